//! The link-monitor actor: owns the [`LinkEstimator`] and the
//! [`Classifier`], feeds them with what the sync actor observes on the uplink
//! ([`LinkEvent`]s: path statistics, frames sent and acknowledged, pings, connection
//! attempts) and publishes the class on a watch channel the sync actor follows. Every
//! class change is logged and counted (`outpost_link_class_changes{from,to,reason}`), the
//! current class and estimate are exported as gauges.
//!
//! It also decides when a throughput probe is due: only while the uplink is idle (no
//! backlogged send for a while), never on fiber (nothing better to prove), and only within
//! the `[link] probe_budget_per_hour` ([`ProbeBudget`]). The sync actor carries the probe out
//! (padded pings) and reports its result.

use std::time::{Duration, Instant};

use outpost_protocols::uplink::quic::PathStats;
use outpost_runtime::config::LinkSection;
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::LinkClass;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};

use super::{ChangeReason, ClassChange, Classifier, ClassifierConfig, EstimatorConfig};
use super::{LinkEstimator, ProbeBudget, probe_bytes};

/// How often the classifier looks at the estimate.
pub const TICK: Duration = Duration::from_millis(50);
/// Events queued between the sync actor and the monitor at most (beyond: dropped, counted).
pub const EVENT_QUEUE: usize = 4_096;
/// A throughput probe lasts about this long at the rate it must prove.
pub const PROBE_SPAN: Duration = Duration::from_millis(200);
/// The uplink counts as idle after this long without a backlogged send.
pub const IDLE_AFTER: Duration = Duration::from_secs(2);
/// Least pause after a throughput probe before the next one; it doubles after each probe
/// while the class stays the same (a link that has shown its rate need not be asked again
/// and again), up to [`PROBE_GAP_MAX`], and starts over when the class changes.
pub const PROBE_GAP_MIN: Duration = Duration::from_secs(2);
/// Longest pause between throughput probes while the class stays the same.
pub const PROBE_GAP_MAX: Duration = Duration::from_secs(60);
/// A throughput probe not reported done or failed after this long is given up: the
/// pinger waits for its last Pong however slow the link turned out to be, and reports
/// nothing if it stopped meanwhile. (A probe is sized to take 200 ms at the rate it must
/// prove; one that takes 10 s has shown a link far slower, through its deliveries.)
pub const PROBE_GIVE_UP: Duration = Duration::from_secs(10);

/// What the sync actor saw on the uplink.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinkEvent {
    /// A connection to the hub came up after a handshake of this long; `probes`: the
    /// transport can carry throughput probes (QUIC pings; not MQTT).
    Connected { handshake: Duration, probes: bool },
    /// A connection attempt failed or timed out (a probe without answer).
    ConnectFailed,
    /// The connection went down.
    Disconnected,
    /// A path-statistics reading of the live connection.
    PathStats(PathStats),
    /// Frame bytes written; `backlogged`: more data was waiting.
    Sent { bytes: u64, backlogged: bool },
    /// Frame bytes the hub acknowledged.
    Delivered { bytes: u64 },
    /// An RTT ping went out.
    PingSent,
    /// A ping came back.
    PingAnswered { rtt: Duration },
    /// A ping sent at `sent` got no answer in time ([`LinkHandle::probe_timeout`]).
    PingTimedOut { sent: Instant },
    /// A throughput probe put `bytes` of padding on the link.
    ProbeStarted { bytes: u64 },
    /// The hub answered a probe ping: its `bytes` of padding crossed the link.
    ProbeDelivered { bytes: u64 },
    /// The probe's last answer came back: its padding took `duration` to cross the link
    /// (the elapsed time less one RTT).
    ProbeDone { duration: Duration },
    /// A throughput probe reserved `bytes` and could not run (refund).
    ProbeFailed { bytes: u64 },
}

/// The sync actor's side of the monitor.
#[derive(Clone)]
pub struct LinkHandle {
    events: mpsc::Sender<(Instant, LinkEvent)>,
    class: watch::Receiver<LinkClass>,
    probe_timeout: watch::Receiver<Duration>,
    probe: watch::Receiver<Option<u64>>,
    dropped: Counter,
}

impl LinkHandle {
    /// Reports an event now (never blocks; a full queue drops it and counts).
    pub fn report(&self, e: LinkEvent) {
        if self.events.try_send((Instant::now(), e)).is_err() {
            self.dropped.inc();
        }
    }

    /// The class now.
    pub fn class(&self) -> LinkClass {
        *self.class.borrow()
    }

    /// A receiver that wakes on class changes.
    pub fn watch_class(&self) -> watch::Receiver<LinkClass> {
        self.class.clone()
    }

    /// How long a ping may go unanswered.
    pub fn probe_timeout(&self) -> Duration {
        *self.probe_timeout.borrow()
    }

    /// Takes the pending throughput-probe request (bytes to send), if any.
    pub fn take_probe(&mut self) -> Option<u64> {
        if self.probe.has_changed().unwrap_or(false) {
            *self.probe.borrow_and_update()
        } else {
            None
        }
    }
}

/// The monitor's state (everything but the channels): pure, driven by [`Monitor::on_event`]
/// and [`Monitor::tick`].
pub struct Monitor {
    estimator: LinkEstimator,
    classifier: Classifier,
    budget: ProbeBudget,
    last_backlogged: Option<Instant>,
    /// Since when a throughput probe is running, if one is.
    probe_running: Option<Instant>,
    /// No throughput probe before this.
    probe_not_before: Option<Instant>,
    /// The pause after the next probe.
    probe_gap: Duration,
    /// The class the last probe was sized from (it was to prove the one above).
    probe_basis: LinkClass,
    connected: bool,
    /// The current connection can carry throughput probes.
    can_probe: bool,
}

impl Monitor {
    pub fn new(cfg: &LinkSection, initial: LinkClass, now: Instant) -> Monitor {
        Monitor {
            estimator: LinkEstimator::new(EstimatorConfig::default()),
            classifier: Classifier::new(ClassifierConfig::from_section(cfg), initial, now),
            budget: ProbeBudget::new(cfg.probe_budget_per_hour.0, now)
                .holding(largest_probe(&ClassifierConfig::from_section(cfg))),
            last_backlogged: None,
            probe_running: None,
            probe_not_before: None,
            probe_gap: PROBE_GAP_MIN,
            probe_basis: initial,
            connected: false,
            can_probe: false,
        }
    }

    pub fn class(&self) -> LinkClass {
        self.classifier.class()
    }

    pub fn estimator(&self) -> &LinkEstimator {
        &self.estimator
    }

    pub fn on_event(&mut self, at: Instant, e: LinkEvent) {
        let est = &mut self.estimator;
        match e {
            LinkEvent::Connected { handshake, probes } => {
                self.connected = true;
                self.can_probe = probes;
                est.reset_in_flight();
                est.on_probe_answered(at, handshake);
            }
            LinkEvent::ConnectFailed => est.on_probe_timed_out(at, None),
            LinkEvent::Disconnected => {
                self.connected = false;
                self.probe_running = None;
                est.on_probe_ended(at);
                est.reset_in_flight();
            }
            LinkEvent::PathStats(s) => est.on_path_stats(at, &s),
            LinkEvent::Sent { bytes, backlogged } => {
                if backlogged {
                    self.last_backlogged = Some(at);
                }
                est.on_sent(at, bytes, backlogged);
            }
            LinkEvent::Delivered { bytes } => est.on_delivered(at, bytes),
            LinkEvent::PingSent => est.on_probe_sent(at),
            LinkEvent::PingAnswered { rtt } => est.on_probe_answered(at, rtt),
            LinkEvent::PingTimedOut { sent } => est.on_probe_timed_out(at, Some(sent)),
            LinkEvent::ProbeStarted { bytes } => est.on_probe_started(at, bytes),
            LinkEvent::ProbeDelivered { bytes } => est.on_probe_delivered(at, bytes),
            LinkEvent::ProbeDone { duration } => {
                self.probe_running = None;
                est.on_probe_finished(at, duration);
                self.probe_pause(at);
            }
            LinkEvent::ProbeFailed { bytes } => {
                self.probe_running = None;
                est.on_probe_ended(at);
                self.budget.refund(bytes);
            }
        }
    }

    /// After a probe: a pause, unless it showed more than it was sized to prove (then the
    /// next, larger probe is worth sending at once).
    fn probe_pause(&mut self, now: Instant) {
        let est = self.estimator.estimate(now);
        let shown = self.classifier.config().evidence(&est, true);
        if shown.is_some_and(|c| c < self.probe_basis) {
            self.probe_not_before = None;
            return;
        }
        self.probe_not_before = Some(now + self.probe_gap);
        self.probe_gap = (self.probe_gap * 2).min(PROBE_GAP_MAX);
    }

    /// Re-classifies; returns the change, if any.
    pub fn tick(&mut self, now: Instant) -> Option<ClassChange> {
        if self
            .probe_running
            .is_some_and(|t| now.saturating_duration_since(t) >= PROBE_GIVE_UP)
        {
            self.probe_running = None;
            self.estimator.on_probe_ended(now);
            self.probe_pause(now);
        }
        let est = self.estimator.estimate(now);
        let change = self.classifier.update(now, &est);
        if change.is_some() {
            // A new class: what it could be up-graded to is worth asking soon.
            self.probe_gap = PROBE_GAP_MIN;
            self.probe_not_before = None;
        }
        change
    }

    /// A throughput probe to start now (its byte size), if one is due and affordable.
    pub fn probe_due(&mut self, now: Instant) -> Option<u64> {
        if self.probe_running.is_some()
            || !self.connected
            || !self.can_probe
            || self.probe_not_before.is_some_and(|t| now < t)
        {
            return None;
        }
        let class = self.classifier.class();
        let idle = self
            .last_backlogged
            .is_none_or(|t| now.saturating_duration_since(t) >= IDLE_AFTER);
        let est = self.estimator.estimate(now);
        if est.outage() || (est.rate_fresh && !est.rate_app_limited) {
            // The link must answer pings before it is measured; traffic that keeps it busy
            // is measuring it already.
            return None;
        }
        // Sized to prove the class above what is known: the current class, or what the
        // evidence already shows if that is better (after an outage a small first probe
        // may show a fast link; the next one is sized to prove it).
        let basis = self
            .classifier
            .config()
            .evidence(&est, true)
            .map_or(class, |e| e.min(class));
        let bytes = probe_bytes(self.classifier.config(), basis, PROBE_SPAN)?;
        self.budget.try_start(now, bytes, idle).ok()?;
        self.probe_running = Some(now);
        self.probe_basis = basis;
        Some(bytes)
    }
}

/// The largest throughput probe the monitor asks for: the one that proves fiber.
fn largest_probe(cfg: &ClassifierConfig) -> u64 {
    LinkClass::ALL
        .into_iter()
        .filter_map(|c| probe_bytes(cfg, c, PROBE_SPAN))
        .max()
        .unwrap_or(0)
}

struct Gauges {
    class: Gauge,
    rate: Gauge,
    rtt_us: Gauge,
    loss_permille: Gauge,
    outage: Gauge,
}

/// Starts the monitor task; returns the handle the sync actor uses. The task ends when
/// every handle is dropped.
pub fn spawn(cfg: &LinkSection, initial: LinkClass, metrics: &Metrics) -> LinkHandle {
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let (class_tx, class_rx) = watch::channel(initial);
    let (timeout_tx, timeout_rx) = watch::channel(Duration::from_secs(1));
    let (probe_tx, probe_rx) = watch::channel(None);
    let dropped = metrics.counter(
        "outpost_link_events_dropped",
        "Link observations dropped because the link monitor was behind",
        &[],
    );
    let monitor = Monitor::new(cfg, initial, Instant::now());
    tokio::spawn(run(
        monitor,
        ev_rx,
        class_tx,
        timeout_tx,
        probe_tx,
        metrics.clone(),
    ));
    LinkHandle {
        events: ev_tx,
        class: class_rx,
        probe_timeout: timeout_rx,
        probe: probe_rx,
        dropped,
    }
}

async fn run(
    mut m: Monitor,
    mut events: mpsc::Receiver<(Instant, LinkEvent)>,
    class_tx: watch::Sender<LinkClass>,
    timeout_tx: watch::Sender<Duration>,
    probe_tx: watch::Sender<Option<u64>>,
    metrics: Metrics,
) {
    let g = Gauges {
        class: metrics.gauge(
            "outpost_link_class",
            "Current link class: 0 fiber, 1 broadband, 2 mobile, 3 satellite, 4 intermittent",
            &[],
        ),
        rate: metrics.gauge(
            "outpost_link_rate_bps",
            "Estimated delivery rate of the uplink (windowed maximum), bit/s",
            &[],
        ),
        rtt_us: metrics.gauge(
            "outpost_link_rtt_us",
            "Estimated RTT of the uplink (windowed minimum), microseconds",
            &[],
        ),
        loss_permille: metrics.gauge(
            "outpost_link_loss_permille",
            "Packet loss of the uplink over the loss window, per mille",
            &[],
        ),
        outage: metrics.gauge("outpost_link_outage", "1 while the uplink is down", &[]),
    };
    let probes = metrics.counter(
        "outpost_link_probes",
        "Throughput probes started (padded pings within the hourly byte budget)",
        &[],
    );
    let probe_bytes = metrics.counter(
        "outpost_link_probe_bytes",
        "Bytes reserved for throughput probes",
        &[],
    );
    g.class.set(m.class() as i64);
    tracing::info!(class = m.class().as_str(), "link monitor started");
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            e = events.recv() => {
                let Some((at, e)) = e else { return };
                m.on_event(at, e);
                // Drain what else is queued before classifying.
                while let Ok((at, e)) = events.try_recv() {
                    m.on_event(at, e);
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if let Some(c) = m.tick(now) {
                    report_change(&metrics, &c, &m);
                    g.class.set(c.to as i64);
                    class_tx.send_replace(c.to);
                }
                let est = m.estimator.estimate(now);
                g.rate.set(est.rate_bps.unwrap_or(0.0) as i64);
                g.rtt_us.set(est.rtt_min.map_or(0, |r| r.as_micros() as i64));
                g.loss_permille.set((est.loss * 1000.0) as i64);
                g.outage.set(i64::from(est.outage()));
                timeout_tx.send_if_modified(|t| {
                    let new = m.estimator.probe_timeout();
                    let changed = *t != new;
                    *t = new;
                    changed
                });
                if let Some(bytes) = m.probe_due(now) {
                    probes.inc();
                    probe_bytes.inc_by(bytes);
                    tracing::debug!(bytes, class = m.class().as_str(), "throughput probe");
                    probe_tx.send_replace(Some(bytes));
                }
            }
        }
    }
}

fn report_change(metrics: &Metrics, c: &ClassChange, m: &Monitor) {
    let reason = match c.reason {
        ChangeReason::Downgrade => "downgrade",
        ChangeReason::Upgrade => "upgrade",
    };
    metrics
        .counter(
            "outpost_link_class_changes",
            "Link class changes, by old and new class",
            &[
                ("from", c.from.as_str()),
                ("to", c.to.as_str()),
                ("reason", reason),
            ],
        )
        .inc();
    let est = m.estimator.clone().estimate(c.at);
    tracing::info!(
        from = c.from.as_str(),
        to = c.to.as_str(),
        reason,
        mode = c.to.sync_mode().as_str(),
        rate_mbps = est.rate_bps.map(|r| r / 1e6),
        rtt_ms = est.rtt_min.map(|r| r.as_secs_f64() * 1e3),
        loss = est.loss,
        outage = est.outage(),
        "link class changed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A monitor in `class` whose uplink connected at `t0` after a `handshake`.
    fn connected(cfg: &LinkSection, class: LinkClass, t0: Instant, handshake: u64) -> Monitor {
        let mut m = Monitor::new(cfg, class, t0);
        m.on_event(
            t0,
            LinkEvent::Connected {
                handshake: ms(handshake),
                probes: true,
            },
        );
        m
    }

    #[test]
    fn pings_that_time_out_make_the_link_intermittent_and_an_answer_ends_it() {
        let cfg = LinkSection::default();
        let t0 = Instant::now();
        let mut m = connected(&cfg, LinkClass::Broadband, t0, 30);
        // A working link: deliveries at ~20 Mbit/s.
        let mut t = t0;
        for _ in 0..40 {
            t += ms(50);
            m.on_event(
                t,
                LinkEvent::Sent {
                    bytes: 125_000,
                    backlogged: true,
                },
            );
            m.on_event(t, LinkEvent::Delivered { bytes: 125_000 });
            assert_eq!(m.tick(t), None, "a steady broadband link stays broadband");
        }
        // Silence: pings unanswered.
        let down_at = t;
        let mut changed = None;
        for _ in 0..100 {
            t += ms(50);
            if (t - down_at).as_millis() % 500 < 50 {
                m.on_event(t, LinkEvent::PingSent);
                m.on_event(
                    t,
                    LinkEvent::PingTimedOut {
                        sent: t - ms(1_000),
                    },
                );
            }
            if let Some(c) = m.tick(t) {
                changed = Some((c, t - down_at));
                break;
            }
        }
        let (c, after) = changed.expect("an outage is detected");
        assert_eq!(c.to, LinkClass::Intermittent);
        assert!(after <= Duration::from_secs(2), "detected after {after:?}");
        assert_eq!(m.probe_due(t), None, "no throughput probe during an outage");
    }

    #[test]
    fn probes_back_off_while_the_class_stays_and_start_over_when_it_changes() {
        let cfg = LinkSection::default();
        let t0 = Instant::now();
        let mut m = connected(&cfg, LinkClass::Mobile, t0, 60);
        // Each probe measures a mobile link (2 Mbit/s): no up-grade, longer pauses.
        let mut t = t0;
        let mut starts = Vec::new();
        let mut probe_time = Duration::ZERO;
        while t < t0 + Duration::from_secs(60) {
            t += ms(50);
            assert_eq!(m.tick(t), None);
            if let Some(bytes) = m.probe_due(t) {
                starts.push(t - t0);
                m.on_event(t, LinkEvent::ProbeStarted { bytes });
                let took = Duration::from_secs_f64(bytes as f64 * 8.0 / 2e6);
                probe_time = took + ms(60);
                t += probe_time;
                m.on_event(t, LinkEvent::ProbeDelivered { bytes });
                m.on_event(t, LinkEvent::ProbeDone { duration: took });
                assert_eq!(m.tick(t), None, "a mobile link stays mobile");
            }
        }
        // Pauses from one probe's end to the next one's start.
        let gaps: Vec<f64> = starts
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64() - probe_time.as_secs_f64())
            .collect();
        assert!(gaps.len() >= 3, "{starts:?}");
        for w in gaps.windows(2) {
            assert!(w[1] > 1.8 * w[0], "each pause about doubles: {gaps:?}");
        }
        assert!(gaps[0] >= PROBE_GAP_MIN.as_secs_f64(), "{gaps:?}");
        // The link goes down and comes back: a new class, probes are due again at once.
        let mut changed = false;
        while !changed {
            t += ms(50);
            m.on_event(
                t,
                LinkEvent::PingTimedOut {
                    sent: t - ms(2_000),
                },
            );
            changed = m.tick(t).is_some();
        }
        m.on_event(
            t,
            LinkEvent::Connected {
                handshake: ms(60),
                probes: true,
            },
        );
        t += ms(50);
        assert!(m.probe_due(t).is_some(), "a new class is probed at once");
    }

    #[test]
    fn a_probe_that_shows_a_faster_link_is_followed_by_one_sized_to_prove_it() {
        let cfg = LinkSection::default();
        let ccfg = ClassifierConfig::from_section(&cfg);
        let t0 = Instant::now();
        // Back from an outage: nothing known but that the link answers.
        let mut m = connected(&cfg, LinkClass::Intermittent, t0, 10);
        let t = t0 + ms(100);
        let first = m.probe_due(t).expect("a probe after the outage");
        assert_eq!(
            Some(first),
            probe_bytes(&ccfg, LinkClass::Intermittent, PROBE_SPAN)
        );
        // It crossed at 50 Mbit/s: broadband shown; the next probe (at once) is sized to
        // prove fiber.
        m.on_event(t, LinkEvent::ProbeStarted { bytes: first });
        let took = Duration::from_secs_f64(first as f64 * 8.0 / 50e6);
        let t = t + took + ms(10);
        m.on_event(t, LinkEvent::ProbeDelivered { bytes: first });
        m.on_event(t, LinkEvent::ProbeDone { duration: took });
        // (No probe while the fresh sample stands: the link was just measured.)
        let t = t + m.estimator().config().rate_window + ms(50);
        let second = m
            .probe_due(t)
            .expect("no pause after a probe that showed more");
        assert_eq!(
            Some(second),
            probe_bytes(&ccfg, LinkClass::Broadband, PROBE_SPAN)
        );
        assert!(second > first);
    }

    #[test]
    fn a_probe_is_due_only_when_idle_and_within_budget() {
        let mut cfg = LinkSection::default();
        let t0 = Instant::now();
        let mut m = Monitor::new(&cfg, LinkClass::Mobile, t0);
        assert_eq!(m.probe_due(t0), None, "not connected");
        m.on_event(
            t0,
            LinkEvent::Connected {
                handshake: ms(60),
                probes: true,
            },
        );
        m.on_event(
            t0,
            LinkEvent::Sent {
                bytes: 1_000,
                backlogged: true,
            },
        );
        m.on_event(t0 + ms(60), LinkEvent::Delivered { bytes: 1_000 });
        assert_eq!(m.probe_due(t0 + ms(100)), None, "busy");
        let t = t0 + IDLE_AFTER + ms(100);
        let bytes = m.probe_due(t).expect("idle, budget available");
        // Mobile must prove the broadband up-grade rate (10 Mbit/s + 40 %) for PROBE_SPAN.
        assert_eq!(bytes, (14e6 / 8.0 * PROBE_SPAN.as_secs_f64()).ceil() as u64);
        assert_eq!(m.probe_due(t), None, "one probe at a time");
        m.on_event(t, LinkEvent::ProbeFailed { bytes });
        assert!(m.probe_due(t).is_some(), "refunded");

        cfg.probe_budget_per_hour.0 = 1_000;
        let mut m = connected(&cfg, LinkClass::Mobile, t0, 60);
        assert_eq!(m.probe_due(t0 + IDLE_AFTER), None, "over budget");

        // A transport that cannot carry probes (MQTT) is never asked for one.
        let cfg = LinkSection::default();
        let mut m = Monitor::new(&cfg, LinkClass::Mobile, t0);
        m.on_event(
            t0,
            LinkEvent::Connected {
                handshake: ms(60),
                probes: false,
            },
        );
        assert_eq!(
            m.probe_due(t0 + IDLE_AFTER + ms(100)),
            None,
            "no probes over MQTT"
        );
    }
}
