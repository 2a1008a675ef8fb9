//! The MQTT device driver: broker → [`MqttSource`] → [`Mapper`] → ingest → durable → ack.
//!
//! Publishes are taken from the source in small batches, mapped to samples and submitted
//! to the ingest in one submission per batch. The batch's durability promise and its
//! acknowledgements go, in arrival order, to an ack task that waits for each promise and
//! only then hands the batch's acknowledgements to the source, which writes them at once.
//! So an acknowledged message is always in the outbox, and a message that yields no
//! samples (malformed, unmatched, oversized, a redelivery already stored) is acknowledged
//! right after the messages before it — never left for the broker to redeliver forever.
//!
//! Back-pressure: the source holds at most `max_in_flight` unacknowledged messages and
//! stops reading from the broker beyond that; a full ingest queue or a slow outbox holds
//! the acknowledgements back, so the source stops reading — nothing is dropped, no
//! acknowledgement is given up.
//!
//! Redeliveries: a QoS 1 message flagged DUP whose fingerprint was taken in this run or
//! stored before (the receipts stored with the samples) is acknowledged, not stored again;
//! its fingerprint is stored again with the next samples, so its receipt stays among the
//! newest while the broker may still redeliver it. Receipts are sized from `max_in_flight`
//! (`outpost_runtime::storage::receipts`).
//!
//! Metrics (label `device`): `outpost_stream_samples_stored` (samples made durable),
//! `outpost_stream_errors{kind}` (bad messages, by [`MappingError::kind`] plus `bad_topic`,
//! `oversized` and `subscribe_rejected`), `outpost_mqtt_connected` (0/1),
//! `outpost_mqtt_reconnects` (failed or ended connections),
//! `outpost_mqtt_redeliveries_skipped` (redelivered messages already stored),
//! `outpost_mqtt_unacked` (QoS 1 messages held unacknowledged), `outpost_mqtt_broker_refusals`
//! (connections an MQTT 5 broker ended saying it refused or dropped messages).
//!
//! [`MappingError::kind`]: outpost_protocols::mqtt::mapping::MappingError::kind

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use outpost_protocols::mqtt::mapping::{Mapper, MapperLimits, MappingError};
use outpost_protocols::mqtt::source::{
    AckToken, Acker, MqttSource, RecentMessages, SourceEvent, SourceOptions,
};
use outpost_runtime::config::MqttDeviceConfig;
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Sample, now_ns};
use outpost_runtime::storage::receipts::{capacity_for_in_flight, fingerprint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use crate::device::{DeviceContext, DriverFn};
use crate::ingest::Durable;

/// Most publishes mapped into one ingest submission.
pub const BATCH: usize = 256;

/// Batches awaiting durability before intake pauses (the source's `max_in_flight` bounds
/// the unacknowledged messages they hold).
pub const PENDING_BATCHES: usize = 8;

/// Stream refusals are logged at most this often (with the count of those held back).
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// MQTT 5 DISCONNECT reason codes by which a broker says it refused or dropped messages:
/// receive maximum exceeded, packet too large, message rate too high, quota exceeded.
const DROP_REASONS: [u8; 4] = [0x93, 0x95, 0x96, 0x97];

/// What is logged once per device (kept across restarts of its driver).
#[derive(Default)]
struct Once {
    oversized: AtomicBool,
    broker_drop: AtomicBool,
}

impl Once {
    fn first(flag: &AtomicBool) -> bool {
        !flag.swap(true, Ordering::Relaxed)
    }
}

/// The driver of an MQTT device.
pub fn driver(cfg: MqttDeviceConfig) -> DriverFn {
    let cfg = Arc::new(cfg);
    let once = Arc::new(Once::default());
    Arc::new(move |ctx: DeviceContext| Box::pin(run(cfg.clone(), once.clone(), ctx)))
}

/// Lets a repeated log line through at most once per `every`, counting what it held back.
#[derive(Debug)]
struct LogLimit {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl LogLimit {
    fn new(every: Duration) -> LogLimit {
        LogLimit {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)`: log now, `n` occurrences were held back since the last line.
    fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.every => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

struct Counters {
    metrics: Metrics,
    device: String,
    samples: Counter,
    connected: Gauge,
    reconnects: Counter,
    skipped: Counter,
    unacked: Gauge,
    refusals: Counter,
    errors: HashMap<&'static str, Counter>,
}

impl Counters {
    fn new(metrics: &Metrics, device: &str) -> Counters {
        let l = [("device", device)];
        Counters {
            metrics: metrics.clone(),
            device: device.to_owned(),
            samples: super::counters::samples_stored(metrics, device),
            connected: metrics.gauge(
                "outpost_mqtt_connected",
                "Whether the MQTT device is connected to its broker",
                &l,
            ),
            reconnects: metrics.counter(
                "outpost_mqtt_reconnects",
                "MQTT connections that failed or ended and were retried",
                &l,
            ),
            skipped: metrics.counter(
                "outpost_mqtt_redeliveries_skipped",
                "Redelivered MQTT messages whose samples were already stored",
                &l,
            ),
            unacked: metrics.gauge(
                "outpost_mqtt_unacked",
                "QoS 1 messages taken from the broker and not yet acknowledged (at most max_in_flight)",
                &l,
            ),
            refusals: metrics.counter(
                "outpost_mqtt_broker_refusals",
                "Connections an MQTT 5 broker ended saying it refused or dropped messages (reason codes 0x93, 0x95-0x97)",
                &l,
            ),
            errors: HashMap::new(),
        }
    }

    fn error(&mut self, kind: &'static str, n: u64) {
        let c = self
            .errors
            .entry(kind)
            .or_insert_with(|| super::counters::stream_errors(&self.metrics, &self.device, kind));
        c.inc_by(n);
    }
}

/// A submitted batch on its way to acknowledgement.
struct Pending {
    durable: Option<Durable>,
    samples: u64,
    acks: Vec<AckToken>,
}

/// One batch being assembled.
#[derive(Default)]
struct Batch {
    messages: usize,
    samples: Vec<Sample>,
    acks: Vec<AckToken>,
    /// Fingerprints of the QoS 1 messages taken, stored with their samples.
    fingerprints: Vec<u64>,
}

/// State the driver keeps between batches.
struct State {
    mapper: Mapper,
    recent: RecentMessages,
    /// Fingerprints of recognised redeliveries, to store again with the next samples (at
    /// most `refresh_cap`, the newest).
    refresh: VecDeque<u64>,
    refresh_cap: usize,
    refusals: LogLimit,
    max_streams: u64,
    max_packet: u64,
    once: Arc<Once>,
}

struct AbortOnDrop(tokio::task::JoinHandle<Result<(), String>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Disconnected(Gauge);

impl Drop for Disconnected {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

async fn run(
    cfg: Arc<MqttDeviceConfig>,
    once: Arc<Once>,
    ctx: DeviceContext,
) -> Result<(), String> {
    let opts = SourceOptions::from_config(&cfg, &ctx.gateway_id, &ctx.name)
        .map_err(|e| format!("MQTT device {}: {e}", ctx.name))?;
    tracing::info!(device = %ctx.name, broker = %cfg.broker, client_id = %opts.client_id,
        version = ?opts.version, tls = opts.tls.is_some(), max_in_flight = opts.max_in_flight,
        max_packet = opts.max_packet, "MQTT: connecting");
    let mut c = Counters::new(&ctx.metrics, &ctx.name);
    let _gauge = Disconnected(c.connected.clone());
    let window = capacity_for_in_flight(usize::from(opts.max_in_flight));
    let mut st = State {
        mapper: Mapper::with_limits(
            cfg.subscriptions.clone(),
            MapperLimits {
                max_payload: usize::try_from(cfg.max_payload.0).unwrap_or(usize::MAX),
                max_streams: cfg.max_streams.get() as usize,
                stream_idle_ns: i64::try_from(cfg.stream_idle.get().as_nanos()).unwrap_or(i64::MAX),
            },
        ),
        recent: RecentMessages::new(window),
        refresh: VecDeque::new(),
        refresh_cap: window,
        refusals: LogLimit::new(REFUSAL_LOG_EVERY),
        max_streams: cfg.max_streams.get(),
        max_packet: cfg.max_packet.0,
        once,
    };
    let mut source = MqttSource::start(opts);
    let (pending_tx, pending_rx) = mpsc::channel(PENDING_BATCHES);
    let mut acks = AbortOnDrop(tokio::spawn(ack_loop(
        pending_rx,
        source.acker(),
        c.samples.clone(),
    )));
    loop {
        let first = tokio::select! {
            ev = source.next() => ev.ok_or("MQTT connection task stopped")?,
            r = &mut acks.0 => return Err(match r {
                Ok(Err(e)) => e,
                _ => "MQTT ack task ended".to_owned(),
            }),
        };
        let mut batch = Batch::default();
        handle(first, &ctx, &mut c, &mut st, &mut batch);
        while batch.messages < BATCH {
            match source.try_next() {
                Some(ev) => handle(ev, &ctx, &mut c, &mut st, &mut batch),
                None => break,
            }
        }
        c.unacked.set(source.held().0 as i64);
        if batch.samples.is_empty() && batch.acks.is_empty() {
            continue;
        }
        let samples = batch.samples.len() as u64;
        let durable = if batch.samples.is_empty() {
            None
        } else {
            // Refreshed receipts go with the first samples stored after their redelivery:
            // nothing is stored in between, so nothing could push them out meanwhile.
            let mut fps = batch.fingerprints;
            fps.extend(st.refresh.drain(..));
            Some(
                ctx.ingest
                    .submit_with_receipts(ctx.priority, batch.samples, namespace(&ctx.name), fps)
                    .await
                    .map_err(|e| e.to_string())?,
            )
        };
        pending_tx
            .send(Pending {
                durable,
                samples,
                acks: batch.acks,
            })
            .await
            .map_err(|_| "MQTT ack task ended".to_owned())?;
    }
}

/// The receipts namespace of an MQTT device.
fn namespace(device: &str) -> u64 {
    fingerprint(&[b"mqtt", device.as_bytes()])
}

fn handle(
    ev: SourceEvent,
    ctx: &DeviceContext,
    c: &mut Counters,
    st: &mut State,
    batch: &mut Batch,
) {
    match ev {
        SourceEvent::Connected { session_present } => {
            c.connected.set(1);
            tracing::info!(device = %ctx.name, session_present, "MQTT: connected");
        }
        SourceEvent::Disconnected {
            error,
            attempt,
            retry_in,
        } => {
            c.connected.set(0);
            c.reconnects.inc();
            tracing::warn!(device = %ctx.name, %error, attempt, ?retry_in,
                "MQTT: disconnected; retrying");
        }
        SourceEvent::SubscribeRejected { count } => {
            c.error("subscribe_rejected", count as u64);
            tracing::warn!(device = %ctx.name, count, "MQTT: the broker refused subscriptions");
        }
        SourceEvent::BrokerDisconnect { code, reason } => {
            if DROP_REASONS.contains(&code) {
                c.refusals.inc();
                if Once::first(&st.once.broker_drop) {
                    tracing::warn!(device = %ctx.name, code = format!("0x{code:02x}"),
                        reason = reason.as_deref().unwrap_or(""), max_packet = st.max_packet,
                        "MQTT: the broker says it refused or dropped messages for this device \
                         (an MQTT 5 broker also drops messages over max_packet without saying \
                         so); logged once, counted in outpost_mqtt_broker_refusals");
                }
            } else {
                tracing::info!(device = %ctx.name, code = format!("0x{code:02x}"),
                    reason = reason.as_deref().unwrap_or(""), "MQTT: the broker ended the connection");
            }
        }
        SourceEvent::Message(m) => {
            batch.messages += 1;
            take(m, ctx, c, st, batch);
        }
    }
}

fn take(
    m: outpost_protocols::mqtt::source::Message,
    ctx: &DeviceContext,
    c: &mut Counters,
    st: &mut State,
    batch: &mut Batch,
) {
    let arrival = now_ns();
    if let Some(len) = m.oversized() {
        // Read past by the source: counted and acknowledged, never stored.
        c.error("oversized", 1);
        if Once::first(&st.once.oversized) {
            tracing::warn!(device = %ctx.name, topic = %String::from_utf8_lossy(m.topic_bytes()),
                bytes = len, max_packet = st.max_packet,
                "MQTT: a message over max_packet was skipped and acknowledged (logged once; \
                 counted in outpost_stream_errors{{kind=\"oversized\"}})");
        }
    } else {
        match m.topic() {
            None => c.error("bad_topic", 1),
            Some(topic) => {
                let mut fresh = true;
                if m.qos() > 0 {
                    // A redelivery (DUP) of a message already taken is acked, not stored
                    // again: taken in this run (`recent`), or stored before a crash or
                    // restart (the receipts stored with the samples).
                    let digest = st.recent.digest(m.topic_bytes(), m.payload());
                    let fp = fingerprint(&[m.topic_bytes(), m.payload()]);
                    let known = st.recent.contains(digest);
                    // The newest either way: a first take, or a refresh of a redelivery.
                    st.recent.insert(digest);
                    if m.dup() && (known || ctx.ingest.already_stored(namespace(&ctx.name), fp)) {
                        c.skipped.inc();
                        fresh = false;
                        st.refresh.push_back(fp);
                        while st.refresh.len() > st.refresh_cap {
                            st.refresh.pop_front();
                        }
                    } else {
                        batch.fingerprints.push(fp);
                    }
                }
                if fresh {
                    let out = st.mapper.map(topic, m.payload(), arrival);
                    for e in &out.errors {
                        c.error(e.kind(), 1);
                        if let MappingError::StreamLimit(name) = e {
                            if let Some(held_back) = st.refusals.hit(Instant::now()) {
                                tracing::warn!(device = %ctx.name, stream = %name,
                                    max_streams = st.max_streams, held_back,
                                    "MQTT: stream refused: the device names max_streams \
                                     distinct streams already (a stream silent for \
                                     stream_idle gives its slot back); at most one line a minute");
                            }
                        } else {
                            tracing::debug!(device = %ctx.name, error = %e, "MQTT: bad message");
                        }
                    }
                    batch.samples.extend(out.samples);
                }
            }
        }
    }
    if let Some(ack) = m.into_ack() {
        batch.acks.push(ack);
    }
}

/// Waits for each batch to be durable, in order, then hands its acknowledgements to the
/// source, which writes them at once (never refused, never given up).
async fn ack_loop(
    mut rx: mpsc::Receiver<Pending>,
    acker: Acker,
    samples: Counter,
) -> Result<(), String> {
    while let Some(p) = rx.recv().await {
        if let Some(d) = p.durable {
            d.wait()
                .await
                .map_err(|e| format!("MQTT samples could not be made durable: {e}"))?;
            samples.inc_by(p.samples);
        }
        acker.ack_all(p.acks);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_line_is_let_through_once_a_period_with_the_count_held_back() {
        let mut l = LogLimit::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(l.hit(t0), Some(0));
        assert_eq!(l.hit(t0 + Duration::from_secs(1)), None);
        assert_eq!(l.hit(t0 + Duration::from_secs(59)), None);
        assert_eq!(l.hit(t0 + Duration::from_secs(61)), Some(2));
        assert_eq!(l.hit(t0 + Duration::from_secs(62)), None);
    }
}
