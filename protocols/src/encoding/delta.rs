//! The `delta` body ([`Encoding::Delta`](crate::frame::Encoding::Delta)): a lossless,
//! Gorilla-style encoding of the samples the deadband let through, built for the mobile link
//! class. The hub reconstructs exactly the frame the gateway encoded: the same
//! samples in the same order, floats bit for bit (NaN payloads, ±inf, −0.0), timestamps and
//! sequences exact.
//!
//! Each frame is self-contained (no state carried between frames, so loss, retransmission
//! and reordering of frames cannot corrupt anything). Samples are written in frame order,
//! which must be strictly increasing in sequence (the outbox order), and each field goes to
//! its own column so that zstd, run over the whole body, sees similar bytes together:
//!
//! | column | per sample | content |
//! |--------|------------|---------|
//! | seqs | always | varint `skip` = seq − previous sample's seq − 1 (for the first sample: seq − *first sequence*): how many records the deadband (or another priority class) took out in between; `gap` = `skip + 1` (saturating) |
//! | rows | always | varint `zigzag(idx − (previous idx + min(gap, S))) << 1 \| tag_changed` (`S` streams in the table; the previous index of the first sample is −1): a device's registers enter the outbox one after the other, in stream-table order ([`DataFrame::from_filtered`]), so within a poll the index follows from the gap and this is 0 |
//! | times | always | zigzag(ts − previous sample's ts) (the first against 0): samples of one poll share a timestamp and cost one byte |
//! | tags | when `tag_changed` | the tag byte of the raw block (kind, quality); each stream starts from tag 0 (f64, good), so only kind/quality changes and boolean toggles cost a byte |
//! | codings | first f64 of a stream | varint: `0` XOR, `k ≥ 1` scaled by scale-table entry `k − 1` |
//! | ints | i64 | zigzag(v − the stream's previous i64), wrapping (first against 0) |
//! | scaled | f64, scaled coding | zigzag(n − the stream's previous n), wrapping (first against 0) |
//! | corrections | f64, scaled coding | zigzag(bits(v) − bits(predict(n))), wrapping: 0 when the value is exactly the scaled integer |
//! | xors | f64, XOR coding | `x` = bits(v) XOR the stream's previous f64 bits (first against 0), byte-aligned: `0` if `x = 0`, else a token `1 + 8·tz + (len − 1)` (`tz` trailing zero bytes, `len` meaningful bytes) then those `len` bytes little-endian |
//! | strings | strings | u8 length + UTF-8 bytes |
//!
//! A *scaled* value is `v = predict(n) + correction` with `predict(n) = n × s + o` (op `0`) or
//! `n / s + o` (op `1`), computed in f64 exactly as written (no fused multiply-add): devices
//! deliver ADC counts or fixed-point registers times a scale (`raw × scale + offset`, as
//! [`crate::modbus`] computes it), so the integer `n` moves by a few counts where the f64 bits
//! change all over the mantissa, which is where XOR coding loses. The encoder picks, per
//! stream and frame, the cheaper of XOR and each scale it knows: powers of ten (`× 0.1`,
//! `÷ 10`, …) and scales it detects from the values (the smallest gap between values, snapped
//! so that `n × s` reproduces them bit for bit). The correction column keeps any choice
//! lossless; a good choice makes it all zeros.
//!
//! Block layout (the zstd-compressed payload, see `FRAME_FORMAT.md`): stream table as in the
//! raw block; varint `M` samples; u8 `K` scale entries (≤ [`MAX_SCALES`]), each u8 op + f64
//! `s` + f64 `o` (little-endian IEEE-754); then the ten columns in the order of the table
//! above, each as varint byte length + bytes. Every column must be consumed exactly.

use crate::frame::{
    DataFrame, EncodeError, FrameError, FrameSample, KIND_F64, KIND_I64, KIND_STR,
    MAX_SAMPLES_PER_FRAME, Reader, check_samples, decode_stream_table, encode_stream_table,
    parse_tag, put_short_str, put_varint, unzigzag, value_tag, zigzag,
};
use outpost_runtime::model::{Quality, Value};

/// Most scale-table entries in one delta block.
pub const MAX_SCALES: usize = 32;

/// Number of columns in a delta block.
const COLUMNS: usize = 10;
const C_SEQS: usize = 0;
const C_ROWS: usize = 1;
const C_TIMES: usize = 2;
const C_TAGS: usize = 3;
const C_CODINGS: usize = 4;
const C_INTS: usize = 5;
const C_SCALED: usize = 6;
const C_CORR: usize = 7;
const C_XORS: usize = 8;
const C_STRS: usize = 9;

/// Column names, for [`column_sizes`].
pub const COLUMN_NAMES: [&str; COLUMNS] = [
    "seqs",
    "rows",
    "times",
    "tags",
    "codings",
    "ints",
    "scaled",
    "corrections",
    "xors",
    "strings",
];

/// Per-stream decoder/encoder state within one frame.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StreamState {
    tag: u8,
    bits: u64,
    n: i64,
    int: i64,
    /// 0 = not chosen yet, 1 = XOR, k + 2 = scale entry k.
    coding: u32,
}

/// Heap bytes the decoder keeps per stream-table entry (for `MAX_DECODE_ALLOC`).
pub(crate) const STATE_BYTES: usize = std::mem::size_of::<StreamState>();

/// One entry of the scale table: `predict(n) = n × s + o` or `n / s + o`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scale {
    div: bool,
    s: f64,
    o: f64,
}

impl Scale {
    fn mul(s: f64) -> Scale {
        Scale {
            div: false,
            s,
            o: 0.0,
        }
    }

    fn same(&self, other: &Scale) -> bool {
        self.div == other.div
            && self.s.to_bits() == other.s.to_bits()
            && self.o.to_bits() == other.o.to_bits()
    }

    pub(crate) fn predict(&self, n: i64) -> f64 {
        if self.div {
            n as f64 / self.s + self.o
        } else {
            n as f64 * self.s + self.o
        }
    }

    /// The integer whose prediction is nearest `v` (saturating; 0 for NaN).
    fn quantize(&self, v: f64) -> i64 {
        let q = if self.div {
            (v - self.o) * self.s
        } else {
            (v - self.o) / self.s
        };
        q.round() as i64
    }

    /// `(n, correction)` for `v`.
    pub(crate) fn split(&self, v: f64) -> (i64, u64) {
        let n = self.quantize(v);
        let corr = zigzag(v.to_bits().wrapping_sub(self.predict(n).to_bits()) as i64);
        (n, corr)
    }
}

fn varint_len(v: u64) -> usize {
    (64 - v.leading_zeros() as usize).max(1).div_ceil(7)
}

pub(crate) fn put_xor(out: &mut Vec<u8>, x: u64) {
    if x == 0 {
        out.push(0);
        return;
    }
    let tz = (x.trailing_zeros() / 8) as usize;
    let lz = (x.leading_zeros() / 8) as usize;
    let len = 8 - tz - lz;
    out.push((1 + 8 * tz + (len - 1)) as u8);
    out.extend_from_slice(&(x >> (8 * tz)).to_le_bytes()[..len]);
}

fn xor_len(x: u64) -> usize {
    if x == 0 {
        1
    } else {
        1 + 8 - (x.trailing_zeros() / 8) as usize - (x.leading_zeros() / 8) as usize
    }
}

/// Power-of-ten scales every encoder tries (fixed-point registers: `raw × 0.1`, `raw / 100`).
fn decimal_scales() -> Vec<Scale> {
    let mut v = vec![Scale::mul(1.0)];
    for (m, d) in [
        (0.1, 10.0),
        (0.01, 100.0),
        (0.001, 1000.0),
        (0.0001, 10000.0),
    ] {
        v.push(Scale::mul(m));
        v.push(Scale {
            div: true,
            s: d,
            o: 0.0,
        });
    }
    v
}

/// Whether every value is exactly `scale.predict(quantize(v))`.
fn fits_exactly(scale: &Scale, values: &[f64]) -> bool {
    values.iter().all(|&v| scale.split(v).1 == 0)
}

/// Looks for a multiplicative scale `s` with every value exactly `n × s`: the smallest gap
/// between distinct values is `k × s` for a small `k`; the candidate is snapped with the
/// largest value (`s = v / round(v / s')`) and its neighbouring f64s, and accepted only if it
/// reproduces every value bit for bit.
fn detect_scale(values: &[f64]) -> Option<Scale> {
    let mut vals: Vec<f64> = values
        .iter()
        .copied()
        .filter(|v| v.is_finite() && *v != 0.0)
        .map(f64::abs)
        .collect();
    if vals.len() < 2 {
        return None;
    }
    vals.sort_by(f64::total_cmp);
    vals.dedup();
    let gap = vals
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|d| *d > 0.0)
        .fold(f64::INFINITY, f64::min);
    let top = *vals.last()?;
    if !gap.is_finite() || gap < top * 1e-9 {
        return None;
    }
    for k in 1..=8u32 {
        let approx = gap / f64::from(k);
        let n = (top / approx).round();
        if !(1.0..=9.0e15).contains(&n) {
            continue;
        }
        let base = top / n;
        for d in [0i64, -1, 1, -2, 2] {
            let s = f64::from_bits(base.to_bits().wrapping_add_signed(d));
            let cand = Scale::mul(s);
            if s.is_finite() && s > 0.0 && fits_exactly(&cand, values) {
                return Some(cand);
            }
        }
    }
    None
}

/// Chooses each stream's f64 coding and the frame's scale table.
fn choose_codings(d: &DataFrame) -> (Vec<Scale>, Vec<u32>) {
    let mut per_stream: Vec<Vec<f64>> = vec![Vec::new(); d.streams.len()];
    for s in &d.samples {
        if let Value::F64(v) = s.value {
            per_stream[s.stream as usize].push(v);
        }
    }
    choose_scales(&per_stream)
}

/// Chooses, for each group of f64 values (coded one after the other), XOR (`1`) or a
/// scale-table entry `k` (`k + 2`), and builds the table (≤ [`MAX_SCALES`] entries).
pub(crate) fn choose_scales(per_stream: &[Vec<f64>]) -> (Vec<Scale>, Vec<u32>) {
    let decimals = decimal_scales();
    let mut detected: Vec<Scale> = Vec::new();
    let mut table: Vec<Scale> = Vec::new();
    let mut coding = vec![1u32; per_stream.len()];
    for (i, vals) in per_stream.iter().enumerate() {
        if vals.is_empty() {
            continue;
        }
        // Cost in bytes before zstd; a zero correction is nearly free after it.
        let xor_cost: usize = {
            let mut prev = 0u64;
            vals.iter()
                .map(|v| {
                    let b = v.to_bits();
                    let c = xor_len(b ^ prev);
                    prev = b;
                    c
                })
                .sum()
        };
        let scaled_cost = |sc: &Scale| -> usize {
            let mut prev = 0i64;
            vals.iter()
                .map(|&v| {
                    let (n, corr) = sc.split(v);
                    let c = varint_len(zigzag(n.wrapping_sub(prev)))
                        + if corr == 0 { 0 } else { varint_len(corr) + 1 };
                    prev = n;
                    c
                })
                .sum()
        };
        let mut best: Option<(usize, Scale)> = None;
        let mut consider = |sc: Scale| {
            let c = scaled_cost(&sc);
            if best.is_none_or(|(b, _)| c < b) {
                best = Some((c, sc));
            }
        };
        let exact_known = table
            .iter()
            .chain(&detected)
            .find(|sc| fits_exactly(sc, vals))
            .copied();
        match exact_known {
            Some(sc) => consider(sc),
            None => {
                for sc in &decimals {
                    consider(*sc);
                }
                if let Some(sc) = detect_scale(vals) {
                    detected.push(sc);
                    consider(sc);
                }
            }
        }
        if let Some((cost, sc)) = best
            && cost < xor_cost
        {
            let k = match table.iter().position(|t| t.same(&sc)) {
                Some(k) => Some(k),
                None if table.len() < MAX_SCALES => {
                    table.push(sc);
                    Some(table.len() - 1)
                }
                None => None,
            };
            if let Some(k) = k {
                coding[i] = k as u32 + 2;
            }
        }
    }
    (table, coding)
}

/// Writes the uncompressed delta block of `d` to `out`.
pub(crate) fn encode_block(out: &mut Vec<u8>, d: &DataFrame) -> Result<(), EncodeError> {
    let cols = encode_columns(d)?;
    encode_stream_table(out, &d.streams)?;
    put_varint(out, d.samples.len() as u64);
    put_scales(out, &cols.scales);
    put_columns(out, &cols.columns);
    Ok(())
}

/// Writes a scale table: u8 count, then each entry as u8 op + f64 s + f64 o.
pub(crate) fn put_scales(out: &mut Vec<u8>, scales: &[Scale]) {
    out.push(scales.len() as u8);
    for sc in scales {
        out.push(u8::from(sc.div));
        out.extend_from_slice(&sc.s.to_bits().to_le_bytes());
        out.extend_from_slice(&sc.o.to_bits().to_le_bytes());
    }
}

/// Writes columns, each as varint length + bytes.
pub(crate) fn put_columns(out: &mut Vec<u8>, columns: &[Vec<u8>]) {
    for c in columns {
        put_varint(out, c.len() as u64);
        out.extend_from_slice(c);
    }
}

/// Reads a scale table written by [`put_scales`].
pub(crate) fn read_scales(r: &mut Reader<'_>) -> Result<Vec<Scale>, FrameError> {
    let k = r.u8("scale table")? as usize;
    if k > MAX_SCALES {
        return Err(FrameError::LimitExceeded {
            what: "scale table",
            count: k as u64,
            max: MAX_SCALES,
        });
    }
    let mut scales = Vec::with_capacity(k);
    for _ in 0..k {
        let op = r.u8("scale op")?;
        if op > 1 {
            return Err(malformed("scale op", "unknown operation"));
        }
        let s = f64::from_bits(u64::from_le_bytes(r.array("scale")?));
        let o = f64::from_bits(u64::from_le_bytes(r.array("scale offset")?));
        scales.push(Scale { div: op == 1, s, o });
    }
    Ok(scales)
}

/// Cuts `names.len()` columns (varint length + bytes) off `r`.
pub(crate) fn read_columns<'a>(
    r: &mut Reader<'a>,
    names: &[&'static str],
) -> Result<Vec<Reader<'a>>, FrameError> {
    let mut cols = Vec::with_capacity(names.len());
    for name in names {
        let len = r.varint(name)?;
        if len > r.remaining() as u64 {
            return Err(malformed(name, "column longer than the block"));
        }
        cols.push(Reader::new(r.bytes(len as usize, name)?));
    }
    Ok(cols)
}

struct Columns {
    scales: Vec<Scale>,
    columns: [Vec<u8>; COLUMNS],
}

fn encode_columns(d: &DataFrame) -> Result<Columns, EncodeError> {
    check_samples(d)?;
    let (scales, coding) = choose_codings(d);
    let mut cols: [Vec<u8>; COLUMNS] = Default::default();
    let mut state = vec![StreamState::default(); d.streams.len()];
    let mut prev_idx: i64 = -1;
    let mut prev_seq = d.first_seq;
    let mut prev_ts = 0i64;
    for (i, s) in d.samples.iter().enumerate() {
        if i > 0 && s.seq <= prev_seq {
            return Err(EncodeError::SeqOrder {
                index: i,
                seq: s.seq,
            });
        }
        let idx = i64::from(s.stream);
        // Records left out before this one; the first sample counts from *first sequence*.
        let skip = if i == 0 {
            s.seq - d.first_seq
        } else {
            s.seq - prev_seq - 1
        };
        put_varint(&mut cols[C_SEQS], skip);
        let gap = skip.saturating_add(1);
        let st = &mut state[s.stream as usize];
        let tag = value_tag(s.quality, &s.value);
        let changed = tag != st.tag;
        let step = idx - (prev_idx + gap.min(d.streams.len() as u64) as i64);
        put_varint(&mut cols[C_ROWS], (zigzag(step) << 1) | u64::from(changed));
        put_varint(&mut cols[C_TIMES], zigzag(s.ts_ns.wrapping_sub(prev_ts)));
        if changed {
            cols[C_TAGS].push(tag);
            st.tag = tag;
        }
        match &s.value {
            Value::F64(v) => {
                if st.coding == 0 {
                    st.coding = coding[s.stream as usize];
                    put_varint(&mut cols[C_CODINGS], u64::from(st.coding - 1));
                }
                let bits = v.to_bits();
                if st.coding == 1 {
                    put_xor(&mut cols[C_XORS], bits ^ st.bits);
                } else {
                    let sc = &scales[(st.coding - 2) as usize];
                    let (n, corr) = sc.split(*v);
                    put_varint(&mut cols[C_SCALED], zigzag(n.wrapping_sub(st.n)));
                    put_varint(&mut cols[C_CORR], corr);
                    st.n = n;
                }
                st.bits = bits;
            }
            Value::I64(v) => {
                put_varint(&mut cols[C_INTS], zigzag(v.wrapping_sub(st.int)));
                st.int = *v;
            }
            Value::Bool(_) => {}
            Value::Str(t) => put_short_str(&mut cols[C_STRS], t),
        }
        prev_idx = idx;
        prev_seq = s.seq;
        prev_ts = s.ts_ns;
    }
    Ok(Columns {
        scales,
        columns: cols,
    })
}

/// Where a delta frame's bytes go: per column, its raw length and its length zstd-compressed
/// alone at `zstd_level` (the whole body is compressed together on the wire, so the parts
/// only approximately add up). For benchmarks and tuning.
pub fn column_sizes(
    d: &DataFrame,
    zstd_level: i32,
) -> Result<Vec<(&'static str, usize, usize)>, EncodeError> {
    let cols = encode_columns(d)?;
    let mut out = Vec::new();
    let mut table = Vec::new();
    encode_stream_table(&mut table, &d.streams)?;
    table.push(cols.scales.len() as u8);
    table.resize(table.len() + 17 * cols.scales.len(), 0);
    let z = |b: &[u8]| {
        zstd::bulk::compress(b, zstd_level)
            .map(|v| v.len())
            .map_err(|e| EncodeError::Compress(e.to_string()))
    };
    out.push(("header", table.len(), z(&table)?));
    for (name, c) in COLUMN_NAMES.iter().zip(&cols.columns) {
        out.push((*name, c.len(), z(c)?));
    }
    Ok(out)
}

fn malformed(field: &'static str, reason: &'static str) -> FrameError {
    FrameError::Malformed { field, reason }
}

/// Reads a delta block into `frame` (whose sequence bounds are set).
pub(crate) fn decode_block(block: &[u8], frame: &mut DataFrame) -> Result<(), FrameError> {
    let mut r = Reader::new(block);
    let streams = decode_stream_table(&mut r)?;
    let m = r.varint("samples per frame")?;
    if m > MAX_SAMPLES_PER_FRAME as u64 {
        return Err(FrameError::LimitExceeded {
            what: "samples per frame",
            count: m,
            max: MAX_SAMPLES_PER_FRAME,
        });
    }
    let m = m as usize;
    let scales = read_scales(&mut r)?;
    let mut cols = read_columns(&mut r, &COLUMN_NAMES)?;
    r.finish("delta block")?;
    // Every sample has at least one byte in the rows column.
    if m > cols[C_ROWS].remaining() {
        return Err(malformed("rows column", "shorter than the sample count"));
    }
    let mut state = vec![StreamState::default(); streams.len()];
    let mut samples = Vec::with_capacity(m);
    let mut prev_idx: i64 = -1;
    let mut prev_seq = frame.first_seq;
    let mut prev_ts = 0i64;
    for i in 0..m {
        let skip = cols[C_SEQS].varint("seqs column")?;
        let seq = if i == 0 {
            frame.first_seq.checked_add(skip)
        } else {
            prev_seq.checked_add(skip).and_then(|s| s.checked_add(1))
        };
        let seq = match seq {
            Some(q) if q <= frame.last_seq => q,
            _ => {
                return Err(malformed(
                    "sample sequence",
                    "outside the frame's sequence bounds",
                ));
            }
        };
        let gap = skip.saturating_add(1);
        let row = cols[C_ROWS].varint("rows column")?;
        let idx =
            (prev_idx + gap.min(streams.len() as u64) as i64).wrapping_add(unzigzag(row >> 1));
        if idx < 0 || idx >= streams.len() as i64 {
            return Err(malformed("sample stream index", "outside the stream table"));
        }
        let ts_ns = prev_ts.wrapping_add(unzigzag(cols[C_TIMES].varint("times column")?));
        let st = &mut state[idx as usize];
        if row & 1 == 1 {
            let tag = cols[C_TAGS].u8("tags column")?;
            if tag == st.tag {
                return Err(malformed(
                    "tags column",
                    "a tag change that changes nothing",
                ));
            }
            st.tag = tag;
        }
        let (quality, kind): (Quality, u8) = parse_tag(st.tag)?;
        let value = match kind {
            KIND_F64 => {
                if st.coding == 0 {
                    let c = cols[C_CODINGS].varint("codings column")?;
                    if c > scales.len() as u64 {
                        return Err(malformed("codings column", "no such scale entry"));
                    }
                    st.coding = c as u32 + 1;
                }
                let bits = if st.coding == 1 {
                    st.bits ^ read_xor(&mut cols[C_XORS])?
                } else {
                    let sc = &scales[(st.coding - 2) as usize];
                    let n =
                        st.n.wrapping_add(unzigzag(cols[C_SCALED].varint("scaled column")?));
                    let corr = unzigzag(cols[C_CORR].varint("corrections column")?);
                    st.n = n;
                    sc.predict(n).to_bits().wrapping_add(corr as u64)
                };
                st.bits = bits;
                Value::F64(f64::from_bits(bits))
            }
            KIND_I64 => {
                let v = st
                    .int
                    .wrapping_add(unzigzag(cols[C_INTS].varint("ints column")?));
                st.int = v;
                Value::I64(v)
            }
            KIND_STR => Value::Str(cols[C_STRS].short_str("strings column")?.into()),
            k => Value::Bool(k == crate::frame::KIND_TRUE),
        };
        samples.push(FrameSample {
            stream: idx as u32,
            seq,
            ts_ns,
            quality,
            value,
        });
        prev_idx = idx;
        prev_seq = seq;
        prev_ts = ts_ns;
    }
    for (c, name) in cols.iter().zip(COLUMN_NAMES) {
        c.finish(name)?;
    }
    frame.streams = streams;
    frame.samples = samples;
    Ok(())
}

pub(crate) fn read_xor(r: &mut Reader<'_>) -> Result<u64, FrameError> {
    let token = r.u8("xors column")? as usize;
    if token == 0 {
        return Ok(0);
    }
    if token > 64 {
        return Err(malformed("xors column", "bad token"));
    }
    let tz = (token - 1) / 8;
    let len = (token - 1) % 8 + 1;
    if tz + len > 8 {
        return Err(malformed("xors column", "bad token"));
    }
    let mut b = [0u8; 8];
    b[..len].copy_from_slice(r.bytes(len, "xors column")?);
    Ok(u64::from_le_bytes(b) << (8 * tz))
}
