//! MQTT uplink transport, gateway side: the frames of the frame codec as QoS 1 payloads,
//! through any MQTT 3.1.1 broker, for sites where the hub is reachable
//! only through a broker (no UDP out, a cloud broker in between, an existing MQTT
//! infrastructure).
//!
//! # Topics
//!
//! - `<prefix>/<gateway id>/up`: the gateway publishes each encoded frame (Hello, Data) as
//!   one QoS 1 message, not retained. The hub subscribes to `<prefix>/+/up`.
//! - `<prefix>/<gateway id>/down`: the hub publishes one Ack frame per Data frame it
//!   committed, QoS 1. The gateway subscribes to its own `down` topic only.
//!
//! [`up_topic`], [`down_topic`], [`up_filter`] and [`gateway_of_up_topic`] are the pure
//! rules both sides use; the prefix rule is the config's
//! ([`outpost_runtime::config::topic_prefix_problem`]).
//!
//! # Identity
//!
//! Over MQTT the hub cannot see who published a message: it believes the gateway id in the
//! topic. The broker's authentication and ACLs are therefore what protect
//! `<prefix>/<gw>/up` (only gateway `gw` may write it) and `<prefix>/<gw>/down` (only the
//! hub may write it, only `gw` may read it). `config/hub.toml` shows a Mosquitto ACL.
//!
//! # Sessions
//!
//! One [`MqttUplinkSession`] is one connection with a **clean session**: the gateway's
//! outbox is the source of truth, anything the hub has not acknowledged is sent again on
//! the next session and the hub drops duplicates. rumqttc reconnects on its own without
//! backoff and drops its queue on a new session, so this module never lets it: when the
//! connection fails, the session ends ([`MqttUplinkSession::send`] and
//! [`MqttUplinkSession::recv`] return an error) and the caller reconnects with its own
//! backoff.
//!
//! A background task owns rumqttc's event loop (it must be polled continuously: keep-alive,
//! PUBACKs, the hub's messages). [`MqttUplinkSession::send`] waits while
//! `max_in_flight` publishes are not yet acknowledged by the broker (PUBACK): that is the
//! back-pressure. The hub's messages are queued for [`MqttUplinkSession::recv`] up to
//! [`MAX_DOWN_QUEUED_BYTES`]; a caller that stops reading them ends the session rather than
//! stalling the event loop. [`InFlight`] is the pure core that turns rumqttc's events into
//! acknowledged bytes and a publish→PUBACK RTT for the link estimator.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_runtime::config::{GatewayId, UplinkMqttConfig};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::frame::{self, FrameError, Message};

/// The default first topic level.
pub const DEFAULT_TOPIC_PREFIX: &str = "outpost";
/// Default number of publishes awaiting the broker's PUBACK.
pub const DEFAULT_MAX_IN_FLIGHT: u16 = 32;
/// Default deadline for the connection, CONNACK and SUBACK.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of the hub's messages queued for [`MqttUplinkSession::recv`] before the session
/// is ended as stuck.
pub const MAX_DOWN_QUEUED_BYTES: usize = 16 << 20;
/// Room for the topic and the packet header on top of a payload, in MQTT packet limits.
const PACKET_OVERHEAD: usize = 4 << 10;
/// Longest topic quoted in an error.
const MAX_QUOTED: usize = 128;

/// What can go wrong in the MQTT uplink.
#[derive(Debug, thiserror::Error)]
pub enum MqttUplinkError {
    /// Options that cannot work (bad prefix, gateway id, client id, sizes).
    #[error("invalid MQTT uplink options: {0}")]
    InvalidOptions(String),
    /// A secret (password, key) could not be read.
    #[error("cannot read {what}: {detail}")]
    Secret {
        /// Which secret.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The connection or the MQTT handshake failed (refused, unreachable, bad credentials,
    /// TLS failure).
    #[error("cannot connect to the broker: {0}")]
    Connect(String),
    /// CONNACK or SUBACK did not arrive in time.
    #[error("no {what} from the broker within {after:?}")]
    Timeout {
        /// "CONNACK" or "SUBACK".
        what: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The broker refused the subscription to the down topic (an ACL, usually).
    #[error("the broker refused the subscription to {0}")]
    SubscribeRejected(String),
    /// The connection ended; the caller reconnects (with backoff) and resends what the hub
    /// has not acknowledged.
    #[error("MQTT uplink connection lost: {0}")]
    ConnectionLost(String),
    /// A frame larger than `max_payload`; the session stays usable.
    #[error("frame of {len} bytes exceeds the MQTT uplink's max_payload of {max}")]
    PayloadTooLarge {
        /// The frame's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The hub sent a payload that is not a frame; the session has ended.
    #[error("undecodable message from the hub: {0}")]
    Undecodable(FrameError),
    /// The hub acknowledged another gateway's sequences on our topic; the session has ended.
    #[error("the hub sent an acknowledgement for gateway {0:?} on this gateway's topic")]
    WrongGateway(String),
    /// The session ended earlier (see the error that ended it); reconnect.
    #[error("MQTT uplink session already ended: {0}")]
    Ended(String),
}

// ---------------------------------------------------------------------------------------
// Topics (pure)
// ---------------------------------------------------------------------------------------

/// Why a topic is not a gateway's up topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Not `<prefix>/<one level>/up`.
    #[error("topic {0:?} is not <prefix>/<gateway id>/up")]
    NotUplink(String),
    /// The gateway level breaks the gateway id rule (wildcards, empty, too long...).
    #[error("invalid gateway id {id:?} in the topic: {reason}")]
    GatewayId {
        /// The level (quoted, truncated).
        id: String,
        /// The rule broken.
        reason: &'static str,
    },
}

/// `s`, truncated to at most [`MAX_QUOTED`] bytes on a character boundary.
fn quoted(s: &str) -> String {
    let mut end = s.len().min(MAX_QUOTED);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Checks a topic prefix (the config's rule: no wildcards, no empty level, no `$`).
pub fn check_topic_prefix(prefix: &str) -> Result<(), MqttUplinkError> {
    match outpost_runtime::config::topic_prefix_problem(prefix) {
        Some(p) => Err(MqttUplinkError::InvalidOptions(p)),
        None => Ok(()),
    }
}

/// `<prefix>/<gateway>/up`: where a gateway publishes its frames.
pub fn up_topic(prefix: &str, gateway_id: &GatewayId) -> String {
    format!("{prefix}/{gateway_id}/up")
}

/// `<prefix>/<gateway>/down`: where the hub publishes a gateway's acknowledgements.
pub fn down_topic(prefix: &str, gateway_id: &GatewayId) -> String {
    format!("{prefix}/{gateway_id}/down")
}

/// `<prefix>/+/up`: the hub's subscription.
pub fn up_filter(prefix: &str) -> String {
    format!("{prefix}/+/up")
}

/// The gateway id in `topic`, which must be `<prefix>/<gateway id>/up` with a valid gateway
/// id (the [`GatewayId`] rule: no `+`, `#`, `/`, not empty, at most 64 bytes).
pub fn gateway_of_up_topic(prefix: &str, topic: &str) -> Result<GatewayId, TopicError> {
    let not_up = || TopicError::NotUplink(quoted(topic));
    let gw = topic
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|rest| rest.strip_suffix("/up"))
        .ok_or_else(not_up)?;
    GatewayId::parse(gw).map_err(|e| TopicError::GatewayId {
        id: quoted(gw),
        reason: e.reason(),
    })
}

// ---------------------------------------------------------------------------------------
// In-flight tracking (pure)
// ---------------------------------------------------------------------------------------

/// Counters of a session, for the link estimator and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MqttUplinkStats {
    /// Payload bytes published and acknowledged by the broker (PUBACK).
    pub acked_bytes: u64,
    /// Publishes acknowledged by the broker.
    pub acked_messages: u64,
    /// Publishes handed to the client and not yet acknowledged.
    pub in_flight: usize,
    /// Smoothed publish→PUBACK time (RFC 6298 weights: 7/8 old, 1/8 new).
    pub srtt: Option<Duration>,
    /// Smallest publish→PUBACK time seen.
    pub min_rtt: Option<Duration>,
    /// The latest publish→PUBACK time.
    pub latest_rtt: Option<Duration>,
    /// Messages from the hub that were not a frame or not for this gateway.
    pub bad_messages: u64,
}

/// Tracks publishes from [`queued`](Self::queued) (handed to rumqttc) through
/// [`written`](Self::written) (rumqttc's `Outgoing::Publish(pkid)`, in request order) to
/// [`acked`](Self::acked) (the broker's PUBACK), for acknowledged bytes and RTT.
#[derive(Debug, Default)]
pub struct InFlight {
    queued: VecDeque<usize>,
    written: HashMap<u16, (usize, Instant)>,
    stats: MqttUplinkStats,
    /// Smallest publish→PUBACK time since the last [`take_min_rtt`](Self::take_min_rtt).
    recent_min_rtt: Option<Duration>,
}

impl InFlight {
    /// A publish of `len` payload bytes was handed to the client.
    pub fn queued(&mut self, len: usize) {
        self.queued.push_back(len);
    }

    /// The client wrote the oldest queued publish with packet id `pkid`.
    pub fn written(&mut self, pkid: u16, now: Instant) {
        if let Some(len) = self.queued.pop_front() {
            self.written.insert(pkid, (len, now));
        }
    }

    /// The broker acknowledged `pkid`; false if no publish with that id was in flight.
    pub fn acked(&mut self, pkid: u16, now: Instant) -> bool {
        let Some((len, sent)) = self.written.remove(&pkid) else {
            return false;
        };
        let rtt = now.saturating_duration_since(sent);
        let s = &mut self.stats;
        s.acked_bytes = s.acked_bytes.saturating_add(len as u64);
        s.acked_messages = s.acked_messages.saturating_add(1);
        s.latest_rtt = Some(rtt);
        s.min_rtt = Some(s.min_rtt.map_or(rtt, |m| m.min(rtt)));
        s.srtt = Some(match s.srtt {
            Some(old) => old.mul_f64(0.875) + rtt.mul_f64(0.125),
            None => rtt,
        });
        self.recent_min_rtt = Some(self.recent_min_rtt.map_or(rtt, |m| m.min(rtt)));
        true
    }

    /// The smallest publish→PUBACK time since the previous call, `None` when no PUBACK
    /// arrived in between: one RTT sample per look for a windowed-minimum filter.
    pub fn take_min_rtt(&mut self) -> Option<Duration> {
        self.recent_min_rtt.take()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MqttUplinkStats {
        MqttUplinkStats {
            in_flight: self.queued.len() + self.written.len(),
            ..self.stats
        }
    }
}

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

/// Everything a session needs, secrets read and TLS built.
#[derive(Clone)]
pub struct MqttUplinkOptions {
    /// The broker's host name or address.
    pub host: String,
    /// The broker's port.
    pub port: u16,
    /// MQTT client id (default `outpost-<gateway id>-uplink`).
    pub client_id: String,
    /// This gateway's id: the topics' second part.
    pub gateway_id: GatewayId,
    /// First topic level(s), default [`DEFAULT_TOPIC_PREFIX`].
    pub topic_prefix: String,
    /// Username and password.
    pub credentials: Option<(String, String)>,
    /// TLS towards the broker (ring provider; see [`tls_from_pem`] and
    /// [`crate::mqtt::source::tls_client_config`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT keep-alive (whole seconds, at least 1 s; zero turns it off).
    pub keep_alive: Duration,
    /// Deadline for the connection, CONNACK and SUBACK.
    pub connect_timeout: Duration,
    /// Publishes awaiting the broker's PUBACK at most (≥ 1).
    pub max_in_flight: u16,
    /// Largest frame [`MqttUplinkSession::send`] publishes (1 ..= [`frame::MAX_FRAME_LEN`]).
    pub max_payload: usize,
}

impl std::fmt::Debug for MqttUplinkOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttUplinkOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("gateway_id", &self.gateway_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("username", &self.credentials.as_ref().map(|c| &c.0))
            .field("tls", &self.tls.is_some())
            .field("keep_alive", &self.keep_alive)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_payload", &self.max_payload)
            .finish_non_exhaustive()
    }
}

impl MqttUplinkOptions {
    /// Options with the defaults: plain TCP, no credentials, prefix `outpost`, client id
    /// `outpost-<gateway id>-uplink`, keep-alive 30 s, 32 publishes in flight, frames up to
    /// 1 MiB.
    pub fn new(host: &str, port: u16, gateway_id: &GatewayId) -> MqttUplinkOptions {
        MqttUplinkOptions {
            host: host.to_owned(),
            port,
            client_id: format!("outpost-{gateway_id}-uplink"),
            gateway_id: gateway_id.clone(),
            topic_prefix: DEFAULT_TOPIC_PREFIX.to_owned(),
            credentials: None,
            tls: None,
            keep_alive: Duration::from_secs(30),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_payload: frame::MAX_FRAME_LEN,
        }
    }

    /// Resolves `[uplink.mqtt]`: reads the password and the TLS files (ring provider).
    pub fn from_config(
        gateway_id: &GatewayId,
        cfg: &UplinkMqttConfig,
    ) -> Result<MqttUplinkOptions, MqttUplinkError> {
        let (host, port) = split_host_port(&cfg.broker)?;
        let mut o = MqttUplinkOptions::new(&host, port, gateway_id);
        if let Some(id) = &cfg.client_id {
            o.client_id = id.clone();
        }
        o.topic_prefix = cfg.topic_prefix.clone();
        o.credentials =
            crate::mqtt::source::credentials(cfg.username.as_deref(), cfg.password.as_ref())
                .map_err(|e| MqttUplinkError::Secret {
                    what: "the MQTT password",
                    detail: e.to_string(),
                })?;
        if let Some(t) = &cfg.tls {
            o.tls = Some(
                crate::mqtt::source::tls_client_config(t, &host)
                    .map_err(|e| MqttUplinkError::Tls(e.to_string()))?,
            );
        }
        o.keep_alive = cfg.keep_alive.get();
        o.max_in_flight = u16::try_from(cfg.max_in_flight.get()).unwrap_or(u16::MAX);
        o.max_payload = usize::try_from(cfg.max_payload.0)
            .unwrap_or(usize::MAX)
            .min(frame::MAX_FRAME_LEN);
        o.check()?;
        Ok(o)
    }

    /// `<prefix>/<gateway>/up`.
    pub fn up_topic(&self) -> String {
        up_topic(&self.topic_prefix, &self.gateway_id)
    }

    /// `<prefix>/<gateway>/down`.
    pub fn down_topic(&self) -> String {
        down_topic(&self.topic_prefix, &self.gateway_id)
    }

    /// Checks what rumqttc would otherwise panic on or what cannot work.
    pub fn check(&self) -> Result<(), MqttUplinkError> {
        let bad = |m: String| Err(MqttUplinkError::InvalidOptions(m));
        check_topic_prefix(&self.topic_prefix)?;
        if self.client_id.is_empty() || self.client_id.len() > 65_535 {
            return bad("the client id must be 1 to 65535 bytes".into());
        }
        if self.host.is_empty() {
            return bad("the broker host is empty".into());
        }
        if !self.keep_alive.is_zero() && self.keep_alive < Duration::from_secs(1) {
            return bad("keep_alive must be at least 1 s (or zero: off)".into());
        }
        if self.keep_alive > Duration::from_secs(u64::from(u16::MAX)) {
            return bad("keep_alive must be at most 65535 s".into());
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight must be at least 1".into());
        }
        if self.max_payload == 0 || self.max_payload > frame::MAX_FRAME_LEN {
            return bad(format!(
                "max_payload must be from 1 to {} bytes",
                frame::MAX_FRAME_LEN
            ));
        }
        Ok(())
    }
}

/// A TLS client config (ring provider) trusting the CA certificates in `ca_pem`, with an
/// optional client certificate chain and key (PEM) for mutual TLS. The broker's certificate
/// must name the host connected to.
pub fn tls_from_pem(
    ca_pem: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<Arc<rustls::ClientConfig>, MqttUplinkError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |e: &dyn std::fmt::Display| MqttUplinkError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
    }
    if roots.is_empty() {
        return Err(tls(&"no CA certificate found"));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls(&e))?
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<_, _>>()
                .map_err(|e| tls(&e))?;
            if chain.is_empty() {
                return Err(tls(&"no client certificate found"));
            }
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| tls(&e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| tls(&e))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn split_host_port(broker: &str) -> Result<(String, u16), MqttUplinkError> {
    let bad = || MqttUplinkError::InvalidOptions(format!("broker {broker:?}: expected host:port"));
    let (host, port) = broker.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

// ---------------------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------------------

struct State {
    inflight: InFlight,
    /// Why the event loop stopped, once it has.
    error: Option<String>,
    /// Payload bytes queued for `recv`.
    down_bytes: usize,
    bad_messages: u64,
}

/// One connection to the broker (clean session), subscribed to this gateway's down topic.
pub struct MqttUplinkSession {
    client: AsyncClient,
    up_topic: String,
    gateway_id: GatewayId,
    max_payload: usize,
    window: Arc<Semaphore>,
    state: Arc<Mutex<State>>,
    down: mpsc::UnboundedReceiver<rumqttc::Publish>,
    /// Messages that arrived before the SUBACK, delivered first.
    early: VecDeque<rumqttc::Publish>,
    task: Option<JoinHandle<()>>,
    /// Why the session ended on our side (a bad message from the hub).
    ended: Option<String>,
    /// The connection (TCP, TLS) and CONNECT→CONNACK.
    connect_time: Duration,
    /// SUBSCRIBE→SUBACK.
    subscribe_rtt: Duration,
}

impl Drop for MqttUplinkSession {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl MqttUplinkSession {
    /// Connects (clean session), waits for CONNACK, subscribes to the down topic with QoS 1
    /// and waits for SUBACK; an error if any of it fails or takes longer than
    /// `connect_timeout`.
    pub async fn connect(opts: &MqttUplinkOptions) -> Result<MqttUplinkSession, MqttUplinkError> {
        opts.check()?;
        let mut o = MqttOptions::new(&opts.client_id, &opts.host, opts.port);
        let cap = usize::from(opts.max_in_flight) + 8;
        o.set_keep_alive(opts.keep_alive)
            .set_clean_session(true)
            .set_inflight(opts.max_in_flight)
            .set_max_packet_size(
                frame::MAX_FRAME_LEN + PACKET_OVERHEAD,
                opts.max_payload + PACKET_OVERHEAD,
            )
            .set_request_channel_capacity(cap);
        if let Some((u, p)) = &opts.credentials {
            o.set_credentials(u, p);
        }
        if let Some(tls) = &opts.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        let (client, mut lp) = AsyncClient::new(o, cap);
        let mut net = lp.network_options();
        net.set_connection_timeout(opts.connect_timeout.as_secs().max(1));
        // rumqttc leaves Nagle's algorithm on: a small frame (or PUBACK) then waits for
        // the peer's delayed ACK, tens of milliseconds when traffic is light.
        net.set_tcp_nodelay(true);
        lp.set_network_options(net);
        let down_topic = opts.down_topic();
        let after = opts.connect_timeout;
        let connack = tokio::time::timeout(after, async {
            loop {
                match lp.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(MqttUplinkError::Connect(e.to_string())),
                }
            }
        });
        let started = Instant::now();
        connack.await.map_err(|_| MqttUplinkError::Timeout {
            what: "CONNACK",
            after,
        })??;
        let connect_time = started.elapsed();
        let subscribing = Instant::now();
        client
            .try_subscribe(&down_topic, QoS::AtLeastOnce)
            .map_err(|e| MqttUplinkError::Connect(e.to_string()))?;
        let mut early = VecDeque::new();
        let suback = tokio::time::timeout(after.saturating_sub(started.elapsed()), async {
            loop {
                match lp.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(s))) => {
                        let refused = s
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                        return if refused {
                            Err(MqttUplinkError::SubscribeRejected(down_topic.clone()))
                        } else {
                            Ok(())
                        };
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => early.push_back(p),
                    Ok(_) => {}
                    Err(e) => return Err(MqttUplinkError::Connect(e.to_string())),
                }
            }
        });
        suback.await.map_err(|_| MqttUplinkError::Timeout {
            what: "SUBACK",
            after,
        })??;
        let subscribe_rtt = subscribing.elapsed();
        let early: VecDeque<_> = early
            .into_iter()
            .filter(|p| p.topic == down_topic)
            .collect();
        let window = Arc::new(Semaphore::new(usize::from(opts.max_in_flight)));
        let state = Arc::new(Mutex::new(State {
            inflight: InFlight::default(),
            error: None,
            down_bytes: early.iter().map(|p| p.payload.len()).sum(),
            bad_messages: 0,
        }));
        let (tx, down) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(lp, state.clone(), window.clone(), tx, down_topic));
        Ok(MqttUplinkSession {
            client,
            up_topic: opts.up_topic(),
            gateway_id: opts.gateway_id.clone(),
            max_payload: opts.max_payload,
            window,
            state,
            down,
            early,
            task: Some(task),
            ended: None,
            connect_time,
            subscribe_rtt,
        })
    }

    /// How long the connection took: TCP (and TLS) set-up, then CONNECT→CONNACK, so two
    /// round trips or more (three with TLS 1.3).
    pub fn connect_time(&self) -> Duration {
        self.connect_time
    }

    /// SUBSCRIBE→SUBACK on the new connection: one round trip to the broker, the one clean
    /// RTT sample of the set-up.
    pub fn subscribe_rtt(&self) -> Duration {
        self.subscribe_rtt
    }

    /// The smallest publish→PUBACK time since the previous call, `None` when the broker
    /// acknowledged nothing in between ([`InFlight::take_min_rtt`]).
    pub fn take_min_rtt(&self) -> Option<Duration> {
        self.lock().inflight.take_min_rtt()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The error that ended the event loop.
    fn lost(&self) -> MqttUplinkError {
        let why = self.lock().error.clone();
        MqttUplinkError::ConnectionLost(why.unwrap_or_else(|| "the event loop stopped".into()))
    }

    /// Ends the session on our side (a bad message from the hub).
    fn end(&mut self, why: String) {
        self.ended = Some(why);
        self.window.close();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Publishes one encoded frame (the bytes of [`frame::encode`]) as one QoS 1 message on
    /// `<prefix>/<gateway>/up`. Waits while `max_in_flight` publishes await the broker's
    /// PUBACK. A frame over `max_payload` is refused and the session stays usable.
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), MqttUplinkError> {
        if let Some(why) = &self.ended {
            return Err(MqttUplinkError::Ended(why.clone()));
        }
        if frame.len() > self.max_payload {
            return Err(MqttUplinkError::PayloadTooLarge {
                len: frame.len(),
                max: self.max_payload,
            });
        }
        match self.window.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(self.lost()),
        }
        self.lock().inflight.queued(frame.len());
        self.client
            .publish(
                self.up_topic.clone(),
                QoS::AtLeastOnce,
                false,
                frame.to_vec(),
            )
            .await
            .map_err(|_| self.lost())
    }

    /// The next message from the hub (from `<prefix>/<gateway>/down`), e.g.
    /// [`Message::Ack`]. A payload that is not a frame, or an Ack for another gateway, is
    /// counted ([`MqttUplinkStats::bad_messages`]) and ends the session.
    pub async fn recv(&mut self) -> Result<Message, MqttUplinkError> {
        if let Some(why) = &self.ended {
            return Err(MqttUplinkError::Ended(why.clone()));
        }
        let p = match self.early.pop_front() {
            Some(p) => p,
            None => match self.down.recv().await {
                Some(p) => p,
                None => return Err(self.lost()),
            },
        };
        {
            let mut st = self.lock();
            st.down_bytes = st.down_bytes.saturating_sub(p.payload.len());
        }
        let err = match frame::decode(&p.payload) {
            Ok(Message::Ack(a)) if a.gateway_id != self.gateway_id => {
                MqttUplinkError::WrongGateway(quoted(&a.gateway_id))
            }
            Ok(m) => return Ok(m),
            Err(e) => MqttUplinkError::Undecodable(e),
        };
        self.lock().bad_messages += 1;
        tracing::warn!(error = %err, "MQTT uplink: bad message from the hub, ending the session");
        self.end(err.to_string());
        Err(err)
    }

    /// Bytes and messages acknowledged by the broker so far, what is in flight, and the
    /// publish→PUBACK RTT.
    pub fn stats(&self) -> MqttUplinkStats {
        let st = self.lock();
        MqttUplinkStats {
            bad_messages: st.bad_messages,
            ..st.inflight.stats()
        }
    }

    /// Sends DISCONNECT (after the publishes already queued) and waits up to 2 s for the
    /// event loop to write it.
    pub async fn close(mut self) {
        let Some(mut task) = self.task.take() else {
            return;
        };
        if self.client.try_disconnect().is_ok()
            && tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_ok()
        {
            return;
        }
        task.abort();
    }
}

/// Polls the event loop until the connection ends: feeds [`InFlight`], releases the send
/// window on PUBACK, and queues the hub's messages for `recv`.
async fn drive(
    mut lp: EventLoop,
    state: Arc<Mutex<State>>,
    window: Arc<Semaphore>,
    down: mpsc::UnboundedSender<rumqttc::Publish>,
    down_topic: String,
) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let reason = loop {
        match lp.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                lock().inflight.written(pkid, Instant::now());
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                if lock().inflight.acked(a.pkid, Instant::now()) {
                    window.add_permits(1);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic != down_topic {
                    continue;
                }
                {
                    let mut st = lock();
                    st.down_bytes = st.down_bytes.saturating_add(p.payload.len());
                    if st.down_bytes > MAX_DOWN_QUEUED_BYTES {
                        break format!(
                            "more than {MAX_DOWN_QUEUED_BYTES} bytes of the hub's messages are not being read"
                        );
                    }
                }
                if down.send(p).is_err() {
                    break "the session was dropped".to_owned();
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break "closed".to_owned(),
            Ok(_) => {}
            Err(e) => break e.to_string(),
        }
    };
    lock().error = Some(reason);
    window.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_built_from_prefix_and_gateway() {
        let gw: GatewayId = "gw-1".parse().unwrap();
        assert_eq!(up_topic("outpost", &gw), "outpost/gw-1/up");
        assert_eq!(down_topic("site/a", &gw), "site/a/gw-1/down");
        assert_eq!(up_filter("outpost"), "outpost/+/up");
        let o = MqttUplinkOptions::new("127.0.0.1", 1883, &gw);
        assert_eq!(o.up_topic(), "outpost/gw-1/up");
        assert_eq!(o.down_topic(), "outpost/gw-1/down");
        assert_eq!(o.client_id, "outpost-gw-1-uplink");
    }

    #[test]
    fn the_gateway_id_is_read_from_an_up_topic() {
        assert_eq!(
            gateway_of_up_topic("outpost", "outpost/gw-1/up").unwrap(),
            "gw-1"
        );
        assert_eq!(
            gateway_of_up_topic("site/a", "site/a/plant.gw_2/up").unwrap(),
            "plant.gw_2"
        );
        for bad in [
            "outpost/gw-1/down",
            "outpost/gw-1",
            "other/gw-1/up",
            "outpostx/gw-1/up",
            "outpost/up",
            "outpost//up",
        ] {
            assert!(gateway_of_up_topic("outpost", bad).is_err(), "{bad}");
        }
        for (topic, reason) in [
            ("outpost/+/up", "must start"),
            ("outpost/#/up", "must start"),
            ("outpost/gw+1/up", "only ASCII"),
            ("outpost/a/b/up", "only ASCII"),
            ("outpost/gw 1/up", "only ASCII"),
            ("outpost/-gw/up", "must start"),
            ("outpost/_gw/up", "must start"),
            ("outpost/../up", "must start"),
            ("outpost//up", "empty"),
        ] {
            match gateway_of_up_topic("outpost", topic) {
                Err(TopicError::GatewayId { reason: r, .. }) => {
                    assert!(r.contains(reason), "{topic}: {r}")
                }
                other => panic!("{topic}: {other:?}"),
            }
        }
        let long = format!("outpost/{}/up", "a".repeat(65));
        assert!(matches!(
            gateway_of_up_topic("outpost", &long),
            Err(TopicError::GatewayId { .. })
        ));
        // Quoted topics are bounded.
        let huge = "x".repeat(10_000);
        match gateway_of_up_topic("outpost", &huge) {
            Err(TopicError::NotUplink(t)) => assert_eq!(t.len(), MAX_QUOTED),
            other => panic!("{other:?}"),
        }
        assert_eq!(quoted("é".repeat(100).as_str()).len(), 128);
    }

    #[test]
    fn options_are_checked() {
        let ok = MqttUplinkOptions::new("127.0.0.1", 1883, &"gw-1".parse().unwrap());
        assert!(ok.check().is_ok());
        type Edit = fn(&mut MqttUplinkOptions);
        let cases: [(&str, Edit); 6] = [
            ("prefix", |o| o.topic_prefix = "a/+".into()),
            ("client", |o| o.client_id.clear()),
            ("keep alive", |o| o.keep_alive = Duration::from_millis(500)),
            ("in flight", |o| o.max_in_flight = 0),
            ("payload", |o| o.max_payload = frame::MAX_FRAME_LEN + 1),
            ("host", |o| o.host.clear()),
        ];
        for (what, f) in cases {
            let mut o = ok.clone();
            f(&mut o);
            assert!(
                matches!(o.check(), Err(MqttUplinkError::InvalidOptions(_))),
                "{what}"
            );
        }
        assert_eq!(
            split_host_port("[::1]:1883").unwrap(),
            ("::1".to_owned(), 1883)
        );
        assert!(split_host_port("broker").is_err());
        assert!(split_host_port("broker:0").is_err());
        assert!(split_host_port(":1883").is_err());
    }

    #[test]
    fn options_come_from_the_config() {
        let text = r#"
[gateway]
id = "gw-cfg"
data_dir = "/tmp/x"
[uplink]
transport = "mqtt"
[uplink.mqtt]
broker = "broker.example:8883"
username = "gw-cfg"
password = "pw"
topic_prefix = "site/a"
max_in_flight = 8
max_payload = "128KiB"
keep_alive = "10s"
"#;
        let c = outpost_runtime::config::parse(
            text,
            std::path::Path::new("gw.toml"),
            std::path::Path::new("/"),
        )
        .unwrap()
        .strict()
        .unwrap();
        let m = c.uplink.unwrap().mqtt.unwrap();
        let o = MqttUplinkOptions::from_config(&"gw-cfg".parse().unwrap(), &m).unwrap();
        assert_eq!((o.host.as_str(), o.port), ("broker.example", 8883));
        assert_eq!(o.client_id, "outpost-gw-cfg-uplink");
        assert_eq!(o.credentials, Some(("gw-cfg".into(), "pw".into())));
        assert_eq!(o.up_topic(), "site/a/gw-cfg/up");
        assert_eq!(o.max_in_flight, 8);
        assert_eq!(o.max_payload, 128 << 10);
        assert_eq!(o.keep_alive, Duration::from_secs(10));
        assert!(o.tls.is_none());
        assert!(!format!("{o:?}").contains("pw\""), "no password in Debug");
    }

    #[test]
    fn tls_from_pem_needs_a_ca() {
        assert!(matches!(
            tls_from_pem(b"", None),
            Err(MqttUplinkError::Tls(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let b = crate::uplink::certs::generate_bundle(
            dir.path(),
            &["localhost".into()],
            &["gw-1".parse().unwrap()],
        )
        .unwrap();
        let ca = std::fs::read(&b.ca_cert).unwrap();
        assert!(tls_from_pem(&ca, None).is_ok());
        let g = &b.gateways[0];
        let (cert, key) = (
            std::fs::read(&g.cert).unwrap(),
            std::fs::read(&g.key).unwrap(),
        );
        assert!(tls_from_pem(&ca, Some((&cert, &key))).is_ok());
        assert!(tls_from_pem(&ca, Some((&cert, b"not a key"))).is_err());
    }

    #[test]
    fn in_flight_counts_acked_bytes_and_rtt() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut f = InFlight::default();
        f.queued(100);
        f.queued(200);
        f.queued(300);
        assert_eq!(f.stats().in_flight, 3);
        f.written(1, t0);
        f.written(2, t0 + ms(10));
        // Acked out of order; an unknown id is ignored.
        assert!(f.acked(2, t0 + ms(50)));
        assert!(!f.acked(2, t0 + ms(60)));
        assert!(!f.acked(9, t0 + ms(60)));
        let s = f.stats();
        assert_eq!((s.acked_bytes, s.acked_messages, s.in_flight), (200, 1, 2));
        assert_eq!(s.latest_rtt, Some(ms(40)));
        assert_eq!(s.srtt, Some(ms(40)));
        assert!(f.acked(1, t0 + ms(120)));
        let s = f.stats();
        assert_eq!((s.acked_bytes, s.acked_messages, s.in_flight), (300, 2, 1));
        assert_eq!(s.min_rtt, Some(ms(40)));
        assert_eq!(s.latest_rtt, Some(ms(120)));
        assert_eq!(s.srtt, Some(ms(40).mul_f64(0.875) + ms(120).mul_f64(0.125)));
        // The smallest RTT since the last look, once.
        assert_eq!(f.take_min_rtt(), Some(ms(40)));
        assert_eq!(f.take_min_rtt(), None);
        // The packet id is reused for the third publish once free.
        f.written(1, t0 + ms(200));
        assert!(f.acked(1, t0 + ms(201)));
        assert_eq!(f.take_min_rtt(), Some(ms(1)));
        assert_eq!(f.stats().acked_bytes, 600);
        assert_eq!(f.stats().in_flight, 0);
        // A write event without a queued publish (cannot happen) changes nothing.
        f.written(5, t0);
        assert!(!f.acked(5, t0));
    }

    #[tokio::test]
    async fn connecting_to_a_closed_port_fails() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let mut o = MqttUplinkOptions::new("127.0.0.1", port, &"gw-1".parse().unwrap());
        o.connect_timeout = Duration::from_secs(5);
        match MqttUplinkSession::connect(&o).await {
            Err(MqttUplinkError::Connect(_)) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("connected to a closed port"),
        }
    }

    #[tokio::test]
    async fn a_silent_broker_times_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        // Accepts and holds the connection, never answers CONNECT.
        let hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let mut o = MqttUplinkOptions::new("127.0.0.1", port, &"gw-1".parse().unwrap());
        o.connect_timeout = Duration::from_millis(300);
        let t = Instant::now();
        match MqttUplinkSession::connect(&o).await {
            Err(MqttUplinkError::Timeout {
                what: "CONNACK", ..
            }) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("connected to a silent peer"),
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        hold.abort();
    }
}
