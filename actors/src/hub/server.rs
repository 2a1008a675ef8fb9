//! The hub's network side: accepts gateways over QUIC (mutual TLS: only certificates the
//! configured CA signed), checks that each gateway's Hello names the id in its
//! certificate, decodes frames (every byte is hostile: errors are counted and the
//! connection is closed, the hub carries on), commits them through the ingest core
//! ([`HubIngest`], shared with the MQTT ingress: de-duplication, sink, metrics, republish)
//! and acknowledges.
//!
//! # Streams
//!
//! A gateway opens bi-directional streams on its connection: one for data (Hello, then Data
//! frames, answered by Acks) and one for the link monitor's pings, so that pings are not
//! queued behind data. The hub serves up to [`MAX_STREAMS_PER_CONNECTION`] streams of a
//! connection at once, each with the same message loop; a stream opened beyond that is
//! refused (reset and stopped with [`STREAM_REFUSED`]) and counted. The first stream must
//! come within 30 s of the handshake. A stream that ends, or fails on the transport, ends
//! alone; a protocol violation or a storage failure on any stream closes the connection.
//!
//! # Messages
//!
//! - Hello: must name the certificate's gateway id. It is per stream: a Data frame needs a
//!   Hello earlier *on the same stream* (streams are not ordered with each other). A stream
//!   is one [`Session`]; a refused Hello or Data frame is counted
//!   (`outpost_hub_bad_input{kind="identity"|"no_hello"}`) and closes the connection (the
//!   gateway reconnects, says Hello and sends again what is unacknowledged).
//! - Data: committed (grouped with the Data frames already buffered behind it), then
//!   acknowledged on the same stream.
//! - Ping: answered at once with a Pong on the same stream, Hello or not: it reveals nothing
//!   and the connection's identity is the certificate's anyway. A ping-only stream never
//!   needs a Hello. On a data stream a Ping waits for the commit in front of it.
//! - Ack and Pong travel hub → gateway only: receiving one is a protocol violation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::frame::{self, FrameBuffer, Message};
use outpost_protocols::uplink::quic::{
    self, CLOSE_BAD_IDENTITY, GatewayConnection, QuicConnection, QuicServer, ServerOptions,
    ServerTls,
};
use outpost_runtime::config::{GatewayId, HubConfig};
use outpost_runtime::metrics::Metrics;
use prometheus_client::metrics::counter::Counter;

use super::ingest::{Group, HubIngest, Refusal, Republish, Session, Transport};
use super::store::{HubStore, HubStoreError};

/// Close code for a protocol violation (undecodable frame, wrong gateway id in a frame).
pub const CLOSE_PROTOCOL: u32 = 2;
/// Close code when the hub cannot store data (the gateway keeps it and retries).
pub const CLOSE_STORAGE: u32 = 3;
/// Most buffered data frames committed together.
const MAX_GROUP: usize = 64;
/// Most bi-directional streams served at once on one gateway connection (data, pings, and
/// room to spare for a stream being replaced).
pub const MAX_STREAMS_PER_CONNECTION: usize = 4;
/// Application error code of a stream refused because the connection already has
/// [`MAX_STREAMS_PER_CONNECTION`] streams.
pub const STREAM_REFUSED: u32 = 4;
/// How long a new connection may take to open its first stream.
const FIRST_STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// Hub start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("cannot read the hub's certificates: {0}")]
    Tls(quic::QuicError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: quic::QuicError,
    },
    #[error(transparent)]
    Store(#[from] HubStoreError),
    #[error("MQTT ingress: {0}")]
    MqttIngress(String),
}

/// A running hub.
pub struct Hub {
    pub addr: SocketAddr,
    pub store: Arc<HubStore>,
    task: tokio::task::JoinHandle<()>,
    mqtt_ingress: Option<super::mqtt_ingress::MqttIngress>,
}

impl Hub {
    /// Opens the hub's state and starts listening.
    pub async fn start(config: &HubConfig, metrics: Metrics) -> Result<Hub, HubError> {
        let h = &config.hub;
        let key = h
            .key
            .resolve()
            .map_err(|e| HubError::Tls(quic::QuicError::InvalidOptions(e.to_string())))?;
        let tls = ServerTls {
            ca_pem: quic::read_pem_file(&h.ca).map_err(HubError::Tls)?,
            cert_pem: quic::read_pem_file(&h.cert).map_err(HubError::Tls)?,
            key_pem: key,
        };
        let store = Arc::new(HubStore::open(
            &h.data_dir.join("state"),
            &config.sink_dir(),
        )?);
        let hs = &h.handshakes;
        let options = ServerOptions {
            handshake_timeout: hs.timeout.get(),
            max_pending_handshakes: hs.max_pending.get() as usize,
            max_pending_per_source: hs.max_pending_per_source.get() as usize,
            retry_above: hs.retry_above.get() as usize,
            reserved_for_known: hs.reserved_for_known.get() as usize,
            ..ServerOptions::default()
        };
        let server =
            QuicServer::bind(h.listen, &tls, options).map_err(|source| HubError::Bind {
                addr: h.listen,
                source,
            })?;
        let addr = server.local_addr().map_err(|source| HubError::Bind {
            addr: h.listen,
            source,
        })?;
        let ingest = Arc::new(HubIngest::new(
            store.clone(),
            metrics.clone(),
            config.republish.as_ref().map(Republish::start),
        ));
        let mqtt_ingress = match &config.mqtt_ingress {
            Some(m) => Some(super::mqtt_ingress::MqttIngress::start(
                super::mqtt_ingress::MqttIngressOptions::from_config(m)
                    .map_err(HubError::MqttIngress)?,
                ingest.clone(),
                metrics.clone(),
            )),
            None => None,
        };
        let task = tokio::spawn(accept_loop(server, ingest, metrics));
        tracing::info!(%addr, sink = %config.sink_dir().display(), "hub listening");
        Ok(Hub {
            addr,
            store,
            task,
            mqtt_ingress,
        })
    }

    /// Stops accepting, drops open connections (unacknowledged frames will be resent by
    /// their gateways), and waits until the state is closed.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        if let Some(ingress) = self.mqtt_ingress {
            ingress.stop().await;
        }
        // Commits already running finish (each is atomic) and release the store.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while Arc::strong_count(&self.store) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn accept_loop(mut server: QuicServer, ingest: Arc<HubIngest>, metrics: Metrics) {
    let accepted = metrics.counter(
        "outpost_hub_connections",
        "Gateway connections accepted",
        &[],
    );
    // Owned here so that aborting the loop aborts every connection task too.
    let mut conns = tokio::task::JoinSet::new();
    let handshake = |result: &'static str| {
        metrics.counter(
            "outpost_hub_handshakes_refused",
            "QUIC handshakes that did not yield an authenticated gateway",
            &[("reason", result)],
        )
    };
    let (failed, timed_out, identity, busy, per_source) = (
        handshake("tls_failed"),
        handshake("timed_out"),
        handshake("no_gateway_id"),
        handshake("busy"),
        handshake("per_source"),
    );
    let retried = metrics.counter(
        "outpost_hub_handshakes_retried",
        "QUIC clients asked to validate their address first (Retry), the hub being busy",
        &[],
    );
    let pending = metrics.gauge(
        "outpost_hub_handshakes_pending",
        "QUIC handshakes in progress",
        &[],
    );
    let mut last = server.counters();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = server.counters();
                failed.inc_by(now.handshakes_failed.saturating_sub(last.handshakes_failed));
                timed_out.inc_by(now.handshakes_timed_out.saturating_sub(last.handshakes_timed_out));
                identity.inc_by(now.identity_rejected.saturating_sub(last.identity_rejected));
                busy.inc_by(now.refused_busy.saturating_sub(last.refused_busy));
                per_source.inc_by(now.refused_per_source.saturating_sub(last.refused_per_source));
                retried.inc_by(now.retried.saturating_sub(last.retried));
                pending.set(i64::try_from(now.pending).unwrap_or(i64::MAX));
                last = now;
            }
            conn = server.accept() => {
                let Some(conn) = conn else { break };
                accepted.inc();
                let ingest = ingest.clone();
                let metrics = metrics.clone();
                conns.spawn(async move {
                    let id = conn.gateway_id.clone();
                    if let Err(e) = serve_gateway(conn, ingest, &metrics).await {
                        tracing::info!(gateway = %id, reason = %e, "gateway connection ended");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// What every stream of one gateway connection shares.
struct ConnCtx {
    gw: GatewayId,
    conn: QuicConnection,
    ingest: Arc<HubIngest>,
    pongs: Counter,
}

impl ConnCtx {
    /// Counts rejected input of `kind`.
    fn bad(&self, kind: &'static str) {
        self.ingest.bad(Transport::Quic, kind);
    }

    /// Counts a frame error and closes the connection for it.
    fn frame_error(&self, e: &frame::FrameError) -> String {
        self.bad(e.label());
        self.conn.close(CLOSE_PROTOCOL, b"frame error");
        format!("bad frame: {e}")
    }
}

/// Serves one gateway connection until it closes or misbehaves: accepts its streams (at
/// most [`MAX_STREAMS_PER_CONNECTION`] at once) and serves each in its own task.
async fn serve_gateway(
    conn: GatewayConnection,
    ingest: Arc<HubIngest>,
    metrics: &Metrics,
) -> Result<(), String> {
    let gw = conn.gateway_id.clone();
    let ctx = Arc::new(ConnCtx {
        conn: conn.connection.clone(),
        ingest,
        pongs: metrics.counter(
            "outpost_hub_pongs_sent",
            "Pings answered with a Pong",
            &[("gateway", &gw)],
        ),
        gw: gw.clone(),
    });
    let refused = metrics.counter(
        "outpost_hub_streams_refused",
        "Gateway streams refused because their connection had too many open",
        &[],
    );
    let c = &conn.connection;
    // Owned here: when the connection's task ends (or is aborted), its streams' tasks are
    // aborted with it.
    let mut streams = tokio::task::JoinSet::new();
    let mut opened_any = false;
    let first_deadline = tokio::time::Instant::now() + FIRST_STREAM_TIMEOUT;
    loop {
        tokio::select! {
            accepted = c.accept_bi() => {
                let (mut send, mut recv) = match accepted {
                    Ok(s) => s,
                    // The connection is closed (by the gateway, a stream task or a timeout).
                    Err(e) => return Err(e.to_string()),
                };
                opened_any = true;
                // Streams that have ended no longer count.
                while let Some(ended) = streams.try_join_next() {
                    if let Err(e) = ended {
                        c.close(CLOSE_STORAGE, b"hub stream task failed");
                        return Err(format!("stream task failed: {e}"));
                    }
                }
                if streams.len() >= MAX_STREAMS_PER_CONNECTION {
                    refused.inc();
                    let _ = send.reset(STREAM_REFUSED.into());
                    let _ = recv.stop(STREAM_REFUSED.into());
                    tracing::debug!(gateway = %gw, "stream refused: too many open on the connection");
                    continue;
                }
                let ctx = ctx.clone();
                streams.spawn(async move {
                    // Logged here: when this stream closed the connection, the accept above
                    // may see that first and end the connection's task before joining us.
                    let r = serve_stream(ctx.clone(), send, recv).await;
                    if let Err(e) = &r {
                        tracing::info!(gateway = %ctx.gw, reason = %e, "gateway stream ended");
                    }
                    r
                });
            }
            _ = tokio::time::sleep_until(first_deadline), if !opened_any => {
                c.close(CLOSE_PROTOCOL, b"no stream opened");
                return Err(format!("no stream opened within {} s", FIRST_STREAM_TIMEOUT.as_secs()));
            }
            Some(ended) = streams.join_next(), if !streams.is_empty() => {
                match ended {
                    Ok(_) => {}
                    Err(e) => {
                        c.close(CLOSE_STORAGE, b"hub stream task failed");
                        return Err(format!("stream task failed: {e}"));
                    }
                }
            }
        }
    }
}

/// Serves one stream of a gateway connection until it ends or misbehaves. Protocol
/// violations and storage failures close the whole connection; transport errors end the
/// stream only.
async fn serve_stream(
    ctx: Arc<ConnCtx>,
    mut send: quic::SendStream,
    mut recv: quic::RecvStream,
) -> Result<(), String> {
    let gw = &ctx.gw;
    let c = &ctx.conn;
    let mut buf = FrameBuffer::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut session = Session::new(gw.clone());
    // A message read while grouping data frames, handled next.
    let mut pending: Option<Message> = None;
    loop {
        let next = match pending.take() {
            Some(m) => Ok(Some(m)),
            None => buf.next_message(),
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => match quic::read_some(&mut recv, &mut chunk).await {
                Ok(Some(n)) => {
                    if let Err(e) = buf.push(&chunk[..n]) {
                        return Err(ctx.frame_error(&e));
                    }
                    continue;
                }
                Ok(None) => {
                    // The gateway finished its side: finish ours.
                    let _ = quic::finish(&mut send);
                    return Ok(());
                }
                Err(e) => return Err(e.to_string()),
            },
            Err(e) => return Err(ctx.frame_error(&e)),
        };
        match msg {
            Message::Hello(h) => {
                if let Err(r) = session.hello(&h) {
                    ctx.bad(r.kind());
                    c.close(CLOSE_BAD_IDENTITY, b"hello does not match certificate");
                    return Err(r.to_string());
                }
            }
            Message::Ping(p) => {
                let pong = frame::encode(&Message::Pong(p.pong()))
                    .map_err(|e| format!("cannot encode pong: {e}"))?;
                quic::send_all(&mut send, &pong)
                    .await
                    .map_err(|e| e.to_string())?;
                ctx.pongs.inc();
            }
            Message::Data(first) => {
                // Group commit: with this frame, every data frame already buffered.
                let mut frames = vec![first];
                while frames.len() < MAX_GROUP {
                    match buf.next_message() {
                        Ok(Some(Message::Data(f))) => frames.push(f),
                        Ok(Some(other)) => {
                            pending = Some(other);
                            break;
                        }
                        Ok(None) => break,
                        Err(e) => return Err(ctx.frame_error(&e)),
                    }
                }
                if let Err(r) = session.admit(&frames) {
                    ctx.bad(r.kind());
                    let why: &[u8] = match r {
                        Refusal::NoHello(_) => b"data before hello",
                        Refusal::Identity { .. } => b"frame from another gateway",
                    };
                    c.close(CLOSE_BAD_IDENTITY, why);
                    return Err(r.to_string());
                }
                let group = Group {
                    gateway: gw.clone(),
                    frames,
                };
                let done = match ctx.ingest.commit(Transport::Quic, vec![group]).await {
                    Ok(d) => d,
                    Err(e) => {
                        c.close(CLOSE_STORAGE, b"hub storage error");
                        return Err(e.to_string());
                    }
                };
                let mut acks = Vec::new();
                let mut n = 0;
                for ack in done.into_iter().flat_map(|d| d.acks) {
                    acks.extend(
                        frame::encode(&Message::Ack(ack))
                            .map_err(|e| format!("cannot encode ack: {e}"))?,
                    );
                    n += 1;
                }
                quic::send_all(&mut send, &acks)
                    .await
                    .map_err(|e| e.to_string())?;
                ctx.ingest.acks_sent(Transport::Quic, n);
            }
            Message::Ack(_) => {
                ctx.bad("unexpected_ack");
                c.close(CLOSE_PROTOCOL, b"unexpected ack");
                return Err("gateway sent an ack".into());
            }
            Message::Pong(_) => {
                ctx.bad("unexpected_pong");
                c.close(CLOSE_PROTOCOL, b"unexpected pong");
                return Err("gateway sent a pong".into());
            }
        }
    }
}
