//! The per-stream deadband of the `delta` sync mode: decides which samples are sent
//! while the link is mobile. Pure: no I/O, no clock; the state is the last *sent* sample of
//! each stream.
//!
//! # Rule
//!
//! A sample is sent when any of these holds, else it is skipped:
//! - it is the first one of its stream since the filter was created or [reset](DeadbandFilter::reset);
//! - its quality or its value kind differs from the last sent sample's;
//! - `max_silence_ms` is set and the sample is at least that much later than the last sent
//!   one (a heartbeat, so the hub sees a quiet stream is alive);
//! - numbers (f64, i64): `|v − last_sent| > band`, with `band` the stream's absolute deadband,
//!   or its relative deadband × `|last_sent|`; no deadband means `band = 0` (every change is
//!   sent, repeats are not). A non-finite f64 (NaN, ±inf) on either side is sent unless it is
//!   bit-identical to the last sent value;
//! - booleans and strings: the value differs from the last sent one.
//!
//! The comparison is against the last *sent* value, not the previous sample, so a slow drift
//! cannot creep through below the band.
//!
//! # What the sync actor does with the outcome
//!
//! [`DeadbandFilter::filter`] takes the outbox records of one frame and returns which of them
//! to send and which it skipped. Skipped records are **not** lost: the sync actor keeps them
//! in the outbox, marks their sequences as *kept for backfill* (they are neither in flight nor
//! to be sent again in delta mode) and advances its cursor past them; they are backfilled as
//! bulk when the link allows, like the raw history under summary mode. Sent records are
//! acknowledged by the hub as usual and deleted then.
//!
//! The filter's state moves when it says "send". If the frame it built is never acknowledged
//! (the connection dropped) and the sync actor re-reads those records, it must call
//! [`DeadbandFilter::reset`] first: otherwise a re-read sample equal to the one the filter
//! remembers as sent would be skipped although the hub never got it.
//!
//! Which records go through the filter is policy ([`super::applies_deadband`]): normal and bulk
//! telemetry only; control and critical records (alarms) are always sent.

use std::collections::{BTreeMap, HashMap};

use outpost_runtime::config::GatewayId;
use outpost_runtime::model::{Priority, Quality, Sample, StreamId, Value};
use serde::{Deserialize, Serialize};

use crate::frame::{DataFrame, Encoding, FrameSample, SeqRange};

/// A deadband: how far a number must move from the last sent value to be sent again.
///
/// In TOML: `{ absolute = 0.15 }` (engineering units) or `{ relative = 0.01 }` (a fraction of
/// the last sent value's magnitude: 0.01 is 1 %).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Deadband {
    /// Send when `|v − last_sent| > band`.
    Absolute(f64),
    /// Send when `|v − last_sent| > fraction × |last_sent|`.
    Relative(f64),
}

impl Deadband {
    fn validate(self) -> Result<(), &'static str> {
        let v = match self {
            Deadband::Absolute(v) | Deadband::Relative(v) => v,
        };
        if !v.is_finite() || v < 0.0 {
            return Err("must be a finite number >= 0");
        }
        Ok(())
    }

    /// The band around `last` (≥ 0).
    fn band(self, last: f64) -> f64 {
        match self {
            Deadband::Absolute(b) => b,
            Deadband::Relative(r) => r * last.abs(),
        }
    }
}

/// Configuration of the delta mode's deadband (the `[sync.delta]` table the lead wires into
/// the runtime schema):
///
/// ```toml
/// [sync.delta]
/// default = { absolute = 0.0 }   # optional; absent = every change is sent
/// max_silence_ms = 60000         # optional heartbeat
/// [sync.delta.streams]
/// "plant/line1/tt-101" = { absolute = 0.15 }
/// "plant/line1/pt-201" = { relative = 0.005 }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadbandConfig {
    /// Deadband of streams not listed in `streams`; `None` = band 0.
    #[serde(default)]
    pub default: Option<Deadband>,
    /// Send a sample anyway once a stream has been silent this long (ms, by sample
    /// timestamps); `None` = never.
    #[serde(default)]
    pub max_silence_ms: Option<u64>,
    /// Per-stream deadbands, by exact stream name.
    #[serde(default)]
    pub streams: BTreeMap<String, Deadband>,
}

/// A configuration value the filter cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("deadband of {key}: {reason}")]
pub struct DeadbandError {
    /// `default` or `streams."NAME"`.
    pub key: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// The filter's verdict for one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Put it in the frame.
    Send,
    /// Leave it in the outbox for backfill.
    Skip,
}

#[derive(Debug, Clone)]
struct LastSent {
    ts_ns: i64,
    quality: Quality,
    value: Value,
}

/// What [`DeadbandFilter::filter`] decided for a batch of records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterOutcome {
    /// Positions (in the input order) of the records to send.
    pub send: Vec<usize>,
    /// Sequences of the skipped records, in input order: keep them for backfill.
    pub skipped: Vec<u64>,
}

impl FilterOutcome {
    /// The skipped sequences as sorted, merged inclusive ranges (compact for the sync
    /// actor's *kept for backfill* set).
    pub fn skipped_ranges(&self) -> Vec<SeqRange> {
        crate::frame::seq_ranges(self.skipped.iter().copied())
    }
}

/// The deadband filter: configuration plus the last sent sample of each stream.
#[derive(Debug, Clone)]
pub struct DeadbandFilter {
    default: Option<Deadband>,
    max_silence_ns: Option<i64>,
    by_name: HashMap<String, Deadband>,
    /// Resolved deadband per interned stream (a cache of `by_name`).
    resolved: HashMap<StreamId, Option<Deadband>>,
    last: HashMap<StreamId, LastSent>,
}

impl DeadbandFilter {
    /// A filter with no state, after checking `cfg` (bands finite and ≥ 0).
    pub fn new(cfg: &DeadbandConfig) -> Result<DeadbandFilter, DeadbandError> {
        if let Some(d) = cfg.default {
            d.validate().map_err(|reason| DeadbandError {
                key: "default".into(),
                reason,
            })?;
        }
        if cfg.max_silence_ms == Some(0) {
            return Err(DeadbandError {
                key: "max_silence_ms".into(),
                reason: "must be at least 1 (omit it for no heartbeat)",
            });
        }
        for (name, d) in &cfg.streams {
            d.validate().map_err(|reason| DeadbandError {
                key: format!("streams.{name:?}"),
                reason,
            })?;
        }
        Ok(DeadbandFilter {
            default: cfg.default,
            max_silence_ns: cfg
                .max_silence_ms
                .map(|ms| i64::try_from(ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
            by_name: cfg.streams.clone().into_iter().collect(),
            resolved: HashMap::new(),
            last: HashMap::new(),
        })
    }

    /// Forgets every stream's last sent sample: the next sample of each stream is sent.
    /// Call it when frames built since the last acknowledgement may not have arrived.
    pub fn reset(&mut self) {
        self.last.clear();
    }

    /// Number of streams with a remembered last sent sample.
    pub fn tracked_streams(&self) -> usize {
        self.last.len()
    }

    fn deadband_of(&mut self, stream: StreamId) -> Option<Deadband> {
        if let Some(d) = self.resolved.get(&stream) {
            return *d;
        }
        let d = self.by_name.get(&*stream.name()).copied().or(self.default);
        self.resolved.insert(stream, d);
        d
    }

    /// Decides for one sample and, if it is sent, remembers it as the stream's last sent one.
    pub fn check(&mut self, s: &Sample) -> Verdict {
        let band = self.deadband_of(s.stream);
        let send = match self.last.get(&s.stream) {
            None => true,
            Some(last) => {
                last.quality != s.quality
                    || self
                        .max_silence_ns
                        .is_some_and(|m| s.ts_ns.saturating_sub(last.ts_ns) >= m)
                    || value_moved(&last.value, &s.value, band)
            }
        };
        if send {
            self.last.insert(
                s.stream,
                LastSent {
                    ts_ns: s.ts_ns,
                    quality: s.quality,
                    value: s.value.clone(),
                },
            );
            Verdict::Send
        } else {
            Verdict::Skip
        }
    }

    /// Runs [`DeadbandFilter::check`] over outbox records `(sequence, sample)` in order.
    pub fn filter<'a>(
        &mut self,
        records: impl IntoIterator<Item = (u64, &'a Sample)>,
    ) -> FilterOutcome {
        let mut out = FilterOutcome::default();
        for (i, (seq, s)) in records.into_iter().enumerate() {
            match self.check(s) {
                Verdict::Send => out.send.push(i),
                Verdict::Skip => out.skipped.push(seq),
            }
        }
        out
    }
}

impl DataFrame {
    /// Builds a frame of the records `outcome` says to send, out of all the records the filter
    /// saw (in the same order). The stream table lists streams in the order they first appear
    /// among *all* records — the poll and register order — which is what the delta encoding
    /// predicts stream indices from; streams with nothing sent are left out.
    pub fn from_filtered<'a>(
        gateway_id: &GatewayId,
        priority: Priority,
        encoding: Encoding,
        records: impl IntoIterator<Item = (u64, &'a Sample)>,
        outcome: &FilterOutcome,
    ) -> DataFrame {
        let mut order: HashMap<StreamId, usize> = HashMap::new();
        let mut chosen: Vec<(u64, &Sample, usize)> = Vec::with_capacity(outcome.send.len());
        let mut next = outcome.send.iter().peekable();
        for (i, (seq, s)) in records.into_iter().enumerate() {
            let n = order.len();
            let pos = *order.entry(s.stream).or_insert(n);
            while next.next_if(|&&j| j < i).is_some() {}
            if next.next_if(|&&j| j == i).is_some() {
                chosen.push((seq, s, pos));
            }
        }
        // Keep the first-appearance order of the streams that have a sample in the frame.
        let mut used: Vec<(usize, StreamId)> =
            chosen.iter().map(|(_, s, pos)| (*pos, s.stream)).collect();
        used.sort_unstable_by_key(|u| u.0);
        used.dedup_by_key(|u| u.0);
        let index: HashMap<usize, u32> = used
            .iter()
            .enumerate()
            .map(|(i, (pos, _))| (*pos, i as u32))
            .collect();
        let (mut lo, mut hi) = (u64::MAX, u64::MIN);
        let samples: Vec<FrameSample> = chosen
            .iter()
            .map(|(seq, s, pos)| {
                lo = lo.min(*seq);
                hi = hi.max(*seq);
                FrameSample {
                    stream: index.get(pos).copied().unwrap_or(0),
                    seq: *seq,
                    ts_ns: s.ts_ns,
                    quality: s.quality,
                    value: s.value.clone(),
                }
            })
            .collect();
        if samples.is_empty() {
            (lo, hi) = (0, 0);
        }
        DataFrame {
            gateway_id: gateway_id.clone(),
            priority,
            encoding,
            first_seq: lo,
            last_seq: hi,
            streams: used.iter().map(|(_, id)| id.name().to_string()).collect(),
            samples,
            summaries: Vec::new(),
        }
    }
}

/// Whether `v` differs from `last` by more than the deadband (or in kind).
fn value_moved(last: &Value, v: &Value, band: Option<Deadband>) -> bool {
    match (last, v) {
        (Value::F64(a), Value::F64(b)) => {
            if !a.is_finite() || !b.is_finite() {
                return a.to_bits() != b.to_bits();
            }
            let band = band.map_or(0.0, |d| d.band(*a));
            (b - a).abs() > band
        }
        (Value::I64(a), Value::I64(b)) => {
            let diff = (i128::from(*b) - i128::from(*a)).unsigned_abs();
            let band = band.map_or(0.0, |d| d.band(*a as f64));
            diff as f64 > band
        }
        (Value::Bool(a), Value::Bool(b)) => a != b,
        (Value::Str(a), Value::Str(b)) => a != b,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, ts: i64, v: Value) -> Sample {
        Sample::new(StreamId::intern(name).unwrap(), ts, v)
    }

    fn cfg(toml_text: &str) -> DeadbandConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn absolute_and_relative_bands_compare_against_the_last_sent_value() {
        let c = cfg(r#"
            max_silence_ms = 10000
            [streams]
            "db/t" = { absolute = 0.15 }
            "db/p" = { relative = 0.1 }
        "#);
        let mut f = DeadbandFilter::new(&c).unwrap();
        let t = |ts, v| s("db/t", ts, Value::F64(v));
        let v: Vec<Verdict> = [
            t(0, 20.0),
            t(1, 20.1),  // one step: skipped
            t(2, 20.14), // still within 0.15 of 20.0
            t(3, 20.2),  // 0.2 > 0.15: sent
            t(4, 20.1),  // 0.1 from 20.2: skipped
            t(5, 20.05), // 0.15 from 20.2: not beyond, skipped (slow drift is caught later)
            t(6, 20.0),  // 0.2 from 20.2: sent
        ]
        .iter()
        .map(|x| f.check(x))
        .collect();
        use Verdict::{Send as S, Skip as K};
        assert_eq!(v, [S, K, K, S, K, K, S]);
        let p = |ts, v| s("db/p", ts, Value::F64(v));
        assert_eq!(f.check(&p(0, 100.0)), S);
        assert_eq!(f.check(&p(1, 109.0)), K);
        assert_eq!(f.check(&p(2, 111.0)), S);
        assert_eq!(f.check(&p(3, 101.0)), K); // 10 from 111 < 11.1
        // Heartbeat after 10 s of silence.
        assert_eq!(f.check(&p(10_000_000_002, 111.0)), S);
    }

    #[test]
    fn quality_kind_and_non_numbers_are_always_sent_on_change() {
        let mut f = DeadbandFilter::new(&cfg("default = { absolute = 1000.0 }")).unwrap();
        let a = |ts, v| s("db/a", ts, v);
        assert_eq!(f.check(&a(0, Value::F64(1.0))), Verdict::Send);
        assert_eq!(f.check(&a(1, Value::F64(2.0))), Verdict::Skip);
        let mut bad = a(2, Value::F64(2.0));
        bad.quality = Quality::Bad;
        assert_eq!(f.check(&bad), Verdict::Send);
        assert_eq!(f.check(&a(3, Value::I64(2))), Verdict::Send); // kind and quality changed
        assert_eq!(f.check(&a(4, Value::I64(900))), Verdict::Skip);
        assert_eq!(f.check(&a(5, Value::I64(i64::MIN))), Verdict::Send);
        assert_eq!(f.check(&a(6, Value::F64(f64::NAN))), Verdict::Send);
        assert_eq!(f.check(&a(7, Value::F64(f64::NAN))), Verdict::Skip);
        assert_eq!(f.check(&a(8, Value::F64(f64::INFINITY))), Verdict::Send);
        assert_eq!(f.check(&a(9, Value::F64(5.0))), Verdict::Send);
        let b = |ts, v| s("db/b", ts, Value::Bool(v));
        assert_eq!(f.check(&b(0, true)), Verdict::Send);
        assert_eq!(f.check(&b(1, true)), Verdict::Skip);
        assert_eq!(f.check(&b(2, false)), Verdict::Send);
        let st = |ts, v: &str| s("db/s", ts, Value::text(v));
        assert_eq!(f.check(&st(0, "run")), Verdict::Send);
        assert_eq!(f.check(&st(1, "run")), Verdict::Skip);
        assert_eq!(f.check(&st(2, "stop")), Verdict::Send);
    }

    #[test]
    fn filter_reports_sent_positions_and_skipped_sequences_and_reset_forgets() {
        let mut f = DeadbandFilter::new(&DeadbandConfig::default()).unwrap();
        let recs: Vec<(u64, Sample)> = vec![
            (10, s("db/x", 0, Value::I64(1))),
            (11, s("db/y", 0, Value::I64(1))),
            (12, s("db/x", 1, Value::I64(1))),
            (13, s("db/y", 1, Value::I64(1))),
            (15, s("db/x", 2, Value::I64(2))),
            (16, s("db/y", 2, Value::I64(1))),
        ];
        let out = f.filter(recs.iter().map(|(q, s)| (*q, s)));
        assert_eq!(out.send, vec![0, 1, 4]);
        assert_eq!(out.skipped, vec![12, 13, 16]);
        assert_eq!(
            out.skipped_ranges(),
            vec![
                SeqRange {
                    first: 12,
                    last: 13
                },
                SeqRange {
                    first: 16,
                    last: 16
                }
            ]
        );
        assert_eq!(f.tracked_streams(), 2);
        let d = DataFrame::from_filtered(
            &GatewayId::parse("gw").unwrap(),
            Priority::Normal,
            Encoding::Delta,
            recs.iter().map(|(q, s)| (*q, s)),
            &out,
        );
        assert_eq!(d.streams, vec!["db/x".to_string(), "db/y".to_string()]);
        let got: Vec<(u32, u64)> = d.samples.iter().map(|s| (s.stream, s.seq)).collect();
        assert_eq!(got, vec![(0, 10), (1, 11), (0, 15)]);
        assert_eq!((d.first_seq, d.last_seq), (10, 15));
        f.reset();
        let again = f.filter(recs.iter().map(|(q, s)| (*q, s)));
        assert_eq!(again, out);
    }

    #[test]
    fn bad_bands_are_refused_with_their_key() {
        let e = DeadbandFilter::new(&cfg("[streams]\n\"x\" = { absolute = -1.0 }")).unwrap_err();
        assert_eq!(e.key, "streams.\"x\"");
        assert!(DeadbandFilter::new(&cfg("default = { relative = nan }")).is_err());
        assert!(toml::from_str::<DeadbandConfig>("default = { both = 1.0 }").is_err());
        assert!(toml::from_str::<DeadbandConfig>("unknown = 1").is_err());
        let e = DeadbandFilter::new(&cfg("max_silence_ms = 0")).unwrap_err();
        assert_eq!(e.key, "max_silence_ms");
    }
}
