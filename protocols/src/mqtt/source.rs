//! The MQTT client of the MQTT source (rumqttc, MQTT 3.1.1 and 5 behind one type).
//!
//! [`MqttSource::start`] spawns one task that owns the rumqttc event loop and does nothing
//! but poll it: it (re)subscribes on every connection, hands each publish to the consumer
//! through a bounded channel (a slow consumer stops the polling, and TCP flow control
//! slows the broker), and sleeps with exponential backoff and jitter between failed
//! connections (rumqttc's `poll()` itself retries at once, forever).
//!
//! Delivery guarantees. The session is persistent (`clean_session = false` in 3.1.1;
//! `clean_start = false` with a session-expiry interval in 5) and acknowledgements are
//! manual: a QoS 1 publish is acknowledged only when the consumer calls
//! [`Acker::ack`] with its [`AckToken`], which it does once the samples are durable. A
//! message received but not yet acknowledged when the gateway or the broker stops is
//! redelivered by the broker on the next connection. Acknowledgements are tied to the
//! connection a publish arrived on (packet ids are per connection): an ack whose
//! connection has ended is dropped, never sent on the next connection, where the same
//! packet id may name another message.
//!
//! [`RecentMessages`] is the pure core that recognises a redelivery (`dup` flag) of a
//! message already taken in, so that a broker restart does not duplicate samples.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use outpost_runtime::config::types::{Secret, SecretError};
use outpost_runtime::config::{MqttDeviceConfig, MqttVersion, TlsClientConfig};
use outpost_runtime::supervisor::{Backoff, BackoffPolicy};
use rumqttc::v5::mqttbytes::v5 as p5;
use tokio::sync::mpsc;

use super::mapping::MAX_PAYLOAD;

/// Largest MQTT packet accepted from the broker. Larger than [`MAX_PAYLOAD`] so that a
/// payload over the mapping limit still arrives as a packet (and is counted, acknowledged
/// and skipped) instead of breaking the connection; in MQTT 5 the broker is told this
/// limit and must not send bigger packets.
pub const MAX_PACKET: usize = 2 * MAX_PAYLOAD;

/// Requests (acks, subscriptions) queued towards the event loop.
pub const REQUEST_CHANNEL: usize = 1_024;

/// Publishes buffered between the event loop and the consumer.
pub const EVENT_CHANNEL: usize = 1_024;

/// Unacknowledged QoS 1 messages an MQTT 5 broker may have in flight to us (its
/// "receive maximum"): bounds what a restart can make the broker send again. MQTT 3.1.1
/// has no such field; the broker's own setting applies.
pub const RECEIVE_MAXIMUM: u16 = 1_024;

/// Session expiry asked of an MQTT 5 broker: how long it keeps our subscriptions and
/// queued QoS 1 messages while the gateway is away.
pub const SESSION_EXPIRY_S: u32 = 7 * 24 * 3600;

/// A connection that lasted at least this long resets the reconnect backoff.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(1);

/// Why a source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid broker address {0:?}: expected host:port")]
    BadBroker(String),
    #[error("cannot read the MQTT password: {0}")]
    Password(SecretError),
    #[error("cannot read the TLS client key: {0}")]
    Key(SecretError),
    #[error("cannot read {path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("MQTT 3.1.1 client ids may not be empty")]
    EmptyClientId,
}

/// Everything the client needs, resolved from config (secrets read, TLS built).
#[derive(Clone)]
pub struct SourceOptions {
    pub host: String,
    pub port: u16,
    pub version: MqttVersion,
    pub client_id: String,
    /// Username and password.
    pub credentials: Option<(String, String)>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub keep_alive: Duration,
    pub reconnect: BackoffPolicy,
    /// Topic filters and their QoS (0 or 1).
    pub subscriptions: Vec<(String, u8)>,
}

impl std::fmt::Debug for SourceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("version", &self.version)
            .field("client_id", &self.client_id)
            .field("username", &self.credentials.as_ref().map(|c| &c.0))
            .field("tls", &self.tls.is_some())
            .field("subscriptions", &self.subscriptions)
            .finish_non_exhaustive()
    }
}

/// The MQTT credentials of a config section: the user name with its password read from
/// its secret (empty when absent); a password alone goes with an empty user name.
pub fn credentials(
    username: Option<&str>,
    password: Option<&Secret>,
) -> Result<Option<(String, String)>, SecretError> {
    let password = password.map(Secret::resolve_string).transpose()?;
    Ok(match (username, password) {
        (Some(u), p) => Some((u.to_owned(), p.unwrap_or_default())),
        (None, Some(p)) => Some((String::new(), p)),
        (None, None) => None,
    })
}

impl SourceOptions {
    /// Resolves a device's config: default client id `outpost-<gateway>-<device>`,
    /// password and key read from their secrets, TLS built with the ring provider.
    pub fn from_config(
        cfg: &MqttDeviceConfig,
        gateway_id: &str,
        device: &str,
    ) -> Result<SourceOptions, SourceError> {
        let (host, port) = split_host_port(&cfg.broker)?;
        let client_id = cfg
            .client_id
            .clone()
            .unwrap_or_else(|| format!("outpost-{gateway_id}-{device}"));
        if client_id.is_empty() {
            return Err(SourceError::EmptyClientId);
        }
        let credentials = credentials(cfg.username.as_deref(), cfg.password.as_ref())
            .map_err(SourceError::Password)?;
        let tls = match &cfg.tls {
            Some(t) => Some(tls_client_config(t, &host)?),
            None => None,
        };
        let mut reconnect = BackoffPolicy::new(
            cfg.reconnect.initial.get(),
            cfg.reconnect.max.get().max(cfg.reconnect.initial.get()),
            2.0,
            0.5,
        );
        reconnect.reset_after = STABLE_CONNECTION;
        Ok(SourceOptions {
            host,
            port,
            version: cfg.version,
            client_id,
            credentials,
            tls,
            keep_alive: cfg.keep_alive.get(),
            reconnect,
            subscriptions: cfg
                .subscriptions
                .iter()
                .map(|s| (s.topic.clone(), s.qos.get().min(1) as u8))
                .collect(),
        })
    }
}

fn split_host_port(broker: &str) -> Result<(String, u16), SourceError> {
    let bad = || SourceError::BadBroker(broker.to_owned());
    let (host, port) = broker.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port.parse().map_err(|_| bad())?))
}

/// A rustls client config using the ring provider explicitly (never a process-wide
/// default): the CA file's certificates as roots, an optional client certificate and key,
/// and the configured `server_name` checked instead of the broker host when given.
pub fn tls_client_config(
    cfg: &TlsClientConfig,
    broker_host: &str,
) -> Result<Arc<rustls::ClientConfig>, SourceError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let pem_err = |path: &std::path::Path, e: &dyn std::fmt::Display| SourceError::Pem {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let read_pem = |path: &std::path::Path| -> Result<Vec<u8>, SourceError> {
        let meta = std::fs::metadata(path).map_err(|e| pem_err(path, &e))?;
        if meta.len() > 1 << 20 {
            return Err(pem_err(path, &"larger than 1 MiB"));
        }
        std::fs::read(path).map_err(|e| pem_err(path, &e))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = read_pem(&cfg.ca)?;
    for c in CertificateDer::pem_slice_iter(&ca) {
        let c = c.map_err(|e| pem_err(&cfg.ca, &e))?;
        roots.add(c).map_err(|e| pem_err(&cfg.ca, &e))?;
    }
    if roots.is_empty() {
        return Err(pem_err(&cfg.ca, &"no certificate found"));
    }
    let roots = Arc::new(roots);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::Tls(e.to_string()))?;
    let builder = match &cfg.server_name {
        Some(name) if name != broker_host => {
            let expected = ServerName::try_from(name.clone())
                .map_err(|e| SourceError::Tls(format!("server_name {name:?}: {e}")))?;
            let inner =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| SourceError::Tls(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedVerifier { inner, expected }))
        }
        _ => builder.with_root_certificates(roots),
    };
    let config = match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(&read_pem(cert)?)
                    .collect::<Result<_, _>>()
                    .map_err(|e| pem_err(cert, &e))?;
            if chain.is_empty() {
                return Err(pem_err(cert, &"no certificate found"));
            }
            let key_bytes = key.resolve().map_err(SourceError::Key)?;
            let key = PrivateKeyDer::from_pem_slice(&key_bytes)
                .map_err(|e| SourceError::Tls(format!("client key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| SourceError::Tls(e.to_string()))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(SourceError::Tls(
                "a client certificate needs both `cert` and `key`".into(),
            ));
        }
    };
    Ok(Arc::new(config))
}

/// Verifies the server certificate against a configured name instead of the host the
/// connection was made to (rumqttc always passes the host).
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    expected: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            &self.expected,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------

/// What the source reports to its consumer.
#[derive(Debug)]
pub enum SourceEvent {
    /// A connection was accepted; subscriptions have been (re)sent.
    Connected { session_present: bool },
    /// The connection failed or ended; the next attempt follows after `retry_in`.
    Disconnected {
        error: String,
        /// Failed attempts since the backoff was last reset (1-based).
        attempt: u32,
        retry_in: Duration,
    },
    /// The broker refused `count` of our subscriptions.
    SubscribeRejected { count: usize },
    /// A publish from the broker.
    Message(Message),
}

enum Publish {
    V4(rumqttc::Publish),
    V5(p5::Publish),
}

/// One publish. Its [`AckToken`] (QoS ≥ 1) must be passed to [`Acker::ack`] once the
/// message is safely stored, or it is redelivered on the next connection.
pub struct Message {
    publish: Publish,
    epoch: u64,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("topic", &String::from_utf8_lossy(self.topic_bytes()))
            .field("payload_len", &self.payload().len())
            .field("qos", &self.qos())
            .field("dup", &self.dup())
            .finish()
    }
}

impl Message {
    /// The topic as text; `None` when a (v5) broker sent a topic that is not UTF-8.
    pub fn topic(&self) -> Option<&str> {
        std::str::from_utf8(self.topic_bytes()).ok()
    }

    /// The topic's bytes.
    pub fn topic_bytes(&self) -> &[u8] {
        match &self.publish {
            Publish::V4(p) => p.topic.as_bytes(),
            Publish::V5(p) => &p.topic,
        }
    }

    pub fn payload(&self) -> &[u8] {
        match &self.publish {
            Publish::V4(p) => &p.payload,
            Publish::V5(p) => &p.payload,
        }
    }

    /// 0, 1 or 2.
    pub fn qos(&self) -> u8 {
        match &self.publish {
            Publish::V4(p) => p.qos as u8,
            Publish::V5(p) => p.qos as u8,
        }
    }

    /// Set by the broker on a redelivery.
    pub fn dup(&self) -> bool {
        match &self.publish {
            Publish::V4(p) => p.dup,
            Publish::V5(p) => p.dup,
        }
    }

    /// The acknowledgement owed for this message (`None` for QoS 0). Keeps the packet id,
    /// not the payload.
    pub fn into_ack(self) -> Option<AckToken> {
        if self.qos() == 0 {
            return None;
        }
        let publish = match self.publish {
            Publish::V4(mut p) => {
                p.payload = Default::default();
                p.topic = String::new();
                Publish::V4(p)
            }
            Publish::V5(mut p) => {
                p.payload = Default::default();
                p.topic = Default::default();
                p.properties = None;
                Publish::V5(p)
            }
        };
        Some(AckToken {
            publish,
            epoch: self.epoch,
        })
    }
}

/// The acknowledgement of one QoS ≥ 1 publish, valid on the connection it arrived on.
pub struct AckToken {
    publish: Publish,
    epoch: u64,
}

impl std::fmt::Debug for AckToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pkid = match &self.publish {
            Publish::V4(p) => p.pkid,
            Publish::V5(p) => p.pkid,
        };
        write!(f, "AckToken(pkid {pkid}, connection {})", self.epoch)
    }
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

// One of each per source, moved once: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Loop {
    V4(rumqttc::EventLoop),
    V5(Box<rumqttc::v5::EventLoop>),
}

#[allow(clippy::large_enum_variant)] // returned by value once per event, never stored
enum Polled {
    ConnAck { session_present: bool },
    Publish(Publish),
    SubAck { rejected: usize },
    Other,
}

/// Sending a request to the event loop failed (queue full or loop gone).
struct Busy;

impl Client {
    fn try_ack(&self, p: &Publish) -> Result<(), Busy> {
        match (self, p) {
            (Client::V4(c), Publish::V4(p)) => c.try_ack(p).map_err(|_| Busy),
            (Client::V5(c), Publish::V5(p)) => c.try_ack(p).map_err(|_| Busy),
            _ => Ok(()), // cannot happen: one source speaks one version
        }
    }

    fn try_subscribe(&self, subs: &[(String, u8)]) -> Result<(), Busy> {
        if subs.is_empty() {
            return Ok(());
        }
        match self {
            Client::V4(c) => c
                .try_subscribe_many(
                    subs.iter()
                        .map(|(t, q)| rumqttc::SubscribeFilter::new(t.clone(), qos_v4(*q))),
                )
                .map_err(|_| Busy),
            Client::V5(c) => c
                .try_subscribe_many(subs.iter().map(|(t, q)| {
                    let mut f = p5::Filter::new(t.clone(), qos_v5(*q));
                    // Retained messages only with a new subscription, not on every
                    // reconnection of a persistent session.
                    f.retain_forward_rule = p5::RetainForwardRule::OnNewSubscribe;
                    f
                }))
                .map_err(|_| Busy),
        }
    }
}

fn qos_v4(q: u8) -> rumqttc::QoS {
    if q == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    }
}

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    if q == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    }
}

impl Loop {
    async fn poll(&mut self) -> Result<Polled, String> {
        match self {
            Loop::V4(l) => {
                use rumqttc::{Event, Packet};
                match l.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(c)) => Ok(Polled::ConnAck {
                        session_present: c.session_present,
                    }),
                    Event::Incoming(Packet::Publish(p)) => Ok(Polled::Publish(Publish::V4(p))),
                    Event::Incoming(Packet::SubAck(s)) => Ok(Polled::SubAck {
                        rejected: s
                            .return_codes
                            .iter()
                            .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                            .count(),
                    }),
                    _ => Ok(Polled::Other),
                }
            }
            Loop::V5(l) => {
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::Packet;
                match l.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(c)) => Ok(Polled::ConnAck {
                        session_present: c.session_present,
                    }),
                    Event::Incoming(Packet::Publish(p)) => Ok(Polled::Publish(Publish::V5(p))),
                    Event::Incoming(Packet::SubAck(s)) => Ok(Polled::SubAck {
                        rejected: s
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, p5::SubscribeReasonCode::Success(_)))
                            .count(),
                    }),
                    _ => Ok(Polled::Other),
                }
            }
        }
    }

    /// Drops the connection's queued requests (acks among them).
    fn clean(&mut self) {
        match self {
            Loop::V4(l) => l.clean(),
            Loop::V5(l) => l.clean(),
        }
    }
}

fn build(opts: &SourceOptions) -> (Client, Loop) {
    match opts.version {
        MqttVersion::V311 => {
            let mut o = rumqttc::MqttOptions::new(&opts.client_id, &opts.host, opts.port);
            o.set_keep_alive(opts.keep_alive)
                .set_clean_session(false)
                .set_manual_acks(true)
                .set_max_packet_size(MAX_PACKET, MAX_PACKET)
                .set_request_channel_capacity(REQUEST_CHANNEL);
            if let Some((u, p)) = &opts.credentials {
                o.set_credentials(u, p);
            }
            if let Some(tls) = &opts.tls {
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls.clone()),
                ));
            }
            let (c, l) = rumqttc::AsyncClient::new(o, REQUEST_CHANNEL);
            (Client::V4(c), Loop::V4(l))
        }
        MqttVersion::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(&opts.client_id, &opts.host, opts.port);
            o.set_keep_alive(opts.keep_alive)
                .set_clean_start(false)
                .set_session_expiry_interval(Some(SESSION_EXPIRY_S))
                .set_receive_maximum(Some(RECEIVE_MAXIMUM))
                .set_manual_acks(true)
                .set_max_packet_size(Some(MAX_PACKET as u32))
                .set_request_channel_capacity(REQUEST_CHANNEL);
            if let Some((u, p)) = &opts.credentials {
                o.set_credentials(u, p);
            }
            if let Some(tls) = &opts.tls {
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls.clone()),
                ));
            }
            let (c, l) = rumqttc::v5::AsyncClient::new(o, REQUEST_CHANNEL);
            (Client::V5(c), Loop::V5(Box::new(l)))
        }
    }
}

/// State shared by the event-loop task and the ackers.
struct Shared {
    /// Connection number: bumped (under the write lock) when a connection ends.
    epoch: RwLock<u64>,
    closed: AtomicBool,
}

/// Sends acknowledgements; clone freely.
#[derive(Clone)]
pub struct Acker {
    client: Client,
    shared: Arc<Shared>,
}

/// Outcome of [`Acker::try_ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// Queued on the connection the message came on.
    Sent,
    /// That connection has ended (or the source stopped): the broker will redeliver the
    /// message; nothing to do.
    Stale,
    /// The request queue is full: try again after the event loop made progress.
    Full,
}

impl Acker {
    /// Acknowledges a message to the broker without waiting. The event loop drains the
    /// request queue only while it runs, and it may itself be waiting for the consumer:
    /// so a consumer must never block on a full queue — keep the token and retry.
    pub fn try_ack(&self, token: &AckToken) -> AckOutcome {
        let epoch = self.shared.epoch.read().unwrap_or_else(|e| e.into_inner());
        if *epoch != token.epoch || self.shared.closed.load(Ordering::Acquire) {
            return AckOutcome::Stale;
        }
        // Pushed while holding the read lock: the connection cannot end in between, so
        // this ack is either sent on its connection or drained with it.
        match self.client.try_ack(&token.publish) {
            Ok(()) => AckOutcome::Sent,
            Err(Busy) => AckOutcome::Full,
        }
    }
}

/// A running MQTT client. Dropping it stops the event loop (the broker keeps the session).
pub struct MqttSource {
    events: mpsc::Receiver<SourceEvent>,
    acker: Acker,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MqttSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MqttSource {
    /// Starts the event-loop task; the first connection attempt begins at once.
    pub fn start(opts: SourceOptions) -> MqttSource {
        let (client, lp) = build(&opts);
        let shared = Arc::new(Shared {
            epoch: RwLock::new(0),
            closed: AtomicBool::new(false),
        });
        let (tx, events) = mpsc::channel(EVENT_CHANNEL);
        let task = tokio::spawn(event_loop(
            lp,
            client.clone(),
            shared.clone(),
            opts.subscriptions.clone(),
            opts.reconnect,
            tx,
        ));
        MqttSource {
            events,
            acker: Acker { client, shared },
            task,
        }
    }

    /// The next event; `None` once the event loop has stopped.
    pub async fn next(&mut self) -> Option<SourceEvent> {
        self.events.recv().await
    }

    /// The next event if one is ready, without waiting.
    pub fn try_next(&mut self) -> Option<SourceEvent> {
        self.events.try_recv().ok()
    }

    /// A handle to acknowledge messages with.
    pub fn acker(&self) -> Acker {
        self.acker.clone()
    }
}

struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
    }
}

async fn event_loop(
    mut lp: Loop,
    client: Client,
    shared: Arc<Shared>,
    subs: Vec<(String, u8)>,
    policy: BackoffPolicy,
    tx: mpsc::Sender<SourceEvent>,
) {
    let _close = CloseOnDrop(shared.clone());
    let mut backoff = Backoff::new(policy);
    let mut connected_at: Option<Instant> = None;
    loop {
        let polled = match lp.poll().await {
            Ok(Polled::ConnAck { session_present }) => match client.try_subscribe(&subs) {
                Ok(()) => Ok(Polled::ConnAck { session_present }),
                // Cannot happen right after a connection (the queue was drained when the
                // previous one ended); reconnecting re-subscribes.
                Err(Busy) => Err("cannot queue the subscriptions".to_owned()),
            },
            other => other,
        };
        let event = match polled {
            Ok(Polled::ConnAck { session_present }) => {
                connected_at = Some(Instant::now());
                SourceEvent::Connected { session_present }
            }
            Ok(Polled::Publish(publish)) => {
                let epoch = *shared.epoch.read().unwrap_or_else(|e| e.into_inner());
                SourceEvent::Message(Message { publish, epoch })
            }
            Ok(Polled::SubAck { rejected: 0 }) | Ok(Polled::Other) => continue,
            Ok(Polled::SubAck { rejected }) => SourceEvent::SubscribeRejected { count: rejected },
            Err(error) => {
                {
                    let mut epoch = shared.epoch.write().unwrap_or_else(|e| e.into_inner());
                    *epoch = epoch.wrapping_add(1);
                    // Ends the connection (if still up) and drops its queued acks: rumqttc
                    // dropped those queued before the error, this drops those pushed since.
                    lp.clean();
                }
                let ran = connected_at.take().map(|t| t.elapsed());
                let (attempt, retry_in) = backoff.next_delay(ran, fastrand::f64());
                if tx
                    .send(SourceEvent::Disconnected {
                        error,
                        attempt,
                        retry_in,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(retry_in).await;
                continue;
            }
        };
        if tx.send(event).await.is_err() {
            return; // the consumer is gone
        }
    }
}

// ---------------------------------------------------------------------------------------
// Redelivery filter (pure)
// ---------------------------------------------------------------------------------------

/// Digests of the last `capacity` QoS ≥ 1 messages taken in (topic and payload, 128-bit,
/// keyed per process so a broker cannot aim for collisions). A message the broker flags as
/// a redelivery (`dup`) whose digest is here was already taken in: its samples are not
/// stored twice. A message without `dup` is always new, even when identical to an
/// earlier one. Memory: `capacity` × 16 bytes, twice.
pub struct RecentMessages {
    set: HashSet<u128>,
    order: VecDeque<u128>,
    capacity: usize,
    keys: (
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    ),
}

impl RecentMessages {
    pub fn new(capacity: usize) -> RecentMessages {
        RecentMessages {
            set: HashSet::with_capacity(capacity.min(1 << 16)),
            order: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity: capacity.max(1),
            keys: Default::default(),
        }
    }

    /// The digest of a message.
    pub fn digest(&self, topic: &[u8], payload: &[u8]) -> u128 {
        let h = |k: &std::collections::hash_map::RandomState| {
            let mut h = k.build_hasher();
            topic.hash(&mut h);
            payload.hash(&mut h);
            h.finish()
        };
        (u128::from(h(&self.keys.0)) << 64) | u128::from(h(&self.keys.1))
    }

    /// Was this digest taken in recently?
    pub fn contains(&self, digest: u128) -> bool {
        self.set.contains(&digest)
    }

    /// Records a digest, forgetting the oldest beyond capacity.
    pub fn insert(&mut self, digest: u128) {
        if !self.set.insert(digest) {
            return;
        }
        self.order.push_back(digest);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses() {
        assert_eq!(
            split_host_port("localhost:1883").unwrap(),
            ("localhost".into(), 1883)
        );
        assert_eq!(split_host_port("[::1]:8883").unwrap(), ("::1".into(), 8883));
        assert!(split_host_port("localhost").is_err());
        assert!(split_host_port(":1883").is_err());
        assert!(split_host_port("h:99999").is_err());
    }

    #[test]
    fn recent_messages_forget_the_oldest() {
        let mut r = RecentMessages::new(2);
        let a = r.digest(b"t", b"1");
        let b = r.digest(b"t", b"2");
        let c = r.digest(b"t", b"3");
        assert_ne!(a, b);
        assert_ne!(r.digest(b"t1", b""), r.digest(b"t", b"1"));
        r.insert(a);
        r.insert(b);
        r.insert(b);
        assert!(r.contains(a) && r.contains(b));
        r.insert(c);
        assert!(!r.contains(a) && r.contains(b) && r.contains(c));
        assert_eq!(r.len(), 2);
    }
}
