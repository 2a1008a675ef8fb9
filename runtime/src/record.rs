//! The outbox record format: one sample ↔ bytes, for local storage (not the wire — the
//! wire format is the frame codec in `outpost-protocols`).
//!
//! Layout, version 1 (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | version = 1 |
//! | 1 | 1 | quality (0 good, 1 uncertain, 2 bad) |
//! | 2 | 1 | value tag (0 f64, 1 i64, 2 bool, 3 string) |
//! | 3 | 8 | source timestamp, ns since the epoch (i64) |
//! | 11 | 1 | stream name length n (1..=255) |
//! | 12 | n | stream name, UTF-8 |
//! | 12+n | … | value: 8 bytes (f64/i64), 1 byte (bool), or 1-byte length + UTF-8 |
//!
//! Decoding is total: any bytes give a sample or an error, and allocate at most 255 bytes
//! for the name and 255 for a string value.

use crate::model::{Quality, Sample, StreamId, Value};

const VERSION: u8 = 1;

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record truncated")]
    Truncated,
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("invalid quality code {0}")]
    Quality(u8),
    #[error("invalid value tag {0}")]
    Tag(u8),
    #[error("invalid UTF-8 in record")]
    Utf8,
    #[error("invalid stream name: {0}")]
    Stream(#[from] crate::model::StreamNameError),
    #[error("{0} trailing bytes after the record")]
    Trailing(usize),
}

/// Appends the encoding of `s` to `out`.
pub fn encode_into(s: &Sample, out: &mut Vec<u8>) {
    let name = s.stream.name();
    let tag = match s.value {
        Value::F64(_) => 0,
        Value::I64(_) => 1,
        Value::Bool(_) => 2,
        Value::Str(_) => 3,
    };
    out.extend_from_slice(&[VERSION, s.quality as u8, tag]);
    out.extend_from_slice(&s.ts_ns.to_le_bytes());
    // Names are ≤ 255 bytes by construction (StreamId::intern checks).
    let n = name.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&name.as_bytes()[..n]);
    match &s.value {
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::Str(t) => {
            let n = t.len().min(255);
            out.push(n as u8);
            out.extend_from_slice(&t.as_bytes()[..n]);
        }
    }
}

/// The encoding of `s`.
pub fn encode(s: &Sample) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    encode_into(s, &mut v);
    v
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.b.len() < n {
            return Err(RecordError::Truncated);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn arr8(&mut self) -> Result<[u8; 8], RecordError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(a)
    }
    fn str(&mut self) -> Result<&'a str, RecordError> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| RecordError::Utf8)
    }
}

/// Decodes a record (interning its stream name).
pub fn decode(bytes: &[u8]) -> Result<Sample, RecordError> {
    let mut r = Reader { b: bytes };
    let v = r.u8()?;
    if v != VERSION {
        return Err(RecordError::Version(v));
    }
    let q = r.u8()?;
    let quality = Quality::from_u8(q).ok_or(RecordError::Quality(q))?;
    let tag = r.u8()?;
    let ts_ns = i64::from_le_bytes(r.arr8()?);
    let stream = StreamId::intern(r.str()?)?;
    let value = match tag {
        0 => Value::F64(f64::from_le_bytes(r.arr8()?)),
        1 => Value::I64(i64::from_le_bytes(r.arr8()?)),
        2 => Value::Bool(r.u8()? != 0),
        3 => Value::Str(r.str()?.into()),
        t => return Err(RecordError::Tag(t)),
    };
    if !r.b.is_empty() {
        return Err(RecordError::Trailing(r.b.len()));
    }
    Ok(Sample {
        stream,
        ts_ns,
        value,
        quality,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(v: Value) -> Sample {
        Sample {
            stream: StreamId::intern("rec/test").unwrap(),
            ts_ns: -5,
            value: v,
            quality: Quality::Uncertain,
        }
    }

    #[test]
    fn all_value_kinds_round_trip() {
        for v in [
            Value::F64(1.5),
            Value::I64(i64::MIN),
            Value::Bool(true),
            Value::text("héllo"),
            Value::text(""),
        ] {
            let s = sample(v);
            assert_eq!(decode(&encode(&s)).unwrap(), s);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&sample(Value::text("abc")));
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "prefix {n}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(RecordError::Trailing(1)));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn f64_round_trips(x in any::<f64>(), ts in any::<i64>()) {
            let mut s = sample(Value::F64(x));
            s.ts_ns = ts;
            let d = decode(&encode(&s)).unwrap();
            prop_assert_eq!(d.ts_ns, ts);
            match d.value { Value::F64(y) => prop_assert_eq!(y.to_bits(), x.to_bits()), _ => prop_assert!(false) }
        }
    }
}
