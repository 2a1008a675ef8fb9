//! The `summary` sync mode (satellite links): per stream and time window, min, max,
//! mean, stddev, last, count, first/last timestamps and the sequence range covered — and the
//! wire form of those aggregates ([`Encoding::Summary`]).
//!
//! # Aggregation
//!
//! [`SummaryAggregator`] is pure: windows are aligned on the sample timestamps
//! (`[k·w, (k+1)·w)` ns since the epoch, `w` from [`SummaryConfig::window_ms`]), never on a
//! clock. Numeric samples (finite f64, and i64 as f64) feed min/max and a Welford mean and
//! (population) standard deviation, numerically stable over long windows; non-numeric samples
//! (booleans, strings, NaN/±inf) only count and can be the window's *last* value. The sync
//! actor pushes the records it would otherwise send, then calls
//! [`SummaryAggregator::close_until`] with a watermark (now minus the allowed lateness): every
//! window that ends at or before it is emitted. A sample arriving for an already emitted
//! window opens a new, partial summary of that window; two summaries of one stream and window
//! combine exactly with [`WindowSummary::merge`] (Chan et al.'s parallel variance), so the hub
//! may merge them or keep both.
//!
//! # What happens to the raw samples
//!
//! A summary frame acknowledges nothing it summarizes ([`crate::frame::Ack::for_frame`] lists
//! only the frame's raw samples), so the summarized records stay in the outbox and are
//! backfilled as bulk when the link allows; the hub de-duplicates by sequence as always.
//! Summary frames are best-effort: a lost one is not resent (its data arrives with the
//! backfill). **Critical alarms always pass through raw**: the sync actor never summarizes
//! control or critical records ([`super::encoding_for`] sends them as full zstd frames); a
//! summary frame may also carry raw samples itself (its `samples`, acknowledged as usual).
//!
//! # Wire form
//!
//! The Summary payload is `u32 U` + zstd frames decompressing to exactly `U` bytes (as for
//! zstd), of: the raw sample block (stream table, raw samples — possibly none); varint `K`
//! summaries (≤ [`MAX_SUMMARIES_PER_FRAME`]); a scale table as in the delta block; then eleven
//! columns, each varint byte length + bytes, consumed exactly. Per summary, in order:
//!
//! | column | content |
//! |--------|---------|
//! | streams | zigzag(stream index − previous summary's index − 1), the first against −1 |
//! | windows | zigzag(window start − previous summary's window start, first against 0); varint window length ns (≥ 1) |
//! | times | zigzag(first timestamp − window start); varint(last timestamp − first timestamp) |
//! | seqs | zigzag(first sequence − previous summary's first sequence, the first against the frame's first sequence); varint(last − first); all within the frame's bounds |
//! | counts | varint count (≥ 1); if numeric, varint(count − n) (< count) |
//! | tags | the last value's tag (as in the raw block), bit 6 set if numeric statistics follow |
//! | lasts | the last value's payload (as in the raw block), unless numeric statistics follow and the last value is an f64 (then it is coded with min and max) |
//! | codings | if numeric: varint `0` XOR, `k ≥ 1` scale entry `k − 1` |
//! | scaled, corrections | if numeric and scaled: for min, max (and an f64 last), zigzag(n − previous n, the first against 0) and varint zigzag correction, as in the delta block |
//! | floats | if numeric: with XOR coding, min, max (and an f64 last) as XOR tokens against the previous one (the first against 0); then always mean XOR min and stddev XOR 0 as tokens |
//!
//! min, max and last are sample values, so they are scaled integers whenever the samples are;
//! mean and stddev are computed and travel as full f64s. Everything round-trips bit for bit.

use std::collections::{BTreeMap, HashMap};

use outpost_runtime::config::GatewayId;
use outpost_runtime::model::{MAX_STR_LEN, Priority, Quality, Sample, StreamId, Value};
use serde::{Deserialize, Serialize};

use crate::encoding::delta;
use crate::frame::{
    DataFrame, EncodeError, Encoding, FrameError, Reader, parse_tag, put_value_payload, put_varint,
    read_value_payload, unzigzag, value_tag, zigzag,
};

/// Most window summaries in one frame.
pub const MAX_SUMMARIES_PER_FRAME: usize = 16_384;

/// Most open windows per stream before the oldest is emitted early (bounds memory when
/// timestamps scatter over many windows).
pub const MAX_OPEN_WINDOWS_PER_STREAM: usize = 8;

/// Configuration of the summary mode (`[sync.summary]`).
///
/// ```toml
/// [sync.summary]
/// window_ms = 10000
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryConfig {
    /// Window length in ms (> 0).
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
}

fn default_window_ms() -> u64 {
    10_000
}

impl Default for SummaryConfig {
    fn default() -> Self {
        SummaryConfig {
            window_ms: default_window_ms(),
        }
    }
}

/// A summary configuration the aggregator cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("summary window_ms must be between 1 and 2^40, got {0}")]
pub struct SummaryConfigError(pub u64);

/// Statistics of a window's numeric samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NumericStats {
    /// Numeric samples (finite f64 or i64), ≥ 1.
    pub n: u64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Arithmetic mean (Welford).
    pub mean: f64,
    /// Population standard deviation, `sqrt(Σ(x − mean)² / n)`.
    pub stddev: f64,
}

/// The aggregate of one stream over one window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowSummary {
    /// Window start, ns since the epoch (a multiple of `window_ns`).
    pub window_start_ns: i64,
    /// Window length, ns (≥ 1).
    pub window_ns: u64,
    /// Earliest sample timestamp in the window.
    pub first_ts_ns: i64,
    /// Latest sample timestamp in the window (≥ `first_ts_ns`).
    pub last_ts_ns: i64,
    /// Lowest sequence summarized (other streams' sequences interleave: a bound, not a claim).
    pub first_seq: u64,
    /// Highest sequence summarized.
    pub last_seq: u64,
    /// Samples summarized (≥ 1).
    pub count: u64,
    /// Value of the latest sample (by timestamp; the later pushed on a tie).
    pub last: Value,
    /// Quality of that sample.
    pub last_quality: Quality,
    /// Statistics of the numeric samples, if there were any.
    pub numeric: Option<NumericStats>,
}

impl WindowSummary {
    /// Combines two summaries of the same stream and window (for example a partial one made
    /// by a late sample) into the summary of all their samples.
    pub fn merge(&self, other: &WindowSummary) -> WindowSummary {
        let later = other.last_ts_ns >= self.last_ts_ns;
        let (last, last_quality) = if later {
            (other.last.clone(), other.last_quality)
        } else {
            (self.last.clone(), self.last_quality)
        };
        let numeric = match (self.numeric, other.numeric) {
            (Some(a), Some(b)) => {
                let n = a.n + b.n;
                let (na, nb, nn) = (a.n as f64, b.n as f64, n as f64);
                let delta = b.mean - a.mean;
                let mean = a.mean + delta * nb / nn;
                let m2 = a.stddev * a.stddev * na
                    + b.stddev * b.stddev * nb
                    + delta * delta * na * nb / nn;
                Some(NumericStats {
                    n,
                    min: a.min.min(b.min),
                    max: a.max.max(b.max),
                    mean,
                    stddev: (m2 / nn).max(0.0).sqrt(),
                })
            }
            (a, b) => a.or(b),
        };
        WindowSummary {
            window_start_ns: self.window_start_ns,
            window_ns: self.window_ns,
            first_ts_ns: self.first_ts_ns.min(other.first_ts_ns),
            last_ts_ns: self.last_ts_ns.max(other.last_ts_ns),
            first_seq: self.first_seq.min(other.first_seq),
            last_seq: self.last_seq.max(other.last_seq),
            count: self.count.saturating_add(other.count),
            last,
            last_quality,
            numeric,
        }
    }
}

/// A closed window of one stream, as the aggregator emits it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSummary {
    /// The stream.
    pub stream: StreamId,
    /// Its aggregate.
    pub summary: WindowSummary,
}

/// A window summary inside a [`DataFrame`]: the stream is an index into the frame's table.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameSummary {
    /// Index into [`DataFrame::streams`].
    pub stream: u32,
    /// The aggregate.
    pub summary: WindowSummary,
}

#[derive(Debug, Clone)]
struct Acc {
    first_ts: i64,
    last_ts: i64,
    first_seq: u64,
    last_seq: u64,
    count: u64,
    last: Value,
    last_quality: Quality,
    n: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
}

impl Acc {
    fn new(seq: u64, s: &Sample) -> Acc {
        let mut a = Acc {
            first_ts: s.ts_ns,
            last_ts: s.ts_ns,
            first_seq: seq,
            last_seq: seq,
            count: 0,
            last: s.value.clone(),
            last_quality: s.quality,
            n: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        };
        a.push(seq, s);
        a
    }

    fn push(&mut self, seq: u64, s: &Sample) {
        self.count += 1;
        self.first_seq = self.first_seq.min(seq);
        self.last_seq = self.last_seq.max(seq);
        self.first_ts = self.first_ts.min(s.ts_ns);
        if s.ts_ns >= self.last_ts {
            self.last_ts = s.ts_ns;
            self.last = s.value.clone();
            self.last_quality = s.quality;
        }
        let x = match s.value {
            Value::F64(v) if v.is_finite() => v,
            Value::I64(v) => v as f64,
            _ => return,
        };
        self.n += 1;
        let delta = x - self.mean;
        self.mean += delta / self.n as f64;
        self.m2 += delta * (x - self.mean);
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    fn finish(self, window: i64, window_ns: u64) -> WindowSummary {
        let numeric = (self.n > 0).then(|| NumericStats {
            n: self.n,
            min: self.min,
            max: self.max,
            mean: self.mean,
            stddev: (self.m2 / self.n as f64).max(0.0).sqrt(),
        });
        WindowSummary {
            window_start_ns: window.saturating_mul(window_ns as i64),
            window_ns,
            first_ts_ns: self.first_ts,
            last_ts_ns: self.last_ts,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            count: self.count,
            last: self.last,
            last_quality: self.last_quality,
            numeric,
        }
    }
}

/// Builds per-stream, per-window summaries from samples (see the module docs).
#[derive(Debug, Clone)]
pub struct SummaryAggregator {
    window_ns: u64,
    open: HashMap<StreamId, BTreeMap<i64, Acc>>,
}

impl SummaryAggregator {
    /// An aggregator with no open window.
    pub fn new(cfg: &SummaryConfig) -> Result<SummaryAggregator, SummaryConfigError> {
        if cfg.window_ms == 0 || cfg.window_ms > 1 << 40 {
            return Err(SummaryConfigError(cfg.window_ms));
        }
        Ok(SummaryAggregator {
            window_ns: cfg.window_ms * 1_000_000,
            open: HashMap::new(),
        })
    }

    /// Window length in ns.
    pub fn window_ns(&self) -> u64 {
        self.window_ns
    }

    /// Number of open windows over all streams.
    pub fn open_windows(&self) -> usize {
        self.open.values().map(BTreeMap::len).sum()
    }

    /// Adds outbox record `(seq, sample)` to its stream's window. Returns a summary only when
    /// the stream already had [`MAX_OPEN_WINDOWS_PER_STREAM`] open windows: the oldest is then
    /// closed early.
    pub fn push(&mut self, seq: u64, s: &Sample) -> Option<StreamSummary> {
        let w = s.ts_ns.div_euclid(self.window_ns as i64);
        let windows = self.open.entry(s.stream).or_default();
        if let Some(acc) = windows.get_mut(&w) {
            acc.push(seq, s);
            return None;
        }
        windows.insert(w, Acc::new(seq, s));
        if windows.len() > MAX_OPEN_WINDOWS_PER_STREAM {
            let (ow, acc) = windows.pop_first()?;
            return Some(StreamSummary {
                stream: s.stream,
                summary: acc.finish(ow, self.window_ns),
            });
        }
        None
    }

    /// Closes every window that ends at or before `watermark_ns`, oldest first per stream.
    pub fn close_until(&mut self, watermark_ns: i64) -> Vec<StreamSummary> {
        let mut out = Vec::new();
        let wn = self.window_ns as i64;
        for (stream, windows) in &mut self.open {
            while let Some(entry) = windows.first_entry() {
                let end = entry.key().saturating_add(1).saturating_mul(wn);
                if end > watermark_ns {
                    break;
                }
                let w = *entry.key();
                let acc = entry.remove();
                out.push(StreamSummary {
                    stream: *stream,
                    summary: acc.finish(w, self.window_ns),
                });
            }
        }
        self.open.retain(|_, w| !w.is_empty());
        out.sort_by_key(|s| (s.summary.window_start_ns, s.stream.index()));
        out
    }

    /// Closes every open window.
    pub fn flush(&mut self) -> Vec<StreamSummary> {
        self.close_until(i64::MAX)
    }
}

impl DataFrame {
    /// Builds a summary frame ([`Encoding::Summary`], no raw samples) from closed windows;
    /// the stream table and the sequence bounds are derived from them.
    pub fn from_summaries(
        gateway_id: &GatewayId,
        priority: Priority,
        summaries: &[StreamSummary],
    ) -> DataFrame {
        let mut index: HashMap<StreamId, u32> = HashMap::new();
        let mut streams = Vec::new();
        let mut out = Vec::with_capacity(summaries.len());
        let (mut lo, mut hi) = (u64::MAX, u64::MIN);
        for s in summaries {
            let next = streams.len() as u32;
            let idx = *index.entry(s.stream).or_insert_with(|| {
                streams.push(s.stream.name().to_string());
                next
            });
            lo = lo.min(s.summary.first_seq);
            hi = hi.max(s.summary.last_seq);
            out.push(FrameSummary {
                stream: idx,
                summary: s.summary.clone(),
            });
        }
        if out.is_empty() {
            (lo, hi) = (0, 0);
        }
        DataFrame {
            gateway_id: gateway_id.clone(),
            priority,
            encoding: Encoding::Summary,
            first_seq: lo,
            last_seq: hi,
            streams,
            samples: Vec::new(),
            summaries: out,
        }
    }
}

fn bad(reason: &'static str) -> EncodeError {
    EncodeError::Summary(reason)
}

const SUMMARY_COLUMNS: [&str; 11] = [
    "summary streams",
    "summary windows",
    "summary times",
    "summary seqs",
    "summary counts",
    "summary tags",
    "summary lasts",
    "summary codings",
    "summary scaled",
    "summary corrections",
    "summary floats",
];
const S_STREAMS: usize = 0;
const S_WINDOWS: usize = 1;
const S_TIMES: usize = 2;
const S_SEQS: usize = 3;
const S_COUNTS: usize = 4;
const S_TAGS: usize = 5;
const S_LASTS: usize = 6;
const S_CODINGS: usize = 7;
const S_SCALED: usize = 8;
const S_CORR: usize = 9;
const S_FLOATS: usize = 10;

/// The f64s of a numeric summary coded as a group: min, max, and the last value if it is an
/// f64.
fn coded_values(w: &WindowSummary) -> Vec<f64> {
    let Some(n) = &w.numeric else {
        return Vec::new();
    };
    let mut v = vec![n.min, n.max];
    if let Value::F64(x) = w.last {
        v.push(x);
    }
    v
}

fn check_summary(d: &DataFrame, index: usize, f: &FrameSummary) -> Result<(), EncodeError> {
    let w = &f.summary;
    if f.stream as usize >= d.streams.len() {
        return Err(EncodeError::StreamIndex {
            index,
            stream: f.stream,
            streams: d.streams.len(),
        });
    }
    if w.window_ns == 0 {
        return Err(bad("window length must be at least 1 ns"));
    }
    if w.count == 0 {
        return Err(bad("count must be at least 1"));
    }
    if w.last_ts_ns < w.first_ts_ns {
        return Err(bad("last timestamp before first timestamp"));
    }
    if w.first_seq > w.last_seq || w.first_seq < d.first_seq || w.last_seq > d.last_seq {
        return Err(EncodeError::SeqOutOfRange {
            seq: w.first_seq,
            first: d.first_seq,
            last: d.last_seq,
        });
    }
    if let Value::Str(t) = &w.last
        && t.len() > MAX_STR_LEN
    {
        return Err(EncodeError::StringTooLong(t.len()));
    }
    if let Some(n) = &w.numeric
        && (n.n == 0 || n.n > w.count)
    {
        return Err(bad("numeric count must be in 1..=count"));
    }
    Ok(())
}

/// Appends the summaries section of `d` (after its raw sample block): varint `K`, a scale
/// table, then eleven columns (see `FRAME_FORMAT.md`).
pub(crate) fn encode_summaries(out: &mut Vec<u8>, d: &DataFrame) -> Result<(), EncodeError> {
    if d.summaries.len() > MAX_SUMMARIES_PER_FRAME {
        return Err(EncodeError::LimitExceeded {
            what: "summaries per frame",
            count: d.summaries.len(),
            max: MAX_SUMMARIES_PER_FRAME,
        });
    }
    for (i, f) in d.summaries.iter().enumerate() {
        check_summary(d, i, f)?;
    }
    let groups: Vec<Vec<f64>> = d
        .summaries
        .iter()
        .map(|f| coded_values(&f.summary))
        .collect();
    let (scales, coding) = delta::choose_scales(&groups);
    let mut c: [Vec<u8>; 11] = Default::default();
    let mut prev_idx: i64 = -1;
    let mut prev_start = 0i64;
    let mut prev_first = d.first_seq;
    for (f, code) in d.summaries.iter().zip(&coding) {
        let w = &f.summary;
        let idx = i64::from(f.stream);
        put_varint(&mut c[S_STREAMS], zigzag(idx - prev_idx - 1));
        prev_idx = idx;
        put_varint(
            &mut c[S_WINDOWS],
            zigzag(w.window_start_ns.wrapping_sub(prev_start)),
        );
        put_varint(&mut c[S_WINDOWS], w.window_ns);
        prev_start = w.window_start_ns;
        put_varint(
            &mut c[S_TIMES],
            zigzag(w.first_ts_ns.wrapping_sub(w.window_start_ns)),
        );
        put_varint(
            &mut c[S_TIMES],
            w.last_ts_ns.wrapping_sub(w.first_ts_ns) as u64,
        );
        put_varint(
            &mut c[S_SEQS],
            zigzag(w.first_seq.wrapping_sub(prev_first) as i64),
        );
        put_varint(&mut c[S_SEQS], w.last_seq - w.first_seq);
        prev_first = w.first_seq;
        put_varint(&mut c[S_COUNTS], w.count);
        let flag = if w.numeric.is_some() { 0x40 } else { 0 };
        c[S_TAGS].push(value_tag(w.last_quality, &w.last) | flag);
        let Some(n) = &w.numeric else {
            put_value_payload(&mut c[S_LASTS], &w.last);
            continue;
        };
        put_varint(&mut c[S_COUNTS], w.count - n.n);
        if !matches!(w.last, Value::F64(_)) {
            put_value_payload(&mut c[S_LASTS], &w.last);
        }
        put_varint(&mut c[S_CODINGS], u64::from(code - 1));
        let vals = coded_values(w);
        if *code == 1 {
            let mut prev = 0u64;
            for v in &vals {
                delta::put_xor(&mut c[S_FLOATS], v.to_bits() ^ prev);
                prev = v.to_bits();
            }
        } else {
            let sc = &scales[(code - 2) as usize];
            let mut prev = 0i64;
            for v in &vals {
                let (q, corr) = sc.split(*v);
                put_varint(&mut c[S_SCALED], zigzag(q.wrapping_sub(prev)));
                put_varint(&mut c[S_CORR], corr);
                prev = q;
            }
        }
        delta::put_xor(&mut c[S_FLOATS], n.mean.to_bits() ^ n.min.to_bits());
        delta::put_xor(&mut c[S_FLOATS], n.stddev.to_bits());
    }
    put_varint(out, d.summaries.len() as u64);
    delta::put_scales(out, &scales);
    delta::put_columns(out, &c);
    Ok(())
}

fn malformed(field: &'static str, reason: &'static str) -> FrameError {
    FrameError::Malformed { field, reason }
}

/// Reads the summaries section into `frame` (stream table and bounds already set).
pub(crate) fn decode_summaries(
    r: &mut Reader<'_>,
    frame: &mut DataFrame,
) -> Result<(), FrameError> {
    let k = r.varint("summaries per frame")?;
    if k > MAX_SUMMARIES_PER_FRAME as u64 {
        return Err(FrameError::LimitExceeded {
            what: "summaries per frame",
            count: k,
            max: MAX_SUMMARIES_PER_FRAME,
        });
    }
    let k = k as usize;
    let scales = delta::read_scales(r)?;
    let mut c = delta::read_columns(r, &SUMMARY_COLUMNS)?;
    // Every summary has at least one byte in the tags column.
    if k > c[S_TAGS].remaining() {
        return Err(malformed("summary tags", "shorter than the summary count"));
    }
    let mut out = Vec::with_capacity(k);
    let mut prev_idx: i64 = -1;
    let mut prev_start = 0i64;
    let mut prev_first = frame.first_seq;
    for _ in 0..k {
        let idx = prev_idx
            .wrapping_add(1)
            .wrapping_add(unzigzag(c[S_STREAMS].varint("summary streams")?));
        if idx < 0 || idx >= frame.streams.len() as i64 {
            return Err(malformed(
                "summary stream index",
                "outside the stream table",
            ));
        }
        prev_idx = idx;
        let window_start_ns =
            prev_start.wrapping_add(unzigzag(c[S_WINDOWS].varint("summary windows")?));
        prev_start = window_start_ns;
        let window_ns = c[S_WINDOWS].varint("summary windows")?;
        if window_ns == 0 {
            return Err(malformed("summary window length", "zero"));
        }
        let first_ts_ns =
            window_start_ns.wrapping_add(unzigzag(c[S_TIMES].varint("summary times")?));
        let last_ts_ns = first_ts_ns
            .checked_add_unsigned(c[S_TIMES].varint("summary times")?)
            .ok_or(malformed("summary last timestamp", "overflows"))?;
        let first_seq = prev_first.wrapping_add(unzigzag(c[S_SEQS].varint("summary seqs")?) as u64);
        prev_first = first_seq;
        let last_seq = first_seq
            .checked_add(c[S_SEQS].varint("summary seqs")?)
            .ok_or(malformed("summary last sequence", "overflows"))?;
        if first_seq < frame.first_seq || last_seq > frame.last_seq {
            return Err(malformed(
                "summary sequences",
                "outside the frame's sequence bounds",
            ));
        }
        let count = c[S_COUNTS].varint("summary counts")?;
        if count == 0 {
            return Err(malformed("summary count", "zero"));
        }
        let tag = c[S_TAGS].u8("summary tags")?;
        let (last_quality, kind) = parse_tag(tag & !0x40)?;
        let (last, numeric) = if tag & 0x40 == 0 {
            (read_value_payload(&mut c[S_LASTS], kind)?, None)
        } else {
            let missing = c[S_COUNTS].varint("summary counts")?;
            if missing >= count {
                return Err(malformed("summary numeric count", "not in 1..=count"));
            }
            let last_is_f64 = kind == crate::frame::KIND_F64;
            let other = if last_is_f64 {
                None
            } else {
                Some(read_value_payload(&mut c[S_LASTS], kind)?)
            };
            let code = c[S_CODINGS].varint("summary codings")?;
            if code > scales.len() as u64 {
                return Err(malformed("summary codings", "no such scale entry"));
            }
            let mut vals = [0f64; 3];
            let nvals = if last_is_f64 { 3 } else { 2 };
            if code == 0 {
                let mut prev = 0u64;
                for v in vals.iter_mut().take(nvals) {
                    prev ^= delta::read_xor(&mut c[S_FLOATS])?;
                    *v = f64::from_bits(prev);
                }
            } else {
                let sc = &scales[(code - 1) as usize];
                let mut prev = 0i64;
                for v in vals.iter_mut().take(nvals) {
                    prev = prev.wrapping_add(unzigzag(c[S_SCALED].varint("summary scaled")?));
                    let corr = unzigzag(c[S_CORR].varint("summary corrections")?);
                    *v = f64::from_bits(sc.predict(prev).to_bits().wrapping_add(corr as u64));
                }
            }
            let mean = f64::from_bits(delta::read_xor(&mut c[S_FLOATS])? ^ vals[0].to_bits());
            let stddev = f64::from_bits(delta::read_xor(&mut c[S_FLOATS])?);
            (
                other.unwrap_or(Value::F64(vals[2])),
                Some(NumericStats {
                    n: count - missing,
                    min: vals[0],
                    max: vals[1],
                    mean,
                    stddev,
                }),
            )
        };
        out.push(FrameSummary {
            stream: idx as u32,
            summary: WindowSummary {
                window_start_ns,
                window_ns,
                first_ts_ns,
                last_ts_ns,
                first_seq,
                last_seq,
                count,
                last,
                last_quality,
                numeric,
            },
        });
    }
    for (col, name) in c.iter().zip(SUMMARY_COLUMNS) {
        col.finish(name)?;
    }
    frame.summaries = out;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, ts: i64, v: Value) -> Sample {
        Sample::new(StreamId::intern(name).unwrap(), ts, v)
    }

    const S: i64 = 1_000_000_000;

    #[test]
    fn windows_hold_exact_statistics_and_close_by_watermark() {
        let mut a = SummaryAggregator::new(&SummaryConfig { window_ms: 10_000 }).unwrap();
        let base = 1_700_000_000 * S; // a multiple of 10 s
        let xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        for (i, x) in xs.iter().enumerate() {
            assert!(
                a.push(
                    100 + i as u64,
                    &s("sum/t", base + i as i64 * S, Value::F64(*x))
                )
                .is_none()
            );
        }
        a.push(200, &s("sum/t", base + 10 * S, Value::F64(1.0)));
        a.push(201, &s("sum/b", base + 3 * S, Value::Bool(true)));
        a.push(202, &s("sum/b", base + 2 * S, Value::Bool(false)));
        assert_eq!(a.open_windows(), 3);
        assert!(a.close_until(base + 10 * S - 1).is_empty());
        let out = a.close_until(base + 10 * S);
        assert_eq!(out.len(), 2);
        let t = out.iter().find(|x| &*x.stream.name() == "sum/t").unwrap();
        let w = &t.summary;
        assert_eq!((w.window_start_ns, w.window_ns), (base, 10 * S as u64));
        assert_eq!((w.first_ts_ns, w.last_ts_ns), (base, base + 7 * S));
        assert_eq!((w.first_seq, w.last_seq, w.count), (100, 107, 8));
        assert_eq!(w.last, Value::F64(9.0));
        let n = w.numeric.unwrap();
        assert_eq!(
            (n.n, n.min, n.max, n.mean, n.stddev),
            (8, 2.0, 9.0, 5.0, 2.0)
        );
        let b = out.iter().find(|x| &*x.stream.name() == "sum/b").unwrap();
        assert_eq!(b.summary.count, 2);
        assert_eq!(b.summary.last, Value::Bool(true)); // latest by timestamp
        assert!(b.summary.numeric.is_none());
        assert_eq!(a.flush().len(), 1);
        assert_eq!(a.open_windows(), 0);
        assert!(SummaryAggregator::new(&SummaryConfig { window_ms: 0 }).is_err());
    }

    #[test]
    fn welford_is_stable_and_partial_windows_merge_exactly() {
        // Large offset, tiny variance: the naive Σx² − n·mean² formula loses everything.
        let mut whole = SummaryAggregator::new(&SummaryConfig::default()).unwrap();
        let mut part1 = whole.clone();
        let mut part2 = whole.clone();
        let base = 1e9;
        for i in 0..1000u64 {
            let x = base + (i % 7) as f64 * 0.001;
            let smp = s("sum/w", i as i64 * 1000, Value::F64(x));
            whole.push(i, &smp);
            if i % 3 == 0 {
                part1.push(i, &smp)
            } else {
                part2.push(i, &smp)
            };
        }
        let w = whole.flush().remove(0).summary;
        let n = w.numeric.unwrap();
        let vals: Vec<f64> = (0..1000u64).map(|i| (i % 7) as f64 * 0.001).collect();
        let m = vals.iter().sum::<f64>() / 1000.0;
        let sd = (vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / 1000.0).sqrt();
        assert!((n.mean - (base + m)).abs() < 1e-6);
        assert!((n.stddev - sd).abs() < 1e-6, "{} vs {sd}", n.stddev);
        let merged = part1.flush()[0].summary.merge(&part2.flush()[0].summary);
        let mn = merged.numeric.unwrap();
        assert_eq!(
            (merged.count, merged.first_seq, merged.last_seq),
            (1000, 0, 999)
        );
        assert!((mn.mean - n.mean).abs() < 1e-6 && (mn.stddev - n.stddev).abs() < 1e-6);
        assert_eq!(merged.last, w.last);
    }

    #[test]
    fn open_windows_per_stream_are_bounded() {
        let mut a = SummaryAggregator::new(&SummaryConfig { window_ms: 1 }).unwrap();
        let mut early = 0;
        for i in 0..100i64 {
            if a.push(i as u64, &s("sum/scatter", i * 1_000_000, Value::I64(i)))
                .is_some()
            {
                early += 1;
            }
        }
        assert_eq!(a.open_windows(), MAX_OPEN_WINDOWS_PER_STREAM);
        assert_eq!(early, 100 - MAX_OPEN_WINDOWS_PER_STREAM);
    }
}
