//! The MQTT client of the MQTT source (MQTT 3.1.1 and 5 behind one type).
//!
//! [`MqttSource::start`] spawns one task that owns the broker connection: it connects
//! (TCP, optionally TLS), asks for the persistent session, (re)subscribes on every
//! connection, hands each publish to the consumer through a bounded queue, writes the
//! acknowledgements the consumer gives back, pings, and sleeps with exponential backoff
//! and jitter between failed connections.
//!
//! ## Back-pressure without dropping an acknowledgement
//!
//! The connection loop reads the socket only while the consumer can take more: while
//! fewer than `max_in_flight` QoS 1 messages are held unacknowledged in the gateway and
//! while the consumer's queue has room (in messages and in bytes) — the [`Flow`] gate.
//! Beyond that it stops *reading*: the broker keeps the messages, and TCP flow control
//! pushes back on it. It never stops *writing*: acknowledgements given back by the
//! consumer (once the samples are durable) are written as soon as they are ready, all of
//! them in one write, even while reading is paused, and pings keep the connection alive
//! through a long pause. A message's credit returns when its acknowledgement is written,
//! so the number of messages held unacknowledged in the gateway never exceeds
//! `max_in_flight`, even when a broker sends more than the Receive Maximum we announced
//! (Mosquitto 2.0.11 does): the excess waits in the broker and in socket buffers, unread.
//! No acknowledgement is ever given up while its connection lives.
//!
//! Why not rumqttc's event loop (its packet codec is used here): it reads up to ten
//! packets into its own queue whenever it is polled, and it writes queued acknowledgements
//! only while it is polled (one write per acknowledgement) — so pausing it to stop reading
//! also stops the acknowledgements, and polling it to send them keeps reading. It also
//! drops the connection on a packet over its size limit, which a persistent session then
//! redelivers for ever; [`Framer`] reads past such a packet instead.
//!
//! ## Delivery guarantees
//!
//! The session is persistent (`clean_session = 0` in 3.1.1; `clean_start = 0` with a
//! session-expiry interval in 5) and acknowledgements are manual: a QoS 1 publish is
//! acknowledged only when the consumer calls [`Acker::ack`] with its [`AckToken`], which it
//! does once the samples are durable, in the order the messages arrived (as MQTT requires).
//! A message received but not yet acknowledged when the gateway or the broker stops is
//! redelivered by the broker on the next connection. Acknowledgements are tied to the
//! connection a publish arrived on (packet ids are per connection): an ack whose
//! connection has ended is dropped, never sent on the next connection, where the same
//! packet id may name another message.
//!
//! A PUBLISH over `max_packet` is read past without being buffered and handed over as an
//! oversized message (topic and size, no payload) to be counted and acknowledged. Over
//! MQTT 5 the broker is told the limit and drops bigger messages itself, silently; when it
//! ends a connection with a reason (a DISCONNECT), the consumer hears it
//! ([`SourceEvent::BrokerDisconnect`]).
//!
//! [`RecentMessages`] is the pure core that recognises a redelivery (`dup` flag) of a
//! message already taken in, so that a broker restart does not duplicate samples.
//!
//! [`Flow`]: super::flow::Flow
//! [`Framer`]: super::wire::Framer

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use outpost_runtime::config::types::{Secret, SecretError};
use outpost_runtime::config::{MqttDeviceConfig, MqttVersion, TlsClientConfig};
use outpost_runtime::supervisor::{Backoff, BackoffPolicy};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

pub use super::flow::AckOutcome;
use super::flow::Flow;
use super::wire::{self, Framer, Incoming, Protocol};

/// Messages queued between the connection and the consumer, at most.
pub const EVENT_CHANNEL: usize = 256;

/// Payload bytes queued between the connection and the consumer: reading pauses at this
/// (so at most one packet more is queued).
pub const EVENT_BYTES: usize = 1 << 20;

/// Session expiry asked of an MQTT 5 broker: how long it keeps our subscriptions and
/// queued QoS 1 messages while the gateway is away.
pub const SESSION_EXPIRY_S: u32 = 7 * 24 * 3600;

/// A connection that lasted at least this long resets the reconnect backoff.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(1);

/// Longest wait for TCP, TLS and the broker's CONNACK.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// Packet id of our SUBSCRIBE (the only packet we send that needs one).
const SUBSCRIBE_ID: u16 = 1;

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
    /// QoS 1 messages held unacknowledged at most (MQTT 5: the Receive Maximum announced).
    pub max_in_flight: u16,
    /// Largest packet taken whole (MQTT 5: the Maximum Packet Size announced); bigger
    /// PUBLISH packets are read past and reported as oversized.
    pub max_packet: usize,
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
            .field("max_in_flight", &self.max_in_flight)
            .field("max_packet", &self.max_packet)
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
            max_in_flight: cfg.max_in_flight.get().clamp(1, u64::from(u16::MAX)) as u16,
            max_packet: usize::try_from(cfg.max_packet.0).unwrap_or(usize::MAX),
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
    /// MQTT 5: the broker ended the connection with this reason code (and text). Codes
    /// 0x93 (receive maximum exceeded), 0x95 (packet too large), 0x96 (message rate too
    /// high) and 0x97 (quota exceeded) say it refused or dropped something.
    BrokerDisconnect { code: u8, reason: Option<String> },
    /// A publish from the broker.
    Message(Message),
}

/// One publish. Its [`AckToken`] (QoS 1) must be passed to [`Acker::ack`] once the
/// message is safely stored, or it is redelivered on the next connection.
pub struct Message {
    topic: Bytes,
    payload: Bytes,
    qos: u8,
    dup: bool,
    oversized: Option<usize>,
    token: Option<AckToken>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("topic", &String::from_utf8_lossy(&self.topic))
            .field("payload_len", &self.payload.len())
            .field("qos", &self.qos)
            .field("dup", &self.dup)
            .field("oversized", &self.oversized)
            .finish()
    }
}

impl Message {
    /// The topic as text; `None` when a broker sent a topic that is not UTF-8.
    pub fn topic(&self) -> Option<&str> {
        std::str::from_utf8(&self.topic).ok()
    }

    /// The topic's bytes.
    pub fn topic_bytes(&self) -> &[u8] {
        &self.topic
    }

    /// The payload (empty for an oversized message).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// 0 or 1.
    pub fn qos(&self) -> u8 {
        self.qos
    }

    /// Set by the broker on a redelivery.
    pub fn dup(&self) -> bool {
        self.dup
    }

    /// For a PUBLISH over `max_packet` that was read past: its size (the packet's
    /// remaining length). Its payload is gone; it still has to be acknowledged.
    pub fn oversized(&self) -> Option<usize> {
        self.oversized
    }

    /// Queue bytes this message counts for.
    fn bytes(&self) -> usize {
        self.topic.len() + self.payload.len()
    }

    /// The acknowledgement owed for this message (`None` for QoS 0). Drops the payload.
    pub fn into_ack(self) -> Option<AckToken> {
        self.token
    }
}

/// The acknowledgement of one QoS 1 publish, valid on the connection it arrived on.
/// Dropped without [`Acker::ack`], it gives its credit back (the broker redelivers the
/// message on the next connection).
pub struct AckToken {
    shared: Arc<Shared>,
    epoch: u64,
    pkid: u16,
    spent: bool,
}

impl std::fmt::Debug for AckToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AckToken(pkid {}, connection {})", self.pkid, self.epoch)
    }
}

impl Drop for AckToken {
    fn drop(&mut self) {
        if !self.spent {
            self.shared.lock().abandon();
            self.shared.wake.notify_one();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared state, acknowledgements
// ---------------------------------------------------------------------------------------

/// State shared by the connection task, the consumer and the ackers.
struct Shared {
    flow: Mutex<Flow>,
    /// Wakes the connection task: acknowledgements ready, or room for more messages.
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Flow> {
        self.flow.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sends acknowledgements; clone freely.
#[derive(Clone)]
pub struct Acker {
    shared: Arc<Shared>,
}

impl Acker {
    /// Acknowledges a message to the broker: queued and written at once, without waiting
    /// (never refused). [`AckOutcome::Stale`]: its connection has ended, the broker will
    /// redeliver it.
    pub fn ack(&self, mut token: AckToken) -> AckOutcome {
        token.spent = true;
        let outcome = self.shared.lock().ack(token.epoch, token.pkid);
        self.shared.wake.notify_one();
        outcome
    }

    /// Acknowledges several messages, in order, with one wake-up of the connection.
    /// Returns how many were stale.
    pub fn ack_all(&self, tokens: impl IntoIterator<Item = AckToken>) -> usize {
        let mut stale = 0;
        {
            let mut flow = self.shared.lock();
            for mut t in tokens {
                t.spent = true;
                if flow.ack(t.epoch, t.pkid) == AckOutcome::Stale {
                    stale += 1;
                }
            }
        }
        self.shared.wake.notify_one();
        stale
    }
}

/// A running MQTT client. Dropping it stops the connection task (the broker keeps the
/// session).
pub struct MqttSource {
    events: mpsc::Receiver<SourceEvent>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MqttSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MqttSource {
    /// Starts the connection task; the first connection attempt begins at once.
    pub fn start(opts: SourceOptions) -> MqttSource {
        let shared = Arc::new(Shared {
            flow: Mutex::new(Flow::new(usize::from(opts.max_in_flight), EVENT_BYTES)),
            wake: Notify::new(),
        });
        let (tx, events) = mpsc::channel(EVENT_CHANNEL);
        let task = tokio::spawn(run(opts, shared.clone(), tx));
        MqttSource {
            events,
            shared,
            task,
        }
    }

    /// Accounts for an event taken out of the queue, and wakes the connection if that
    /// made the room it was waiting for.
    fn took(&self, ev: &SourceEvent, was_full: bool) {
        let room = match ev {
            SourceEvent::Message(m) => self.shared.lock().taken(m.bytes()),
            _ => false,
        };
        if room || was_full {
            self.shared.wake.notify_one();
        }
    }

    fn full(&self) -> bool {
        self.events.len() >= self.events.max_capacity()
    }

    /// The next event; `None` once the connection task has stopped.
    pub async fn next(&mut self) -> Option<SourceEvent> {
        let ev = self.events.recv().await?;
        // It was full if, with this one back, it would be.
        let was_full = self.events.len() + 1 >= self.events.max_capacity();
        self.took(&ev, was_full);
        Some(ev)
    }

    /// The next event if one is ready, without waiting.
    pub fn try_next(&mut self) -> Option<SourceEvent> {
        let was_full = self.full();
        let ev = self.events.try_recv().ok()?;
        self.took(&ev, was_full);
        Some(ev)
    }

    /// A handle to acknowledge messages with.
    pub fn acker(&self) -> Acker {
        Acker {
            shared: self.shared.clone(),
        }
    }

    /// QoS 1 messages held unacknowledged now, and the most held at once so far (never
    /// more than `max_in_flight`).
    pub fn held(&self) -> (usize, usize) {
        let f = self.shared.lock();
        (f.held(), f.peak_held())
    }
}

// ---------------------------------------------------------------------------------------
// The connection task
// ---------------------------------------------------------------------------------------

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// How a connection ended.
enum End {
    /// The consumer is gone: stop.
    Stop,
    /// The connection failed or ended; `connected` tells how long it was up.
    Failed {
        error: String,
        connected: Option<Duration>,
    },
}

async fn run(opts: SourceOptions, shared: Arc<Shared>, tx: mpsc::Sender<SourceEvent>) {
    let mut backoff = Backoff::new(opts.reconnect);
    loop {
        let end = connection(&opts, &shared, &tx).await;
        // Whatever the consumer acknowledges from now on belongs to a dead connection.
        shared.lock().connection_ended();
        let (error, ran) = match end {
            End::Stop => return,
            End::Failed { error, connected } => (error, connected),
        };
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
    }
}

fn failed(error: impl Into<String>) -> End {
    End::Failed {
        error: error.into(),
        connected: None,
    }
}

async fn open(opts: &SourceOptions) -> Result<Box<dyn Stream>, String> {
    let tcp = tokio::net::TcpStream::connect((opts.host.as_str(), opts.port))
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", opts.host, opts.port))?;
    let _ = tcp.set_nodelay(true);
    match &opts.tls {
        None => Ok(Box::new(tcp)),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(opts.host.clone())
                .map_err(|e| format!("TLS server name {:?}: {e}", opts.host))?;
            let s = rumqttc::tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {}: {e}", opts.host))?;
            Ok(Box::new(s))
        }
    }
}

/// Writes `out` whole (and flushes it), within `limit`.
async fn send(stream: &mut Box<dyn Stream>, out: &[u8], limit: Duration) -> Result<(), String> {
    let write = async {
        stream.write_all(out).await?;
        stream.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write to the broker failed: {e}")),
        Err(_) => Err(format!("the broker read nothing for {} s", limit.as_secs())),
    }
}

/// Connects, then runs the connection until it ends.
async fn connection(
    opts: &SourceOptions,
    shared: &Arc<Shared>,
    tx: &mpsc::Sender<SourceEvent>,
) -> End {
    let protocol = match opts.version {
        MqttVersion::V311 => Protocol::V311,
        MqttVersion::V5 => Protocol::V5,
    };
    let mut framer = Framer::new(protocol, opts.max_packet);
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let keep_alive_s = opts.keep_alive.as_secs().clamp(1, u64::from(u16::MAX)) as u16;
    let hello = match wire::connect(
        protocol,
        &wire::ConnectOptions {
            client_id: &opts.client_id,
            keep_alive_s,
            credentials: opts
                .credentials
                .as_ref()
                .map(|(u, p)| (u.as_str(), p.as_str())),
            session_expiry_s: SESSION_EXPIRY_S,
            receive_maximum: opts.max_in_flight,
            max_packet: u32::try_from(opts.max_packet).unwrap_or(u32::MAX),
        },
    ) {
        Ok(b) => b,
        Err(e) => return failed(format!("cannot encode CONNECT: {e}")),
    };
    // TCP, TLS, CONNECT → CONNACK, within one timeout.
    let handshake = async {
        let mut stream = open(opts).await?;
        send(&mut stream, &hello, CONNECT_TIMEOUT).await?;
        loop {
            match framer.next(&mut rbuf).map_err(|e| e.to_string())? {
                Some(Incoming::ConnAck {
                    session_present,
                    code,
                    server_keep_alive,
                    reason,
                }) => {
                    if code != 0 {
                        return Err(format!(
                            "the broker refused the connection: code 0x{code:02x}{}",
                            reason.map(|r| format!(" ({r})")).unwrap_or_default()
                        ));
                    }
                    return Ok((stream, session_present, server_keep_alive));
                }
                Some(other) => {
                    return Err(format!("expected CONNACK, the broker sent {other:?}"));
                }
                None => {
                    rbuf.reserve(READ_CHUNK);
                    if stream
                        .read_buf(&mut rbuf)
                        .await
                        .map_err(|e| format!("read from the broker failed: {e}"))?
                        == 0
                    {
                        return Err("the broker closed the connection before CONNACK".into());
                    }
                }
            }
        }
    };
    let (mut stream, session_present, server_keep_alive) =
        match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return failed(e),
            Err(_) => {
                return failed(format!(
                    "no CONNACK from {}:{} within {} s",
                    opts.host,
                    opts.port,
                    CONNECT_TIMEOUT.as_secs()
                ));
            }
        };
    let up = Instant::now();
    let end = |error: String| End::Failed {
        error,
        connected: Some(up.elapsed()),
    };
    // The broker's keep-alive wins (MQTT 5); 0 would mean none: we still ping.
    let keep_alive = match server_keep_alive {
        Some(s) if s > 0 => Duration::from_secs(u64::from(s)),
        _ => Duration::from_secs(u64::from(keep_alive_s)),
    };
    let write_limit = (keep_alive * 2).max(Duration::from_secs(10));
    if !opts.subscriptions.is_empty() {
        let sub = match wire::subscribe(protocol, SUBSCRIBE_ID, &opts.subscriptions) {
            Ok(b) => b,
            Err(e) => return end(format!("cannot encode SUBSCRIBE: {e}")),
        };
        if let Err(e) = send(&mut stream, &sub, write_limit).await {
            return end(e);
        }
    }

    let mut out = BytesMut::with_capacity(1024);
    let mut acks: Vec<u16> = Vec::new();
    // Control events waiting for room in the consumer's queue (at most one of each kind
    // per SUBACK or DISCONNECT: a handful).
    let mut pending: VecDeque<SourceEvent> =
        VecDeque::from([SourceEvent::Connected { session_present }]);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Last time bytes came in, or reading was paused (a paused connection is not silent).
    let mut heard = Instant::now();
    loop {
        // 1. Acknowledgements: every ready one, in one write.
        shared.lock().take_acks(&mut acks);
        for id in acks.drain(..) {
            wire::puback(&mut out, id);
        }
        if !out.is_empty() {
            if let Err(e) = send(&mut stream, &out, write_limit).await {
                return end(e);
            }
            out.clear();
        }
        // 2. Control events, then whatever the gate lets through of what was read.
        while let Some(ev) = pending.pop_front() {
            match tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    pending.push_front(ev);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return End::Stop,
            }
        }
        let mut open_gate;
        loop {
            open_gate = pending.is_empty() && tx.capacity() > 0 && shared.lock().may_deliver();
            if framer.next_is_publish(&rbuf) && !open_gate {
                break;
            }
            let packet = match framer.next(&mut rbuf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => return end(e.to_string()),
            };
            let taken = match packet {
                Incoming::Publish(p) => Taken {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos,
                    dup: p.dup,
                    pkid: p.pkid,
                    oversized: None,
                },
                Incoming::Oversized {
                    topic,
                    qos,
                    dup,
                    pkid,
                    len,
                } => Taken {
                    topic,
                    payload: Bytes::new(),
                    qos,
                    dup,
                    pkid,
                    oversized: Some(len),
                },
                Incoming::PingResp => continue,
                Incoming::SubAck { rejected: 0, .. } => continue,
                Incoming::SubAck { rejected, .. } => {
                    pending.push_back(SourceEvent::SubscribeRejected { count: rejected });
                    continue;
                }
                Incoming::Disconnect { code, reason } => {
                    let error = format!(
                        "the broker disconnected: reason 0x{code:02x}{}",
                        reason
                            .as_ref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    );
                    // Best effort: the consumer hears why before it hears it ended.
                    let _ = tx
                        .send(SourceEvent::BrokerDisconnect { code, reason })
                        .await;
                    return end(error);
                }
                Incoming::ConnAck { .. } => {
                    return end("protocol violation: a second CONNACK".into());
                }
            };
            let event = SourceEvent::Message(deliver(shared, taken));
            match tx.try_send(event) {
                Ok(()) => {}
                // Cannot be full: only this task sends, and it saw room.
                Err(_) => return End::Stop,
            }
        }
        // 3. Wait: for acknowledgements or room (a wake-up), the ping, or more bytes —
        // read only when the next packet can be taken, or to read past an oversized one,
        // or when what is buffered is not a message (a PINGRESP, a SUBACK...).
        let want_read = framer.skipping() || open_gate || !framer.next_is_publish(&rbuf);
        if !want_read {
            heard = Instant::now();
        }
        // Not biased: under load every branch is ready, and none may starve (the ping
        // least of all: with QoS 0 traffic nothing else tells the broker we are alive).
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = ping.tick() => {
                if want_read && heard.elapsed() > keep_alive * 2 {
                    return end(format!(
                        "the broker sent nothing for {} s (not even a PINGRESP)",
                        heard.elapsed().as_secs()
                    ));
                }
                wire::pingreq(&mut out);
            }
            r = stream.read_buf(&mut rbuf), if want_read => match r {
                Ok(0) => return end("the broker closed the connection".into()),
                Ok(_) => heard = Instant::now(),
                Err(e) => return end(format!("read from the broker failed: {e}")),
            },
            // Room in the consumer's queue for control events.
            r = tx.reserve(), if !pending.is_empty() => match r {
                Ok(permit) => {
                    if let Some(ev) = pending.pop_front() {
                        permit.send(ev);
                    }
                }
                Err(_) => return End::Stop,
            },
        }
        if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
            rbuf.reserve(READ_CHUNK);
        }
    }
}

/// A message as it comes off the connection.
struct Taken {
    topic: Bytes,
    payload: Bytes,
    qos: u8,
    dup: bool,
    pkid: u16,
    oversized: Option<usize>,
}

/// Hands a message over, taking its credit (QoS 1).
fn deliver(shared: &Arc<Shared>, t: Taken) -> Message {
    let epoch = shared
        .lock()
        .delivered(t.qos > 0, t.topic.len() + t.payload.len());
    Message {
        token: (t.qos > 0).then(|| AckToken {
            shared: shared.clone(),
            epoch,
            pkid: t.pkid,
            spent: false,
        }),
        topic: t.topic,
        payload: t.payload,
        qos: t.qos,
        dup: t.dup,
        oversized: t.oversized,
    }
}

// ---------------------------------------------------------------------------------------
// Redelivery filter (pure)
// ---------------------------------------------------------------------------------------

/// Digests of the last `capacity` QoS 1 messages taken in (topic and payload, 128-bit,
/// keyed per process so a broker cannot aim for collisions). A message the broker flags as
/// a redelivery (`dup`) whose digest is here was already taken in: its samples are not
/// stored twice. A message without `dup` is always new, even when identical to an
/// earlier one. Inserting a digest again makes it the newest (a recognised redelivery
/// stays recognised for another `capacity` messages). Memory: `capacity` × about 40 bytes.
pub struct RecentMessages {
    counts: HashMap<u128, u32>,
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
            counts: HashMap::new(),
            order: VecDeque::new(),
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
        self.counts.contains_key(&digest)
    }

    /// Records a digest as the newest, forgetting the oldest beyond capacity.
    pub fn insert(&mut self, digest: u128) {
        *self.counts.entry(digest).or_insert(0) += 1;
        self.order.push_back(digest);
        while self.order.len() > self.capacity {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(c) = self.counts.get_mut(&old) {
                *c -= 1;
                if *c == 0 {
                    self.counts.remove(&old);
                }
            }
        }
    }

    /// Distinct digests held.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
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
        assert!(r.contains(a) && r.contains(b));
        r.insert(c);
        assert!(!r.contains(a) && r.contains(b) && r.contains(c));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn recent_messages_refresh_on_reinsert() {
        let mut r = RecentMessages::new(2);
        let (a, b, c) = (1u128, 2u128, 3u128);
        r.insert(a);
        r.insert(b);
        r.insert(a); // a redelivery recognised: a is the newest again
        r.insert(c);
        assert!(r.contains(a) && r.contains(c) && !r.contains(b));
    }

    /// A broker played by the test over a real loopback socket.
    mod peer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpStream;

        pub async fn read_packet_half(s: &mut tokio::net::tcp::ReadHalf<'_>) -> (u8, Vec<u8>) {
            let first = s.read_u8().await.unwrap();
            let mut len = 0usize;
            for i in 0..4 {
                let b = s.read_u8().await.unwrap();
                len |= usize::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    break;
                }
            }
            let mut body = vec![0; len];
            s.read_exact(&mut body).await.unwrap();
            (first, body)
        }

        pub async fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
            let first = s.read_u8().await.ok()?;
            let mut len = 0usize;
            for i in 0..4 {
                let b = s.read_u8().await.ok()?;
                len |= usize::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    break;
                }
            }
            let mut body = vec![0; len];
            s.read_exact(&mut body).await.ok()?;
            Some((first, body))
        }

        pub fn publish(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
            let mut body = (topic.len() as u16).to_be_bytes().to_vec();
            body.extend_from_slice(topic.as_bytes());
            body.extend_from_slice(&pkid.to_be_bytes());
            body.push(0); // MQTT 5: no properties
            body.extend_from_slice(payload);
            let mut out = vec![0x32];
            let mut n = body.len();
            loop {
                let mut b = (n % 128) as u8;
                n /= 128;
                if n > 0 {
                    b |= 0x80;
                }
                out.push(b);
                if n == 0 {
                    break;
                }
            }
            out.extend(body);
            out
        }

        /// Accepts one MQTT 5 client: CONNECT → CONNACK, SUBSCRIBE → SUBACK.
        pub async fn accept(l: &tokio::net::TcpListener) -> TcpStream {
            let (mut s, _) = l.accept().await.unwrap();
            let (first, _) = read_packet(&mut s).await.unwrap();
            assert_eq!(first >> 4, 1, "CONNECT first");
            s.write_all(&[0x20, 3, 0, 0, 0]).await.unwrap();
            let (first, body) = read_packet(&mut s).await.unwrap();
            assert_eq!(first >> 4, 8, "then SUBSCRIBE");
            s.write_all(&[0x90, 4, body[0], body[1], 0, 1])
                .await
                .unwrap();
            s
        }
    }

    fn options(port: u16, max_in_flight: u16) -> SourceOptions {
        SourceOptions {
            host: "127.0.0.1".into(),
            port,
            version: MqttVersion::V5,
            client_id: "flow-test".into(),
            credentials: None,
            tls: None,
            keep_alive: Duration::from_secs(30),
            reconnect: BackoffPolicy::new(
                Duration::from_millis(20),
                Duration::from_millis(100),
                2.0,
                0.5,
            ),
            subscriptions: vec![("t/#".into(), 1)],
            max_in_flight,
            max_packet: 4096,
        }
    }

    async fn next_message(s: &mut MqttSource) -> Message {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), s.next())
                .await
                .expect("no event")
                .expect("source stopped");
            if let SourceEvent::Message(m) = ev {
                return m;
            }
        }
    }

    /// A broker that ignores the Receive Maximum and sends 5,000 messages at once: the
    /// source takes only `max_in_flight` of them until it acknowledges, and the
    /// acknowledgements it gives while reading is paused reach the broker, in order.
    #[tokio::test]
    async fn reading_pauses_at_max_in_flight_while_acks_still_go_out() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut source = MqttSource::start(options(port, 8));
        let mut broker = peer::accept(&l).await;
        let mut flood = Vec::new();
        for i in 1..=5_000u16 {
            flood.extend(peer::publish("t/x", i, format!("{i}").as_bytes()));
        }
        let (mut rd, mut wr) = broker.split();
        let send = async { wr.write_all(&flood).await.unwrap() };
        let consume = async {
            let mut tokens = Vec::new();
            for _ in 0..8 {
                tokens.push(next_message(&mut source).await.into_ack().unwrap());
            }
            // Eight held: nothing more comes, however much the broker sent.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(source.try_next().is_none(), "read past max_in_flight");
            assert_eq!(source.held(), (8, 8));
            // Acknowledge three: they are written at once; three more come in.
            let acker = source.acker();
            assert_eq!(acker.ack_all(tokens.drain(..3)), 0);
            for _ in 0..3 {
                tokens.push(next_message(&mut source).await.into_ack().unwrap());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(source.try_next().is_none());
            assert_eq!(source.held().1, 8, "never more than 8 held");
            tokens
        };
        let read_acks = async {
            let mut ids = Vec::new();
            while ids.len() < 3 {
                let (first, body) = peer::read_packet_half(&mut rd).await;
                if first >> 4 == 4 {
                    ids.push(u16::from_be_bytes([body[0], body[1]]));
                }
            }
            ids
        };
        let ((), _tokens, acks) = tokio::join!(send, consume, read_acks);
        assert_eq!(acks, [1, 2, 3]);
    }

    /// An ack given after its connection ended is never written on the next one; the
    /// broker's DISCONNECT reason reaches the consumer.
    #[tokio::test]
    async fn acks_of_an_ended_connection_are_dropped_and_disconnect_reasons_reported() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut source = MqttSource::start(options(port, 8));
        let mut broker = peer::accept(&l).await;
        broker
            .write_all(&peer::publish("t/x", 7, b"1"))
            .await
            .unwrap();
        let token = next_message(&mut source).await.into_ack().unwrap();
        // MQTT 5 DISCONNECT, quota exceeded, reason string "full".
        broker
            .write_all(&[0xE0, 8, 0x97, 6, 0x1F, 0, 3, b'f', b'u', b'l'])
            .await
            .unwrap();
        let mut saw_reason = false;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), source.next())
                .await
                .unwrap()
                .unwrap()
            {
                SourceEvent::BrokerDisconnect { code, reason } => {
                    assert_eq!((code, reason.as_deref()), (0x97, Some("ful")));
                    saw_reason = true;
                }
                SourceEvent::Disconnected { .. } => break,
                _ => {}
            }
        }
        assert!(saw_reason);
        assert_eq!(source.acker().ack(token), AckOutcome::Stale);
        assert_eq!(source.held().0, 0, "its credit came back");
        // The next connection: a publish, acknowledged — the stale pkid 7 never shows.
        let mut broker = peer::accept(&l).await;
        broker
            .write_all(&peer::publish("t/x", 9, b"2"))
            .await
            .unwrap();
        let m = next_message(&mut source).await;
        assert_eq!(m.payload(), b"2");
        source.acker().ack(m.into_ack().unwrap());
        let (first, body) = peer::read_packet(&mut broker).await.unwrap();
        assert_eq!((first >> 4, &body[..2]), (4, &9u16.to_be_bytes()[..]));
    }
}
