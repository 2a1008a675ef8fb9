//! Uplink estimator: a pure, clock-free model of the path to the hub.
//!
//! It is fed timestamped observations and computes:
//!
//! - a **windowed-maximum delivery rate**, as BBR does: each time the hub acknowledges data,
//!   a rate sample is taken over the last `rate_span` of acknowledgements (bytes delivered
//!   since an earlier acknowledgement / time between them — but never faster than those
//!   bytes were sent, so acknowledgements released in a bunch after a stall do not read as
//!   a fast link), and the estimate is the maximum of the samples of the last
//!   `rate_window`. The span is longer than a typical loss-recovery stall of the data
//!   stream, so the burst of acknowledgements that ends one averages out;
//! - a **windowed-minimum RTT** from QUIC's RTT and from RTT probes: over `rtt_window`
//!   while the gateway's own traffic may be standing in the bottleneck queue (a backlogged
//!   send or a throughput probe within that window), over the shorter `quiet_rtt_window`
//!   otherwise — with no queue of its own, every RTT sample is the path's, and an RTT
//!   increase (a route change, a satellite hop) shows within about a second;
//! - a **loss rate** over `loss_window`, from QUIC's sent and lost packet counters;
//! - **outages**: something was sent and nothing at all came back for
//!   `max(outage_min, outage_rtt_factor × base RTT, current RTT)` (the base RTT is the
//!   minimum over a long window, so a standing queue is not multiplied: a busy link answers
//!   continuously whatever its queueing delay), or `outage_probe_timeouts` RTT probes in a
//!   row timed out.
//!
//! ## Application-limited samples
//!
//! A gateway often has little to send: its acknowledgements then arrive at the rate it
//! *offers*, not at the rate the link *could* carry. Such a sample says "the link carries at
//! least this much" and nothing more, so (as in BBR) it is **app-limited**: it may raise the
//! estimate but never lower it. The sender says, with each send, whether it still had data
//! waiting ([`LinkEstimator::on_sent`] `backlogged`); after a send with nothing waiting, every
//! acknowledgement until the bytes then in flight are delivered is marked app-limited (BBR's
//! "bubble"). Consequences:
//!
//! - when the link falls below what the gateway offers, the gateway becomes backlogged and
//!   the drop shows in real traffic at once;
//! - a backlogged sender is not always limited by the link: the hub may acknowledge slowly
//!   (a slow disk), or the gateway may not produce frames as fast as the link takes them
//!   (a small CPU compressing a backlog). Then QUIC's congestion window is not full. A
//!   sample counts as the link's only when it is at least [`CWND_FULL`] of the rate the
//!   congestion window allows (`cwnd / RTT`, from the path statistics and the latest ping):
//!   a link-limited sender is window-limited, and its delivery rate is what its window
//!   carries per RTT;
//! - when the link falls but still carries everything offered, nothing is lost by not
//!   knowing at once; the estimate keeps its last value until a **throughput probe** (a short
//!   burst sent as backlogged traffic while the uplink is idle, within the hourly byte budget
//!   of [`super::ProbeBudget`]) refreshes it. With no fresh sample the last estimate is held:
//!   absence of evidence never down-grades a link (outages aside). The probe's answers are
//!   deliveries like the hub's acknowledgements: while its padding queues the link is busy,
//!   and the samples of data and padding together are the link's rate (a link that slows
//!   down under a long probe shows at once); its last window drains like any burst (a
//!   bubble).
//!
//! Every method takes the current time as an argument: no clock is read, so tests are
//! deterministic. Time must not go backwards; an earlier `now` is treated as the latest
//! time seen.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use outpost_protocols::uplink::quic::PathStats;

/// A backlogged delivery-rate sample is the link's only when it reaches this fraction of
/// the rate QUIC's congestion window allows (`cwnd / RTT`); below, the window was not full
/// and something else (the hub, the gateway's own CPU) set the pace.
pub const CWND_FULL: f64 = 0.5;

/// Tuning of [`LinkEstimator`]. The defaults aim at the link monitor's targets: a down-grade seen
/// within 2 s, no flapping under ±30 % rate jitter (with the classifier's margins).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EstimatorConfig {
    /// Shortest span of acknowledgements a delivery-rate sample covers.
    pub rate_span: Duration,
    /// Longest span a sample may cover; a longer gap between acknowledgements (sender idle,
    /// outage) yields no sample. A shorter one does: a backlogged sender that got nothing
    /// delivered for a second — a link that just went to a 700 ms RTT, say — has measured a
    /// low rate.
    pub max_rate_span: Duration,
    /// Window of the delivery-rate maximum filter. A rate drop is visible after about
    /// `rate_window + rate_span`.
    pub rate_window: Duration,
    /// Window of the RTT minimum filter while the gateway's own traffic may queue at the
    /// bottleneck (a backlogged send or a throughput probe within this window). Long enough
    /// to catch a trough of that queue (a loss-based congestion controller keeps the
    /// bottleneck buffer full), so an RTT *increase* is seen only after this long.
    pub rtt_window: Duration,
    /// Window of the RTT minimum filter when the gateway has built no queue for
    /// `rtt_window`: every sample is then the path's own RTT, and an increase is seen after
    /// this long.
    pub quiet_rtt_window: Duration,
    /// Window of the base (propagation) RTT used for the outage threshold: long, so a
    /// standing queue (bufferbloat) does not stretch outage detection.
    pub base_rtt_window: Duration,
    /// Window over which the loss rate is computed.
    pub loss_window: Duration,
    /// Least silence (data or probe outstanding, nothing received) that is an outage.
    pub outage_min: Duration,
    /// Silence of more than this many (windowed-minimum) RTTs is an outage, if longer than
    /// `outage_min`.
    pub outage_rtt_factor: f64,
    /// RTT probes timed out in a row that make an outage.
    pub outage_probe_timeouts: u32,
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        Self {
            rate_span: Duration::from_millis(500),
            max_rate_span: Duration::from_millis(2_000),
            rate_window: Duration::from_millis(750),
            rtt_window: Duration::from_millis(4_000),
            quiet_rtt_window: Duration::from_millis(1_000),
            base_rtt_window: Duration::from_millis(30_000),
            loss_window: Duration::from_millis(2_000),
            outage_min: Duration::from_millis(1_000),
            outage_rtt_factor: 2.0,
            outage_probe_timeouts: 2,
        }
    }
}

/// What the estimator believes about the link at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Windowed-maximum delivery rate, bits per second; the last known value when no fresh
    /// sample exists; `None` until the first sample.
    pub rate_bps: Option<f64>,
    /// True when `rate_bps` comes from samples within the current window.
    pub rate_fresh: bool,
    /// True when `rate_bps` was measured while the sender had nothing more to send: a
    /// lower bound of what the link carries, evidence for an up-grade but never for a
    /// down-grade.
    pub rate_app_limited: bool,
    /// Windowed-minimum RTT; the last known value when no fresh sample exists.
    pub rtt_min: Option<Duration>,
    /// While the gateway's own traffic may stand in the bottleneck queue, the minimum RTT
    /// over the long `base_rtt_window`: on a fast link a standing queue of its own is tens
    /// of milliseconds, which is not distance (judging the path's RTT against fiber's
    /// 20 ms by `rtt_min` would down-grade every busy fiber link). `None` otherwise (then
    /// `rtt_min` is the path's RTT).
    pub rtt_base: Option<Duration>,
    /// Lost over sent packets within the loss window (0 when nothing was sent).
    pub loss: f64,
    /// Since when the link is believed down, if it is.
    pub outage_since: Option<Instant>,
}

impl Estimate {
    /// True when the link is believed down.
    pub fn outage(&self) -> bool {
        self.outage_since.is_some()
    }
}

/// A delivery event kept for rate sampling.
#[derive(Debug, Clone, Copy)]
struct AckPoint {
    at: Instant,
    /// Cumulative bytes delivered after this acknowledgement.
    delivered: u64,
    /// This acknowledgement delivered bytes sent while the sender was app-limited.
    app_limited: bool,
    /// When the last byte it delivered was sent (bytes are taken as delivered in the order
    /// they were sent), if known.
    sent_at: Option<Instant>,
}

/// A throughput probe in flight.
#[derive(Debug, Clone, Copy)]
struct ProbeState {
    /// Bytes delivered (data included) before it started.
    delivered_before: u64,
    /// Padding not yet answered.
    remaining: u64,
    /// The last window of padding is draining: nothing queues behind it any more.
    tail: bool,
    /// A delivery-rate sample was taken while it lasted.
    sampled: bool,
}

/// A windowed extremum filter over timestamped values (monotone deque). When the window
/// empties, the last value to leave it is held.
#[derive(Debug, Clone, Default)]
struct WindowedExtremum<T> {
    items: VecDeque<(Instant, T)>,
    held: Option<T>,
}

impl<T: Copy + PartialOrd> WindowedExtremum<T> {
    /// Adds `v`; `better(a, b)` is true when `a` dominates `b` (≥ for a max filter).
    fn push(&mut self, at: Instant, v: T, better: impl Fn(T, T) -> bool) {
        while let Some(&(_, last)) = self.items.back() {
            if better(v, last) {
                self.items.pop_back();
            } else {
                break;
            }
        }
        self.items.push_back((at, v));
    }

    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some(&(at, _)) = self.items.front() {
            if now.saturating_duration_since(at) > window {
                if let Some((_, v)) = self.items.pop_front()
                    && self.items.is_empty()
                {
                    self.held = Some(v);
                }
            } else {
                break;
            }
        }
    }

    /// The extremum of the window, if it holds samples.
    fn best(&self) -> Option<T> {
        self.items.front().map(|&(_, v)| v)
    }

    /// The extremum of the window, else the last value that left it.
    fn best_or_held(&self) -> Option<T> {
        self.best().or(self.held)
    }
}

/// Most acknowledgement points kept (bounds memory whatever the caller feeds).
const MAX_ACK_POINTS: usize = 4_096;
/// Most send points kept.
const MAX_SEND_POINTS: usize = 8_192;
/// Most answer times kept (at one per 50 ms path-statistics poll: 25 s).
const MAX_HEARD_TIMES: usize = 512;
/// Most path-statistics points kept for the loss window.
const MAX_LOSS_POINTS: usize = 4_096;

/// The uplink estimator; see the module documentation.
#[derive(Debug, Clone)]
pub struct LinkEstimator {
    cfg: EstimatorConfig,
    now: Option<Instant>,

    // Delivery rate.
    delivered: u64,
    in_flight: u64,
    /// Set while acknowledgements deliver bytes sent in an app-limited period: the
    /// cumulative delivered count that ends the period.
    app_limited_until: Option<u64>,
    acks: VecDeque<AckPoint>,
    /// Bytes sent so far, counted from the same origin as `delivered` (what was in flight
    /// at a reset is forgotten).
    sent: u64,
    /// (time, `sent` after it) of recent sends, to time when acknowledged bytes were sent.
    sends: VecDeque<(Instant, u64)>,
    /// (rate, app-limited) samples; the maximum by rate.
    rate_max: WindowedExtremum<(f64, bool)>,

    /// QUIC's congestion window and smoothed RTT, from the latest path statistics of the
    /// current connection.
    cwnd: Option<(u64, Duration)>,
    /// The latest RTT probe answer: when, and its RTT (queueing included).
    last_probe_rtt: Option<(Instant, Duration)>,
    /// The throughput probe in flight, if one is.
    probing: Option<ProbeState>,

    // RTT.
    rtt_min: WindowedExtremum<Duration>,
    /// The same over `quiet_rtt_window`.
    rtt_recent: WindowedExtremum<Duration>,
    base_rtt: WindowedExtremum<Duration>,
    /// Last time the gateway's own traffic could stand in the bottleneck queue (a
    /// backlogged send, a throughput probe).
    last_queue: Option<Instant>,

    // Loss: (time, cumulative sent packets, cumulative lost packets).
    loss_points: VecDeque<(Instant, u64, u64)>,
    last_stats: Option<PathStats>,

    // Outage.
    last_heard: Option<Instant>,
    /// Recent times the hub was heard from (bounded), to tell a busy link answering
    /// continuously from one answering in clumps.
    heard_times: VecDeque<Instant>,
    /// First time something was sent after `last_heard`.
    unanswered_since: Option<Instant>,
    probe_timeouts_in_row: u32,
    outage_since: Option<Instant>,
}

impl LinkEstimator {
    /// A fresh estimator that knows nothing yet.
    pub fn new(cfg: EstimatorConfig) -> Self {
        Self {
            cfg,
            now: None,
            delivered: 0,
            in_flight: 0,
            app_limited_until: None,
            acks: VecDeque::new(),
            sent: 0,
            sends: VecDeque::new(),
            rate_max: WindowedExtremum::default(),
            cwnd: None,
            last_probe_rtt: None,
            probing: None,
            rtt_min: WindowedExtremum::default(),
            rtt_recent: WindowedExtremum::default(),
            base_rtt: WindowedExtremum::default(),
            last_queue: None,
            loss_points: VecDeque::new(),
            last_stats: None,
            last_heard: None,
            heard_times: VecDeque::new(),
            unanswered_since: None,
            probe_timeouts_in_row: 0,
            outage_since: None,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &EstimatorConfig {
        &self.cfg
    }

    /// Clamps `now` to the latest time seen (time never runs backwards here).
    fn tick(&mut self, now: Instant) -> Instant {
        let now = match self.now {
            Some(prev) if now < prev => prev,
            _ => now,
        };
        self.now = Some(now);
        self.rtt_min.expire(now, self.cfg.rtt_window);
        self.rtt_recent.expire(now, self.cfg.quiet_rtt_window);
        now
    }

    /// True when the gateway's own traffic has queued nothing for `rtt_window`.
    fn quiet(&self) -> bool {
        match (self.last_queue, self.now) {
            (None, _) => true,
            (Some(q), Some(now)) => now.saturating_duration_since(q) > self.cfg.rtt_window,
            (Some(_), None) => false,
        }
    }

    /// The windowed-minimum RTT in force: over `quiet_rtt_window` when the gateway's own
    /// traffic has built no queue for `rtt_window`, else over `rtt_window`.
    fn rtt_now(&self) -> Option<Duration> {
        if self.quiet() {
            self.rtt_recent.best_or_held()
        } else {
            self.rtt_min.best_or_held()
        }
    }

    fn heard(&mut self, now: Instant) {
        self.last_heard = Some(now);
        if self.heard_times.back() != Some(&now) {
            self.heard_times.push_back(now);
        }
        let keep = self.streaming_span() + self.cfg.outage_min;
        while self.heard_times.len() > MAX_HEARD_TIMES
            || self
                .heard_times
                .front()
                .is_some_and(|&t| now.saturating_duration_since(t) > keep)
        {
            self.heard_times.pop_front();
        }
        self.unanswered_since = None;
        self.probe_timeouts_in_row = 0;
        self.outage_since = None;
    }

    fn sent_something(&mut self, now: Instant) {
        if self.unanswered_since.is_none() {
            self.unanswered_since = Some(now);
        }
    }

    /// `bytes` of application data handed to the uplink. `backlogged`: the sender still has
    /// data waiting after this send (it is limited by the link or its window, not by having
    /// nothing to say). A throughput probe is sent as backlogged data.
    pub fn on_sent(&mut self, now: Instant, bytes: u64, backlogged: bool) {
        let now = self.tick(now);
        self.in_flight = self.in_flight.saturating_add(bytes);
        self.record_send(now, bytes);
        if backlogged {
            self.last_queue = Some(now);
        } else if self.probing.is_none_or(|p| p.tail) {
            // (While a throughput probe's padding queues, the link is kept busy whatever
            // the data does.)
            // BBR's bubble: everything delivered until what is in flight now has arrived
            // was sent without a queue behind it.
            self.app_limited_until = Some(self.delivered.saturating_add(self.in_flight).max(1));
        }
        if bytes > 0 {
            self.sent_something(now);
        }
    }

    /// The hub acknowledged `bytes` of application data (e.g. the encoded size of the
    /// frames an ack covers). Takes a delivery-rate sample.
    pub fn on_delivered(&mut self, now: Instant, bytes: u64) {
        let now = self.tick(now);
        self.heard(now);
        if bytes == 0 {
            return;
        }
        let app_limited = self.app_limited_until.is_some();
        self.delivered = self.delivered.saturating_add(bytes);
        self.in_flight = self.in_flight.saturating_sub(bytes);
        if let Some(until) = self.app_limited_until
            && self.delivered >= until
        {
            self.app_limited_until = None;
        }
        // When the last byte delivered now was sent: the first send that reached it.
        let i = self.sends.partition_point(|&(_, cum)| cum < self.delivered);
        let point = AckPoint {
            at: now,
            delivered: self.delivered,
            app_limited,
            sent_at: self.sends.get(i).map(|&(t, _)| t),
        };
        // Reference: the latest earlier acknowledgement at least `rate_span` old.
        let reference = self
            .acks
            .iter()
            .rev()
            .find(|p| now.saturating_duration_since(p.at) >= self.cfg.rate_span)
            .copied();
        if let Some(r) = reference {
            let span = now.saturating_duration_since(r.at);
            if span <= self.cfg.max_rate_span && !span.is_zero() {
                // The sample is app-limited if any delivery after the reference was.
                let bytes = self.delivered - r.delivered;
                // …unless what is still in flight would take the link longer than the
                // sample's span: then a queue stood in front of it the whole time (the link
                // dropped below what the gateway offers) and the sample is the link's rate.
                let queued = self.in_flight >= bytes;
                // Never faster than those bytes were sent (as BBR does): acknowledgements
                // that arrive in a bunch — a stream stalled behind a lost packet, then
                // released at once — must not read as a fast link.
                let send_span = match (point.sent_at, r.sent_at) {
                    (Some(b), Some(a)) => b.saturating_duration_since(a),
                    _ => Duration::ZERO,
                };
                let rate = bytes as f64 * 8.0 / span.max(send_span).as_secs_f64();
                // …and only if the congestion window was full (else the hub or the gateway
                // set the pace).
                let window_full = self.cwnd_rate(now).is_none_or(|c| rate >= CWND_FULL * c);
                let limited = !window_full
                    || (!queued
                        && (app_limited
                            || self
                                .acks
                                .iter()
                                .filter(|p| p.at > r.at)
                                .any(|p| p.app_limited)));
                if !limited && let Some(p) = &mut self.probing {
                    p.sampled = true;
                }
                self.rate_sample(now, rate, limited, Some(span));
            }
        }
        self.acks.push_back(point);
        // Keep one point older than the longest span as a possible reference.
        while self.acks.len() > 1 {
            let second = self.acks[1];
            if now.saturating_duration_since(second.at) > self.cfg.max_rate_span {
                self.acks.pop_front();
            } else {
                break;
            }
        }
        while self.acks.len() > MAX_ACK_POINTS {
            self.acks.pop_front();
        }
        // Send points before the oldest reference's bytes are no longer needed.
        let oldest = self.acks.front().map_or(self.delivered, |p| p.delivered);
        while self.sends.len() > 1 && self.sends[1].1 <= oldest {
            self.sends.pop_front();
        }
    }

    fn record_send(&mut self, now: Instant, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.sent = self.sent.saturating_add(bytes);
        self.sends.push_back((now, self.sent));
        while self.sends.len() > MAX_SEND_POINTS {
            self.sends.pop_front();
        }
    }

    /// The rate QUIC's congestion window allows now, bits per second: `cwnd` over the
    /// current RTT — the larger of QUIC's smoothed RTT and the latest ping's (the smoothed
    /// one takes seconds to catch up with a queue that builds when the link slows down;
    /// a ping queues behind the data at once). `None` without path statistics (MQTT).
    fn cwnd_rate(&self, now: Instant) -> Option<f64> {
        let (cwnd, srtt) = self.cwnd?;
        let ping = self
            .last_probe_rtt
            .filter(|(at, _)| now.saturating_duration_since(*at) <= self.cfg.rate_window)
            .map_or(Duration::ZERO, |(_, r)| r);
        let rtt = srtt.max(ping);
        (!rtt.is_zero()).then(|| cwnd as f64 * 8.0 / rtt.as_secs_f64())
    }

    /// A throughput probe put `bytes` of padding on the link at once: a burst of backlogged
    /// traffic. Its answers come back through [`Self::on_probe_delivered`] like the hub's
    /// acknowledgements, so the delivery rate is sampled while it lasts (data and padding
    /// together: the probe keeps the link busy, and a link that slows down under a long
    /// probe shows at once); [`Self::on_probe_finished`] ends it.
    pub fn on_probe_started(&mut self, now: Instant, bytes: u64) {
        self.probing = Some(ProbeState {
            delivered_before: self.delivered,
            remaining: bytes,
            tail: false,
            sampled: false,
        });
        self.on_sent(now, bytes, true);
    }

    /// The hub answered `bytes` of the throughput probe's padding: a delivery. When what
    /// is left of the padding fits in one congestion window, nothing queues behind it any
    /// more and the link drains: from there on the samples are app-limited (BBR's
    /// "bubble"), like after any send with nothing waiting.
    pub fn on_probe_delivered(&mut self, now: Instant, bytes: u64) {
        self.on_delivered(now, bytes);
        let tail_bytes = self.cwnd.map_or(0, |(c, _)| c);
        if let Some(p) = &mut self.probing {
            p.remaining = p.remaining.saturating_sub(bytes);
            if !p.tail && p.remaining <= tail_bytes {
                p.tail = true;
                self.app_limited_until = Some(self.delivered.saturating_add(self.in_flight).max(1));
            }
        }
    }

    /// The throughput probe's last answer came back; the padding took `duration` to cross
    /// the link (the elapsed time less one RTT). A short probe (on a fast link) is over
    /// before any span of answers is long enough to sample: it is one sample, of everything
    /// delivered since it started. A longer one was sampled while it lasted, and its
    /// average would mix a link that changed under it.
    pub fn on_probe_finished(&mut self, now: Instant, duration: Duration) {
        let now = self.tick(now);
        let Some(ProbeState {
            delivered_before: before,
            sampled,
            ..
        }) = self.probing.take()
        else {
            return;
        };
        self.last_queue = Some(now);
        if duration.is_zero() || sampled {
            return;
        }
        let rate = self.delivered.saturating_sub(before) as f64 * 8.0 / duration.as_secs_f64();
        self.rate_sample(now, rate, false, None);
    }

    /// The throughput probe ended without a result (the connection went down, or it was
    /// given up).
    pub fn on_probe_ended(&mut self, now: Instant) {
        let now = self.tick(now);
        if self.probing.take().is_some() {
            self.last_queue = Some(now);
        }
    }

    /// `span`: the time the sample covers, for samples of traffic; `None` for a short
    /// throughput probe (a deliberate full-pipe measurement).
    fn rate_sample(&mut self, now: Instant, rate: f64, app_limited: bool, span: Option<Duration>) {
        if !rate.is_finite() {
            return;
        }
        self.rate_max.expire(now, self.cfg.rate_window);
        if let Some(span) = span
            && span < self.cfg.rate_window
            && !app_limited
            && self.rate_max.best().is_none()
            && let Some(held) = self.rate_max.held
            && rate < held.0
        {
            // The first traffic sample after a quiet spell: the held estimate stands until
            // the lower rate has been seen for a whole window (the sample's own span
            // counts) — the same evidence as when samples never stopped. (A short
            // throughput probe counts at once.)
            let at = now.checked_sub(span).unwrap_or(now);
            self.rate_max.push(at, held, |a, b| a.0 >= b.0);
        }
        if app_limited {
            // A lower bound only: it may raise the estimate, never lower it.
            let current = self.rate_max.best_or_held().map_or(0.0, |r| r.0);
            if rate < current {
                return;
            }
        }
        self.rate_max
            .push(now, (rate, app_limited), |a, b| a.0 >= b.0);
    }

    /// A path-statistics reading of the uplink connection (poll it every 50-200 ms). Takes
    /// an RTT sample, the loss counters, and whether anything was received.
    pub fn on_path_stats(&mut self, now: Instant, stats: &PathStats) {
        let now = self.tick(now);
        if let Some(prev) = self.last_stats {
            let new_connection = stats.sent_packets < prev.sent_packets
                || stats.bytes_received < prev.bytes_received
                || stats.bytes_sent < prev.bytes_sent;
            if new_connection {
                // Counters restarted: a new connection; its handshake proves the path.
                self.loss_points.clear();
                self.cwnd = None;
                if stats.bytes_received > 0 {
                    self.heard(now);
                }
            } else {
                // Only receptions count: what QUIC sends may be bare ACKs, which the peer
                // does not answer; what expects an answer is reported by the caller
                // (`on_sent`, `on_probe_sent`).
                if stats.bytes_received > prev.bytes_received {
                    self.heard(now);
                }
            }
        } else if stats.bytes_received > 0 {
            self.heard(now);
        }
        // QUIC's smoothed RTT: its windowed minimum tracks the path's RTT and ignores
        // short queueing bursts. quinn reports its initial guess before any sample; skip
        // readings taken before anything was received.
        if stats.bytes_received > 0 && !stats.rtt.is_zero() {
            self.rtt_sample(now, stats.rtt);
            self.cwnd = Some((stats.cwnd, stats.rtt));
        }
        self.loss_points
            .push_back((now, stats.sent_packets, stats.lost_packets));
        while self.loss_points.len() > 2 {
            let second = self.loss_points[1];
            if now.saturating_duration_since(second.0) > self.cfg.loss_window {
                self.loss_points.pop_front();
            } else {
                break;
            }
        }
        while self.loss_points.len() > MAX_LOSS_POINTS {
            self.loss_points.pop_front();
        }
        self.last_stats = Some(*stats);
    }

    /// An RTT probe was sent (a ping the hub echoes).
    pub fn on_probe_sent(&mut self, now: Instant) {
        let now = self.tick(now);
        self.sent_something(now);
    }

    /// An RTT probe came back after `rtt`.
    pub fn on_probe_answered(&mut self, now: Instant, rtt: Duration) {
        let now = self.tick(now);
        self.heard(now);
        self.last_probe_rtt = Some((now, rtt));
        self.rtt_sample(now, rtt);
    }

    /// An RTT probe got no answer within [`Self::probe_timeout`] (or the caller's own).
    ///
    /// `sent`: when the probe went out, if known. When the hub was heard after that (QUIC
    /// acknowledgements keep arriving), the probe is queued behind data on a congested
    /// link, not lost on a dead one, and does not count.
    pub fn on_probe_timed_out(&mut self, now: Instant, sent: Option<Instant>) {
        let now = self.tick(now);
        self.sent_something(now);
        if let (Some(sent), Some(heard)) = (sent, self.last_heard)
            && heard >= sent
        {
            // The hub is answering (acknowledgements keep arriving): the ping is queued
            // behind data on a congested link, not lost on a dead one.
            self.probe_timeouts_in_row = 0;
            return;
        }
        self.probe_timeouts_in_row = self.probe_timeouts_in_row.saturating_add(1);
        if self.probe_timeouts_in_row >= self.cfg.outage_probe_timeouts
            && self.outage_since.is_none()
        {
            self.declare_outage(self.unanswered_since.unwrap_or(now));
        }
    }

    /// An RTT sample from elsewhere (e.g. a handshake's duration).
    pub fn on_rtt_sample(&mut self, now: Instant, rtt: Duration) {
        let now = self.tick(now);
        self.rtt_sample(now, rtt);
    }

    fn rtt_sample(&mut self, now: Instant, rtt: Duration) {
        self.rtt_min.expire(now, self.cfg.rtt_window);
        self.rtt_min.push(now, rtt, |a, b| a <= b);
        self.rtt_recent.expire(now, self.cfg.quiet_rtt_window);
        self.rtt_recent.push(now, rtt, |a, b| a <= b);
        self.base_rtt.expire(now, self.cfg.base_rtt_window);
        self.base_rtt.push(now, rtt, |a, b| a <= b);
    }

    /// How long to wait for a probe's answer before calling it timed out:
    /// `max(outage_min, outage_rtt_factor × windowed-minimum RTT)` (queueing included: a
    /// ping waits in the same queue as the data).
    pub fn probe_timeout(&self) -> Duration {
        self.limit(self.rtt_now())
    }

    /// Silence (something outstanding, nothing received) that makes an outage:
    /// `max(outage_min, outage_rtt_factor × base RTT, windowed-minimum RTT)` — no answer
    /// can come sooner than one current RTT, but a standing queue is not multiplied.
    ///
    ///
    /// While answers were streaming in — no gap over a quarter of `outage_min` for a whole
    /// RTT (and at least `outage_min`) before the last one: a busy link, a standing queue —
    /// the limit is `outage_min` alone: answers to what is queued keep coming whatever the
    /// queueing delay, so their stopping is the outage.
    pub fn silence_limit(&self) -> Duration {
        if self.streaming() {
            return self.cfg.outage_min;
        }
        let one_rtt = self.rtt_now().unwrap_or_default();
        self.limit(self.base_rtt.best_or_held()).max(one_rtt)
    }

    fn streaming_span(&self) -> Duration {
        self.rtt_now().unwrap_or_default().max(self.cfg.outage_min)
    }

    fn streaming(&self) -> bool {
        let Some(&last) = self.heard_times.back() else {
            return false;
        };
        let span = self.streaming_span();
        let max_gap = self.cfg.outage_min / 4;
        let mut next = last;
        for &t in self.heard_times.iter().rev().skip(1) {
            if next.saturating_duration_since(t) > max_gap {
                return false;
            }
            if last.saturating_duration_since(t) >= span {
                return true;
            }
            next = t;
        }
        false
    }

    fn limit(&self, rtt: Option<Duration>) -> Duration {
        let by_rtt = rtt
            .map(|r| r.mul_f64(self.cfg.outage_rtt_factor.max(0.0)))
            .unwrap_or_default();
        self.cfg.outage_min.max(by_rtt)
    }

    /// The link went down at `since`. What was known of its rate is stale: the link that
    /// comes back (another route, another modem) is measured afresh.
    fn declare_outage(&mut self, since: Instant) {
        self.outage_since = Some(since);
        self.rate_max = WindowedExtremum::default();
        self.acks.clear();
    }

    /// Bytes handed to the uplink and not yet acknowledged, as far as the estimator knows.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// Forgets the bytes in flight (e.g. after a reconnect, when they will be resent).
    pub fn reset_in_flight(&mut self) {
        self.in_flight = 0;
        self.app_limited_until = None;
        self.acks.clear();
        self.sent = self.delivered;
        self.sends.clear();
    }

    /// The estimate at `now`.
    pub fn estimate(&mut self, now: Instant) -> Estimate {
        let now = self.tick(now);
        self.rate_max.expire(now, self.cfg.rate_window);
        self.rtt_min.expire(now, self.cfg.rtt_window);
        if self.outage_since.is_none()
            && let Some(since) = self.unanswered_since
            && now.saturating_duration_since(since) >= self.silence_limit()
        {
            self.declare_outage(since);
        }
        let fresh = self.rate_max.best();
        let loss = match (self.loss_points.front(), self.loss_points.back()) {
            (Some(a), Some(b)) => {
                let sent = b.1.saturating_sub(a.1);
                let lost = b.2.saturating_sub(a.2);
                if sent == 0 {
                    0.0
                } else {
                    (lost as f64 / sent as f64).min(1.0)
                }
            }
            _ => 0.0,
        };
        let best = self.rate_max.best_or_held();
        Estimate {
            rate_bps: best.map(|r| r.0),
            rate_app_limited: best.is_some_and(|r| r.1),
            rate_fresh: fresh.is_some(),
            rtt_min: self.rtt_now(),
            rtt_base: if self.quiet() {
                None
            } else {
                self.base_rtt.best_or_held()
            },
            loss,
            outage_since: self.outage_since,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A throughput probe of `bytes` that ends at `end` after `dur`, alone on the link.
    fn probe(e: &mut LinkEstimator, end: Instant, bytes: u64, dur: Duration) {
        e.on_probe_started(end - dur, bytes);
        e.on_probe_delivered(end, bytes);
        e.on_probe_finished(end, dur);
    }

    /// Feeds a backlogged sender over a link of `rate_bps` for `dur`, acknowledging
    /// 1200-byte chunks as they would drain; returns the end time.
    fn drive(
        e: &mut LinkEstimator,
        start: Instant,
        dur: Duration,
        rate_bps: f64,
        backlogged: bool,
    ) -> Instant {
        let chunk = 1200u64;
        let gap = Duration::from_secs_f64(chunk as f64 * 8.0 / rate_bps);
        let mut t = start;
        while t < start + dur {
            e.on_sent(t, chunk, backlogged);
            e.on_delivered(t + ms(1), chunk);
            t += gap;
        }
        t
    }

    #[test]
    fn delivery_rate_is_measured_from_acks() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        let t = drive(&mut e, t0, ms(2_000), 8e6, true);
        let est = e.estimate(t);
        let r = est.rate_bps.unwrap();
        assert!((r - 8e6).abs() / 8e6 < 0.05, "rate {r}");
        assert!(est.rate_fresh);
    }

    #[test]
    fn rate_drop_is_seen_within_the_window() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        let t1 = drive(&mut e, t0, ms(3_000), 20e6, true);
        let t2 = drive(&mut e, t1, ms(1_400), 3e6, true);
        let r = e.estimate(t2).rate_bps.unwrap();
        assert!((r - 3e6).abs() / 3e6 < 0.1, "rate after the drop {r}");
    }

    #[test]
    fn app_limited_samples_never_lower_the_estimate() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        let t1 = drive(&mut e, t0, ms(2_000), 20e6, true);
        // The gateway now offers only 1 Mbit/s: the link may still carry 20.
        let t2 = drive(&mut e, t1, ms(5_000), 1e6, false);
        let est = e.estimate(t2);
        assert!(!est.rate_fresh, "no full-pipe sample in the window");
        let r = est.rate_bps.unwrap();
        assert!((r - 20e6).abs() / 20e6 < 0.05, "held estimate {r}");
    }

    #[test]
    fn app_limited_samples_can_raise_the_estimate() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        let t1 = drive(&mut e, t0, ms(2_000), 1e6, true);
        let t2 = drive(&mut e, t1, ms(1_000), 5e6, false);
        let r = e.estimate(t2).rate_bps.unwrap();
        assert!(r > 4e6, "a lower bound above the estimate raises it: {r}");
    }

    #[test]
    fn throughput_probe_refreshes_an_idle_estimate() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        let t1 = drive(&mut e, t0, ms(2_000), 20e6, true);
        let t2 = t1 + ms(5_000);
        probe(&mut e, t2, 100_000, ms(400));
        let est = e.estimate(t2);
        assert!(est.rate_fresh);
        assert!((est.rate_bps.unwrap() - 2e6).abs() < 1.0);
    }

    #[test]
    fn lumpy_acks_are_averaged_over_the_span() {
        // One 16 KB ack every 100 ms = 1.31 Mbit/s, sampled over >= 250 ms.
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        for i in 0..30u64 {
            let t = t0 + ms(i * 100);
            e.on_sent(t, 16_384, true);
            e.on_delivered(t, 16_384);
        }
        let r = e.estimate(t0 + ms(2_900)).rate_bps.unwrap();
        assert!((r - 1_310_720.0).abs() / 1_310_720.0 < 0.05, "rate {r}");
    }

    #[test]
    fn acknowledgements_released_in_a_bunch_are_no_faster_than_their_sending() {
        // 0.6 Mbit/s, backlogged; then a lost packet stalls the stream for 500 ms and its
        // retransmission releases everything behind it at once.
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        let chunk = 1_200u64;
        let gap = ms(16);
        let mut t = t0;
        let mut stalled = 0u64;
        for i in 0..300 {
            e.on_sent(t, chunk, true);
            let in_stall = (150..181).contains(&i);
            if i == 165 {
                // One frame from before the loss still completes mid-stall.
                e.on_delivered(t + ms(80), chunk);
            } else if in_stall {
                stalled += chunk;
            } else {
                e.on_delivered(t + ms(80), chunk + stalled);
                stalled = 0;
            }
            let r = e.estimate(t + ms(80)).rate_bps.unwrap_or(0.0);
            assert!(r < 0.8e6, "at {i}: {r}");
            t += gap;
        }
        let r = e.estimate(t).rate_bps.unwrap();
        assert!((r - 0.6e6).abs() / 0.6e6 < 0.1, "{r}");
    }

    #[test]
    fn a_backlogged_sender_that_hears_nothing_for_a_second_has_measured_a_slow_link() {
        // 0.6 Mbit/s, then the link turns into a 0.3 Mbit/s satellite hop: nothing is
        // acknowledged for 1.2 s (the new propagation delay, a loss recovered late), then
        // acknowledgements come at 0.3 Mbit/s.
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        let chunk = 1_200u64;
        let t_change = drive(&mut e, t0, ms(3_000), 0.6e6, true);
        let mut t = t_change;
        e.on_sent(t, 200_000, true);
        t += ms(1_200);
        let mut seen = None;
        while t < t_change + ms(4_000) {
            e.on_sent(t, chunk, true);
            e.on_delivered(t, chunk);
            if seen.is_none() && e.estimate(t).rate_bps.unwrap() < 0.4e6 {
                seen = Some(t - t_change);
            }
            t += Duration::from_secs_f64(chunk as f64 * 8.0 / 0.3e6);
        }
        let seen = seen.expect("the slow link is seen");
        assert!(seen <= ms(1_600), "after {seen:?}");
    }

    #[test]
    fn a_gap_in_acks_is_not_a_rate_sample() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        let t1 = drive(&mut e, t0, ms(1_000), 10e6, true);
        // 3 s of nothing, then one ack: no sample spanning the gap.
        let t2 = t1 + ms(3_000);
        e.on_sent(t2, 1200, true);
        e.on_delivered(t2, 1200);
        let est = e.estimate(t2);
        assert!(!est.rate_fresh);
        assert!((est.rate_bps.unwrap() - 10e6).abs() / 10e6 < 0.05);
    }

    #[test]
    fn rtt_min_is_windowed() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        // A backlogged sender: its own queue may inflate samples, the long window applies.
        e.on_sent(t0, 1_000_000, true);
        e.on_probe_answered(t0, ms(10));
        e.on_probe_answered(t0 + ms(500), ms(30));
        assert_eq!(e.estimate(t0 + ms(600)).rtt_min, Some(ms(10)));
        e.on_sent(t0 + ms(4_000), 1_000_000, true);
        // After the window, the 10 ms sample has expired.
        e.on_probe_answered(t0 + ms(4_400), ms(700));
        assert_eq!(e.estimate(t0 + ms(4_400)).rtt_min, Some(ms(30)));
        assert_eq!(e.estimate(t0 + ms(4_600)).rtt_min, Some(ms(700)));
        // With no sample at all, the last value is held.
        assert_eq!(e.estimate(t0 + ms(60_000)).rtt_min, Some(ms(700)));
    }

    #[test]
    fn without_a_queue_of_its_own_an_rtt_increase_shows_within_the_quiet_window() {
        let t0 = Instant::now();
        let cfg = EstimatorConfig::default();
        let mut e = LinkEstimator::new(cfg);
        // App-limited traffic and pings every 200 ms: 10 ms, then the route changes to 40.
        let mut t = t0;
        while t < t0 + ms(3_000) {
            e.on_sent(t, 2_000, false);
            e.on_probe_answered(t, ms(10));
            t += ms(200);
        }
        let change = t;
        let mut seen = None;
        while t < change + ms(3_000) {
            e.on_sent(t, 2_000, false);
            e.on_probe_answered(t, ms(40));
            if seen.is_none() && e.estimate(t).rtt_min == Some(ms(40)) {
                seen = Some(t - change);
            }
            t += ms(200);
        }
        let seen = seen.expect("the increase is seen");
        assert!(seen <= cfg.quiet_rtt_window + ms(200), "after {seen:?}");

        // The same with a backlogged sender: its queue could be what raised the samples,
        // so the long window applies.
        let mut e = LinkEstimator::new(cfg);
        let mut t = t0;
        while t < t0 + ms(3_000) {
            e.on_sent(t, 2_000, true);
            e.on_probe_answered(t, ms(10));
            t += ms(200);
        }
        let change = t;
        while t < change + ms(3_000) {
            e.on_sent(t, 2_000, true);
            e.on_probe_answered(t, ms(40));
            assert_eq!(e.estimate(t).rtt_min, Some(ms(10)), "at {:?}", t - change);
            t += ms(200);
        }
        // A throughput probe counts as a queue of its own too.
        let mut e = LinkEstimator::new(cfg);
        e.on_probe_answered(t0, ms(10));
        e.on_probe_started(t0 + ms(100), 100_000);
        e.on_probe_answered(t0 + ms(200), ms(60));
        e.on_probe_delivered(t0 + ms(300), 100_000);
        e.on_probe_finished(t0 + ms(300), ms(200));
        assert_eq!(e.estimate(t0 + ms(1_500)).rtt_min, Some(ms(10)));
    }

    #[test]
    fn a_busy_link_reports_its_base_rtt_beside_the_windowed_one() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        e.on_probe_answered(t0, ms(10));
        // Backlogged for 10 s: its own queue keeps every later sample at 25-30 ms.
        let mut t = t0;
        let mut i = 0u64;
        while t < t0 + ms(10_000) {
            e.on_sent(t, 10_000, true);
            e.on_probe_answered(t, ms(25 + i % 6));
            t += ms(200);
            i += 1;
        }
        let est = e.estimate(t);
        assert_eq!(est.rtt_min, Some(ms(25)));
        assert_eq!(est.rtt_base, Some(ms(10)));
        // Quiet again: the path's RTT is the recent one, no base beside it.
        let t = t + ms(5_000);
        e.on_probe_answered(t, ms(11));
        let est = e.estimate(t);
        assert_eq!(est.rtt_min, Some(ms(11)));
        assert_eq!(est.rtt_base, None);
    }

    #[test]
    fn a_backlogged_sender_below_its_congestion_window_is_not_the_links_rate() {
        // The hub acknowledges slowly: 2 Mbit/s, while QUIC's window would carry
        // 64 KB per 10 ms (52 Mbit/s). The gateway is backlogged, the link is not the limit.
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        probe(&mut e, t0, 1_250_000, ms(500)); // 20 Mbit/s measured
        let mut st = stats(100, 0, 100_000, 50_000, ms(10));
        st.cwnd = 64_000;
        e.on_path_stats(t0, &st);
        let t = drive(&mut e, t0 + ms(100), ms(3_000), 2e6, true);
        let est = e.estimate(t);
        assert_eq!(
            est.rate_bps,
            Some(20e6),
            "a slow hub does not lower the estimate"
        );

        // The same rate with the window full (cwnd / srtt ≈ 2.4 Mbit/s): the link's.
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        probe(&mut e, t0, 1_250_000, ms(500));
        let mut st = stats(100, 0, 100_000, 50_000, ms(100));
        st.cwnd = 30_000;
        e.on_path_stats(t0, &st);
        let t = drive(&mut e, t0 + ms(100), ms(3_000), 2e6, true);
        let est = e.estimate(t);
        assert!(!est.rate_app_limited, "{est:?}");
        let r = est.rate_bps.unwrap();
        assert!((r - 2e6).abs() / 2e6 < 0.1, "{r}");
    }

    #[test]
    fn a_probe_measures_data_and_padding_together_and_shows_a_drop_while_it_lasts() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        // 1 Mbit/s of app-limited data on an 8 Mbit/s link: a lower bound only.
        let step = ms(10);
        let data = 1_250u64; // per step: 1 Mbit/s
        let mut t = t0;
        while t < t0 + ms(2_000) {
            e.on_sent(t, data, false);
            e.on_delivered(t + ms(5), data);
            t += step;
        }
        let est = e.estimate(t);
        assert!(est.rate_app_limited, "{est:?}");
        // A 3 MB probe: its 8 KB chunks are answered as the link carries them, beside the
        // data (7 Mbit/s of padding).
        e.on_probe_started(t, 3_000_000);
        let mut padding = 0u64;
        let mut chunk = 0u64;
        let probe_start = t;
        while t < probe_start + ms(1_500) {
            e.on_sent(t, data, false);
            e.on_delivered(t + ms(5), data);
            padding += 8_750; // per step: 7 Mbit/s
            while padding >= 8_192 {
                padding -= 8_192;
                chunk += 1;
                e.on_probe_delivered(t + ms(5), 8_192);
            }
            t += step;
        }
        let est = e.estimate(t);
        assert!(!est.rate_app_limited, "{est:?}");
        let r = est.rate_bps.unwrap();
        assert!(
            (r - 8e6).abs() / 8e6 < 0.1,
            "the link's rate during the probe: {r}"
        );
        // The link drops to 2 Mbit/s under the probe (1 of data, 1 of padding): it shows
        // within a rate window, long before the probe ends.
        let drop = t;
        let mut seen = None;
        while t < drop + ms(3_000) {
            e.on_sent(t, data, false);
            e.on_delivered(t + ms(5), data);
            padding += 1_250;
            while padding >= 8_192 {
                padding -= 8_192;
                chunk += 1;
                e.on_probe_delivered(t + ms(5), 8_192);
            }
            t += step;
            let r = e.estimate(t).rate_bps.unwrap();
            if seen.is_none() && r < 2.5e6 {
                seen = Some(t - drop);
            }
        }
        let seen = seen.expect("the drop is seen during the probe");
        assert!(seen <= ms(1_600), "after {seen:?}");
        assert!(chunk * 8_192 < 3_000_000, "still probing");
    }

    fn stats(sent: u64, lost: u64, tx: u64, rx: u64, rtt: Duration) -> PathStats {
        PathStats {
            rtt,
            min_rtt: rtt,
            sent_packets: sent,
            lost_packets: lost,
            bytes_sent: tx,
            bytes_received: rx,
            ..PathStats::default()
        }
    }

    #[test]
    fn loss_rate_from_path_stats() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        e.on_path_stats(t0, &stats(1_000, 0, 1, 1, ms(20)));
        e.on_path_stats(t0 + ms(500), &stats(2_000, 100, 2, 2, ms(20)));
        let l = e.estimate(t0 + ms(500)).loss;
        assert!((l - 0.1).abs() < 1e-9, "loss {l}");
        // Older readings leave the window.
        e.on_path_stats(t0 + ms(3_000), &stats(3_000, 100, 3, 3, ms(20)));
        e.on_path_stats(t0 + ms(3_500), &stats(4_000, 100, 4, 4, ms(20)));
        let l = e.estimate(t0 + ms(3_500)).loss;
        assert!(l < 1e-9, "loss {l}");
    }

    #[test]
    fn silence_while_sending_is_an_outage() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        e.on_path_stats(t0, &stats(10, 0, 1_000, 1_000, ms(20)));
        // Data goes out, nothing comes back (QUIC's own bytes sent do not count: they
        // may be bare ACKs).
        e.on_path_stats(t0 + ms(50), &stats(12, 0, 3_000, 1_000, ms(20)));
        assert!(!e.estimate(t0 + ms(99)).outage());
        e.on_sent(t0 + ms(100), 2_000, true);
        e.on_path_stats(t0 + ms(150), &stats(14, 0, 5_000, 1_000, ms(20)));
        assert!(!e.estimate(t0 + ms(1_000)).outage());
        let est = e.estimate(t0 + ms(1_100));
        assert_eq!(est.outage_since, Some(t0 + ms(100)));
        assert_eq!(est.rate_bps, None, "the rate before an outage is forgotten");
        // Anything heard ends it.
        e.on_path_stats(t0 + ms(5_000), &stats(14, 0, 4_000, 1_100, ms(20)));
        assert!(!e.estimate(t0 + ms(5_000)).outage());
    }

    #[test]
    fn silence_while_idle_is_not_an_outage() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        e.on_path_stats(t0, &stats(10, 0, 1_000, 1_000, ms(20)));
        e.on_path_stats(t0 + ms(10_000), &stats(10, 0, 1_000, 1_000, ms(20)));
        assert!(!e.estimate(t0 + ms(10_000)).outage());
    }

    #[test]
    fn outage_threshold_scales_with_rtt() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        e.on_probe_answered(t0, ms(700));
        e.on_probe_sent(t0 + ms(100));
        assert_eq!(e.probe_timeout(), ms(1_400));
        assert!(!e.estimate(t0 + ms(1_400)).outage());
        assert!(e.estimate(t0 + ms(1_500)).outage());
    }

    #[test]
    fn a_standing_queue_does_not_stretch_outage_detection() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        e.on_probe_answered(t0, ms(700));
        // The queue fills: RTT 2.1 s for the next 10 s.
        for i in 1..=10u64 {
            e.on_probe_answered(t0 + ms(i * 1_000), ms(2_100));
        }
        let t1 = t0 + ms(10_000);
        assert_eq!(e.estimate(t1).rtt_min, Some(ms(2_100)));
        assert_eq!(e.probe_timeout(), ms(4_200), "pings wait in the queue too");
        assert_eq!(e.silence_limit(), ms(2_100), "one current RTT, not two");
        e.on_sent(t1 + ms(10), 1_000, true);
        assert!(!e.estimate(t1 + ms(2_100)).outage());
        assert!(e.estimate(t1 + ms(2_110)).outage());
    }

    #[test]
    fn a_queue_behind_an_app_limited_sender_shows_the_drop() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        // 3.2 Mbit/s offered, all delivered: app-limited samples.
        let mut t = t0;
        for _ in 0..80 {
            e.on_sent(t, 10_000, false);
            e.on_delivered(t + ms(10), 10_000);
            t += ms(25);
        }
        let est = e.estimate(t);
        assert!(est.rate_app_limited);
        assert!(est.rate_bps.unwrap() > 3e6, "{est:?}");
        // The link drops to 0.4 Mbit/s; the sender keeps offering 3.2 (never backlogged
        // by its own measure): a queue builds, and its deliveries are the link's rate.
        for _ in 0..60 {
            e.on_sent(t, 10_000, false);
            e.on_delivered(t + ms(10), 1_250);
            t += ms(25);
        }
        let est = e.estimate(t);
        assert!(!est.rate_app_limited, "{est:?}");
        let r = est.rate_bps.unwrap();
        assert!((3.5e5..4.5e5).contains(&r), "{r}");
    }

    #[test]
    fn a_low_sample_after_a_quiet_spell_needs_a_whole_window() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        probe(&mut e, t0, 100_000, ms(200)); // 4 Mbit/s
        // Quiet for 5 s: the estimate is held.
        let t1 = t0 + ms(5_000);
        assert_eq!(e.estimate(t1).rate_bps, Some(4e6));
        // Then a backlogged trickle at 0.4 Mbit/s.
        let mut t = t1;
        e.on_sent(t, 1_000_000, true);
        let window = e.config().rate_window;
        for _ in 0..60 {
            t += ms(25);
            e.on_delivered(t, 1_250);
            let r = e.estimate(t).rate_bps.unwrap();
            if t - t1 <= window {
                assert_eq!(r, 4e6, "at {:?}", t - t1);
            }
        }
        let r = e.estimate(t).rate_bps.unwrap();
        assert!((3.5e5..4.5e5).contains(&r), "{r}");
    }

    #[test]
    fn a_busy_link_behind_a_long_queue_is_down_when_answers_stop() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        let mut stats = PathStats::default();
        let mut t = t0;
        // Answers every 50 ms while a 1.8 s standing queue drains.
        for _ in 0..100 {
            t += ms(50);
            e.on_sent(t, 1_200, true);
            e.on_rtt_sample(t, ms(1_800));
            stats.bytes_received += 80;
            e.on_path_stats(t, &stats);
        }
        assert!(!e.estimate(t).outage());
        // The link dies: the answers stop.
        let dead = t;
        for _ in 0..40 {
            t += ms(50);
            e.on_sent(t, 1_200, true);
            e.on_path_stats(t, &stats);
            if e.estimate(t).outage() {
                break;
            }
        }
        assert!(e.estimate(t).outage());
        assert!(t - dead <= ms(1_100), "seen after {:?}", t - dead);

        // A window-limited sender on a 1.8 s path hears answers in clumps, one per RTT:
        // the silence between clumps is no outage.
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        let mut stats = PathStats::default();
        let mut t = t0;
        for _ in 0..10 {
            for _ in 0..4 {
                t += ms(50);
                e.on_sent(t, 1_200, true);
                e.on_rtt_sample(t, ms(1_800));
                stats.bytes_received += 80;
                e.on_path_stats(t, &stats);
            }
            for _ in 0..32 {
                t += ms(50);
                e.on_path_stats(t, &stats);
                assert!(!e.estimate(t).outage());
            }
        }
    }

    #[test]
    fn consecutive_probe_timeouts_are_an_outage() {
        let t0 = Instant::now();
        let cfg = EstimatorConfig {
            outage_min: ms(60_000),
            ..EstimatorConfig::default()
        };
        let mut e = LinkEstimator::new(cfg);
        e.on_probe_answered(t0, ms(20));
        e.on_probe_sent(t0 + ms(100));
        e.on_probe_timed_out(t0 + ms(600), Some(t0 + ms(100)));
        assert!(!e.estimate(t0 + ms(600)).outage());
        e.on_probe_timed_out(t0 + ms(1_100), Some(t0 + ms(600)));
        assert_eq!(e.estimate(t0 + ms(1_100)).outage_since, Some(t0 + ms(100)));
        e.on_probe_answered(t0 + ms(1_200), ms(20));
        assert!(!e.estimate(t0 + ms(1_200)).outage());
        // Pings that time out while the hub keeps answering are queued, not lost.
        let mut stats = PathStats::default();
        for i in 0..10u64 {
            let t = t0 + ms(2_000 + i * 500);
            stats.bytes_received += 100;
            e.on_path_stats(t, &stats);
            e.on_probe_timed_out(t + ms(1), Some(t - ms(1_000)));
        }
        assert!(!e.estimate(t0 + ms(7_000)).outage());
    }

    #[test]
    fn time_going_backwards_is_clamped() {
        let t0 = Instant::now();
        let mut e = LinkEstimator::new(EstimatorConfig::default());
        e.on_probe_answered(t0 + ms(1_000), ms(10));
        e.on_probe_answered(t0, ms(5));
        assert_eq!(e.estimate(t0).rtt_min, Some(ms(5)));
    }

    #[test]
    fn memory_stays_bounded() {
        let t0 = Instant::now();
        let cfg = EstimatorConfig {
            max_rate_span: Duration::from_secs(3_600),
            ..EstimatorConfig::default()
        };
        let mut e = LinkEstimator::new(cfg);
        for i in 0..20_000u64 {
            let t = t0 + Duration::from_micros(i);
            e.on_sent(t, 10, true);
            e.on_delivered(t, 10);
        }
        assert!(e.acks.len() <= MAX_ACK_POINTS);
    }
}
