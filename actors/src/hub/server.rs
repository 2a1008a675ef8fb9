//! The hub's network side: accepts gateways over QUIC (mutual TLS: only certificates the
//! configured CA signed), checks that each gateway's Hello names the id in its
//! certificate, decodes frames (every byte is hostile: errors are counted and the
//! connection is closed, the hub carries on), commits them through [`HubStore`] and
//! acknowledges.
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
//!   Hello earlier *on the same stream* (streams are not ordered with each other).
//! - Data: committed (grouped with the Data frames already buffered behind it), then
//!   acknowledged on the same stream.
//! - Ping: answered at once with a Pong on the same stream, Hello or not: it reveals nothing
//!   and the connection's identity is the certificate's anyway. A ping-only stream never
//!   needs a Hello. On a data stream a Ping waits for the commit in front of it.
//! - Ack and Pong travel hub → gateway only: receiving one is a protocol violation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::frame::{self, Ack, DataFrame, FrameBuffer, Message};
use outpost_protocols::mqtt::publisher::{MqttPublisher, PublisherOptions};
use outpost_protocols::uplink::quic::{
    self, CLOSE_BAD_IDENTITY, GatewayConnection, QuicConnection, QuicServer, ServerOptions,
    ServerTls,
};
use outpost_runtime::config::{GatewayId, HubConfig};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::now_ns;
use prometheus_client::metrics::counter::Counter;

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
        let server =
            QuicServer::bind(h.listen, &tls, ServerOptions::default()).map_err(|source| {
                HubError::Bind {
                    addr: h.listen,
                    source,
                }
            })?;
        let addr = server.local_addr().map_err(|source| HubError::Bind {
            addr: h.listen,
            source,
        })?;
        let republish = config.republish.as_ref().map(|r| {
            let (host, port) = r
                .broker
                .rsplit_once(':')
                .map(|(h, p)| (h.to_owned(), p.parse().unwrap_or(1883)))
                .unwrap_or_else(|| (r.broker.clone(), 1883));
            let credentials = r.username.clone().map(|u| {
                let pw = r
                    .password
                    .as_ref()
                    .and_then(|p| p.resolve_string().ok())
                    .unwrap_or_default();
                (u, pw)
            });
            tracing::info!(broker = %r.broker, prefix = %r.topic_prefix, "republishing samples over MQTT");
            Republish {
                prefix: r.topic_prefix.trim_end_matches('/').to_owned(),
                publisher: MqttPublisher::start(PublisherOptions {
                    host,
                    port,
                    client_id: r.client_id.clone().unwrap_or_else(|| "outpost-hub".into()),
                    credentials,
                    qos: r.qos.get() as u8,
                    queue: r.queue.get() as usize,
                    backoff_initial: Duration::from_millis(200),
                    backoff_max: Duration::from_secs(30),
                }),
            }
        });
        let mqtt_ingress = match &config.mqtt_ingress {
            Some(m) => Some(super::mqtt_ingress::MqttIngress::start(
                super::mqtt_ingress::MqttIngressOptions::from_config(m)
                    .map_err(HubError::MqttIngress)?,
                store.clone(),
                metrics.clone(),
            )),
            None => None,
        };
        let task = tokio::spawn(accept_loop(server, store.clone(), metrics, republish));
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

/// Where written samples are republished (optional).
#[derive(Clone)]
struct Republish {
    prefix: String,
    publisher: MqttPublisher,
}

impl Republish {
    fn samples(&self, gateway: &str, frame: &DataFrame, idx: &[usize], dropped: &Counter) {
        for &i in idx {
            let Some(s) = frame.samples.get(i) else {
                continue;
            };
            let topic = format!("{}/{gateway}/{}", self.prefix, frame.stream_name(s));
            let payload = serde_json::json!({
                "seq": s.seq,
                "ts_ns": s.ts_ns,
                "value": s.value,
                "quality": s.quality,
            });
            if !self
                .publisher
                .publish(topic, payload.to_string().into_bytes())
            {
                dropped.inc();
            }
        }
    }
}

async fn accept_loop(
    mut server: QuicServer,
    store: Arc<HubStore>,
    metrics: Metrics,
    republish: Option<Republish>,
) {
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
    let (failed, timed_out, identity, busy) = (
        handshake("tls_failed"),
        handshake("timed_out"),
        handshake("no_gateway_id"),
        handshake("busy"),
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
                last = now;
            }
            conn = server.accept() => {
                let Some(conn) = conn else { break };
                accepted.inc();
                let store = store.clone();
                let metrics = metrics.clone();
                let republish = republish.clone();
                conns.spawn(async move {
                    let id = conn.gateway_id.clone();
                    if let Err(e) = serve_gateway(conn, store, &metrics, republish).await {
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
    store: Arc<HubStore>,
    metrics: Metrics,
    republish: Option<Republish>,
    republish_dropped: Counter,
    written: Counter,
    dups: Counter,
    summaries: Counter,
    summary_dups: Counter,
    pongs: Counter,
}

impl ConnCtx {
    /// Counts rejected input of `kind`.
    fn bad(&self, kind: &'static str) {
        self.metrics
            .counter(
                "outpost_hub_bad_input",
                "Rejected input from gateways",
                &[("kind", kind)],
            )
            .inc();
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
    store: Arc<HubStore>,
    metrics: &Metrics,
    republish: Option<Republish>,
) -> Result<(), String> {
    let gw = conn.gateway_id.clone();
    let per_gw =
        |name: &'static str, help: &'static str| metrics.counter(name, help, &[("gateway", &gw)]);
    let ctx = Arc::new(ConnCtx {
        conn: conn.connection.clone(),
        store,
        metrics: metrics.clone(),
        republish,
        republish_dropped: metrics.counter(
            "outpost_hub_republish_dropped",
            "Samples not republished over MQTT because the broker was slow or away",
            &[],
        ),
        written: per_gw("outpost_hub_samples_written", "Samples written to the sink"),
        dups: per_gw(
            "outpost_hub_duplicates",
            "Samples received again and dropped",
        ),
        summaries: per_gw(
            "outpost_hub_summaries_written",
            "Window summaries written to the summaries sink",
        ),
        summary_dups: per_gw(
            "outpost_hub_summary_duplicates",
            "Window summaries received again and dropped",
        ),
        pongs: per_gw("outpost_hub_pongs_sent", "Pings answered with a Pong"),
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
    let mut hello_seen = false;
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
                if h.gateway_id != *gw {
                    ctx.bad("identity");
                    c.close(CLOSE_BAD_IDENTITY, b"hello does not match certificate");
                    return Err(format!(
                        "hello names {:?} but the certificate says {gw:?}",
                        h.gateway_id
                    ));
                }
                hello_seen = true;
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
                if !hello_seen || frames.iter().any(|f| f.gateway_id != *gw) {
                    ctx.bad("identity");
                    c.close(CLOSE_BAD_IDENTITY, b"frame from another gateway");
                    return Err("data frame without hello or with another gateway id".into());
                }
                let store = ctx.store.clone();
                let gw2 = gw.clone();
                let (frames, res) = tokio::task::spawn_blocking(move || {
                    let r = store.commit_many(&gw2, &frames, now_ns());
                    (frames, r)
                })
                .await
                .map_err(|e| {
                    c.close(CLOSE_STORAGE, b"hub storage error");
                    format!("commit task failed: {e}")
                })?;
                let done = match res {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::error!(gateway = %gw, error = %e, "hub cannot store data");
                        c.close(CLOSE_STORAGE, b"hub storage error");
                        return Err(e.to_string());
                    }
                };
                let mut acks = Vec::new();
                for (frame, done) in frames.iter().zip(&done) {
                    ctx.written.inc_by(done.written as u64);
                    ctx.dups.inc_by(done.duplicates as u64);
                    ctx.summaries.inc_by(done.summaries_written as u64);
                    ctx.summary_dups.inc_by(done.summary_duplicates as u64);
                    if let Some(r) = &ctx.republish {
                        r.samples(gw, frame, &done.written_idx, &ctx.republish_dropped);
                    }
                    acks.extend(
                        frame::encode(&Message::Ack(Ack::for_frame(frame)))
                            .map_err(|e| format!("cannot encode ack: {e}"))?,
                    );
                }
                quic::send_all(&mut send, &acks)
                    .await
                    .map_err(|e| e.to_string())?;
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
