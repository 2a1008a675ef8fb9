//! The hub's MQTT ingress: the receiving end of the MQTT uplink
//! ([`outpost_protocols::uplink::mqtt`]), started by [`super::Hub::start`] when the hub
//! config has an `[mqtt_ingress]` section.
//!
//! The hub is an MQTT 3.1.1 client of the broker: a **persistent session** (stable client
//! id) subscribed to `<prefix>/+/up` with QoS 1 and **manual acknowledgements**. Each
//! message's payload is one frame. For a batch of messages that arrived together (at most
//! [`MAX_GROUP`] messages or [`MAX_GROUP_BYTES`] bytes) the ingress:
//!
//! 1. reads the gateway id from the topic and decodes the payload: anything that is not a
//!    frame, not from a valid up topic, a Data or Hello frame naming another gateway than
//!    its topic, or an Ack, is counted (`outpost_hub_bad_input{kind, transport="mqtt"}`),
//!    logged and skipped — never a panic, and the ingress carries on;
//! 2. admits each Data frame only in its gateway's session, which a Hello starts
//!    ([`MqttSessions`], the same rule as a QUIC stream's): data from a gateway with no
//!    Hello is counted (`kind="no_hello"`), logged, neither written nor acknowledged to the
//!    gateway (it keeps the data in its outbox), and the gateway is asked to start a new
//!    session (a Hello naming it on its down topic, `outpost_hub_hello_requests`); it
//!    reconnects, says Hello and sends the data again;
//! 3. commits the admitted Data frames through the ingest core ([`HubIngest::commit`], as
//!    the QUIC side does: one group commit per gateway, duplicates dropped, new samples
//!    written and made durable, counted, republished to `[republish]`);
//! 4. publishes `Ack::for_frame` of each Data frame on `<prefix>/<gateway>/down` (QoS 1);
//! 5. only then acknowledges each message to the broker (PUBACK).
//!
//! A message the hub has not committed is therefore never acknowledged to the broker,
//! except a refused one (garbage, or data without a Hello, which its gateway still holds):
//! if the hub stops or its storage fails (the connection is then dropped on purpose), the
//! broker delivers it again on the next connection, and the de-duplication makes that
//! harmless. A lost Ack is harmless too: the gateway resends, the hub drops the duplicates
//! and acknowledges again.
//!
//! # Identity
//!
//! The gateway is the one the topic names; a Hello and a Data frame must carry the same id. Nothing in
//! MQTT proves who published: the **broker's authentication and ACLs** are what stop a
//! client from writing another gateway's `up` topic or any `down` topic. Configure them
//! (`config/hub.toml` shows a Mosquitto ACL); without them any client of the broker can
//! inject data for any gateway.
//!
//! # Connections
//!
//! One rumqttc event loop per connection, polled by one task (so an acknowledgement is never
//! sent on a later connection than its message came on, where the packet id may name
//! another message). Between connections: exponential backoff with jitter
//! ([`Backoff`]); rumqttc itself would retry at once, forever. The subscription is sent on
//! every connection (a broker that lost the session has forgotten it). Payloads larger than
//! [`MAX_PACKET`] break the connection and come back on every reconnection: limit packet
//! sizes at the broker (Mosquitto: `max_packet_size`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocols::frame::{self, DataFrame, Hello, Message};
use outpost_protocols::uplink::mqtt::{down_topic, gateway_of_up_topic, up_filter};
use outpost_runtime::config::{GatewayId, MqttIngressSection};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::supervisor::{Backoff, BackoffPolicy};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

use super::ingest::{Group, HubIngest, MqttSessions, Transport};

/// Most messages committed together.
pub const MAX_GROUP: usize = 64;
/// Most payload bytes committed together (a batch stops growing past this).
pub const MAX_GROUP_BYTES: usize = 4 << 20;
/// Largest MQTT packet accepted from the broker: twice the largest frame, so a payload
/// somewhat over the frame limit still arrives and is counted, acknowledged and skipped
/// instead of breaking the connection.
pub const MAX_PACKET: usize = 2 * frame::MAX_FRAME_LEN;
/// Requests (acknowledgements, ack publishes) queued towards the event loop.
const REQUEST_CHANNEL: usize = 4_096;
/// Our QoS 1 ack publishes awaiting the broker's PUBACK.
const INFLIGHT: u16 = 1_000;
/// A connection that lasted this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(1);
/// The `transport` label of this ingress's metrics.
const TRANSPORT: (&str, &str) = ("transport", "mqtt");

/// Everything the ingress needs, secrets read and TLS built.
#[derive(Clone)]
pub struct MqttIngressOptions {
    pub host: String,
    pub port: u16,
    /// Stable: the broker keeps the session (subscription, unacknowledged messages) under it.
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    pub tls: Option<Arc<rumqttc::tokio_rustls::rustls::ClientConfig>>,
    pub topic_prefix: String,
    pub keep_alive: Duration,
    pub reconnect: BackoffPolicy,
}

impl std::fmt::Debug for MqttIngressOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttIngressOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.credentials.as_ref().map(|c| &c.0))
            .field("tls", &self.tls.is_some())
            .field("topic_prefix", &self.topic_prefix)
            .finish_non_exhaustive()
    }
}

impl MqttIngressOptions {
    /// Resolves `[mqtt_ingress]` (already validated by the config loader): reads the
    /// password and the TLS files.
    pub fn from_config(cfg: &MqttIngressSection) -> Result<MqttIngressOptions, String> {
        let bad = || {
            format!(
                "invalid broker address {:?}: expected host:port",
                cfg.broker
            )
        };
        let (host, port) = cfg.broker.rsplit_once(':').ok_or_else(bad)?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        if let Some(p) = outpost_runtime::config::topic_prefix_problem(&cfg.topic_prefix) {
            return Err(p);
        }
        let credentials = outpost_protocols::mqtt::source::credentials(
            cfg.username.as_deref(),
            cfg.password.as_ref(),
        )
        .map_err(|e| format!("cannot read the MQTT password: {e}"))?;
        let tls = match &cfg.tls {
            Some(t) => Some(
                outpost_protocols::mqtt::source::tls_client_config(t, &host)
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let client_id = cfg
            .client_id
            .clone()
            .unwrap_or_else(|| "outpost-hub-ingress".into());
        if client_id.is_empty() {
            return Err("the MQTT client id may not be empty".into());
        }
        let mut reconnect = BackoffPolicy::new(
            cfg.reconnect.initial.get(),
            cfg.reconnect.max.get().max(cfg.reconnect.initial.get()),
            2.0,
            0.5,
        );
        reconnect.reset_after = STABLE_CONNECTION;
        Ok(MqttIngressOptions {
            host,
            port,
            client_id,
            credentials,
            tls,
            topic_prefix: cfg.topic_prefix.clone(),
            keep_alive: cfg.keep_alive.get(),
            reconnect,
        })
    }
}

/// A running ingress; [`stop`](Self::stop) it (dropping it leaves the task running).
pub struct MqttIngress {
    task: tokio::task::JoinHandle<()>,
}

impl MqttIngress {
    /// Starts the ingress task; the first connection attempt begins at once.
    pub fn start(
        opts: MqttIngressOptions,
        ingest: Arc<HubIngest>,
        metrics: Metrics,
    ) -> MqttIngress {
        tracing::info!(broker = %format!("{}:{}", opts.host, opts.port), filter = %up_filter(&opts.topic_prefix), "MQTT ingress starting");
        let task = tokio::spawn(run(opts, ingest, Counters::new(metrics)));
        MqttIngress { task }
    }

    /// Stops the task: the connection is dropped, messages not yet acknowledged are
    /// redelivered by the broker to the next hub. A commit already running finishes.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// The ingress's own metrics (what it commits is counted by [`HubIngest`]).
struct Counters {
    connections: Counter,
    disconnects: Counter,
    connected: Gauge,
    messages: Counter,
    hello_requests: Counter,
}

impl Counters {
    fn new(metrics: Metrics) -> Counters {
        Counters {
            connections: metrics.counter(
                "outpost_hub_connections",
                "Gateway connections accepted",
                &[TRANSPORT],
            ),
            disconnects: metrics.counter(
                "outpost_hub_ingress_disconnects",
                "Connections of the hub's MQTT ingress to its broker that ended",
                &[TRANSPORT],
            ),
            connected: metrics.gauge(
                "outpost_hub_ingress_connected",
                "1 while the hub's MQTT ingress is connected and subscribed",
                &[TRANSPORT],
            ),
            messages: metrics.counter(
                "outpost_hub_ingress_messages",
                "Messages received by the hub's MQTT ingress",
                &[TRANSPORT],
            ),
            hello_requests: metrics.counter(
                "outpost_hub_hello_requests",
                "Gateways behind a broker asked for a new session (their data came without a Hello)",
                &[TRANSPORT],
            ),
        }
    }
}

/// What one message is, once checked (pure: [`classify`]).
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// A Hello whose id matches the topic: it starts the gateway's session.
    Hello { gateway: GatewayId, hello: Hello },
    /// A Data frame from the gateway its topic names.
    Data {
        gateway: GatewayId,
        frame: DataFrame,
    },
}

/// Why a message is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The `kind` label of `outpost_hub_bad_input`: `topic`, `identity`, `unexpected_ack`,
    /// `unexpected_message`,
    /// or a frame error's label ([`frame::FrameError::label`]).
    pub kind: &'static str,
    /// For the log.
    pub detail: String,
}

/// Checks one message: the gateway id from `topic` (`<prefix>/<gw>/up`), the payload as
/// exactly one frame, and that a Hello or Data frame names the topic's gateway.
pub fn classify(prefix: &str, topic: &str, payload: &[u8]) -> Result<Incoming, Rejected> {
    let gw = gateway_of_up_topic(prefix, topic).map_err(|e| Rejected {
        kind: "topic",
        detail: e.to_string(),
    })?;
    let identity = |claimed: &str| Rejected {
        kind: "identity",
        detail: format!(
            "frame names gateway {:?} on the topic of gateway {gw:?}",
            claimed.chars().take(64).collect::<String>()
        ),
    };
    match frame::decode(payload) {
        Ok(Message::Hello(h)) if h.gateway_id == gw => Ok(Incoming::Hello {
            gateway: gw.clone(),
            hello: h,
        }),
        Ok(Message::Hello(h)) => Err(identity(&h.gateway_id)),
        Ok(Message::Data(d)) if d.gateway_id == gw => Ok(Incoming::Data {
            gateway: gw.clone(),
            frame: d,
        }),
        Ok(Message::Data(d)) => Err(identity(&d.gateway_id)),
        Ok(Message::Ack(_)) => Err(Rejected {
            kind: "unexpected_ack",
            detail: format!("gateway {gw:?} sent an ack"),
        }),
        // Over MQTT the gateway times its publishes to the broker instead of pinging.
        Ok(Message::Ping(_) | Message::Pong(_)) => Err(Rejected {
            kind: "unexpected_message",
            detail: format!("gateway {gw:?} sent a ping or pong over MQTT (not answered there)"),
        }),
        Err(e) => Err(Rejected {
            kind: e.label(),
            detail: format!("bad frame from gateway {gw:?}: {e}"),
        }),
    }
}

/// A request for the event loop, queued until its channel has room.
enum Request {
    /// An Ack frame for a gateway's down topic.
    Ack { topic: String, payload: Vec<u8> },
    /// A Hello naming a gateway, on its down topic: asks it for a new session.
    AskHello { topic: String, payload: Vec<u8> },
    /// The acknowledgement of a broker message.
    PubAck(rumqttc::Publish),
}

fn build(opts: &MqttIngressOptions) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(&opts.client_id, &opts.host, opts.port);
    o.set_keep_alive(opts.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_inflight(INFLIGHT)
        .set_max_packet_size(MAX_PACKET + 4096, frame::MAX_FRAME_LEN + 4096)
        .set_request_channel_capacity(REQUEST_CHANNEL);
    if let Some((u, p)) = &opts.credentials {
        o.set_credentials(u, p);
    }
    if let Some(tls) = &opts.tls {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    let (client, mut lp) = AsyncClient::new(o, REQUEST_CHANNEL);
    // rumqttc leaves Nagle's algorithm on: acknowledgements would wait for the broker's
    // delayed ACK when traffic is light.
    let mut net = lp.network_options();
    net.set_tcp_nodelay(true);
    lp.set_network_options(net);
    (client, lp)
}

async fn run(opts: MqttIngressOptions, ingest: Arc<HubIngest>, c: Counters) {
    let mut backoff = Backoff::new(opts.reconnect);
    // Kept across connections to the broker: a gateway's session is its own, not ours.
    let mut sessions = MqttSessions::default();
    loop {
        let (client, lp) = build(&opts);
        let mut connected_at = None;
        let mut ctx = Ctx {
            ingest: &ingest,
            sessions: &mut sessions,
            c: &c,
        };
        let why = serve(&opts, &client, lp, &mut ctx, &mut connected_at).await;
        c.connected.set(0);
        c.disconnects.inc();
        let (attempt, retry_in) =
            backoff.next_delay(connected_at.map(|t: Instant| t.elapsed()), fastrand::f64());
        tracing::warn!(error = %why, attempt, ?retry_in, "MQTT ingress: connection to the broker ended");
        tokio::time::sleep(retry_in).await;
    }
}

/// What the ingress keeps while it runs.
struct Ctx<'a> {
    ingest: &'a Arc<HubIngest>,
    sessions: &'a mut MqttSessions,
    c: &'a Counters,
}

/// Serves one connection; returns why it ended.
async fn serve(
    opts: &MqttIngressOptions,
    client: &AsyncClient,
    mut lp: EventLoop,
    ctx: &mut Ctx<'_>,
    connected_at: &mut Option<Instant>,
) -> String {
    let c = ctx.c;
    let filter = up_filter(&opts.topic_prefix);
    let mut queue: VecDeque<Request> = VecDeque::new();
    loop {
        flush(client, &mut queue, ctx.ingest, c);
        let event = match lp.poll().await {
            Ok(e) => e,
            Err(e) => return e.to_string(),
        };
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                *connected_at = Some(Instant::now());
                c.connections.inc();
                tracing::info!(
                    session_present = ack.session_present,
                    "MQTT ingress connected"
                );
                if client.try_subscribe(&filter, QoS::AtLeastOnce).is_err() {
                    return "cannot queue the subscription".into();
                }
            }
            Event::Incoming(Packet::SubAck(s)) => {
                if s.return_codes
                    .iter()
                    .any(|r| matches!(r, rumqttc::SubscribeReasonCode::Failure))
                {
                    return format!("the broker refused the subscription to {filter}");
                }
                c.connected.set(1);
                tracing::info!(%filter, "MQTT ingress subscribed");
            }
            Event::Incoming(Packet::Publish(first)) => {
                let mut bytes = first.payload.len();
                let mut batch = vec![first];
                // With it, the messages already read from the network (no waiting).
                while batch.len() < MAX_GROUP
                    && bytes < MAX_GROUP_BYTES
                    && matches!(
                        lp.state.events.front(),
                        Some(Event::Incoming(Packet::Publish(_)))
                    )
                {
                    match lp.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            bytes += p.payload.len();
                            batch.push(p);
                        }
                        Ok(_) => {}
                        Err(e) => return e.to_string(),
                    }
                }
                match handle_batch(&opts.topic_prefix, batch, ctx).await {
                    Ok(requests) => queue.extend(requests),
                    // Dropping the connection without acknowledging: the broker delivers
                    // these messages again after the backoff.
                    Err(e) => return e,
                }
            }
            _ => {}
        }
    }
}

/// Hands queued requests to the event loop while its channel has room, in order.
fn flush(client: &AsyncClient, queue: &mut VecDeque<Request>, ingest: &HubIngest, c: &Counters) {
    while let Some(r) = queue.front() {
        let sent = match r {
            Request::Ack { topic, payload } | Request::AskHello { topic, payload } => client
                .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                .is_ok(),
            Request::PubAck(p) => client.try_ack(p).is_ok(),
        };
        if !sent {
            return; // full: the next event makes room
        }
        match r {
            Request::Ack { .. } => ingest.acks_sent(Transport::Mqtt, 1),
            Request::AskHello { .. } => {
                c.hello_requests.inc();
            }
            Request::PubAck(_) => {}
        }
        queue.pop_front();
    }
}

/// What one message of a batch leads to.
#[derive(Default)]
struct Slot {
    /// The (gateway, index in its group) of its Data frame, if admitted.
    data: Option<(GatewayId, usize)>,
    /// The request for a new session it caused, if any.
    ask: Option<Request>,
}

/// Checks, commits and acknowledges one batch; `Err` when the store failed (nothing of the
/// batch is acknowledged then).
async fn handle_batch(
    prefix: &str,
    batch: Vec<rumqttc::Publish>,
    ctx: &mut Ctx<'_>,
) -> Result<Vec<Request>, String> {
    let now = Instant::now();
    let mut slots: Vec<Slot> = Vec::with_capacity(batch.len());
    let mut groups: BTreeMap<GatewayId, Vec<DataFrame>> = BTreeMap::new();
    for p in &batch {
        ctx.c.messages.inc();
        match classify(prefix, &p.topic, &p.payload) {
            Ok(Incoming::Data { gateway, frame }) => {
                match ctx.sessions.data(&gateway, &frame, now) {
                    Ok(()) => {
                        let g = groups.entry(gateway.clone()).or_default();
                        g.push(frame);
                        slots.push(Slot {
                            data: Some((gateway, g.len() - 1)),
                            ask: None,
                        });
                    }
                    Err(r) => {
                        ctx.ingest.bad(Transport::Mqtt, r.refusal.kind());
                        let ask = if r.ask_hello {
                            hello_request(prefix, &gateway)
                        } else {
                            None
                        };
                        if r.ask_hello {
                            tracing::warn!(%gateway, error = %r.refusal, "MQTT ingress: data refused (not acknowledged); asking the gateway for a new session");
                        } else {
                            tracing::debug!(%gateway, error = %r.refusal, "MQTT ingress: data refused");
                        }
                        slots.push(Slot { data: None, ask });
                    }
                }
            }
            Ok(Incoming::Hello { gateway, hello }) => {
                if let Err(r) = ctx.sessions.hello(&gateway, &hello) {
                    ctx.ingest.bad(Transport::Mqtt, r.kind());
                    tracing::warn!(kind = r.kind(), error = %r, "MQTT ingress: message skipped");
                } else {
                    tracing::debug!(%gateway, "MQTT ingress: hello");
                }
                slots.push(Slot::default());
            }
            Err(r) => {
                ctx.ingest.bad(Transport::Mqtt, r.kind);
                tracing::warn!(kind = r.kind, error = %r.detail, "MQTT ingress: message skipped");
                slots.push(Slot::default());
            }
        }
    }
    let groups: Vec<Group> = groups
        .into_iter()
        .map(|(gateway, frames)| Group { gateway, frames })
        .collect();
    // Dropping the connection on an error: the broker delivers the batch again.
    let done = ctx
        .ingest
        .commit(Transport::Mqtt, groups)
        .await
        .map_err(|e| format!("storage error: {e}"))?;
    let acks: BTreeMap<&str, &[frame::Ack]> = done
        .iter()
        .map(|a| (a.gateway.as_str(), a.acks.as_slice()))
        .collect();
    let mut requests = Vec::with_capacity(2 * batch.len());
    for (p, Slot { data, ask }) in batch.into_iter().zip(slots) {
        if let Some((gw, i)) = data
            && let Some(ack) = acks.get(gw.as_str()).and_then(|a| a.get(i))
        {
            match frame::encode(&Message::Ack(ack.clone())) {
                Ok(payload) => requests.push(Request::Ack {
                    topic: down_topic(prefix, &gw),
                    payload,
                }),
                // Cannot happen for a frame that decoded; the gateway will resend.
                Err(e) => tracing::error!(gateway = %gw, error = %e, "cannot encode an ack"),
            }
        }
        requests.extend(ask);
        requests.push(Request::PubAck(p));
    }
    Ok(requests)
}

/// The request for a new session sent to `gateway`: a Hello naming it, on its down topic.
fn hello_request(prefix: &str, gateway: &GatewayId) -> Option<Request> {
    let hello = Message::Hello(Hello {
        gateway_id: gateway.clone(),
        max_version: frame::VERSION,
    });
    match frame::encode(&hello) {
        Ok(payload) => Some(Request::AskHello {
            topic: down_topic(prefix, gateway),
            payload,
        }),
        // Cannot happen for an id that came from a valid topic.
        Err(e) => {
            tracing::error!(%gateway, error = %e, "cannot encode a hello");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocols::frame::{Ack, Encoding};
    use outpost_runtime::model::{Priority, Sample, StreamId, Value};

    fn data(gw: &str, seqs: &[u64]) -> Vec<u8> {
        let s = StreamId::intern("ingress/t").unwrap();
        let samples: Vec<Sample> = seqs
            .iter()
            .map(|q| Sample::new(s, *q as i64, Value::I64(*q as i64)))
            .collect();
        let f = DataFrame::from_samples(
            &gw.parse().unwrap(),
            Priority::Normal,
            Encoding::Raw,
            seqs.iter().copied().zip(samples.iter()),
        );
        frame::encode(&Message::Data(f)).unwrap()
    }

    #[test]
    fn data_from_its_own_topic_is_accepted() {
        match classify("outpost", "outpost/gw-1/up", &data("gw-1", &[1, 2])) {
            Ok(Incoming::Data { gateway, frame }) => {
                assert_eq!(gateway, "gw-1");
                assert_eq!(frame.samples.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        let hello = frame::encode(&Message::Hello(Hello {
            gateway_id: "gw-1".parse().unwrap(),
            max_version: 1,
        }))
        .unwrap();
        match classify("outpost", "outpost/gw-1/up", &hello) {
            Ok(Incoming::Hello { gateway, hello }) => {
                assert_eq!(
                    (gateway.as_str(), hello.gateway_id.as_str()),
                    ("gw-1", "gw-1")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn everything_else_is_rejected_with_a_kind() {
        let kind =
            |topic: &str, payload: &[u8]| classify("outpost", topic, payload).unwrap_err().kind;
        let d = data("gw-1", &[1]);
        assert_eq!(kind("outpost/gw-2/up", &d), "identity");
        assert_eq!(kind("outpost/gw-1/down", &d), "topic");
        assert_eq!(kind("outpost/+/up", &d), "topic");
        assert_eq!(kind("elsewhere/gw-1/up", &d), "topic");
        assert_eq!(kind("outpost/gw-1/up", b"garbage"), "bad_magic");
        assert_eq!(
            kind("outpost/gw-1/up", b"garbage, longer than a header"),
            "bad_magic"
        );
        assert_eq!(kind("outpost/gw-1/up", b""), "truncated");
        let mut two = d.clone();
        two.extend_from_slice(&d);
        assert_eq!(kind("outpost/gw-1/up", &two), "trailing_bytes");
        let mut flipped = d.clone();
        let n = flipped.len();
        flipped[n / 2] ^= 0xff;
        assert_eq!(kind("outpost/gw-1/up", &flipped), "checksum");
        let ack =
            frame::encode(&Message::Ack(Ack::from_seqs(&"gw-1".parse().unwrap(), [1]))).unwrap();
        assert_eq!(kind("outpost/gw-1/up", &ack), "unexpected_ack");
        let hello = frame::encode(&Message::Hello(Hello {
            gateway_id: "gw-2".parse().unwrap(),
            max_version: 1,
        }))
        .unwrap();
        assert_eq!(kind("outpost/gw-1/up", &hello), "identity");
    }

    #[test]
    fn options_come_from_the_config() {
        let text = r#"
[hub]
listen = "127.0.0.1:0"
data_dir = "/tmp/x"
ca = "/dev/null"
cert = "/dev/null"
key = "k"
[mqtt_ingress]
broker = "broker.example:1883"
username = "hub"
password = "pw"
topic_prefix = "site/a"
"#;
        let c = outpost_runtime::config::parse_hub(
            text,
            std::path::Path::new("hub.toml"),
            std::path::Path::new("/"),
        )
        .unwrap();
        let o = MqttIngressOptions::from_config(c.mqtt_ingress.as_ref().unwrap()).unwrap();
        assert_eq!((o.host.as_str(), o.port), ("broker.example", 1883));
        assert_eq!(o.client_id, "outpost-hub-ingress");
        assert_eq!(o.credentials, Some(("hub".into(), "pw".into())));
        assert_eq!(o.topic_prefix, "site/a");
        assert_eq!(o.reconnect.reset_after, STABLE_CONNECTION);
        assert!(!format!("{o:?}").contains("pw\""));
    }
}
