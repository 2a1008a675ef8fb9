//! The sync loop's transports (`[uplink] transport`): QUIC straight to the hub, or MQTT
//! through a broker ([`outpost_protocols::uplink::mqtt`], read by the hub's
//! `[mqtt_ingress]`). Both carry the same frames — a Hello, then Data frames, the hub's
//! Acks back — so the loop in [`super`] is the same for both: it [`Transport::connect`]s,
//! [`Connection::open`]s a session, [`Link::send`]s encoded frames, takes the hub's Acks
//! from [`Link::next`], and lets [`Link::observe`] report to the link monitor what the
//! transport can see.
//!
//! What each transport tells the link monitor ([`LinkEvent`]):
//!
//! | | QUIC | MQTT |
//! |---|---|---|
//! | `Connected { handshake }` | the QUIC + TLS handshake | SUBSCRIBE→SUBACK on the new connection: one round trip (CONNECT→CONNACK, as rumqttc reports it, also holds the TCP and TLS handshakes: two or three round trips, which would read as a far longer RTT) |
//! | RTT | path RTT, pings on their own stream | publish→PUBACK (the broker's acknowledgement), the smallest per look, as `PingAnswered` |
//! | loss | path statistics | nothing (TCP hides it) |
//! | throughput probes | padded pings | none: the hub's MQTT ingress answers no ping |
//!
//! `Sent`, `Delivered` (the hub's Acks), `ConnectFailed` and `Disconnected` come from the
//! loop itself, the same for both.
//!
//! A broker may limit message sizes (`[uplink.mqtt] max_payload`): a frame that encodes
//! larger is split into smaller frames ([`encode_within`]); the hub acknowledges each.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocols::frame::{self, Ack, DataFrame, EncodeError, FrameBuffer, Hello, Message};
use outpost_protocols::uplink::mqtt::{MqttUplinkOptions, MqttUplinkSession};
use outpost_protocols::uplink::quic::{self, ClientOptions, ClientTls, QuicClient, QuicConnection};
use outpost_runtime::config::{GatewayId, UplinkConfig, UplinkTransport};
use outpost_runtime::model::LinkClass;
use tokio::sync::mpsc;

use super::pinger::{self, Heard};
use crate::link::monitor::{LinkEvent, LinkHandle};

/// Timeout of a QUIC connection attempt (handshake included).
const QUIC_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of an MQTT connection attempt: TCP, TLS, CONNECT→CONNACK and SUBSCRIBE→SUBACK,
/// four round trips with TLS (under 3 s on a satellite link).
const MQTT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A session on an intermittent link that has heard nothing for this long while it waits
/// for an answer is given up for a fresh handshake (QUIC's and TCP's retransmission timers
/// back off exponentially, so an old connection may stay silent long after the link is
/// back).
const SILENT_SESSION: Duration = Duration::from_millis(1_500);
/// How long a closing MQTT session may take to write its DISCONNECT.
const MQTT_CLOSE_WAIT: Duration = Duration::from_millis(500);

/// Where the uplink goes and how, from `[uplink]` (certificates and secrets read).
#[derive(Clone)]
pub enum UplinkSettings {
    /// QUIC with mutual TLS straight to the hub.
    Quic {
        hub: SocketAddr,
        server_name: String,
        tls: Arc<ClientTls>,
        keep_alive: Duration,
    },
    /// MQTT through a broker.
    Mqtt(Arc<MqttUplinkOptions>),
}

impl UplinkSettings {
    /// From `[uplink]`: resolves the hub's address and reads the certificates and key
    /// (QUIC), or the password and TLS files (`[uplink.mqtt]`). The config validator
    /// reports missing keys at their place; a config built in code may skip it, so they are
    /// checked here too.
    pub fn from_config(gateway_id: &GatewayId, u: &UplinkConfig) -> Result<UplinkSettings, String> {
        match u.transport {
            UplinkTransport::Quic => {
                let need = |key: &str| {
                    format!(
                        "uplink.{key} is missing: transport \"quic\" needs `hub`, `server_name`, `ca`, `cert` and `key`"
                    )
                };
                let hub = resolve(u.hub.as_deref().ok_or_else(|| need("hub"))?)?;
                let server_name = u.server_name.clone().ok_or_else(|| need("server_name"))?;
                let read = |p: &std::path::Path| quic::read_pem_file(p).map_err(|e| e.to_string());
                let tls = ClientTls {
                    ca_pem: read(u.ca.as_deref().ok_or_else(|| need("ca"))?)?,
                    cert_pem: read(u.cert.as_deref().ok_or_else(|| need("cert"))?)?,
                    key_pem: (u.key.as_ref().ok_or_else(|| need("key"))?)
                        .resolve()
                        .map_err(|e| e.to_string())?,
                };
                Ok(UplinkSettings::Quic {
                    hub,
                    server_name,
                    tls: Arc::new(tls),
                    keep_alive: u.keep_alive.get(),
                })
            }
            UplinkTransport::Mqtt => {
                let m = u.mqtt.as_ref().ok_or_else(|| {
                    "[uplink.mqtt] is missing: transport \"mqtt\" needs it, with at least `broker = \"host:port\"`"
                        .to_string()
                })?;
                let o = MqttUplinkOptions::from_config(gateway_id, m)
                    .map_err(|e| format!("[uplink.mqtt]: {e}"))?;
                Ok(UplinkSettings::Mqtt(Arc::new(o)))
            }
        }
    }

    /// `quic://HUB` or `mqtt://HOST:PORT`, for logs.
    pub fn target(&self) -> String {
        match self {
            UplinkSettings::Quic { hub, .. } => format!("quic://{hub}"),
            UplinkSettings::Mqtt(o) if o.host.contains(':') => {
                format!("mqtt://[{}]:{}", o.host, o.port)
            }
            UplinkSettings::Mqtt(o) => format!("mqtt://{}:{}", o.host, o.port),
        }
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve hub address {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("hub address {addr:?} resolves to nothing"))
}

/// A transport ready to connect (its TLS set up once).
pub enum Transport {
    Quic {
        client: QuicClient,
        hub: SocketAddr,
        server_name: String,
    },
    Mqtt(Arc<MqttUplinkOptions>),
}

impl Transport {
    /// Sets the transport up (QUIC: the TLS client configuration).
    pub fn new(settings: &UplinkSettings) -> Result<Transport, String> {
        match settings {
            UplinkSettings::Quic {
                hub,
                server_name,
                tls,
                keep_alive,
            } => {
                let client = QuicClient::new(
                    tls,
                    ClientOptions {
                        keep_alive: *keep_alive,
                        idle_timeout: (*keep_alive * 4).max(Duration::from_secs(2)),
                        // A handshake is also the probe that ends an outage: a satellite link
                        // completes one in under 2 s; a dead one should not hold the next
                        // attempt back for long.
                        connect_timeout: QUIC_CONNECT_TIMEOUT,
                        ..ClientOptions::default()
                    },
                )
                .map_err(|e| format!("uplink TLS setup: {e}"))?;
                Ok(Transport::Quic {
                    client,
                    hub: *hub,
                    server_name: server_name.clone(),
                })
            }
            UplinkSettings::Mqtt(o) => {
                let mut o = MqttUplinkOptions::clone(o);
                o.connect_timeout = MQTT_CONNECT_TIMEOUT;
                Ok(Transport::Mqtt(Arc::new(o)))
            }
        }
    }

    /// Connects; on success the connection and its handshake time for the link monitor
    /// (see the module documentation).
    pub async fn connect(&self) -> Result<(Connection, Duration), String> {
        match self {
            Transport::Quic {
                client,
                hub,
                server_name,
            } => {
                let started = Instant::now();
                let conn = client
                    .connect(*hub, server_name)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok((Connection::Quic(conn), started.elapsed()))
            }
            Transport::Mqtt(o) => {
                let s = MqttUplinkSession::connect(o)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::debug!(
                    connect_ms = s.connect_time().as_secs_f64() * 1e3,
                    subscribe_ms = s.subscribe_rtt().as_secs_f64() * 1e3,
                    "MQTT uplink connected"
                );
                let rtt = s.subscribe_rtt();
                Ok((
                    Connection::Mqtt {
                        session: Box::new(s),
                        max_payload: o.max_payload,
                    },
                    rtt,
                ))
            }
        }
    }
}

/// A connection whose session has not started.
pub enum Connection {
    Quic(QuicConnection),
    Mqtt {
        session: Box<MqttUplinkSession>,
        max_payload: usize,
    },
}

impl Connection {
    /// Starts the session: sends the Hello; over QUIC also starts the ack reader and the
    /// pings. On failure the connection is closed. Every send of the session, the Hello
    /// included, fails once it makes no progress for `send_timeout`
    /// ([`Link::send`]).
    pub async fn open(
        self,
        gateway_id: &GatewayId,
        link: &LinkHandle,
        ping_interval: Duration,
        send_timeout: Duration,
    ) -> Result<Link, String> {
        let hello = frame::encode(&Message::Hello(Hello {
            gateway_id: gateway_id.clone(),
            max_version: frame::VERSION,
        }))
        .map_err(|e| e.to_string())?;
        match self {
            Connection::Quic(conn) => {
                let opened = async {
                    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                    write_within(&mut send, &hello, send_timeout).await?;
                    Ok::<_, String>((send, recv))
                };
                let (send, recv) = match opened.await {
                    Ok(s) => s,
                    Err(e) => {
                        conn.close(quic::CLOSE_SHUTDOWN, b"reconnecting");
                        return Err(e);
                    }
                };
                // Acks are read by their own task so sending never blocks reading.
                let (ack_tx, acks) = mpsc::channel::<Result<Ack, String>>(256);
                let reader = AbortOnDrop(tokio::spawn(read_acks(recv, ack_tx)));
                let heard = Arc::new(Heard::new());
                let pings = AbortOnDrop(tokio::spawn(pinger::run(
                    conn.clone(),
                    link.clone(),
                    ping_interval,
                    heard.clone(),
                )));
                // Path statistics on their own task: a loop blocked on a congested send
                // must not make a busy link look silent.
                let path = AbortOnDrop(tokio::spawn(pinger::watch_path(
                    conn.clone(),
                    link.clone(),
                    heard.clone(),
                    crate::link::monitor::TICK,
                )));
                Ok(Link::Quic(QuicLink {
                    conn,
                    send,
                    acks,
                    _reader: reader,
                    _path: path,
                    pings: Some(pings),
                    heard,
                    send_timeout,
                }))
            }
            Connection::Mqtt {
                mut session,
                max_payload,
            } => {
                let sent = match tokio::time::timeout(send_timeout, session.send(&hello)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(no_room(send_timeout)),
                };
                if let Err(e) = sent {
                    close_mqtt(session).await;
                    return Err(e);
                }
                Ok(Link::Mqtt(MqttLink {
                    session,
                    max_payload,
                    waiting_since: None,
                    send_timeout,
                }))
            }
        }
    }
}

/// What [`Link::next`] brings.
pub enum Incoming {
    /// An acknowledgement from the hub.
    Ack(Ack),
    /// The RTT pings stopped (why); the session goes on without them.
    PingsStopped(String),
}

/// A session with the hub.
pub enum Link {
    Quic(QuicLink),
    Mqtt(MqttLink),
}

/// A QUIC session: the data stream, its ack reader and the pinger.
pub struct QuicLink {
    conn: QuicConnection,
    send: quic::SendStream,
    acks: mpsc::Receiver<Result<Ack, String>>,
    _reader: AbortOnDrop<()>,
    _path: AbortOnDrop<()>,
    pings: Option<AbortOnDrop<String>>,
    heard: Arc<Heard>,
    /// A send taking no byte for this long fails.
    send_timeout: Duration,
}

/// An MQTT session (a clean session on the broker).
pub struct MqttLink {
    session: Box<MqttUplinkSession>,
    max_payload: usize,
    /// Since when publishes have waited for the broker without hearing from it.
    waiting_since: Option<Instant>,
    /// A send waiting this long for room fails.
    send_timeout: Duration,
}

impl Link {
    /// The largest frame this link carries in one piece.
    pub fn max_frame_len(&self) -> usize {
        match self {
            Link::Quic(_) => frame::MAX_FRAME_LEN,
            Link::Mqtt(m) => m.max_payload,
        }
    }

    /// Sends one encoded frame (waits while the transport's window is full). A send that
    /// makes no progress for `[uplink] send_timeout` fails, and the loop ends the session:
    /// over QUIC, the hub taking no byte (a hub alive at the QUIC level that stopped
    /// reading the stream would otherwise hold the loop for ever: no acks, no mode
    /// switches, no summaries); over MQTT, the broker acknowledging nothing to make room.
    /// Over MQTT, a wait for the broker's PUBACKs longer than [`SILENT_SESSION`] while the
    /// link is intermittent gives the session up sooner (the loop cannot
    /// [`observe`](Self::observe) meanwhile, and MQTT's keep-alive takes up to
    /// 1.5 × `keep_alive` to notice).
    pub async fn send(&mut self, bytes: &[u8], link: &LinkHandle) -> Result<(), String> {
        match self {
            Link::Quic(q) => write_within(&mut q.send, bytes, q.send_timeout).await,
            Link::Mqtt(m) => {
                let started = Instant::now();
                let send = m.session.send(bytes);
                tokio::pin!(send);
                let mut check = tokio::time::interval(crate::link::monitor::TICK);
                loop {
                    tokio::select! {
                        r = &mut send => return r.map_err(|e| e.to_string()),
                        _ = check.tick() => {
                            // Dropping the send leaves the session's accounting unusable;
                            // it is closed right after.
                            if link.class() == LinkClass::Intermittent
                                && started.elapsed() > SILENT_SESSION
                            {
                                return Err("the link is down: the broker acknowledges nothing".into());
                            }
                            if started.elapsed() > m.send_timeout {
                                return Err(no_room(m.send_timeout));
                            }
                        }
                    }
                }
            }
        }
    }

    /// The next thing from the hub; an error ends the session. Cancel-safe.
    pub async fn next(&mut self) -> Result<Incoming, String> {
        match self {
            Link::Quic(q) => {
                let pings = async {
                    match q.pings.as_mut() {
                        Some(p) => (&mut p.0).await.unwrap_or_else(|e| e.to_string()),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    a = q.acks.recv() => {
                        let ack = a.ok_or_else(|| "ack reader stopped".to_string())??;
                        q.heard.now();
                        Ok(Incoming::Ack(ack))
                    }
                    why = pings => {
                        q.pings = None;
                        Ok(Incoming::PingsStopped(why))
                    }
                    e = q.conn.closed() => Err(format!("connection closed: {e}")),
                }
            }
            Link::Mqtt(m) => match m.session.recv().await.map_err(|e| e.to_string())? {
                Message::Ack(a) => {
                    if m.waiting_since.is_some() {
                        m.waiting_since = Some(Instant::now());
                    }
                    Ok(Incoming::Ack(a))
                }
                _ => Err("unexpected message from the hub".into()),
            },
        }
    }

    /// Reports what the transport observed since the last call to the link monitor (call
    /// it every [`crate::link::monitor::TICK`]); an error when the session should be given
    /// up: on an intermittent link, nothing heard for [`SILENT_SESSION`] while waiting for
    /// an answer.
    pub fn observe(&mut self, link: &LinkHandle) -> Result<(), String> {
        match self {
            Link::Quic(q) => {
                if link.class() == LinkClass::Intermittent && q.heard.silent_for() > SILENT_SESSION
                {
                    return Err("the link is down: nothing heard from the hub".into());
                }
            }
            Link::Mqtt(m) => {
                let now = Instant::now();
                let answered = m.session.take_min_rtt();
                if let Some(rtt) = answered {
                    link.report(LinkEvent::PingAnswered { rtt });
                }
                // Silence counts only while a publish waits for its PUBACK: an idle session
                // (store-and-forward sends nothing) proves nothing either way.
                m.waiting_since = if m.session.stats().in_flight == 0 {
                    None
                } else if answered.is_some() {
                    Some(now)
                } else {
                    Some(m.waiting_since.unwrap_or(now))
                };
                if link.class() == LinkClass::Intermittent
                    && m.waiting_since
                        .is_some_and(|t| now.saturating_duration_since(t) > SILENT_SESSION)
                {
                    return Err("the link is down: the broker acknowledges nothing".into());
                }
            }
        }
        Ok(())
    }

    /// Ends the session (QUIC: closes the connection; MQTT: a DISCONNECT if it goes out
    /// quickly, else the connection is dropped).
    pub async fn close(self) {
        match self {
            Link::Quic(q) => q.conn.close(quic::CLOSE_SHUTDOWN, b"reconnecting"),
            Link::Mqtt(m) => close_mqtt(m.session).await,
        }
    }
}

/// Writes all of `bytes` to a QUIC stream; an error when the stream takes no byte for
/// `stall` (flow control: the hub reads nothing, or the link delivers nothing).
async fn write_within(
    stream: &mut quic::SendStream,
    bytes: &[u8],
    stall: Duration,
) -> Result<(), String> {
    let mut rest = bytes;
    while !rest.is_empty() {
        match tokio::time::timeout(stall, stream.write(rest)).await {
            Ok(Ok(n)) => rest = &rest[n..],
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {
                return Err(format!(
                    "the hub took no data for {stall:?} ([uplink] send_timeout): it stopped reading or the link delivers nothing"
                ));
            }
        }
    }
    Ok(())
}

/// The error of an MQTT send that waited `after` for room.
fn no_room(after: Duration) -> String {
    format!(
        "the broker acknowledged nothing for {after:?} ([uplink] send_timeout): no room to send"
    )
}

async fn close_mqtt(session: Box<MqttUplinkSession>) {
    // Dropping the unfinished close drops the session, which aborts its event loop.
    let _ = tokio::time::timeout(MQTT_CLOSE_WAIT, session.close()).await;
}

/// Why a frame cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// The frame codec refused the frame.
    #[error(transparent)]
    Encode(#[from] frame::EncodeError),
    /// A frame of one sample or one summary is still over the limit.
    #[error(
        "a frame of a single sample or summary encodes to {len} bytes, over the limit of {max}"
    )]
    Indivisible { len: usize, max: usize },
}

/// Encodes `f` as one frame, or, when that is over `max` bytes or over one of the codec's
/// own limits ([`frame::MAX_FRAME_LEN`], streams or samples per frame), as several frames
/// carrying its samples (or summaries) in halves, recursively, in order: the hub
/// acknowledges each frame's own sequences, so splitting changes nothing else. Only a frame
/// of one sample or summary that still does not fit is an error.
pub fn encode_within(f: DataFrame, max: usize) -> Result<Vec<Vec<u8>>, SplitError> {
    let mut out = Vec::new();
    let mut todo = vec![f];
    while let Some(f) = todo.pop() {
        let msg = Message::Data(f);
        let refused = match frame::encode(&msg) {
            Ok(bytes) if bytes.len() <= max => {
                out.push(bytes);
                continue;
            }
            Ok(bytes) => SplitError::Indivisible {
                len: bytes.len(),
                max,
            },
            Err(e @ (EncodeError::TooLong { .. } | EncodeError::LimitExceeded { .. })) => {
                SplitError::Encode(e)
            }
            Err(e) => return Err(e.into()),
        };
        let Message::Data(f) = msg else {
            continue; // never: built as Data above
        };
        match split_in_two(f) {
            Some((a, b)) => {
                // Popped from the end: `a` next.
                todo.push(b);
                todo.push(a);
            }
            None => return Err(refused),
        }
    }
    Ok(out)
}

/// The first and second half of `f`'s samples (or, for a frame without samples, of its
/// summaries) as two frames with their own stream tables and the same sequence bounds;
/// `None` for a frame of one item.
fn split_in_two(f: DataFrame) -> Option<(DataFrame, DataFrame)> {
    let DataFrame {
        gateway_id,
        priority,
        encoding,
        first_seq,
        last_seq,
        streams,
        mut samples,
        mut summaries,
    } = f;
    let (rest_samples, rest_summaries) = if samples.len() >= 2 {
        (samples.split_off(samples.len() / 2), Vec::new())
    } else if samples.is_empty() && summaries.len() >= 2 {
        (Vec::new(), summaries.split_off(summaries.len() / 2))
    } else {
        return None;
    };
    let part = |samples: Vec<frame::FrameSample>, summaries: Vec<_>| {
        let mut table: Vec<String> = Vec::new();
        let mut map: Vec<Option<u32>> = vec![None; streams.len()];
        let mut index = |old: u32| -> u32 {
            match map.get(old as usize).copied().flatten() {
                Some(i) => i,
                None => {
                    let i = table.len() as u32;
                    // An index outside the table (never built by the core) stays outside
                    // it, and the codec refuses it as before.
                    match streams.get(old as usize) {
                        Some(name) => {
                            table.push(name.clone());
                            map[old as usize] = Some(i);
                            i
                        }
                        None => u32::MAX,
                    }
                }
            }
        };
        let samples: Vec<frame::FrameSample> = samples
            .into_iter()
            .map(|mut s| {
                s.stream = index(s.stream);
                s
            })
            .collect();
        let summaries: Vec<outpost_protocols::encoding::summary::FrameSummary> = summaries
            .into_iter()
            .map(
                |mut s: outpost_protocols::encoding::summary::FrameSummary| {
                    s.stream = index(s.stream);
                    s
                },
            )
            .collect();
        DataFrame {
            gateway_id: gateway_id.clone(),
            priority,
            encoding,
            first_seq,
            last_seq,
            streams: table,
            samples,
            summaries,
        }
    };
    let a = part(samples, summaries);
    let b = part(rest_samples, rest_summaries);
    Some((a, b))
}

async fn read_acks(mut recv: quic::RecvStream, ack_tx: mpsc::Sender<Result<Ack, String>>) {
    let mut buf = FrameBuffer::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match buf.next_message() {
            Ok(Some(Message::Ack(a))) => {
                if ack_tx.send(Ok(a)).await.is_err() {
                    return;
                }
            }
            Ok(Some(_)) => {
                let _ = ack_tx
                    .send(Err("unexpected message from the hub".into()))
                    .await;
                return;
            }
            Ok(None) => match quic::read_some(&mut recv, &mut chunk).await {
                Ok(Some(n)) => {
                    if let Err(e) = buf.push(&chunk[..n]) {
                        let _ = ack_tx
                            .send(Err(format!("bad frame from the hub: {e}")))
                            .await;
                        return;
                    }
                }
                Ok(None) => {
                    let _ = ack_tx.send(Err("hub closed the stream".into())).await;
                    return;
                }
                Err(e) => {
                    let _ = ack_tx.send(Err(e.to_string())).await;
                    return;
                }
            },
            Err(e) => {
                let _ = ack_tx
                    .send(Err(format!("bad frame from the hub: {e}")))
                    .await;
                return;
            }
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocols::encoding::summary::{FrameSummary, NumericStats, WindowSummary};
    use outpost_protocols::frame::Encoding;
    use outpost_runtime::model::{Priority, Quality, Sample, StreamId, Value};

    /// A well-mixed number (splitmix64).
    fn noise(i: u64) -> u64 {
        let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `n` samples over three streams, sequences 100.., as the core builds them.
    fn data(n: u64, encoding: Encoding) -> DataFrame {
        let ids: Vec<StreamId> = (0..3)
            .map(|i| StreamId::intern(&format!("split/stream-{i}/with-a-long-name")).unwrap())
            .collect();
        let samples: Vec<(u64, Sample)> = (0..n)
            .map(|i| {
                (
                    100 + i,
                    Sample::new(
                        ids[(i % 3) as usize],
                        1_700_000_000_000_000_000 + i as i64 * 1_000_000,
                        // Not too regular, so compression leaves something to split.
                        Value::F64(noise(i) as f64 / 3.0),
                    ),
                )
            })
            .collect();
        DataFrame::from_samples(
            &"gw-split".parse().unwrap(),
            Priority::Normal,
            encoding,
            samples.iter().map(|(q, s)| (*q, s)),
        )
    }

    fn decode(bytes: &[u8]) -> DataFrame {
        match frame::decode(bytes) {
            Ok(Message::Data(d)) => d,
            other => panic!("not a data frame: {other:?}"),
        }
    }

    /// (stream name, seq, ts, value) of every sample, in order.
    fn flat(frames: &[DataFrame]) -> Vec<(String, u64, i64, Value)> {
        frames
            .iter()
            .flat_map(|f| {
                f.samples
                    .iter()
                    .map(|s| (f.stream_name(s).to_owned(), s.seq, s.ts_ns, s.value.clone()))
            })
            .collect()
    }

    /// The `[uplink]` of a gateway config (parsed and validated, files not checked).
    fn uplink_of(uplink: &str) -> UplinkConfig {
        let text = format!("[gateway]\nid = \"gw-1\"\ndata_dir = \"/tmp/x\"\n{uplink}");
        outpost_runtime::config::parse(
            &text,
            std::path::Path::new("gw.toml"),
            std::path::Path::new("/"),
        )
        .unwrap()
        .config
        .uplink
        .unwrap()
    }

    #[test]
    fn mqtt_settings_come_from_uplink_mqtt() {
        let mut u = uplink_of(
            "[uplink]\ntransport = \"mqtt\"\n[uplink.mqtt]\nbroker = \"broker.example:1883\"\nmax_payload = \"64KiB\"\n",
        );
        let s = UplinkSettings::from_config(&"gw-1".parse().unwrap(), &u).unwrap();
        assert_eq!(s.target(), "mqtt://broker.example:1883");
        match &s {
            UplinkSettings::Mqtt(o) => {
                assert_eq!(o.up_topic(), "outpost/gw-1/up");
                assert_eq!(o.max_payload, 64 << 10);
            }
            UplinkSettings::Quic { .. } => panic!("QUIC settings for transport = \"mqtt\""),
        }
        // The QUIC keys are not needed; a missing [uplink.mqtt] is named.
        u.mqtt = None;
        let e = UplinkSettings::from_config(&"gw-1".parse().unwrap(), &u)
            .err()
            .unwrap();
        assert!(e.contains("[uplink.mqtt] is missing"), "{e}");
    }

    #[test]
    fn quic_settings_name_a_missing_key() {
        let mut u = uplink_of(
            "[uplink]\nhub = \"127.0.0.1:7443\"\nserver_name = \"hub\"\nca = \"/nonexistent/ca.pem\"\ncert = \"/nonexistent/gw.pem\"\nkey = { file = \"/nonexistent/gw.key\" }\n",
        );
        let e = UplinkSettings::from_config(&"gw-1".parse().unwrap(), &u)
            .err()
            .unwrap();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        u.hub = None;
        let e = UplinkSettings::from_config(&"gw-1".parse().unwrap(), &u)
            .err()
            .unwrap();
        assert!(e.contains("uplink.hub is missing"), "{e}");
    }

    #[test]
    fn a_frame_within_the_limit_is_one_frame() {
        let f = data(50, Encoding::Raw);
        let one = frame::encode(&Message::Data(f.clone())).unwrap();
        let parts = encode_within(f, one.len()).unwrap();
        assert_eq!(parts, vec![one]);
    }

    #[test]
    fn a_large_frame_is_split_into_frames_that_fit_and_keep_every_sample_in_order() {
        for encoding in [Encoding::Raw, Encoding::Zstd, Encoding::Delta] {
            let f = data(1_000, encoding);
            let whole = frame::encode(&Message::Data(f.clone())).unwrap();
            let max = (whole.len() / 4).max(600);
            let parts = encode_within(f.clone(), max).unwrap();
            assert!(parts.len() > 1, "{encoding:?}: {} bytes whole", whole.len());
            assert!(parts.iter().all(|p| p.len() <= max), "{encoding:?}");
            let decoded: Vec<DataFrame> = parts.iter().map(|p| decode(p)).collect();
            assert_eq!(
                flat(&decoded),
                flat(std::slice::from_ref(&f)),
                "{encoding:?}"
            );
            for d in &decoded {
                assert_eq!(d.encoding, encoding);
                assert_eq!(d.priority, Priority::Normal);
                assert!(d.streams.len() <= 3);
                // Each part's acknowledgement covers exactly its own samples.
                let ack = Ack::for_frame(d);
                assert_eq!(ack.count(), d.samples.len() as u128);
            }
        }
    }

    #[test]
    fn a_frame_over_the_codecs_own_limits_is_split_not_lost() {
        // Over 1 MiB: 6,000 samples of 250-byte strings (a frame of max_frame_samples =
        // 6000 from a text source).
        let id = StreamId::intern("split/text").unwrap();
        let text: String = "x".repeat(250);
        let samples: Vec<(u64, Sample)> = (0..6_000u64)
            .map(|i| {
                let v = Value::text(&format!("{i:06}{text}"));
                (i, Sample::new(id, 1_700_000_000_000_000_000 + i as i64, v))
            })
            .collect();
        let f = DataFrame::from_samples(
            &"gw-split".parse().unwrap(),
            Priority::Normal,
            Encoding::Raw,
            samples.iter().map(|(q, s)| (*q, s)),
        );
        assert!(frame::encode(&Message::Data(f.clone())).is_err());
        let parts = encode_within(f.clone(), frame::MAX_FRAME_LEN).unwrap();
        assert!(parts.len() >= 2);
        let decoded: Vec<DataFrame> = parts.iter().map(|p| decode(p)).collect();
        assert_eq!(flat(&decoded), flat(std::slice::from_ref(&f)));

        // More distinct streams than a frame's table holds.
        let n = frame::MAX_STREAMS_PER_FRAME as u64 + 500;
        let samples: Vec<(u64, Sample)> = (0..n)
            .map(|i| {
                let id = StreamId::intern(&format!("split/many/{i:05}")).unwrap();
                (
                    i,
                    Sample::new(id, 1_700_000_000_000_000_000, Value::F64(i as f64)),
                )
            })
            .collect();
        let f = DataFrame::from_samples(
            &"gw-split".parse().unwrap(),
            Priority::Normal,
            Encoding::Zstd,
            samples.iter().map(|(q, s)| (*q, s)),
        );
        assert!(frame::encode(&Message::Data(f.clone())).is_err());
        let parts = encode_within(f.clone(), frame::MAX_FRAME_LEN).unwrap();
        let decoded: Vec<DataFrame> = parts.iter().map(|p| decode(p)).collect();
        assert!(
            decoded
                .iter()
                .all(|d| d.streams.len() <= frame::MAX_STREAMS_PER_FRAME)
        );
        assert_eq!(flat(&decoded), flat(std::slice::from_ref(&f)));
    }

    #[test]
    fn summary_frames_are_split_by_summaries() {
        let mut f = data(0, Encoding::Summary);
        f.first_seq = 0;
        f.last_seq = 10_000;
        f.streams = (0..40).map(|i| format!("split/summary/{i:03}")).collect();
        f.summaries = (0..400u32)
            .map(|i| FrameSummary {
                stream: i / 10,
                summary: WindowSummary {
                    window_start_ns: i64::from(i % 10) * 1_000_000_000,
                    window_ns: 1_000_000_000,
                    first_ts_ns: i64::from(i % 10) * 1_000_000_000,
                    last_ts_ns: i64::from(i % 10) * 1_000_000_000 + 900_000_000,
                    first_seq: u64::from(i) * 10,
                    last_seq: u64::from(i) * 10 + 9,
                    count: 10,
                    last: Value::F64(f64::from(i)),
                    last_quality: Quality::Good,
                    numeric: Some(NumericStats {
                        n: 10,
                        min: 0.0,
                        max: f64::from(i),
                        mean: f64::from(i) / 2.0,
                        stddev: 1.5,
                    }),
                },
            })
            .collect();
        let whole = frame::encode(&Message::Data(f.clone())).unwrap().len();
        let max = (whole / 4).max(600);
        let parts = encode_within(f.clone(), max).unwrap();
        assert!(parts.len() > 1, "{whole} bytes whole");
        assert!(parts.iter().all(|p| p.len() <= max));
        let decoded: Vec<DataFrame> = parts.iter().map(|p| decode(p)).collect();
        let names = |fs: &[DataFrame]| -> Vec<(String, u64)> {
            fs.iter()
                .flat_map(|d| {
                    d.summaries
                        .iter()
                        .map(|s| (d.streams[s.stream as usize].clone(), s.summary.first_seq))
                })
                .collect()
        };
        assert_eq!(names(&decoded), names(&[f]));
    }

    #[test]
    fn a_single_sample_over_the_limit_is_an_error() {
        let f = data(1, Encoding::Raw);
        assert!(matches!(
            encode_within(f, 10),
            Err(SplitError::Indivisible { max: 10, .. })
        ));
    }
}
