//! The link-monitor actor (issue 5 item 2): owns the [`LinkEstimator`] and the
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
    /// A throughput probe moved `bytes` in `duration` (one RTT already taken off).
    ProbeDone { bytes: u64, duration: Duration },
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
    probe_running: bool,
    connected: bool,
    /// The current connection can carry throughput probes.
    can_probe: bool,
}

impl Monitor {
    pub fn new(cfg: &LinkSection, initial: LinkClass, now: Instant) -> Monitor {
        Monitor {
            estimator: LinkEstimator::new(EstimatorConfig::default()),
            classifier: Classifier::new(ClassifierConfig::from_section(cfg), initial, now),
            budget: ProbeBudget::new(cfg.probe_budget_per_hour.0, now),
            last_backlogged: None,
            probe_running: false,
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
                self.probe_running = false;
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
            LinkEvent::ProbeDone { bytes, duration } => {
                self.probe_running = false;
                est.on_throughput_probe(at, bytes, duration);
            }
            LinkEvent::ProbeFailed { bytes } => {
                self.probe_running = false;
                self.budget.refund(bytes);
            }
        }
    }

    /// Re-classifies; returns the change, if any.
    pub fn tick(&mut self, now: Instant) -> Option<ClassChange> {
        let est = self.estimator.estimate(now);
        self.classifier.update(now, &est)
    }

    /// A throughput probe to start now (its byte size), if one is due and affordable.
    pub fn probe_due(&mut self, now: Instant) -> Option<u64> {
        if self.probe_running || !self.connected || !self.can_probe {
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
        let bytes = probe_bytes(self.classifier.config(), class, PROBE_SPAN)?;
        self.budget.try_start(now, bytes, idle).ok()?;
        self.probe_running = true;
        Some(bytes)
    }
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

    #[test]
    fn pings_that_time_out_make_the_link_intermittent_and_an_answer_ends_it() {
        let cfg = LinkSection::default();
        let t0 = Instant::now();
        let mut m = Monitor::new(&cfg, LinkClass::Broadband, t0);
        m.on_event(
            t0,
            LinkEvent::Connected {
                handshake: ms(30),
                probes: true,
            },
        );
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
        let mut m = Monitor::new(&cfg, LinkClass::Mobile, t0);
        m.on_event(
            t0,
            LinkEvent::Connected {
                handshake: ms(60),
                probes: true,
            },
        );
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
