//! Temporal alignment of a fusion group's streams onto a common tick (pure core of the aligner
//! actor).
//!
//! Each stream keeps a bounded, time-sorted history. The **watermark** is the newest (corrected)
//! sample timestamp seen in the group minus the allowed lateness; a frame at tick `t` is emitted
//! once `t ≤ watermark` and every stream can give a final value at `t`: it has a sample at or
//! after `t` (two samples past its right neighbour for cubic), or it has been silent, i.e. the
//! watermark is more than its `stale_after` past its newest sample. Ticks are multiples of the
//! period, so frame timestamps strictly increase.
//!
//! **Idle groups.** When every stream is silent the newest timestamp stops, and with it the
//! watermark: nothing would go stale and no tick inside the silence would ever be emitted. So
//! the caller also tells the aligner the time ([`Aligner::advance`], on a timer): once no
//! sample has been accepted for `idle_timeout` (arrival clock), the watermark moves on with
//! the arrival clock from the newest sample (its timestamp plus the arrival time elapsed since
//! it arrived, minus the allowed lateness). The watermark never moves back.
//!
//! Per tick and stream the value is:
//! - interpolated (zero-order hold, linear, or cubic Hermite with Catmull-Rom tangents over the
//!   four surrounding points) with the worst quality of the points used — but only across a
//!   gap of at most `max_gap` between two samples (cubic's outer neighbours too);
//! - after a silent stream's newest sample, or inside a gap longer than `max_gap`: **held**
//!   (the last value, quality `Uncertain`, [`FrameValue::held`] set) for up to `stale_after`,
//!   then `None` with quality `Bad` (stale, to be excluded downstream) until it speaks again.
//!   A tick gets the same value whether it is emitted during the silence or after the data
//!   that ends it arrived. Dynamic filters (Kalman, attitude) treat a held value as missing.
//!
//! A sample older than the watermark when it arrives is **late**: with [`LatePolicy::Drop`] it is
//! dropped and counted; with [`LatePolicy::Reemit`] it is inserted and the already-emitted frames
//! it changes are computed again and emitted flagged `correction = true`.
//!
//! Clocks: for every stream the aligner estimates the source clock's offset and drift against
//! the arrival clock from (arrival, source timestamp) pairs: per bucket of source time it keeps
//! the pair with the smallest offset `arrival − source` (a min-filter on the one-way delay),
//! fits a least-squares line through those minima over a sliding window of buckets, and shifts
//! it down onto their lower envelope (the minimum residual). With
//! `correct_clock = true` the stream's timestamps are mapped to the arrival clock with it.
//!
//! Memory is bounded: `history` samples and `clock_window` pairs per stream, at most
//! `max_pending_ticks` ticks between two polls (older ones are skipped and counted).

use std::collections::VecDeque;

pub use outpost_runtime::config::{
    AlignerConfig, AlignerStreamConfig, FusionConfigError, Interpolation, LatePolicy,
};
use outpost_runtime::model::{Quality, Sample, StreamId, StreamNameError, TimestampNs};

/// Errors of the aligner configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AlignerError {
    /// An invalid configuration value.
    #[error("invalid aligner configuration: {0}")]
    Config(String),
    /// A stream name that cannot be interned.
    #[error("aligner stream {name:?}: {source}")]
    StreamName {
        name: String,
        source: StreamNameError,
    },
}

impl From<FusionConfigError> for AlignerError {
    fn from(e: FusionConfigError) -> Self {
        AlignerError::Config(e.message)
    }
}

/// One stream's value in a frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameValue {
    /// The stream.
    pub stream: StreamId,
    /// The aligned value; `None` when the stream is stale or has no data yet.
    pub value: Option<f64>,
    /// Good/Uncertain from the samples used (Uncertain when held past a silent stream's last
    /// sample); Bad when stale or missing: exclude it.
    pub quality: Quality,
    /// The value is the stream's last sample carried past it into a silence (after its
    /// newest sample, or inside a gap longer than `max_gap`), not a measurement at this tick.
    pub held: bool,
}

/// All streams of a group at one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Tick timestamp (ns, arrival clock if corrected).
    pub ts_ns: TimestampNs,
    /// One entry per configured stream, in configuration order.
    pub values: Vec<FrameValue>,
    /// True for a re-emitted frame that replaces one sent earlier (late data).
    pub correction: bool,
}

/// What [`Aligner::push`] did with a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Stored.
    Accepted,
    /// Older than the watermark, dropped ([`LatePolicy::Drop`], or older than the history).
    LateDropped,
    /// Older than the watermark, stored; this many corrected frames were queued.
    LateReemitted(usize),
    /// Not a stream of this group.
    UnknownStream,
    /// Not a finite number.
    NotNumeric,
    /// Stamped too far ahead of its arrival.
    Future,
}

/// Counters; the actor exports them as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlignerStats {
    pub accepted: u64,
    pub late_dropped: u64,
    pub late_reemitted: u64,
    pub corrections_emitted: u64,
    pub unknown_stream: u64,
    pub not_numeric: u64,
    pub future_rejected: u64,
    pub frames: u64,
    pub ticks_skipped: u64,
    pub history_evictions: u64,
}

/// Estimated relation of a source clock to the arrival clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockEstimate {
    /// `arrival − source` (lower envelope, i.e. offset plus minimum delay) at `ref_source_ns`, ns.
    pub offset_ns: f64,
    /// Drift: change of the offset per ns of source time (e.g. 50e-6 = 50 ppm).
    pub drift: f64,
    /// Source time the offset refers to.
    pub ref_source_ns: TimestampNs,
}

/// Bounded window of (arrival, source) pairs and the estimate computed from them.
#[derive(Debug, Clone)]
struct ClockEstimator {
    /// (bucket of source time, arrival, source) with the smallest offset in each bucket.
    pairs: VecDeque<(i64, TimestampNs, TimestampNs)>,
    cap: usize,
    bucket_ns: i64,
    est: Option<ClockEstimate>,
}

/// Largest drift accepted from the fit (1000 ppm); beyond it the data is not a clock.
const MAX_DRIFT: f64 = 1e-3;

impl ClockEstimator {
    fn new(cap: usize, bucket_ns: i64) -> Self {
        ClockEstimator {
            pairs: VecDeque::with_capacity(cap),
            cap,
            bucket_ns: bucket_ns.max(1),
            est: None,
        }
    }

    fn push(&mut self, arrival: TimestampNs, source: TimestampNs) {
        let bucket = source.div_euclid(self.bucket_ns);
        let off = i128::from(arrival) - i128::from(source);
        match self.pairs.back_mut() {
            // Same (or an older, out-of-order) bucket: keep the smallest offset, i.e. the
            // sample with the least queueing delay.
            Some(back) if bucket <= back.0 => {
                if off < i128::from(back.1) - i128::from(back.2) {
                    *back = (back.0, arrival, source);
                } else {
                    return;
                }
            }
            _ => {
                if self.pairs.len() == self.cap {
                    self.pairs.pop_front();
                }
                self.pairs.push_back((bucket, arrival, source));
            }
        }
        self.refit();
    }

    fn refit(&mut self) {
        let Some(&(_, _, s0)) = self.pairs.front() else {
            return;
        };
        let n = self.pairs.len() as f64;
        let pts = || {
            self.pairs.iter().map(move |&(_, a, s)| {
                let x = (i128::from(s) - i128::from(s0)) as f64;
                let y = (i128::from(a) - i128::from(s)) as f64;
                (x, y)
            })
        };
        let (mx, my) = pts().fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x / n, sy + y / n));
        let (sxx, sxy) = pts().fold((0.0, 0.0), |(sxx, sxy), (x, y)| {
            (sxx + (x - mx) * (x - mx), sxy + (x - mx) * (y - my))
        });
        let drift = if self.pairs.len() >= 8 && sxx > 0.0 {
            (sxy / sxx).clamp(-MAX_DRIFT, MAX_DRIFT)
        } else {
            0.0
        };
        let a = my - drift * mx;
        let min_res = pts()
            .map(|(x, y)| y - (a + drift * x))
            .fold(f64::INFINITY, f64::min);
        if a.is_finite() && min_res.is_finite() {
            self.est = Some(ClockEstimate {
                offset_ns: a + min_res,
                drift,
                ref_source_ns: s0,
            });
        }
    }

    fn correct(&self, source: TimestampNs) -> TimestampNs {
        match self.est {
            None => source,
            Some(e) => {
                let x = (i128::from(source) - i128::from(e.ref_source_ns)) as f64;
                let off = e.offset_ns + e.drift * x;
                let t = source as f64 + off;
                if t.is_finite() && t.abs() < 9.0e18 {
                    source.saturating_add(off.round() as i64)
                } else {
                    source
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Pt {
    ts: TimestampNs,
    v: f64,
    q: Quality,
}

#[derive(Debug, Clone)]
struct StreamState {
    id: StreamId,
    interp: Interpolation,
    stale_after_ns: i64,
    max_gap_ns: i64,
    correct_clock: bool,
    hist: VecDeque<Pt>,
    clock: ClockEstimator,
}

impl StreamState {
    fn newest(&self) -> Option<TimestampNs> {
        self.hist.back().map(|p| p.ts)
    }

    /// Index of the first sample with ts > t.
    fn upper(&self, t: TimestampNs) -> usize {
        self.hist.partition_point(|p| p.ts <= t)
    }

    /// Whether the value at `t` is final given watermark `wm`.
    fn ready(&self, t: TimestampNs, wm: TimestampNs, origin: TimestampNs) -> bool {
        let newest = self.newest().unwrap_or(origin);
        if wm.saturating_sub(newest) > self.stale_after_ns {
            return true; // silent: hold / stale from here on
        }
        match self.interp {
            Interpolation::Hold => newest >= t,
            Interpolation::Linear => newest >= t,
            Interpolation::Cubic => {
                let i = self.upper(t);
                // Need the right neighbour and the one after it (or an exact hit at t).
                i + 1 < self.hist.len() || (i > 0 && self.hist[i - 1].ts == t && newest > t)
            }
        }
    }

    fn value_at(&self, t: TimestampNs) -> FrameValue {
        let bad = FrameValue {
            stream: self.id,
            value: None,
            quality: Quality::Bad,
            held: false,
        };
        let at = |p: Pt| FrameValue {
            stream: self.id,
            value: Some(p.v),
            quality: p.q,
            held: false,
        };
        let i = self.upper(t); // hist[i-1].ts <= t < hist[i].ts
        if i == 0 {
            return bad; // nothing at or before t
        }
        let p0 = self.hist[i - 1];
        if p0.ts == t {
            return at(p0);
        }
        // Past the newest sample (only reached for a silent stream), or inside a gap that
        // interpolation does not bridge: held for up to `stale_after`, then stale.
        let bridged = self
            .hist
            .get(i)
            .filter(|p1| span(p0.ts, p1.ts) <= self.max_gap_ns as f64);
        let Some(&p1) = bridged else {
            if t.saturating_sub(p0.ts) > self.stale_after_ns {
                return bad;
            }
            return FrameValue {
                stream: self.id,
                value: Some(p0.v),
                quality: p0.q.max(Quality::Uncertain),
                held: true,
            };
        };
        if self.interp == Interpolation::Hold {
            return at(p0);
        }
        let h = span(p0.ts, p1.ts);
        let s = span(p0.ts, t) / h;
        let mut q = p0.q.max(p1.q);
        let v = match self.interp {
            Interpolation::Hold | Interpolation::Linear => p0.v + s * (p1.v - p0.v),
            Interpolation::Cubic => {
                // Outer neighbours only from the same unbroken run of samples.
                let near = |a: Pt, b: Pt| span(a.ts, b.ts) <= self.max_gap_ns as f64;
                let pm = (i >= 2)
                    .then(|| self.hist[i - 2])
                    .filter(|pm| near(*pm, p0));
                let pp = self.hist.get(i + 1).copied().filter(|pp| near(p1, *pp));
                let slope = |a: Pt, b: Pt| (b.v - a.v) / span(a.ts, b.ts);
                // Tangents in value per ns (finite differences over the neighbours).
                let m0 = match pm {
                    Some(pm) => slope(pm, p1),
                    None => slope(p0, p1),
                };
                let m1 = match pp {
                    Some(pp) => slope(p0, pp),
                    None => slope(p0, p1),
                };
                if let Some(pm) = pm {
                    q = q.max(pm.q);
                }
                if let Some(pp) = pp {
                    q = q.max(pp.q);
                }
                let (s2, s3) = (s * s, s * s * s);
                (2.0 * s3 - 3.0 * s2 + 1.0) * p0.v
                    + (s3 - 2.0 * s2 + s) * h * m0
                    + (-2.0 * s3 + 3.0 * s2) * p1.v
                    + (s3 - s2) * h * m1
            }
        };
        if v.is_finite() {
            FrameValue {
                stream: self.id,
                value: Some(v),
                quality: q,
                held: false,
            }
        } else {
            bad
        }
    }
}

/// The aligner of one fusion group.
#[derive(Debug, Clone)]
pub struct Aligner {
    period: i64,
    lateness_ns: i64,
    policy: LatePolicy,
    history: usize,
    max_pending: usize,
    max_future_ns: i64,
    idle_timeout_ns: i64,
    streams: Vec<StreamState>,
    newest: Option<TimestampNs>,
    /// Arrival time of the sample that last raised `newest`.
    newest_arrival: TimestampNs,
    /// Arrival time of the newest accepted sample.
    last_arrival: Option<TimestampNs>,
    /// Watermark reached by [`Aligner::advance`] while the group was idle.
    idle_watermark: Option<TimestampNs>,
    origin: Option<TimestampNs>,
    next_tick: Option<TimestampNs>,
    last_emitted: Option<TimestampNs>,
    corrections: Vec<Frame>,
    stats: AlignerStats,
}

fn ms_to_ns(ms: u64) -> i64 {
    i64::try_from(ms)
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000_000)
}

/// `b − a` in ns as f64, without overflow for any timestamps.
fn span(a: TimestampNs, b: TimestampNs) -> f64 {
    (i128::from(b) - i128::from(a)) as f64
}

/// Smallest multiple of `p` that is ≥ `t`.
fn ceil_tick(t: TimestampNs, p: i64) -> TimestampNs {
    let r = t.rem_euclid(p);
    if r == 0 { t } else { t.saturating_add(p - r) }
}

impl Aligner {
    /// An aligner for `cfg` (validated here; stream names interned).
    pub fn new(cfg: &AlignerConfig) -> Result<Aligner, AlignerError> {
        cfg.validate()?;
        let streams = cfg
            .streams
            .iter()
            .map(|s| {
                Ok(StreamState {
                    id: StreamId::intern(&s.stream).map_err(|source| AlignerError::StreamName {
                        name: s.stream.clone(),
                        source,
                    })?,
                    interp: s.interpolation,
                    stale_after_ns: ms_to_ns(s.stale_after_ms),
                    max_gap_ns: ms_to_ns(s.max_gap_ms.unwrap_or(s.stale_after_ms)),
                    correct_clock: s.correct_clock,
                    hist: VecDeque::with_capacity(cfg.history.min(1024)),
                    clock: ClockEstimator::new(cfg.clock_window, ms_to_ns(cfg.clock_bucket_ms)),
                })
            })
            .collect::<Result<Vec<_>, AlignerError>>()?;
        let idle_ms = cfg.idle_timeout_ms.unwrap_or_else(|| {
            cfg.streams
                .iter()
                .map(|s| s.stale_after_ms)
                .max()
                .unwrap_or(1)
        });
        Ok(Aligner {
            idle_timeout_ns: ms_to_ns(idle_ms),
            newest_arrival: 0,
            last_arrival: None,
            idle_watermark: None,
            period: cfg.period_ns,
            lateness_ns: ms_to_ns(cfg.allowed_lateness_ms),
            policy: cfg.late_policy,
            history: cfg.history,
            max_pending: cfg.max_pending_ticks,
            max_future_ns: ms_to_ns(cfg.max_future_ms),
            streams,
            newest: None,
            origin: None,
            next_tick: None,
            last_emitted: None,
            corrections: Vec::new(),
            stats: AlignerStats::default(),
        })
    }

    /// The counters.
    pub fn stats(&self) -> AlignerStats {
        self.stats
    }

    /// The watermark: newest timestamp − allowed lateness, or further on where
    /// [`Aligner::advance`] moved it while the group was idle (`None` before the first sample).
    pub fn watermark(&self) -> Option<TimestampNs> {
        let own = self.newest.map(|n| n.saturating_sub(self.lateness_ns));
        own.max(self.idle_watermark)
    }

    /// Tells the aligner the time on the arrival clock. When no sample has been accepted for
    /// `idle_timeout`, the watermark moves on to the newest timestamp plus the arrival time
    /// elapsed since that sample arrived, minus the allowed lateness; the next
    /// [`Aligner::poll`] then emits the ticks that became final (silent streams held, then
    /// stale). Call it on a timer, before `poll`.
    pub fn advance(&mut self, now: TimestampNs) {
        let (Some(newest), Some(last)) = (self.newest, self.last_arrival) else {
            return;
        };
        if now.saturating_sub(last) < self.idle_timeout_ns {
            return;
        }
        let elapsed = now.saturating_sub(self.newest_arrival).max(0);
        let wm = newest
            .saturating_add(elapsed)
            .saturating_sub(self.lateness_ns);
        self.idle_watermark = self.idle_watermark.max(Some(wm));
    }

    /// The clock estimate of `stream`, if it is in the group and has data.
    pub fn clock_estimate(&self, stream: StreamId) -> Option<ClockEstimate> {
        self.streams
            .iter()
            .find(|s| s.id == stream)
            .and_then(|s| s.clock.est)
    }

    /// Offers a sample that arrived at `arrival_ns` (the gateway's clock).
    pub fn push(&mut self, sample: &Sample, arrival_ns: TimestampNs) -> PushOutcome {
        let Some(si) = self.streams.iter().position(|s| s.id == sample.stream) else {
            self.stats.unknown_stream += 1;
            return PushOutcome::UnknownStream;
        };
        let Some(v) = sample.value.as_f64().filter(|v| v.is_finite()) else {
            self.stats.not_numeric += 1;
            return PushOutcome::NotNumeric;
        };
        let wm = self.watermark();
        let st = &mut self.streams[si];
        st.clock.push(arrival_ns, sample.ts_ns);
        let ts = if st.correct_clock {
            st.clock.correct(sample.ts_ns)
        } else {
            sample.ts_ns
        };
        if self.max_future_ns > 0 && ts.saturating_sub(arrival_ns) > self.max_future_ns {
            self.stats.future_rejected += 1;
            return PushOutcome::Future;
        }
        let pt = Pt {
            ts,
            v,
            q: sample.quality,
        };
        let late = wm.is_some_and(|wm| ts < wm);
        if late {
            let too_old = st.hist.front().is_none_or(|f| ts < f.ts);
            if self.policy == LatePolicy::Drop || too_old {
                self.stats.late_dropped += 1;
                return PushOutcome::LateDropped;
            }
        }
        let i = st.hist.partition_point(|p| p.ts <= ts);
        if i > 0 && st.hist[i - 1].ts == ts {
            st.hist[i - 1] = pt; // same timestamp: the newer report wins
        } else {
            if st.hist.len() >= self.history {
                st.hist.pop_front();
                self.stats.history_evictions += 1;
            }
            let i = st.hist.partition_point(|p| p.ts <= ts);
            st.hist.insert(i, pt);
        }
        if self.origin.is_none() {
            self.origin = Some(ts);
            self.next_tick = Some(ceil_tick(ts, self.period));
        }
        if self.newest.is_none_or(|n| ts >= n) {
            self.newest = Some(ts);
            self.newest_arrival = arrival_ns;
        }
        self.last_arrival = Some(arrival_ns);
        if late {
            self.stats.late_reemitted += 1;
            let n = self.reemit(si, ts);
            return PushOutcome::LateReemitted(n);
        }
        self.stats.accepted += 1;
        PushOutcome::Accepted
    }

    /// Queues corrected frames for the emitted ticks that a late sample at `ts` in stream `si`
    /// influences; returns how many.
    fn reemit(&mut self, si: usize, ts: TimestampNs) -> usize {
        let (Some(last), Some(origin)) = (self.last_emitted, self.origin) else {
            return 0;
        };
        let st = &self.streams[si];
        let i = st.hist.partition_point(|p| p.ts < ts); // index of the new sample
        let reach = match st.interp {
            Interpolation::Hold => 0,
            Interpolation::Linear => 1,
            Interpolation::Cubic => 2,
        };
        // Emitted ticks whose value can change: [ts, next) for hold, strictly between the
        // reach-th neighbours either side for linear/cubic.
        let first = if reach == 0 {
            ts
        } else {
            i.checked_sub(reach)
                .map_or(origin, |j| st.hist[j].ts.saturating_add(1))
        };
        let end_excl = st.hist.get(i + reach.max(1)).map(|p| p.ts);
        let mut t = ceil_tick(first.max(origin), self.period);
        let mut n = 0;
        while t <= last && end_excl.is_none_or(|e| t < e) && n < self.max_pending {
            let f = self.frame_at(t, true);
            self.corrections.push(f);
            n += 1;
            let Some(next) = t.checked_add(self.period) else {
                break;
            };
            t = next;
        }
        n
    }

    fn frame_at(&self, t: TimestampNs, correction: bool) -> Frame {
        Frame {
            ts_ns: t,
            values: self.streams.iter().map(|s| s.value_at(t)).collect(),
            correction,
        }
    }

    /// Appends to `out` the queued corrections, then every new frame that is final, oldest
    /// first. New (non-correction) frame timestamps strictly increase across calls.
    pub fn poll(&mut self, out: &mut Vec<Frame>) {
        self.stats.corrections_emitted += self.corrections.len() as u64;
        out.append(&mut self.corrections);
        let (Some(wm), Some(origin), Some(mut t)) = (self.watermark(), self.origin, self.next_tick)
        else {
            return;
        };
        // Bound the work after a jump in time: skip all but the newest `max_pending` ticks.
        let pending = (wm.saturating_sub(t) / self.period).saturating_add(1);
        let max = i64::try_from(self.max_pending).unwrap_or(i64::MAX);
        if pending > max {
            let skip = pending - max;
            self.stats.ticks_skipped += skip as u64;
            t = t.saturating_add(skip.saturating_mul(self.period));
        }
        while t <= wm && self.streams.iter().all(|s| s.ready(t, wm, origin)) {
            out.push(self.frame_at(t, false));
            self.stats.frames += 1;
            self.last_emitted = Some(t);
            match t.checked_add(self.period) {
                Some(n) => t = n,
                None => {
                    // The end of representable time: no later tick exists.
                    self.next_tick = None;
                    return;
                }
            }
        }
        self.next_tick = Some(t);
    }
}

#[cfg(test)]
#[path = "aligner_tests.rs"]
mod tests;
