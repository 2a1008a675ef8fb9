//! QUIC uplink transport (quinn) with TLS 1.3 and mutual authentication.
//!
//! - [`QuicServer`] (the hub) accepts only clients whose certificate chains to the configured
//!   CA — others fail the handshake — and hands out each connection with the **gateway id
//!   read from the client certificate** (subject CN, else the first DNS SAN; it must follow
//!   the gateway id rule, [`GatewayId`]). The hub compares it with the id a
//!   gateway claims in its Hello. Handshakes run concurrently in the background with a
//!   deadline, so a silent or slow peer cannot stall the others. Which clients are taken on
//!   is decided by [`admission`]: a cap on handshakes in progress, in all and per source
//!   address, QUIC address validation (Retry) under load, and slots kept for sources that
//!   authenticated before, so a flood of handshakes that never finish cannot lock gateways
//!   out. Every outcome is counted ([`ServerCounters`]).
//! - [`QuicClient`] (the gateway) verifies the hub's certificate against the same CA and the
//!   server name it was given, and presents its own certificate.
//!
//! Both sides: TLS 1.3 only, ALPN [`ALPN`], no 0-RTT (replayable), keep-alive on (quinn
//! leaves it off) with an idle timeout, connection migration allowed, data on reliable
//! bi-directional streams (no datagrams, no uni-directional streams). Framing belongs to the
//! frame codec: this module moves bytes. [`PathStats`] exposes quinn's path statistics (RTT,
//! congestion window, loss, bytes) for the link monitor.
//!
//! rustls configs are built with the *ring* provider passed explicitly, so no process-wide
//! provider has to be installed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, IdleTimeout, TransportConfig, VarInt};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use quinn::{ConnectionError, RecvStream, SendStream};

use self::admission::{Admission, AdmissionLimits, Decision, Refused, Ticket};
use outpost_runtime::config::GatewayId;

pub mod admission;

/// The ALPN protocol id of Outpost's uplink, version 1.
pub const ALPN: &[u8] = b"outpost/1";
/// Largest PEM file [`ServerTls::load`] / [`ClientTls::load`] read.
pub const MAX_PEM_FILE_BYTES: u64 = 1 << 20;
/// Most certificates accepted in one PEM (a chain or a CA bundle).
pub const MAX_PEM_CERTS: usize = 16;
/// Application close code: normal shutdown.
pub const CLOSE_SHUTDOWN: u32 = 0;
/// Application close code: the client certificate carries no usable gateway id.
pub const CLOSE_BAD_IDENTITY: u32 = 1;

/// What can go wrong in the QUIC uplink.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// A PEM input could not be parsed.
    #[error("bad PEM in {what}: {detail}")]
    BadPem {
        /// Which input (e.g. "hub certificate").
        what: &'static str,
        /// The parser's reason.
        detail: String,
    },
    /// A PEM input holds no certificate.
    #[error("no certificate found in {what}")]
    MissingCert {
        /// Which input.
        what: &'static str,
    },
    /// A PEM input holds no private key.
    #[error("no private key found in {what} (expected PKCS#8, PKCS#1 or SEC1 PEM)")]
    MissingKey {
        /// Which input.
        what: &'static str,
    },
    /// A PEM input holds more certificates than [`MAX_PEM_CERTS`].
    #[error("{what} holds more than {max} certificates")]
    TooManyCerts {
        /// Which input.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// A CA certificate is not usable as a trust anchor.
    #[error("CA certificate is not usable as a trust anchor: {0}")]
    BadCa(rustls::Error),
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("TLS configuration of the {what} rejected: {detail}")]
    Tls {
        /// Which side ("server" or "client").
        what: &'static str,
        /// rustls' or quinn's reason.
        detail: String,
    },
    /// Options that cannot work together.
    #[error("invalid QUIC options: {0}")]
    InvalidOptions(String),
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A PEM file is larger than [`MAX_PEM_FILE_BYTES`].
    #[error("{path} is larger than {max} bytes: not a PEM certificate or key")]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The hub's server name is neither a DNS name nor an IP address.
    #[error("invalid server name {0:?}: expected a DNS name or an IP address")]
    InvalidServerName(String),
    /// quinn could not start a connection.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The hub's address.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// The handshake failed: certificate refused (by either side), wrong server name, no
    /// common protocol, or the peer closed or went away.
    #[error("handshake with {addr} refused: {source}")]
    HandshakeRefused {
        /// The peer's address.
        addr: SocketAddr,
        /// quinn's reason (TLS alerts show here).
        source: ConnectionError,
    },
    /// The handshake did not finish in time.
    #[error("handshake with {addr} timed out after {after:?}")]
    HandshakeTimedOut {
        /// The peer's address.
        addr: SocketAddr,
        /// The deadline.
        after: Duration,
    },
    /// The client certificate was valid but names no usable gateway.
    #[error("client {addr} rejected: {source}")]
    Identity {
        /// The peer's address.
        addr: SocketAddr,
        /// Why no gateway id could be taken from the certificate.
        source: IdentityError,
    },
    /// The connection is gone.
    #[error("connection lost: {0}")]
    Connection(#[from] ConnectionError),
    /// Writing to a stream failed.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Reading an exact number of bytes failed (or the stream ended first).
    #[error("stream read failed: {0}")]
    ReadExact(#[from] quinn::ReadExactError),
    /// Reading a stream to its end failed or exceeded the limit.
    #[error("stream read failed: {0}")]
    ReadToEnd(#[from] quinn::ReadToEndError),
    /// The stream was already finished or reset.
    #[error("stream already closed: {0}")]
    StreamClosed(#[from] quinn::ClosedStream),
}

/// Why no gateway id could be taken from a client certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The client sent no certificate (cannot happen with the hub's verifier).
    #[error("no client certificate")]
    NoCertificate,
    /// The certificate could not be parsed.
    #[error("unparsable certificate: {0}")]
    Certificate(webpki::Error),
    /// The subject name is malformed.
    #[error("malformed subject name: {0}")]
    Subject(&'static str),
    /// The subject has more than one common name.
    #[error("the subject has more than one common name")]
    SeveralCommonNames,
    /// Neither a common name nor a DNS SAN.
    #[error("the certificate has no common name and no DNS name")]
    NoId,
    /// The id found breaks the gateway id rule (shown truncated).
    #[error(
        "gateway id {0:?} in the certificate is invalid: expected 1 to 64 ASCII letters, digits, `-`, `_` or `.`, starting with a letter or digit"
    )]
    InvalidId(String),
}

/// The hub's TLS material, PEM.
#[derive(Clone)]
pub struct ServerTls {
    /// CA certificate(s) that sign the gateways' certificates.
    pub ca_pem: Vec<u8>,
    /// The hub's certificate (chain), leaf first.
    pub cert_pem: Vec<u8>,
    /// The hub's private key.
    pub key_pem: Vec<u8>,
}

/// A gateway's TLS material, PEM.
#[derive(Clone)]
pub struct ClientTls {
    /// CA certificate(s) that sign the hub's certificate.
    pub ca_pem: Vec<u8>,
    /// The gateway's certificate (chain), leaf first; its CN is the gateway id.
    pub cert_pem: Vec<u8>,
    /// The gateway's private key.
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the three PEM files (each at most [`MAX_PEM_FILE_BYTES`]).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, QuicError> {
        Ok(Self {
            ca_pem: read_pem_file(ca)?,
            cert_pem: read_pem_file(cert)?,
            key_pem: read_pem_file(key)?,
        })
    }
}

impl ClientTls {
    /// Reads the three PEM files (each at most [`MAX_PEM_FILE_BYTES`]).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, QuicError> {
        Ok(Self {
            ca_pem: read_pem_file(ca)?,
            cert_pem: read_pem_file(cert)?,
            key_pem: read_pem_file(key)?,
        })
    }
}

/// Reads a file of at most [`MAX_PEM_FILE_BYTES`].
pub fn read_pem_file(path: &Path) -> Result<Vec<u8>, QuicError> {
    use std::io::Read;
    let err = |source| QuicError::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(err)?;
    let mut buf = Vec::new();
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(err)?;
    if buf.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(QuicError::FileTooLarge {
            path: path.to_path_buf(),
            max: MAX_PEM_FILE_BYTES,
        });
    }
    Ok(buf)
}

/// Hub-side options.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Interval of QUIC PINGs on an otherwise silent connection. Must be shorter than
    /// `idle_timeout`.
    pub keep_alive: Duration,
    /// A connection with no packet from the peer for this long is closed (the smaller of
    /// both sides' values applies).
    pub idle_timeout: Duration,
    /// Deadline for a client to complete the handshake.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at most; further clients are refused until one finishes
    /// (see [`admission`] for this and the next three).
    pub max_pending_handshakes: usize,
    /// Handshakes in progress per source (IPv4 address, IPv6 /64) at most, counted apart
    /// for validated and unvalidated addresses.
    pub max_pending_per_source: usize,
    /// From this many handshakes in progress on, clients must validate their address first
    /// (a QUIC Retry: one more round trip). 0: always.
    pub retry_above: usize,
    /// Of `max_pending_handshakes`, slots only sources that authenticated within
    /// [`admission::KNOWN_FOR`] may use.
    pub reserved_for_known: usize,
    /// Authenticated connections waiting for [`QuicServer::accept`] at most.
    pub accept_backlog: usize,
    /// Bi-directional streams a peer may have open at once.
    pub max_bidi_streams: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 64,
            max_pending_per_source: 8,
            retry_above: 16,
            reserved_for_known: 16,
            accept_backlog: 16,
            max_bidi_streams: 16,
        }
    }
}

impl ServerOptions {
    /// The admission limits of these options.
    pub fn limits(&self) -> AdmissionLimits {
        AdmissionLimits {
            max_pending: self.max_pending_handshakes,
            max_pending_per_source: self.max_pending_per_source,
            retry_above: self.retry_above,
            reserved_for_known: self.reserved_for_known,
        }
    }
}

/// Gateway-side options.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Interval of QUIC PINGs on an otherwise silent connection. Must be shorter than
    /// `idle_timeout`.
    pub keep_alive: Duration,
    /// A connection with no packet from the hub for this long is closed (the smaller of
    /// both sides' values applies).
    pub idle_timeout: Duration,
    /// Deadline for the handshake.
    pub connect_timeout: Duration,
    /// Bi-directional streams the hub may have open at once.
    pub max_bidi_streams: u32,
    /// Local UDP address; `None` picks [`default_bind_for`] the hub's address.
    pub bind: Option<SocketAddr>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_bidi_streams: 16,
            bind: None,
        }
    }
}

/// The local address a client binds to reach `hub`: port 0 on the loopback address when
/// the hub is on loopback, otherwise on the unspecified address of the hub's family (the
/// OS routes to the hub; the socket accepts nothing but QUIC replies to our connection).
pub fn default_bind_for(hub: SocketAddr) -> SocketAddr {
    let ip = match hub.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// Path statistics of one connection, read from quinn, for the link monitor.
///
/// Counters are cumulative since the connection started; take differences between two
/// readings for rates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PathStats {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Smallest RTT seen.
    pub min_rtt: Duration,
    /// Congestion window, bytes.
    pub cwnd: u64,
    /// Congestion events (loss or ECN) so far.
    pub congestion_events: u64,
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Bytes in packets declared lost.
    pub lost_bytes: u64,
    /// UDP payload bytes sent.
    pub bytes_sent: u64,
    /// UDP payload bytes received.
    pub bytes_received: u64,
    /// UDP datagrams sent.
    pub datagrams_sent: u64,
    /// UDP datagrams received.
    pub datagrams_received: u64,
    /// Current path MTU, bytes.
    pub mtu: u16,
}

impl PathStats {
    /// The fields of quinn's statistics that describe the path.
    pub fn from_quinn(s: &quinn::ConnectionStats) -> Self {
        Self {
            rtt: s.path.rtt,
            min_rtt: s.path.min_rtt,
            cwnd: s.path.cwnd,
            congestion_events: s.path.congestion_events,
            sent_packets: s.path.sent_packets,
            lost_packets: s.path.lost_packets,
            lost_bytes: s.path.lost_bytes,
            bytes_sent: s.udp_tx.bytes,
            bytes_received: s.udp_rx.bytes,
            datagrams_sent: s.udp_tx.datagrams,
            datagrams_received: s.udp_rx.datagrams,
            mtu: s.path.current_mtu,
        }
    }

    /// Bytes sent and not declared lost: an upper bound of the bytes the peer acknowledged
    /// (it includes what is still in flight).
    pub fn bytes_acked_estimate(&self) -> u64 {
        self.bytes_sent.saturating_sub(self.lost_bytes)
    }

    /// Lost packets over sent packets, 0 when nothing was sent.
    pub fn loss_ratio(&self) -> f64 {
        if self.sent_packets == 0 {
            0.0
        } else {
            self.lost_packets as f64 / self.sent_packets as f64
        }
    }
}

/// An established, authenticated QUIC connection (either side).
///
/// Cheap to clone; all clones refer to the same connection. It keeps its UDP endpoint
/// alive.
#[derive(Debug, Clone)]
pub struct QuicConnection {
    conn: quinn::Connection,
    _endpoint: Endpoint,
}

impl QuicConnection {
    /// Opens a bi-directional stream. The peer sees it once something is written on it.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), QuicError> {
        Ok(self.conn.open_bi().await?)
    }

    /// Waits for the peer to open a bi-directional stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), QuicError> {
        Ok(self.conn.accept_bi().await?)
    }

    /// The connection's current path statistics.
    pub fn path_stats(&self) -> PathStats {
        PathStats::from_quinn(&self.conn.stats())
    }

    /// The peer's current address (it can change: migration is allowed).
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Closes the connection at once with an application `code` and `reason`, abandoning
    /// unacknowledged stream data (finish streams and wait for replies first).
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.conn.close(VarInt::from_u32(code), reason);
    }

    /// Waits until the connection is closed, and says why.
    pub async fn closed(&self) -> ConnectionError {
        self.conn.closed().await
    }

    /// Why the connection is closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.conn.close_reason()
    }

    /// The underlying quinn connection, for what this wrapper does not cover.
    pub fn quinn(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// A connection accepted by the hub, with the gateway id from its client certificate.
#[derive(Debug, Clone)]
pub struct GatewayConnection {
    /// The gateway id: subject CN of the client certificate, else its first DNS SAN.
    pub gateway_id: GatewayId,
    /// The connection.
    pub connection: QuicConnection,
}

/// Handshake outcomes on the hub, cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerCounters {
    /// Authenticated connections handed to [`QuicServer::accept`] (or dropped with the
    /// server).
    pub accepted: u64,
    /// Handshakes that failed: certificate refused, no common protocol, peer went away.
    pub handshakes_failed: u64,
    /// Handshakes that did not finish within `handshake_timeout`.
    pub handshakes_timed_out: u64,
    /// Valid certificates that named no usable gateway id.
    pub identity_rejected: u64,
    /// Clients refused because every handshake slot they may use was taken.
    pub refused_busy: u64,
    /// Clients refused because their source had `max_pending_per_source` validated
    /// handshakes in progress.
    pub refused_per_source: u64,
    /// Clients sent a Retry (asked to validate their address first).
    pub retried: u64,
    /// Handshakes in progress now.
    pub pending: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    handshakes_failed: AtomicU64,
    handshakes_timed_out: AtomicU64,
    identity_rejected: AtomicU64,
    refused_busy: AtomicU64,
    refused_per_source: AtomicU64,
    retried: AtomicU64,
    pending: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ServerCounters {
        ServerCounters {
            accepted: self.accepted.load(Ordering::Relaxed),
            handshakes_failed: self.handshakes_failed.load(Ordering::Relaxed),
            handshakes_timed_out: self.handshakes_timed_out.load(Ordering::Relaxed),
            identity_rejected: self.identity_rejected.load(Ordering::Relaxed),
            refused_busy: self.refused_busy.load(Ordering::Relaxed),
            refused_per_source: self.refused_per_source.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
        }
    }
}

/// The hub's QUIC endpoint: accepts gateways authenticated by client certificate.
///
/// Dropping it stops accepting (new clients' handshakes go unanswered and time out);
/// connections already handed out stay up. [`Self::close`] closes everything.
pub struct QuicServer {
    endpoint: Endpoint,
    accepted: mpsc::Receiver<GatewayConnection>,
    counters: Arc<Counters>,
    accept_loop: JoinHandle<()>,
}

impl fmt::Debug for QuicServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicServer")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("counters", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl Drop for QuicServer {
    fn drop(&mut self) {
        // New clients are no longer taken in (quinn drops their handshakes) instead of
        // piling up for an accept loop that is gone; connections already handed out keep
        // the endpoint alive.
        self.endpoint.set_server_config(None);
        self.accept_loop.abort();
    }
}

impl QuicServer {
    /// Binds the hub's UDP endpoint on `addr` (e.g. `127.0.0.1:0` in tests) and starts
    /// accepting. Must be called within a tokio runtime.
    pub fn bind(addr: SocketAddr, tls: &ServerTls, opts: ServerOptions) -> Result<Self, QuicError> {
        Self::bind_with_keep_alive(addr, tls, opts, Some(opts.keep_alive))
    }

    fn bind_with_keep_alive(
        addr: SocketAddr,
        tls: &ServerTls,
        opts: ServerOptions,
        keep_alive: Option<Duration>,
    ) -> Result<Self, QuicError> {
        check_timers(opts.keep_alive, opts.idle_timeout)?;
        if opts.handshake_timeout.is_zero() {
            return Err(QuicError::InvalidOptions(
                "handshake_timeout must be positive".into(),
            ));
        }
        if opts.max_pending_handshakes == 0 || opts.accept_backlog == 0 {
            return Err(QuicError::InvalidOptions(
                "max_pending_handshakes and accept_backlog must be at least 1".into(),
            ));
        }
        if let Some(p) = opts.limits().problem() {
            return Err(QuicError::InvalidOptions(p));
        }
        let crypto = server_crypto(tls)?;
        let crypto = QuicServerConfig::try_from(crypto).map_err(|e| QuicError::Tls {
            what: "server",
            detail: e.to_string(),
        })?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport(
            keep_alive,
            opts.idle_timeout,
            opts.max_bidi_streams,
        )?));
        config.migration(true);
        let endpoint =
            Endpoint::server(config, addr).map_err(|source| QuicError::Bind { addr, source })?;
        let (tx, rx) = mpsc::channel(opts.accept_backlog);
        let counters = Arc::new(Counters::default());
        let accept_loop = tokio::spawn(accept_loop(
            endpoint.clone(),
            tx,
            Arc::clone(&counters),
            opts,
        ));
        Ok(Self {
            endpoint,
            accepted: rx,
            counters,
            accept_loop,
        })
    }

    /// The next authenticated gateway connection; `None` once the server is closed.
    pub async fn accept(&mut self) -> Option<GatewayConnection> {
        self.accepted.recv().await
    }

    /// The bound UDP address (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, QuicError> {
        self.endpoint
            .local_addr()
            .map_err(|source| QuicError::Bind {
                addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                source,
            })
    }

    /// Handshake outcomes so far.
    pub fn counters(&self) -> ServerCounters {
        self.counters.snapshot()
    }

    /// Closes the endpoint and every connection on it with `code` and `reason`.
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.endpoint.close(VarInt::from_u32(code), reason);
    }

    /// Waits until every connection is closed and its close was delivered or timed out.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// The admission state shared by the accept loop and the handshake tasks.
type Shared = Arc<Mutex<Admission>>;

fn lock(a: &Shared) -> std::sync::MutexGuard<'_, Admission> {
    a.lock().unwrap_or_else(|e| e.into_inner())
}

/// A handshake slot, given back when dropped (also when its task is aborted).
struct Slot {
    admission: Shared,
    counters: Arc<Counters>,
    ticket: Ticket,
    authenticated: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut a = lock(&self.admission);
        a.finished(self.ticket, self.authenticated, Instant::now());
        self.counters
            .pending
            .store(a.pending() as u64, Ordering::Relaxed);
    }
}

/// How often at most refused clients are logged (a flood would fill the log otherwise).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Runs until the endpoint closes: decides for each incoming client ([`Admission`]) and
/// hands the ones taken on to their own handshake task.
async fn accept_loop(
    endpoint: Endpoint,
    tx: mpsc::Sender<GatewayConnection>,
    counters: Arc<Counters>,
    opts: ServerOptions,
) {
    let admission: Shared = Arc::new(Mutex::new(Admission::new(opts.limits())));
    let mut logged: Option<Instant> = None;
    let mut unlogged = 0u64;
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        let decision = {
            let mut a = lock(&admission);
            let d = a.decide(remote.ip(), validated, Instant::now());
            counters
                .pending
                .store(a.pending() as u64, Ordering::Relaxed);
            d
        };
        let refused = match decision {
            Decision::Accept(ticket) => {
                let slot = Slot {
                    admission: Arc::clone(&admission),
                    counters: Arc::clone(&counters),
                    ticket,
                    authenticated: false,
                };
                spawn_handshake(
                    incoming,
                    slot,
                    endpoint.clone(),
                    tx.clone(),
                    &counters,
                    opts,
                );
                continue;
            }
            Decision::Retry => match incoming.retry() {
                Ok(()) => {
                    Counters::bump(&counters.retried);
                    tracing::debug!(%remote, "QUIC client asked to validate its address (Retry)");
                    continue;
                }
                // Cannot happen for an unvalidated client; refused then.
                Err(e) => {
                    e.into_incoming().refuse();
                    Refused::Busy
                }
            },
            Decision::Refuse(why) => {
                incoming.refuse();
                why
            }
        };
        Counters::bump(match refused {
            Refused::Busy => &counters.refused_busy,
            Refused::PerSource => &counters.refused_per_source,
        });
        unlogged += 1;
        if logged.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
            tracing::warn!(
                %remote,
                reason = ?refused,
                refused = unlogged,
                pending = lock(&admission).pending(),
                limit = opts.max_pending_handshakes,
                per_source = opts.max_pending_per_source,
                "too many QUIC handshakes in progress: refusing clients"
            );
            logged = Some(Instant::now());
            unlogged = 0;
        }
    }
}

/// Runs one handshake taken on in its own task; its slot is given back when it ends.
fn spawn_handshake(
    incoming: quinn::Incoming,
    mut slot: Slot,
    endpoint: Endpoint,
    tx: mpsc::Sender<GatewayConnection>,
    counters: &Arc<Counters>,
    opts: ServerOptions,
) {
    let counters = Arc::clone(counters);
    tokio::spawn(async move {
        match handshake(incoming, endpoint, opts.handshake_timeout).await {
            Ok(conn) => {
                Counters::bump(&counters.accepted);
                slot.authenticated = true;
                tracing::info!(
                    gateway = %conn.gateway_id,
                    remote = %conn.connection.remote_address(),
                    "gateway connected over QUIC"
                );
                // Holding the slot while the backlog is full slows new handshakes down
                // instead of queueing connections without bound.
                if let Err(mpsc::error::SendError(conn)) = tx.send(conn).await {
                    conn.connection
                        .close(CLOSE_SHUTDOWN, b"hub is not accepting connections");
                }
            }
            Err(e) => {
                let counter = match &e {
                    QuicError::HandshakeTimedOut { .. } => &counters.handshakes_timed_out,
                    QuicError::Identity { .. } => &counters.identity_rejected,
                    _ => &counters.handshakes_failed,
                };
                Counters::bump(counter);
                tracing::warn!(error = %e, "QUIC client rejected");
            }
        }
        drop(slot);
    });
}

/// Completes one server-side handshake and identifies the gateway.
async fn handshake(
    incoming: quinn::Incoming,
    endpoint: Endpoint,
    deadline: Duration,
) -> Result<GatewayConnection, QuicError> {
    let addr = incoming.remote_address();
    let connecting = incoming
        .accept()
        .map_err(|source| QuicError::HandshakeRefused { addr, source })?;
    let conn = match tokio::time::timeout(deadline, connecting).await {
        Err(_) => {
            return Err(QuicError::HandshakeTimedOut {
                addr,
                after: deadline,
            });
        }
        Ok(Err(source)) => return Err(QuicError::HandshakeRefused { addr, source }),
        Ok(Ok(conn)) => conn,
    };
    match peer_gateway_id(&conn) {
        Ok(gateway_id) => Ok(GatewayConnection {
            gateway_id,
            connection: QuicConnection {
                conn,
                _endpoint: endpoint,
            },
        }),
        Err(source) => {
            conn.close(
                VarInt::from_u32(CLOSE_BAD_IDENTITY),
                b"client certificate names no valid gateway id",
            );
            Err(QuicError::Identity { addr, source })
        }
    }
}

/// The gateway id of a connection's verified client certificate.
fn peer_gateway_id(conn: &quinn::Connection) -> Result<GatewayId, IdentityError> {
    let identity = conn.peer_identity().ok_or(IdentityError::NoCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| IdentityError::NoCertificate)?;
    let leaf = chain.first().ok_or(IdentityError::NoCertificate)?;
    gateway_id_from_cert(leaf)
}

/// The gateway id a certificate names: its subject CN if it has one, else its first DNS
/// SAN; it must follow the gateway id rule. Meant for certificates the TLS layer has
/// already verified; total on any input (errors, never panics).
pub fn gateway_id_from_cert(cert: &CertificateDer<'_>) -> Result<GatewayId, IdentityError> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(IdentityError::Certificate)?;
    let id = match subject_common_name(ee.subject())? {
        Some(cn) => cn,
        None => ee
            .valid_dns_names()
            .next()
            .ok_or(IdentityError::NoId)?
            .to_string(),
    };
    GatewayId::parse(&id).map_err(|_| IdentityError::InvalidId(id.chars().take(80).collect()))
}

/// The single common name (OID 2.5.4.3) of a DER `Name`'s contents (the RDN SETs, without
/// the outer SEQUENCE header), if any.
fn subject_common_name(mut rdns: &[u8]) -> Result<Option<String>, IdentityError> {
    const CN_OID: [u8; 3] = [0x55, 0x04, 0x03];
    let mut found = None;
    while !rdns.is_empty() {
        let (tag, mut attributes, rest) = der_next(rdns)?;
        rdns = rest;
        if tag != 0x31 {
            return Err(IdentityError::Subject("relative name is not a SET"));
        }
        while !attributes.is_empty() {
            let (tag, attribute, rest) = der_next(attributes)?;
            attributes = rest;
            if tag != 0x30 {
                return Err(IdentityError::Subject("attribute is not a SEQUENCE"));
            }
            let (tag, oid, value) = der_next(attribute)?;
            if tag != 0x06 {
                return Err(IdentityError::Subject("attribute type is not an OID"));
            }
            if oid != CN_OID {
                continue;
            }
            let (tag, text, trailing) = der_next(value)?;
            if !trailing.is_empty() {
                return Err(IdentityError::Subject("bytes after the common name"));
            }
            // UTF8String, PrintableString, IA5String.
            if !matches!(tag, 0x0c | 0x13 | 0x16) {
                return Err(IdentityError::Subject(
                    "common name is not a UTF8, Printable or IA5 string",
                ));
            }
            let text = std::str::from_utf8(text)
                .map_err(|_| IdentityError::Subject("common name is not UTF-8"))?;
            if found.is_some() {
                return Err(IdentityError::SeveralCommonNames);
            }
            found = Some(text.to_string());
        }
    }
    Ok(found)
}

/// Splits one DER element off `input`: (tag, contents, rest). Single-byte tags and lengths
/// up to two bytes (names are far smaller than 64 KiB).
fn der_next(input: &[u8]) -> Result<(u8, &[u8], &[u8]), IdentityError> {
    let (&tag, rest) = input
        .split_first()
        .ok_or(IdentityError::Subject("truncated tag"))?;
    if tag & 0x1f == 0x1f {
        return Err(IdentityError::Subject("multi-byte tag"));
    }
    let (&first, rest) = rest
        .split_first()
        .ok_or(IdentityError::Subject("truncated length"))?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 2 {
            return Err(IdentityError::Subject("unsupported length encoding"));
        }
        let (len_bytes, rest) = rest
            .split_at_checked(n)
            .ok_or(IdentityError::Subject("truncated length"))?;
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    let (contents, rest) = rest
        .split_at_checked(len)
        .ok_or(IdentityError::Subject("truncated contents"))?;
    Ok((tag, contents, rest))
}

/// A gateway's QUIC client: verifies the hub against the CA and presents the gateway's
/// certificate. Holds the parsed TLS configuration, so reconnecting costs no re-parsing.
#[derive(Clone)]
pub struct QuicClient {
    config: quinn::ClientConfig,
    opts: ClientOptions,
}

impl fmt::Debug for QuicClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicClient")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl QuicClient {
    /// Parses the TLS material and checks the options.
    pub fn new(tls: &ClientTls, opts: ClientOptions) -> Result<Self, QuicError> {
        let crypto = client_crypto_builder(&tls.ca_pem)?
            .with_client_auth_cert(
                parse_certs(&tls.cert_pem, "gateway certificate")?,
                parse_key(&tls.key_pem, "gateway key")?,
            )
            .map_err(|e| QuicError::Tls {
                what: "client",
                detail: e.to_string(),
            })?;
        Self::from_crypto(crypto, opts, Some(opts.keep_alive))
    }

    fn from_crypto(
        mut crypto: rustls::ClientConfig,
        opts: ClientOptions,
        keep_alive: Option<Duration>,
    ) -> Result<Self, QuicError> {
        check_timers(opts.keep_alive, opts.idle_timeout)?;
        if opts.connect_timeout.is_zero() {
            return Err(QuicError::InvalidOptions(
                "connect_timeout must be positive".into(),
            ));
        }
        crypto.alpn_protocols = vec![ALPN.to_vec()];
        crypto.enable_early_data = false;
        let crypto = QuicClientConfig::try_from(crypto).map_err(|e| QuicError::Tls {
            what: "client",
            detail: e.to_string(),
        })?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport(
            keep_alive,
            opts.idle_timeout,
            opts.max_bidi_streams,
        )?));
        Ok(Self { config, opts })
    }

    /// Connects to the hub at `hub`, verifying that its certificate is valid for
    /// `server_name` (a DNS name or IP address in the hub certificate). Each call binds a
    /// fresh UDP socket (see [`ClientOptions::bind`]), so a reconnect after a network change
    /// starts clean.
    ///
    /// A hub that refuses this gateway's certificate may do so just after the client side
    /// of the handshake completed: the refusal then shows as the connection closing
    /// ([`QuicConnection::closed`]) or the first stream operation failing.
    pub async fn connect(
        &self,
        hub: SocketAddr,
        server_name: &str,
    ) -> Result<QuicConnection, QuicError> {
        if ServerName::try_from(server_name).is_err() {
            return Err(QuicError::InvalidServerName(server_name.to_string()));
        }
        let bind = self.opts.bind.unwrap_or_else(|| default_bind_for(hub));
        let endpoint =
            Endpoint::client(bind).map_err(|source| QuicError::Bind { addr: bind, source })?;
        let connecting = endpoint
            .connect_with(self.config.clone(), hub, server_name)
            .map_err(|source| QuicError::Connect { addr: hub, source })?;
        match tokio::time::timeout(self.opts.connect_timeout, connecting).await {
            Err(_) => Err(QuicError::HandshakeTimedOut {
                addr: hub,
                after: self.opts.connect_timeout,
            }),
            Ok(Err(source)) => Err(QuicError::HandshakeRefused { addr: hub, source }),
            Ok(Ok(conn)) => Ok(QuicConnection {
                conn,
                _endpoint: endpoint,
            }),
        }
    }
}

/// Writes all of `data` to `stream` (waits for flow control).
pub async fn send_all(stream: &mut SendStream, data: &[u8]) -> Result<(), QuicError> {
    Ok(stream.write_all(data).await?)
}

/// Ends the sending side of `stream`: the peer reads to the end after the data written.
pub fn finish(stream: &mut SendStream) -> Result<(), QuicError> {
    Ok(stream.finish()?)
}

/// Reads some bytes into `buf`: `Some(n)` with `n > 0` (unless `buf` is empty), or `None`
/// at the end of the stream.
pub async fn read_some(
    stream: &mut RecvStream,
    buf: &mut [u8],
) -> Result<Option<usize>, QuicError> {
    Ok(stream.read(buf).await?)
}

/// Fills `buf` exactly; the stream ending first is an error.
pub async fn read_exact(stream: &mut RecvStream, buf: &mut [u8]) -> Result<(), QuicError> {
    Ok(stream.read_exact(buf).await?)
}

/// Reads the rest of `stream`, failing (without allocating more) past `limit` bytes.
pub async fn read_to_end(stream: &mut RecvStream, limit: usize) -> Result<Vec<u8>, QuicError> {
    Ok(stream.read_to_end(limit).await?)
}

/// The *ring* provider, passed explicitly to every config.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// All certificates of a PEM input: at least one, at most [`MAX_PEM_CERTS`].
fn parse_certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, QuicError> {
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| QuicError::BadPem {
            what,
            detail: e.to_string(),
        })?;
        if certs.len() == MAX_PEM_CERTS {
            return Err(QuicError::TooManyCerts {
                what,
                max: MAX_PEM_CERTS,
            });
        }
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(QuicError::MissingCert { what });
    }
    Ok(certs)
}

/// The first private key of a PEM input.
fn parse_key(pem: &[u8], what: &'static str) -> Result<PrivateKeyDer<'static>, QuicError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => QuicError::MissingKey { what },
        e => QuicError::BadPem {
            what,
            detail: e.to_string(),
        },
    })
}

/// A root store holding the CA certificate(s) of a PEM input.
fn root_store(ca_pem: &[u8]) -> Result<RootCertStore, QuicError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem, "CA certificate")? {
        roots.add(cert).map_err(QuicError::BadCa)?;
    }
    Ok(roots)
}

/// The hub's rustls config: TLS 1.3, client certificates required and verified against
/// the CA, ALPN [`ALPN`], no early data.
fn server_crypto(tls: &ServerTls) -> Result<rustls::ServerConfig, QuicError> {
    let provider = provider();
    let tls_err = |detail: String| QuicError::Tls {
        what: "server",
        detail,
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(&tls.ca_pem)?),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| tls_err(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            parse_certs(&tls.cert_pem, "hub certificate")?,
            parse_key(&tls.key_pem, "hub key")?,
        )
        .map_err(|e| tls_err(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// A gateway's rustls config up to the client certificate: TLS 1.3, hub verified against
/// the CA.
fn client_crypto_builder(
    ca_pem: &[u8],
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, QuicError>
{
    let roots = root_store(ca_pem)?;
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Tls {
            what: "client",
            detail: e.to_string(),
        })?
        .with_root_certificates(roots))
}

/// Keep-alive must be positive and shorter than the idle timeout.
fn check_timers(keep_alive: Duration, idle_timeout: Duration) -> Result<(), QuicError> {
    if keep_alive.is_zero() || keep_alive >= idle_timeout {
        return Err(QuicError::InvalidOptions(format!(
            "keep_alive ({keep_alive:?}) must be positive and shorter than idle_timeout ({idle_timeout:?})"
        )));
    }
    Ok(())
}

/// Transport settings shared by both sides.
fn transport(
    keep_alive: Option<Duration>,
    idle_timeout: Duration,
    max_bidi_streams: u32,
) -> Result<TransportConfig, QuicError> {
    let idle = IdleTimeout::try_from(idle_timeout).map_err(|_| {
        QuicError::InvalidOptions(format!("idle_timeout {idle_timeout:?} is too large"))
    })?;
    let mut t = TransportConfig::default();
    t.keep_alive_interval(keep_alive)
        .max_idle_timeout(Some(idle))
        .max_concurrent_bidi_streams(VarInt::from_u32(max_bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::certs::CertificateAuthority;

    const WAIT: Duration = Duration::from_secs(10);

    fn loopback() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
    }

    struct Pki {
        ca: CertificateAuthority,
        server: ServerTls,
    }

    impl Pki {
        fn new() -> Self {
            let ca = CertificateAuthority::new("Test CA").unwrap();
            let hub = ca
                .issue_hub(&["outpost-hub".into(), "localhost".into(), "127.0.0.1".into()])
                .unwrap();
            let server = ServerTls {
                ca_pem: ca.cert_pem().into_bytes(),
                cert_pem: hub.cert_pem.into_bytes(),
                key_pem: hub.key_pem.into_bytes(),
            };
            Self { ca, server }
        }

        fn client_tls(&self, gateway: &str) -> ClientTls {
            let gw = self.ca.issue_gateway(&gateway.parse().unwrap()).unwrap();
            ClientTls {
                ca_pem: self.ca.cert_pem().into_bytes(),
                cert_pem: gw.cert_pem.into_bytes(),
                key_pem: gw.key_pem.into_bytes(),
            }
        }

        fn client(&self, gateway: &str) -> QuicClient {
            QuicClient::new(&self.client_tls(gateway), ClientOptions::default()).unwrap()
        }

        fn server(&self) -> QuicServer {
            QuicServer::bind(loopback(), &self.server, ServerOptions::default()).unwrap()
        }
    }

    /// Waits (bounded) until the server's counters satisfy `pred`.
    async fn counters_reach(
        server: &QuicServer,
        pred: impl Fn(ServerCounters) -> bool,
    ) -> ServerCounters {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let c = server.counters();
            if pred(c) || tokio::time::Instant::now() > deadline {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The client was refused: either its handshake failed, or its connection was closed
    /// by the hub with a TLS (transport-level) error right after (TLS 1.3: the client
    /// finishes first, the hub checks its certificate last). Returns the reason.
    async fn assert_refused(result: Result<QuicConnection, QuicError>) -> String {
        match result {
            Err(QuicError::HandshakeRefused { source, .. }) => source.to_string(),
            Ok(conn) => {
                // Touch the connection so the hub's refusal reaches us.
                let e = tokio::time::timeout(WAIT, async {
                    if let Ok((mut send, _recv)) = conn.open_bi().await {
                        let _ = send_all(&mut send, b"hello").await;
                    }
                    conn.closed().await
                })
                .await
                .expect("a refused client must see its connection closed");
                assert!(
                    matches!(
                        e,
                        ConnectionError::ConnectionClosed(_) | ConnectionError::TransportError(_)
                    ),
                    "expected a TLS-level close, got {e:?}"
                );
                e.to_string()
            }
            Err(e) => panic!("expected a refused handshake, got {e}"),
        }
    }

    #[tokio::test]
    async fn mutual_tls_yields_the_gateway_id_from_the_certificate() {
        let pki = Pki::new();
        let mut server = pki.server();
        let addr = server.local_addr().unwrap();
        let gw1 = pki.client("gw-1");
        let gw2 = pki.client("plant_b.gw2");

        let c1 = gw1.connect(addr, "outpost-hub").await.unwrap();
        let a1 = tokio::time::timeout(WAIT, server.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a1.gateway_id, "gw-1");
        let c2 = gw2.connect(addr, "127.0.0.1").await.unwrap();
        let a2 = tokio::time::timeout(WAIT, server.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a2.gateway_id, "plant_b.gw2");
        assert!(a1.connection.remote_address().ip().is_loopback());

        // A reconnect (possibly a resumed TLS session) still carries the identity.
        c1.close(CLOSE_SHUTDOWN, b"bye");
        let c1b = gw1.connect(addr, "localhost").await.unwrap();
        let a1b = tokio::time::timeout(WAIT, server.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a1b.gateway_id, "gw-1");

        let alpn = c1b
            .quinn()
            .handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap()
            .protocol;
        assert_eq!(alpn.as_deref(), Some(ALPN));
        assert_eq!(server.counters().accepted, 3);
        drop(c2);
    }

    #[tokio::test]
    async fn client_certificate_from_another_ca_is_refused() {
        let pki = Pki::new();
        let mut server = pki.server();
        let addr = server.local_addr().unwrap();
        let other = Pki::new();
        let foreign = other.client_tls("gw-1");
        // Trusts the right hub, but presents a certificate the hub's CA never signed.
        let tls = ClientTls {
            ca_pem: pki.server.ca_pem.clone(),
            ..foreign
        };
        let client = QuicClient::new(&tls, ClientOptions::default()).unwrap();
        let reason = assert_refused(client.connect(addr, "outpost-hub").await).await;
        assert!(reason.contains("invalid peer certificate"), "{reason}");
        let c = counters_reach(&server, |c| c.handshakes_failed == 1).await;
        assert_eq!(c.handshakes_failed, 1);
        assert_eq!(c.accepted, 0);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), server.accept())
                .await
                .is_err(),
            "nothing may be accepted"
        );
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let pki = Pki::new();
        let mut server = pki.server();
        let addr = server.local_addr().unwrap();
        let crypto = client_crypto_builder(&pki.server.ca_pem)
            .unwrap()
            .with_no_client_auth();
        let opts = ClientOptions::default();
        let client = QuicClient::from_crypto(crypto, opts, Some(opts.keep_alive)).unwrap();
        let reason = assert_refused(client.connect(addr, "outpost-hub").await).await;
        assert!(reason.contains("no certificates"), "{reason}");
        let c = counters_reach(&server, |c| c.handshakes_failed == 1).await;
        assert_eq!((c.handshakes_failed, c.accepted), (1, 0));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), server.accept())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn client_refuses_a_wrong_server_name_and_a_foreign_hub() {
        let pki = Pki::new();
        let server = pki.server();
        let addr = server.local_addr().unwrap();
        let client = pki.client("gw-1");
        match client.connect(addr, "not-the-hub").await {
            Err(QuicError::HandshakeRefused { source, .. }) => {
                let s = source.to_string();
                assert!(s.contains("certificate"), "{s}");
            }
            other => panic!("expected refusal, got {other:?}"),
        }

        // A hub whose certificate comes from another CA is refused as well.
        let other = Pki::new();
        let foreign_hub = other.server();
        let foreign_addr = foreign_hub.local_addr().unwrap();
        assert!(matches!(
            client.connect(foreign_addr, "outpost-hub").await,
            Err(QuicError::HandshakeRefused { .. })
        ));
        assert!(matches!(
            client.connect(addr, "not a name!").await,
            Err(QuicError::InvalidServerName(_))
        ));
        let c = counters_reach(&server, |c| c.handshakes_failed == 1).await;
        assert_eq!(c.accepted, 0);
    }

    #[tokio::test]
    async fn one_mebibyte_echoes_over_a_bi_stream_and_path_stats_fill() {
        let pki = Pki::new();
        let mut server = pki.server();
        let addr = server.local_addr().unwrap();
        let hub = tokio::spawn(async move {
            let gw = server.accept().await.unwrap();
            let (mut send, mut recv) = gw.connection.accept_bi().await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            while let Some(n) = read_some(&mut recv, &mut buf).await.unwrap() {
                send_all(&mut send, &buf[..n]).await.unwrap();
            }
            finish(&mut send).unwrap();
            // Keep the connection until the client has read everything and closes.
            let _ = gw.connection.closed().await;
            (gw.connection.path_stats(), server)
        });

        let conn = pki
            .client("gw-1")
            .connect(addr, "outpost-hub")
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let data: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let to_send = data.clone();
        let writer = tokio::spawn(async move {
            send_all(&mut send, &to_send).await.unwrap();
            finish(&mut send).unwrap();
            send
        });
        let echoed = tokio::time::timeout(WAIT, read_to_end(&mut recv, 2 << 20))
            .await
            .unwrap()
            .unwrap();
        let _send = writer.await.unwrap();
        assert_eq!(echoed.len(), data.len());
        assert!(echoed == data, "echo differs");

        let stats = conn.path_stats();
        assert!(stats.rtt > Duration::ZERO, "{stats:?}");
        assert!(
            stats.cwnd > 0 && stats.sent_packets > 0 && stats.datagrams_sent > 0,
            "{stats:?}"
        );
        assert!(
            stats.bytes_sent >= 1 << 20 && stats.bytes_received >= 1 << 20,
            "{stats:?}"
        );
        assert!(
            stats.bytes_acked_estimate() > 0 && stats.bytes_acked_estimate() <= stats.bytes_sent
        );
        assert!(stats.mtu >= 1200, "{stats:?}");
        assert!((0.0..=1.0).contains(&stats.loss_ratio()));

        conn.close(CLOSE_SHUTDOWN, b"done");
        let (hub_stats, _server) = tokio::time::timeout(WAIT, hub).await.unwrap().unwrap();
        assert!(
            hub_stats.bytes_sent >= 1 << 20 && hub_stats.rtt > Duration::ZERO,
            "{hub_stats:?}"
        );
    }

    /// Connects a client to a server that both use `keep_alive` (None = off), idle timeout
    /// `idle`, then stays silent for 3 × `idle`. Returns both sides' connections.
    async fn silent_for_three_idle_timeouts(
        keep_alive: Option<Duration>,
        idle: Duration,
    ) -> (QuicConnection, QuicConnection, QuicServer) {
        let pki = Pki::new();
        let sopts = ServerOptions {
            keep_alive: Duration::from_millis(100),
            idle_timeout: idle,
            ..ServerOptions::default()
        };
        let mut server =
            QuicServer::bind_with_keep_alive(loopback(), &pki.server, sopts, keep_alive).unwrap();
        let copts = ClientOptions {
            keep_alive: Duration::from_millis(100),
            idle_timeout: idle,
            ..ClientOptions::default()
        };
        let tls = pki.client_tls("gw-1");
        let crypto = client_crypto_builder(&tls.ca_pem)
            .unwrap()
            .with_client_auth_cert(
                parse_certs(&tls.cert_pem, "c").unwrap(),
                parse_key(&tls.key_pem, "k").unwrap(),
            )
            .unwrap();
        let client = QuicClient::from_crypto(crypto, copts, keep_alive).unwrap();
        let conn = client
            .connect(server.local_addr().unwrap(), "outpost-hub")
            .await
            .unwrap();
        let hub_side = tokio::time::timeout(WAIT, server.accept())
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(idle * 3).await;
        (conn, hub_side.connection, server)
    }

    #[tokio::test]
    async fn keep_alive_holds_a_silent_connection_past_the_idle_timeout() {
        let idle = Duration::from_millis(600);
        let (conn, hub, _server) =
            silent_for_three_idle_timeouts(Some(Duration::from_millis(100)), idle).await;
        assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
        assert!(hub.close_reason().is_none(), "{:?}", hub.close_reason());
        // And it still carries data.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send_all(&mut send, b"ping").await.unwrap();
        finish(&mut send).unwrap();
        let (mut hsend, mut hrecv) = hub.accept_bi().await.unwrap();
        assert_eq!(read_to_end(&mut hrecv, 16).await.unwrap(), b"ping");
        send_all(&mut hsend, b"pong").await.unwrap();
        finish(&mut hsend).unwrap();
        assert_eq!(read_to_end(&mut recv, 16).await.unwrap(), b"pong");
        assert!(
            conn.path_stats().sent_packets > 3,
            "keep-alive PINGs were sent"
        );
    }

    #[tokio::test]
    async fn without_keep_alive_the_same_silence_closes_the_connection() {
        // Control for the test above: proves that 3 × idle of silence is enough to lose a
        // connection, so the keep-alive is what held it.
        let idle = Duration::from_millis(600);
        let (conn, hub, _server) = silent_for_three_idle_timeouts(None, idle).await;
        assert!(
            matches!(conn.close_reason(), Some(ConnectionError::TimedOut)),
            "{:?}",
            conn.close_reason()
        );
        assert!(
            matches!(hub.close_reason(), Some(ConnectionError::TimedOut)),
            "{:?}",
            hub.close_reason()
        );
    }

    /// The first datagram (the Initial packet) a real client sends, caught by a UDP socket
    /// that never answers.
    async fn captured_initial(pki: &Pki) -> Vec<u8> {
        let trap = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
        let trap_addr = trap.local_addr().unwrap();
        let client = pki.client("gw-1");
        let connecting =
            tokio::spawn(async move { client.connect(trap_addr, "outpost-hub").await });
        let mut buf = vec![0u8; 65_536];
        let (n, _) = tokio::time::timeout(WAIT, trap.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        connecting.abort();
        buf.truncate(n);
        buf
    }

    #[tokio::test]
    async fn half_open_clients_time_out_and_cannot_exhaust_the_hub() {
        let pki = Pki::new();
        let opts = ServerOptions {
            handshake_timeout: Duration::from_millis(500),
            max_pending_handshakes: 1,
            reserved_for_known: 0,
            ..ServerOptions::default()
        };
        let mut server = QuicServer::bind(loopback(), &pki.server, opts).unwrap();
        let addr = server.local_addr().unwrap();
        // Two clients that start a handshake and then go silent (a replayed Initial from a
        // socket that never reads the hub's answer).
        let first = captured_initial(&pki).await;
        let second = captured_initial(&pki).await;
        let silent_a = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
        let silent_b = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
        silent_a.send_to(&first, addr).await.unwrap();
        // Let the hub take the first into a handshake before the second arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            server.counters(),
            ServerCounters {
                pending: 1,
                ..ServerCounters::default()
            }
        );
        silent_b.send_to(&second, addr).await.unwrap();
        // The second finds the only handshake slot taken: asked to validate its address,
        // which a replayed Initial never does; it holds nothing.
        let c = counters_reach(&server, |c| c.retried == 1).await;
        assert_eq!((c.retried, c.pending), (1, 1), "{c:?}");
        // The first is given up at the deadline, which frees the slot for a real gateway.
        let c = counters_reach(&server, |c| c.handshakes_timed_out == 1).await;
        assert_eq!((c.handshakes_timed_out, c.pending), (1, 0), "{c:?}");
        let _conn = pki
            .client("gw-9")
            .connect(addr, "outpost-hub")
            .await
            .unwrap();
        let gw = tokio::time::timeout(WAIT, server.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(gw.gateway_id, "gw-9");
        assert_eq!(server.counters().accepted, 1);
    }

    /// The first datagrams (Initial packets) of `n` real client connections, each from its
    /// own endpoint, caught by a UDP socket that never answers.
    async fn captured_initials(pki: &Pki, n: usize) -> Vec<Vec<u8>> {
        let trap = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
        let trap_addr = trap.local_addr().unwrap();
        let client = pki.client("gw-1");
        let connecting: Vec<_> = (0..n)
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move { c.connect(trap_addr, "outpost-hub").await })
            })
            .collect();
        let mut from = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while out.len() < n {
            let (len, src) = tokio::time::timeout(WAIT, trap.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            // A client's first datagram is its Initial; later ones are resends.
            if from.insert(src) {
                out.push(buf[..len].to_vec());
            }
        }
        for c in connecting {
            c.abort();
        }
        out
    }

    /// Sends `initials` to `hub` from `sockets`, round robin, paced so that the kernel's
    /// receive buffer does not drop them.
    async fn flood(sockets: &[tokio::net::UdpSocket], initials: &[Vec<u8>], hub: SocketAddr) {
        for (i, p) in initials.iter().enumerate() {
            sockets[i % sockets.len()].send_to(p, hub).await.unwrap();
            if i % 16 == 15 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }

    #[tokio::test]
    async fn a_flood_of_half_open_handshakes_does_not_lock_a_gateway_out() {
        let pki = Pki::new();
        let mut server = pki.server();
        let addr = server.local_addr().unwrap();
        // 240 handshakes that will never finish (real Initials replayed by sockets that
        // never answer), from two sockets on the gateway's own address and two on another.
        let initials = captured_initials(&pki, 240).await;
        let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let mut sockets = Vec::new();
        for ip in [
            Ipv4Addr::LOCALHOST.into(),
            other,
            Ipv4Addr::LOCALHOST.into(),
            other,
        ] {
            sockets.push(
                tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0))
                    .await
                    .unwrap(),
            );
        }
        flood(&sockets, &initials, addr).await;
        // Every one of them was taken on or turned away.
        let handled = |c: ServerCounters| {
            c.pending + c.retried + c.refused_busy + c.refused_per_source >= initials.len() as u64
        };
        let c = counters_reach(&server, handled).await;
        assert!(handled(c), "{c:?}");
        // While the flood goes on, a gateway connects with the sync loop's own deadline
        // (3 s), from the loopback address the flood also uses: it gets in at the first
        // attempt.
        let again = flood(&sockets, &initials, addr);
        let gateway = QuicClient::new(
            &pki.client_tls("gw-9"),
            ClientOptions {
                connect_timeout: Duration::from_secs(3),
                bind: Some(loopback()),
                ..ClientOptions::default()
            },
        )
        .unwrap();
        let (_, conn) = tokio::join!(again, gateway.connect(addr, "outpost-hub"));
        let c = server.counters();
        let _conn = conn.unwrap_or_else(|e| panic!("the gateway was locked out: {e}; {c:?}"));
        let gw = tokio::time::timeout(WAIT, server.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(gw.gateway_id, "gw-9");
        // The flood beyond the first few per source was sent a Retry (both times), which
        // these replaying sockets never answer: it holds no handshake slot.
        let retried = |c: ServerCounters| c.retried >= 2 * initials.len() as u64 - 32;
        let c = counters_reach(&server, retried).await;
        assert!(retried(c), "{c:?}");
        assert_eq!(c.accepted, 1, "{c:?}");
        assert!(c.pending <= 16, "{c:?}");
    }

    #[test]
    fn transport_config_has_keep_alive_and_idle_timeout() {
        let t = transport(Some(Duration::from_secs(5)), Duration::from_secs(30), 16).unwrap();
        let debug = format!("{t:?}");
        assert!(debug.contains("keep_alive_interval: Some(5s)"), "{debug}");
        assert!(debug.contains("max_idle_timeout: Some("), "{debug}");
    }

    #[tokio::test]
    async fn options_and_pem_errors_are_clear() {
        let pki = Pki::new();
        let bad_timers = ServerOptions {
            keep_alive: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            ..ServerOptions::default()
        };
        let e = QuicServer::bind(loopback(), &pki.server, bad_timers).unwrap_err();
        assert!(matches!(e, QuicError::InvalidOptions(_)), "{e}");
        assert!(e.to_string().contains("keep_alive"), "{e}");
        let no_backlog = ServerOptions {
            accept_backlog: 0,
            ..ServerOptions::default()
        };
        assert!(matches!(
            QuicServer::bind(loopback(), &pki.server, no_backlog),
            Err(QuicError::InvalidOptions(_))
        ));
        let no_room = ServerOptions {
            max_pending_handshakes: 8,
            ..ServerOptions::default()
        };
        let e = QuicServer::bind(loopback(), &pki.server, no_room).unwrap_err();
        assert!(e.to_string().contains("reserved_for_known"), "{e}");

        let mut tls = pki.client_tls("gw-1");
        let good = tls.clone();
        tls.key_pem = b"not a key".to_vec();
        let e = QuicClient::new(&tls, ClientOptions::default()).unwrap_err();
        assert!(
            matches!(
                e,
                QuicError::MissingKey {
                    what: "gateway key"
                }
            ),
            "{e}"
        );
        tls.key_pem = good.cert_pem.clone();
        assert!(matches!(
            QuicClient::new(&tls, ClientOptions::default()),
            Err(QuicError::MissingKey { .. })
        ));
        tls.key_pem = good.key_pem.clone();
        tls.cert_pem = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".to_vec();
        let e = QuicClient::new(&tls, ClientOptions::default()).unwrap_err();
        assert!(
            matches!(
                e,
                QuicError::BadPem {
                    what: "gateway certificate",
                    ..
                }
            ),
            "{e}"
        );
        tls.cert_pem = Vec::new();
        assert!(matches!(
            QuicClient::new(&tls, ClientOptions::default()),
            Err(QuicError::MissingCert { .. })
        ));
        // A key that does not belong to the certificate.
        let other = pki.client_tls("gw-2");
        tls.cert_pem = good.cert_pem.clone();
        tls.key_pem = other.key_pem;
        let e = QuicClient::new(&tls, ClientOptions::default()).unwrap_err();
        assert!(matches!(e, QuicError::Tls { what: "client", .. }), "{e}");
        // The hub's files: a missing one is named in the error.
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = ServerTls::load(&missing, &missing, &missing).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'A'; (MAX_PEM_FILE_BYTES + 1) as usize]).unwrap();
        assert!(matches!(
            ClientTls::load(&big, &big, &big),
            Err(QuicError::FileTooLarge { .. })
        ));
    }

    fn self_signed(params: rcgen::CertificateParams) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn with_dn(entries: &[(rcgen::DnType, &str)], sans: &[&str]) -> CertificateDer<'static> {
        let mut p =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        for (ty, v) in entries {
            dn.push(ty.clone(), *v);
        }
        p.distinguished_name = dn;
        self_signed(p)
    }

    #[test]
    fn gateway_id_comes_from_cn_then_dns_san() {
        use rcgen::DnType::{CommonName, OrganizationName};
        let c = with_dn(
            &[(OrganizationName, "Outpost"), (CommonName, "gw-7")],
            &["other"],
        );
        assert_eq!(gateway_id_from_cert(&c).unwrap(), "gw-7");
        let c = with_dn(&[(OrganizationName, "Outpost")], &["gw-8.site", "x"]);
        assert_eq!(gateway_id_from_cert(&c).unwrap(), "gw-8.site");
        let c = with_dn(&[(CommonName, "bad/id")], &["ok"]);
        assert!(matches!(
            gateway_id_from_cert(&c),
            Err(IdentityError::InvalidId(_))
        ));
        let c = with_dn(&[(OrganizationName, "Outpost")], &["10.0.0.1"]);
        assert!(matches!(gateway_id_from_cert(&c), Err(IdentityError::NoId)));
        // The one gateway id rule: what a frame could not carry is no identity either.
        for bad in ["_gw", ".gw", "-gw", ".."] {
            let c = with_dn(&[(CommonName, bad)], &[]);
            assert!(
                matches!(gateway_id_from_cert(&c), Err(IdentityError::InvalidId(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            gateway_id_from_cert(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])),
            Err(IdentityError::Certificate(_))
        ));
    }

    /// A subject with two CN attributes is ambiguous (rcgen cannot sign such a subject, so
    /// the walker is checked directly).
    #[test]
    fn several_common_names_are_refused() {
        let cn = |v: &[u8]| {
            let mut atv = vec![0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, v.len() as u8];
            atv.extend_from_slice(v);
            let mut seq = vec![0x30, atv.len() as u8];
            seq.extend(atv);
            let mut set = vec![0x31, seq.len() as u8];
            set.extend(seq);
            set
        };
        assert_eq!(
            subject_common_name(&cn(b"gw-a")).unwrap().as_deref(),
            Some("gw-a")
        );
        let mut subject = cn(b"gw-a");
        subject.extend(cn(b"gw-b"));
        assert!(matches!(
            subject_common_name(&subject),
            Err(IdentityError::SeveralCommonNames)
        ));
    }

    #[test]
    fn subject_walker_is_total_on_hostile_bytes() {
        let pki = Pki::new();
        let cert = CertificateDer::from_pem_slice(pki.server.cert_pem.as_slice()).unwrap();
        let subject = webpki::EndEntityCert::try_from(&cert)
            .unwrap()
            .subject()
            .to_vec();
        assert_eq!(
            subject_common_name(&subject).unwrap().as_deref(),
            Some("outpost-hub")
        );
        // Every truncation and every single-byte corruption: an answer, never a panic.
        for len in 0..subject.len() {
            let _ = subject_common_name(&subject[..len]);
        }
        for i in 0..subject.len() {
            for v in [0x00, 0x1f, 0x7f, 0x80, 0x81, 0x82, 0x83, 0xff] {
                let mut s = subject.clone();
                s[i] = v;
                let _ = subject_common_name(&s);
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2_000 {
            let len = (x % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = subject_common_name(&bytes);
            let _ = gateway_id_from_cert(&CertificateDer::from(bytes));
        }
        assert!(matches!(
            subject_common_name(&[0x31, 0x85, 0, 0, 0, 0, 1]),
            Err(IdentityError::Subject(_))
        ));
    }

    #[test]
    fn path_stats_derived_values() {
        let s = PathStats {
            sent_packets: 200,
            lost_packets: 10,
            bytes_sent: 1000,
            lost_bytes: 1200,
            ..PathStats::default()
        };
        assert_eq!(s.loss_ratio(), 0.05);
        assert_eq!(s.bytes_acked_estimate(), 0);
        assert_eq!(PathStats::default().loss_ratio(), 0.0);
    }

    #[test]
    fn default_bind_stays_on_loopback_for_a_loopback_hub() {
        let hub: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        assert_eq!(default_bind_for(hub), "127.0.0.1:0".parse().unwrap());
        let hub: SocketAddr = "[::1]:4433".parse().unwrap();
        assert_eq!(default_bind_for(hub), "[::1]:0".parse().unwrap());
        let hub: SocketAddr = "192.0.2.7:4433".parse().unwrap();
        assert_eq!(default_bind_for(hub), "0.0.0.0:0".parse().unwrap());
    }
}
