//! The outbox's unit of storage: a *segment* holds the records of one append of one
//! priority class, with consecutive sequence numbers, encoded once and stored under one key.
//! A reading then costs a small share of one storage operation instead of several.
//!
//! Pure codecs, no I/O: [`SegmentBuf`] builds a segment value, [`Segment::parse`] checks and
//! reads one back, and [`AckMask`] records which records of a partially acknowledged segment
//! the hub has already acknowledged (stored beside the segment, so the acknowledged part is
//! never sent again after a restart).
//!
//! Segment value layout (integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | magic `0x53` (`S`): distinguishes a segment from a one-record value of format 1 |
//! | 1 | 1 | segment format = 1 |
//! | 2 | 4 | record count n (≥ 1) |
//! | 6 | 4 | CRC-32C of the body |
//! | 10 | … | body: n × (LEB128 length, record bytes) |
//!
//! Ack mask value: sorted, disjoint, non-adjacent ranges of acknowledged record offsets
//! within the segment, each as `start u32 LE, end u32 LE` (end exclusive).
//!
//! Decoding is total: any bytes give a segment or an error, and allocate nothing.

const MAGIC: u8 = 0x53;
const FORMAT: u8 = 1;
/// Bytes before the body.
pub const HEADER_LEN: usize = 10;
/// Most records in one segment.
pub const MAX_RECORDS: u32 = 1 << 24;

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Why a stored segment cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("segment truncated ({0} bytes)")]
    Truncated(usize),
    #[error("not a segment (magic {0:#04x})")]
    Magic(u8),
    #[error("unknown segment format {0}")]
    Format(u8),
    #[error("segment record count {0} out of range")]
    Count(u32),
    #[error("segment checksum mismatch (torn or corrupt write)")]
    Checksum,
    #[error("segment body malformed at record {0}")]
    Body(u32),
}

/// Builds one segment value, record by record.
#[derive(Debug, Clone)]
pub struct SegmentBuf {
    buf: Vec<u8>,
    count: u32,
}

impl Default for SegmentBuf {
    fn default() -> Self {
        SegmentBuf::new()
    }
}

impl SegmentBuf {
    /// An empty segment.
    pub fn new() -> SegmentBuf {
        SegmentBuf::with_capacity(0)
    }

    /// An empty segment with room for `bytes` of records.
    pub fn with_capacity(bytes: usize) -> SegmentBuf {
        let mut buf = Vec::with_capacity(HEADER_LEN + bytes);
        buf.extend_from_slice(&[MAGIC, FORMAT]);
        buf.extend_from_slice(&[0; 8]);
        SegmentBuf { buf, count: 0 }
    }

    /// Records in the segment.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the value [`finish`](Self::finish) returns.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Appends one record.
    pub fn push(&mut self, record: &[u8]) {
        self.push_with(|b| b.extend_from_slice(record));
    }

    /// Appends one record that `write` appends to the buffer it is given (encoding straight
    /// into the segment, without a buffer of its own).
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let at = self.buf.len();
        self.buf.push(0); // length placeholder: one byte covers records under 128 bytes
        write(&mut self.buf);
        let len = self.buf.len() - at - 1;
        if len < 0x80 {
            self.buf[at] = len as u8;
        } else {
            let mut v = [0u8; 5];
            let n = leb128(len as u32, &mut v);
            self.buf[at] = v[0];
            self.buf.splice(at + 1..at + 1, v[1..n].iter().copied());
        }
        self.count += 1;
    }

    /// The segment value (header filled in). The buffer is left empty for reuse.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        out[2..6].copy_from_slice(&self.count.to_le_bytes());
        let crc = CRC.checksum(&out[HEADER_LEN..]);
        out[6..10].copy_from_slice(&crc.to_le_bytes());
        *self = SegmentBuf::new();
        out
    }
}

fn leb128(mut v: u32, out: &mut [u8; 5]) -> usize {
    let mut n = 0;
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out[n] = b;
            return n + 1;
        }
        out[n] = b | 0x80;
        n += 1;
    }
}

/// A stored segment, checked.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    count: u32,
    body: &'a [u8],
}

/// Whether `value` looks like a segment (rather than a format-1 single record).
pub fn is_segment(value: &[u8]) -> bool {
    value.first() == Some(&MAGIC)
}

/// The record count of a segment value, from its header alone (no checksum check).
pub fn peek_count(value: &[u8]) -> Result<u32, SegmentError> {
    if value.len() < HEADER_LEN {
        return Err(SegmentError::Truncated(value.len()));
    }
    if value[0] != MAGIC {
        return Err(SegmentError::Magic(value[0]));
    }
    if value[1] != FORMAT {
        return Err(SegmentError::Format(value[1]));
    }
    let mut c = [0u8; 4];
    c.copy_from_slice(&value[2..6]);
    let count = u32::from_le_bytes(c);
    if count == 0 || count > MAX_RECORDS {
        return Err(SegmentError::Count(count));
    }
    Ok(count)
}

impl<'a> Segment<'a> {
    /// Checks the header and checksum of a stored value.
    pub fn parse(value: &'a [u8]) -> Result<Segment<'a>, SegmentError> {
        let count = peek_count(value)?;
        let mut c = [0u8; 4];
        c.copy_from_slice(&value[6..10]);
        let body = &value[HEADER_LEN..];
        if CRC.checksum(body) != u32::from_le_bytes(c) {
            return Err(SegmentError::Checksum);
        }
        Ok(Segment { count, body })
    }

    /// Records in the segment.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The records in order, with their offsets in the segment. A malformed body (which a
    /// correct checksum makes a bug of the writer, not a torn write) ends the iteration with
    /// an error.
    pub fn records(&self) -> Records<'a> {
        Records {
            rest: self.body,
            next: 0,
            count: self.count,
        }
    }
}

/// Iterator over a segment's records: `(offset, bytes)`.
pub struct Records<'a> {
    rest: &'a [u8],
    next: u32,
    count: u32,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<(u32, &'a [u8]), SegmentError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.count {
            return None;
        }
        let i = self.next;
        let bad = || Some(Err(SegmentError::Body(i)));
        let mut len: u32 = 0;
        let mut shift = 0;
        let mut used = 0;
        loop {
            let Some(&b) = self.rest.get(used) else {
                self.next = self.count;
                return bad();
            };
            used += 1;
            if shift > 28 {
                self.next = self.count;
                return bad();
            }
            len |= u32::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let len = len as usize;
        if self.rest.len() - used < len {
            self.next = self.count;
            return bad();
        }
        let rec = &self.rest[used..used + len];
        self.rest = &self.rest[used + len..];
        self.next += 1;
        Some(Ok((i, rec)))
    }
}

/// Which records of a segment are acknowledged: sorted, disjoint, non-adjacent ranges of
/// offsets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckMask {
    ranges: Vec<(u32, u32)>,
}

impl AckMask {
    /// Nothing acknowledged.
    pub fn new() -> AckMask {
        AckMask::default()
    }

    /// Reads a stored mask; `None` when malformed (a mask is advisory: losing it only means
    /// records are sent again, which the hub de-duplicates).
    pub fn decode(v: &[u8]) -> Option<AckMask> {
        if !v.len().is_multiple_of(8) {
            return None;
        }
        let mut ranges: Vec<(u32, u32)> = Vec::with_capacity(v.len() / 8);
        for c in v.chunks_exact(8) {
            let a = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            let b = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
            if a >= b || ranges.last().is_some_and(|l| l.1 >= a) {
                return None;
            }
            ranges.push((a, b));
        }
        Some(AckMask { ranges })
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.ranges.len() * 8);
        for (a, b) in &self.ranges {
            v.extend_from_slice(&a.to_le_bytes());
            v.extend_from_slice(&b.to_le_bytes());
        }
        v
    }

    /// Whether offset `i` is acknowledged.
    pub fn contains(&self, i: u32) -> bool {
        let k = self.ranges.partition_point(|r| r.1 <= i);
        self.ranges.get(k).is_some_and(|r| r.0 <= i)
    }

    /// Offsets acknowledged.
    pub fn acked(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| u64::from(b - a)).sum()
    }

    /// Whether every one of `count` offsets is acknowledged.
    pub fn covers(&self, count: u32) -> bool {
        self.ranges.len() == 1 && self.ranges[0] == (0, count)
    }

    /// Marks `[a, b)` acknowledged; returns how many offsets were new.
    pub fn insert(&mut self, a: u32, b: u32) -> u64 {
        if a >= b {
            return 0;
        }
        let before = self.acked();
        // Ranges touching or overlapping [a, b) merge with it.
        let lo = self.ranges.partition_point(|r| r.1 < a);
        let hi = self.ranges.partition_point(|r| r.0 <= b);
        let (mut na, mut nb) = (a, b);
        if lo < hi {
            na = na.min(self.ranges[lo].0);
            nb = nb.max(self.ranges[hi - 1].1);
        }
        self.ranges.splice(lo..hi, [(na, nb)]);
        self.acked() - before
    }

    /// The ranges.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_long_records() {
        let mut s = SegmentBuf::new();
        s.push(b"a");
        s.push(&[7u8; 127]);
        s.push(&[8u8; 128]);
        s.push(&[9u8; 70_000]);
        s.push_with(|b| b.extend_from_slice(b"xyz"));
        assert_eq!(s.len(), 5);
        let v = s.finish();
        assert!(s.is_empty());
        assert!(is_segment(&v));
        let seg = Segment::parse(&v).unwrap();
        assert_eq!(seg.count(), 5);
        let recs: Vec<(u32, Vec<u8>)> = seg
            .records()
            .map(|r| r.map(|(i, b)| (i, b.to_vec())))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(recs[0], (0, b"a".to_vec()));
        assert_eq!(recs[1].1.len(), 127);
        assert_eq!(recs[2].1, vec![8u8; 128]);
        assert_eq!(recs[3].1.len(), 70_000);
        assert_eq!(recs[4], (4, b"xyz".to_vec()));
    }

    #[test]
    fn torn_and_hostile_values_are_errors() {
        let mut s = SegmentBuf::new();
        for i in 0..10u8 {
            s.push(&[i; 20]);
        }
        let v = s.finish();
        for cut in 0..v.len() {
            assert!(Segment::parse(&v[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = v.clone();
        flipped[HEADER_LEN + 3] ^= 1;
        assert_eq!(
            Segment::parse(&flipped).unwrap_err(),
            SegmentError::Checksum
        );
        assert!(matches!(
            Segment::parse(&[1, 0, 0]),
            Err(SegmentError::Truncated(3))
        ));
        let mut zero = v.clone();
        zero[2..6].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(peek_count(&zero).unwrap_err(), SegmentError::Count(0));
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panic(v in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(seg) = Segment::parse(&v) {
                for r in seg.records() { let _ = r; }
            }
            let _ = AckMask::decode(&v);
        }

        #[test]
        fn mask_matches_a_set(ops in proptest::collection::vec((0u32..64, 0u32..8), 0..40)) {
            let mut m = AckMask::new();
            let mut set = std::collections::BTreeSet::new();
            for (a, n) in ops {
                let new = (a..a + n).filter(|i| set.insert(*i)).count() as u64;
                prop_assert_eq!(m.insert(a, a + n), new);
                prop_assert_eq!(AckMask::decode(&m.encode()), Some(m.clone()));
            }
            for i in 0..80 {
                prop_assert_eq!(m.contains(i), set.contains(&i));
            }
            prop_assert_eq!(m.acked(), set.len() as u64);
            let full = !set.is_empty() && set.len() as u32 == *set.iter().max().unwrap() + 1;
            prop_assert_eq!(m.covers(set.len() as u32), full);
        }
    }
}
