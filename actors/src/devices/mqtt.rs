//! The MQTT device driver: broker → [`MqttSource`] → [`Mapper`] → ingest → durable → ack.
//!
//! Publishes are taken from the source in small batches, mapped to samples and submitted
//! to the ingest in one submission per batch. The batch's durability promise and its
//! acknowledgements go, in arrival order, to an ack task that waits for each promise and
//! only then acknowledges the batch's QoS 1 messages to the broker. So the event loop is
//! never blocked by an ack, an acknowledged message is always in the outbox, and a message
//! that yields no samples (malformed, unmatched, a redelivery already stored) is
//! acknowledged right after the messages before it — never left for the broker to
//! redeliver forever.
//!
//! Metrics (label `device`): `outpost_stream_samples_stored` (samples made durable),
//! `outpost_stream_errors{kind}` (bad messages, by [`MappingError::kind`] plus `bad_topic`
//! and `subscribe_rejected`), `outpost_mqtt_connected` (0/1), `outpost_mqtt_reconnects`
//! (failed or ended connections), `outpost_mqtt_redeliveries_skipped` (redelivered
//! messages already stored).
//!
//! [`MappingError::kind`]: outpost_protocols::mqtt::mapping::MappingError::kind

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::mqtt::mapping::Mapper;
use outpost_protocols::mqtt::source::{
    AckOutcome, AckToken, Acker, MqttSource, RecentMessages, SourceEvent, SourceOptions,
};
use outpost_runtime::config::MqttDeviceConfig;
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Sample, now_ns};
use outpost_runtime::storage::receipts::fingerprint;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use crate::device::{DeviceContext, DriverFn};
use crate::ingest::Durable;

/// Most publishes mapped into one ingest submission.
pub const BATCH: usize = 256;

/// Batches awaiting durability before intake pauses (with [`BATCH`], bounds the
/// unacknowledged messages held by the driver).
pub const PENDING_BATCHES: usize = 8;

/// Acknowledgements ready but not yet taken by the event loop, at most (a broker that
/// honours its in-flight window never gets near it).
pub const MAX_READY_ACKS: usize = 65_536;

/// Digests of recent QoS 1 messages kept to recognise redeliveries (16 bytes each, twice).
pub const RECENT_MESSAGES: usize = 65_536;

/// The driver of an MQTT device.
pub fn driver(cfg: MqttDeviceConfig) -> DriverFn {
    let cfg = Arc::new(cfg);
    Arc::new(move |ctx: DeviceContext| Box::pin(run(cfg.clone(), ctx)))
}

struct Counters {
    metrics: Metrics,
    device: String,
    samples: Counter,
    connected: Gauge,
    reconnects: Counter,
    skipped: Counter,
    acks_given_up: Counter,
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
            acks_given_up: metrics.counter(
                "outpost_mqtt_acks_given_up",
                "MQTT acknowledgements dropped because the event loop did not take them (the broker redelivers)",
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

async fn run(cfg: Arc<MqttDeviceConfig>, ctx: DeviceContext) -> Result<(), String> {
    let opts = SourceOptions::from_config(&cfg, &ctx.gateway_id, &ctx.name)
        .map_err(|e| format!("MQTT device {}: {e}", ctx.name))?;
    tracing::info!(device = %ctx.name, broker = %cfg.broker, client_id = %opts.client_id,
        version = ?opts.version, tls = opts.tls.is_some(), "MQTT: connecting");
    let mut c = Counters::new(&ctx.metrics, &ctx.name);
    let _gauge = Disconnected(c.connected.clone());
    let mut mapper = Mapper::new(cfg.subscriptions.clone());
    let mut source = MqttSource::start(opts);
    let (pending_tx, pending_rx) = mpsc::channel(PENDING_BATCHES);
    let mut acks = AbortOnDrop(tokio::spawn(ack_loop(
        pending_rx,
        source.acker(),
        c.samples.clone(),
        c.acks_given_up.clone(),
    )));
    let mut recent = RecentMessages::new(RECENT_MESSAGES);
    loop {
        let first = tokio::select! {
            ev = source.next() => ev.ok_or("MQTT event loop stopped")?,
            r = &mut acks.0 => return Err(match r {
                Ok(Err(e)) => e,
                _ => "MQTT ack task ended".to_owned(),
            }),
        };
        let mut batch = Batch::default();
        handle(first, &ctx, &mut c, &mut mapper, &mut recent, &mut batch);
        while batch.messages < BATCH {
            match source.try_next() {
                Some(ev) => handle(ev, &ctx, &mut c, &mut mapper, &mut recent, &mut batch),
                None => break,
            }
        }
        if batch.samples.is_empty() && batch.acks.is_empty() {
            continue;
        }
        let samples = batch.samples.len() as u64;
        let durable = if batch.samples.is_empty() {
            None
        } else {
            Some(
                ctx.ingest
                    .submit_with_receipts(
                        ctx.priority,
                        batch.samples,
                        namespace(&ctx.name),
                        batch.fingerprints,
                    )
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
    mapper: &mut Mapper,
    recent: &mut RecentMessages,
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
        SourceEvent::Message(m) => {
            batch.messages += 1;
            let arrival = now_ns();
            match m.topic() {
                None => c.error("bad_topic", 1),
                Some(topic) => {
                    let mut take = true;
                    if m.qos() > 0 {
                        // A redelivery (DUP) of a message already taken is acked, not stored
                        // again: taken in this run (`recent`), or stored before a crash or
                        // restart (the receipts stored with the samples).
                        let digest = recent.digest(m.topic_bytes(), m.payload());
                        let fp = fingerprint(&[m.topic_bytes(), m.payload()]);
                        if m.dup()
                            && (recent.contains(digest)
                                || ctx.ingest.already_stored(namespace(&ctx.name), fp))
                        {
                            c.skipped.inc();
                            take = false;
                        } else {
                            recent.insert(digest);
                            batch.fingerprints.push(fp);
                        }
                    }
                    if take {
                        let out = mapper.map(topic, m.payload(), arrival);
                        for e in &out.errors {
                            c.error(e.kind(), 1);
                            tracing::debug!(device = %ctx.name, error = %e, "MQTT: bad message");
                        }
                        batch.samples.extend(out.samples);
                    }
                }
            }
            if let Some(ack) = m.into_ack() {
                batch.acks.push(ack);
            }
        }
    }
}

/// Waits for each batch to be durable, in order, then acknowledges its messages. Acks the
/// event loop cannot take yet wait here (never blocking intake: the event loop only takes
/// requests while it runs, and it may be waiting for the driver); past
/// [`MAX_READY_ACKS`] the oldest are given up — the broker redelivers those messages.
async fn ack_loop(
    mut rx: mpsc::Receiver<Pending>,
    acker: Acker,
    samples: Counter,
    given_up: Counter,
) -> Result<(), String> {
    let mut ready: VecDeque<AckToken> = VecDeque::new();
    loop {
        while let Some(t) = ready.front() {
            match acker.try_ack(t) {
                AckOutcome::Sent | AckOutcome::Stale => {
                    ready.pop_front();
                }
                AckOutcome::Full => break,
            }
        }
        let p = tokio::select! {
            p = rx.recv() => match p {
                Some(p) => p,
                None => return Ok(()),
            },
            _ = tokio::time::sleep(Duration::from_millis(1)), if !ready.is_empty() => continue,
        };
        if let Some(d) = p.durable {
            d.wait()
                .await
                .map_err(|e| format!("MQTT samples could not be made durable: {e}"))?;
            samples.inc_by(p.samples);
        }
        ready.extend(p.acks);
        while ready.len() > MAX_READY_ACKS {
            ready.pop_front();
            given_up.inc();
        }
    }
}
