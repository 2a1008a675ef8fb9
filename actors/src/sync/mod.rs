//! The sync actor: everything that leaves the gateway goes through it. It reads the
//! durable outbox (weighted by priority class), packs records into frames in the encoding of
//! the current sync mode, sends them to the hub, and deletes records from the outbox only
//! when the hub has acknowledged them. The mode follows the link class the link monitor
//! ([`crate::link::monitor`]) publishes, or `[sync] mode` when it is pinned. After a
//! reconnect everything not yet acknowledged is sent again (the hub de-duplicates).
//!
//! [`core::SyncCore`] is the pure bookkeeping (lanes, cursors, held records, encodings);
//! this module does the I/O and reports what it sees on the uplink to the link monitor.

pub mod core;
#[cfg(test)]
mod core_tests;
pub mod pinger;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocols::encoding::{Deadband, DeadbandConfig, SummaryConfig};
use outpost_protocols::frame::{self, Ack, DataFrame, FrameBuffer, Hello, Message};
use outpost_protocols::uplink::quic::{self, ClientOptions, ClientTls, QuicClient, QuicConnection};
use outpost_runtime::config::{Config, DeadbandSpec, SyncModeSetting};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{LinkClass, Priority, SyncMode, now_ns};
use outpost_runtime::record;
use outpost_runtime::storage::{GatewayOutbox, Seq};
use outpost_runtime::supervisor::{Backoff, BackoffPolicy};
use tokio::sync::{Notify, mpsc};

use self::core::{CoreConfig, Outgoing, ScanRequest, SyncCore};
use crate::link::monitor::{LinkEvent, LinkHandle};

/// Timeout of a connection attempt (handshake included).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait between connection attempts while the link is intermittent.
const OUTAGE_RETRY: Duration = Duration::from_millis(500);
/// A session on an intermittent link that has heard nothing from the hub for this long is
/// given up for a fresh handshake (QUIC's own retransmission timer backs off
/// exponentially, so an old connection may stay silent long after the link is back).
const SILENT_SESSION: Duration = Duration::from_millis(1_500);

/// Tuning of the sync loop.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Most samples per frame.
    pub max_frame_samples: usize,
    /// Most samples in flight (sent, unacknowledged).
    pub window: usize,
    pub keep_alive: Duration,
    pub reconnect: BackoffPolicy,
    /// Interval of the RTT pings.
    pub ping_interval: Duration,
}

/// Everything the sync loop needs.
#[derive(Clone)]
pub struct SyncContext {
    pub gateway_id: String,
    pub hub: SocketAddr,
    pub server_name: String,
    pub tls: Arc<ClientTls>,
    pub options: SyncOptions,
    pub core: CoreConfig,
    /// A pinned mode, or `Auto` (follow the link class).
    pub mode: SyncModeSetting,
    pub link: LinkHandle,
    pub outbox: Arc<GatewayOutbox>,
    pub wake: Arc<Notify>,
    pub metrics: Metrics,
}

/// Builds the sync context from the config (reads the certificates). `link` is the link
/// monitor's handle (it outlives restarts of the sync actor).
pub fn context_from_config(
    config: &Config,
    link: LinkHandle,
    outbox: Arc<GatewayOutbox>,
    wake: Arc<Notify>,
    metrics: Metrics,
) -> Result<SyncContext, String> {
    let u = config
        .uplink
        .as_ref()
        .ok_or_else(|| "no [uplink] section".to_string())?;
    // Only a config with transport = "mqtt" lacks them: that transport is not wired into
    // the sync loop yet (issue 5).
    let need = |key: &str| {
        let t = u.transport.as_str();
        format!("uplink.{key} is missing: this sync loop speaks QUIC only (transport {t:?})")
    };
    let hub = resolve(u.hub.as_deref().ok_or_else(|| need("hub"))?)?;
    let read = |p: &std::path::Path| quic::read_pem_file(p).map_err(|e| e.to_string());
    let tls = ClientTls {
        ca_pem: read(u.ca.as_deref().ok_or_else(|| need("ca"))?)?,
        cert_pem: read(u.cert.as_deref().ok_or_else(|| need("cert"))?)?,
        key_pem: (u.key.as_ref().ok_or_else(|| need("key"))?)
            .resolve()
            .map_err(|e| e.to_string())?,
    };
    let max_frame_samples = u.max_frame_samples.get() as usize;
    let window = (max_frame_samples * 8).max(1);
    let s = &config.sync;
    let band = |d: &DeadbandSpec| match *d {
        DeadbandSpec::Absolute(v) => Deadband::Absolute(v),
        DeadbandSpec::Relative(v) => Deadband::Relative(v),
    };
    let core = CoreConfig {
        gateway_id: config.gateway.id.clone(),
        max_frame_samples,
        window,
        backfill: s.backfill,
        deadband: DeadbandConfig {
            default: s.delta.default.as_ref().map(band),
            max_silence_ms: s.delta.max_silence.map(|d| d.get().as_millis() as u64),
            streams: s
                .delta
                .streams
                .iter()
                .map(|(k, v)| (k.clone(), band(v)))
                .collect(),
        },
        summary: SummaryConfig {
            window_ms: s.summary.window.get().as_millis() as u64,
        },
        summary_lateness_ns: s.summary.lateness.get().as_nanos() as i64,
    };
    // Fail now, at start-up, on a configuration the core cannot use.
    SyncCore::new(core.clone(), SyncMode::Full).map_err(|e| format!("[sync]: {e}"))?;
    Ok(SyncContext {
        gateway_id: config.gateway.id.clone(),
        hub,
        server_name: u.server_name.clone().ok_or_else(|| need("server_name"))?,
        tls: Arc::new(tls),
        options: SyncOptions {
            max_frame_samples,
            window,
            keep_alive: u.keep_alive.get(),
            reconnect: BackoffPolicy::new(
                u.reconnect.initial.get(),
                u.reconnect.max.get(),
                2.0,
                0.2,
            ),
            ping_interval: config.link.ping_interval.get(),
        },
        core,
        mode: s.mode,
        link,
        outbox,
        wake,
        metrics,
    })
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve hub address {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("hub address {addr:?} resolves to nothing"))
}

struct Counters {
    acked: prometheus_client::metrics::counter::Counter,
    connects: prometheus_client::metrics::counter::Counter,
    corrupt: prometheus_client::metrics::counter::Counter,
    connected: prometheus_client::metrics::gauge::Gauge,
    in_flight: prometheus_client::metrics::gauge::Gauge,
    mode: prometheus_client::metrics::gauge::Gauge,
    held: prometheus_client::metrics::gauge::Gauge,
}

impl Counters {
    fn new(m: &Metrics) -> Counters {
        Counters {
            acked: m.counter(
                "outpost_sync_samples_acked",
                "Samples acknowledged by the hub and deleted from the outbox",
                &[],
            ),
            connects: m.counter(
                "outpost_sync_connects",
                "Connections established to the hub",
                &[],
            ),
            corrupt: m.counter(
                "outpost_sync_corrupt_records",
                "Outbox records that could not be decoded or encoded (dropped)",
                &[],
            ),
            connected: m.gauge(
                "outpost_sync_connected",
                "1 while connected to the hub",
                &[],
            ),
            in_flight: m.gauge(
                "outpost_sync_in_flight",
                "Samples sent and not yet acknowledged",
                &[],
            ),
            mode: m.gauge(
                "outpost_sync_mode",
                "Current sync mode: 0 full, 1 full_zstd, 2 delta, 3 summary, 4 store_and_forward",
                &[],
            ),
            held: m.gauge(
                "outpost_sync_backfill_pending",
                "1 while raw samples held back by delta, summary or store-and-forward wait for backfill",
                &[],
            ),
        }
    }

    /// Samples and bytes sent, by mode and lane.
    fn sent(m: &Metrics, mode: SyncMode, lane: &str, samples: usize, bytes: usize) {
        let l = [("mode", mode.as_str()), ("lane", lane)];
        m.counter(
            "outpost_sync_samples_sent",
            "Samples sent to the hub (resends included), by sync mode and lane",
            &l,
        )
        .inc_by(samples as u64);
        m.counter(
            "outpost_sync_bytes_sent",
            "Frame bytes sent to the hub, by sync mode and lane",
            &l,
        )
        .inc_by(bytes as u64);
    }
}

/// The mode to use now.
fn wanted_mode(ctx: &SyncContext) -> SyncMode {
    ctx.mode
        .fixed()
        .unwrap_or_else(|| ctx.link.class().sync_mode())
}

/// Runs the sync loop forever: connect (with backoff), ship, reconnect. Returns only on an
/// error that a restart cannot fix (none today: connection errors are retried here).
pub async fn run(ctx: SyncContext) -> Result<(), String> {
    let c = Counters::new(&ctx.metrics);
    let client = QuicClient::new(
        &ctx.tls,
        ClientOptions {
            keep_alive: ctx.options.keep_alive,
            idle_timeout: (ctx.options.keep_alive * 4).max(Duration::from_secs(2)),
            // A handshake is also the probe that ends an outage: a satellite link completes
            // one in under 2 s; a dead one should not hold the next attempt back for long.
            connect_timeout: CONNECT_TIMEOUT,
            ..ClientOptions::default()
        },
    )
    .map_err(|e| format!("uplink TLS setup: {e}"))?;
    let mut backoff = Backoff::new(ctx.options.reconnect);
    let mut core =
        SyncCore::new(ctx.core.clone(), wanted_mode(&ctx)).map_err(|e| format!("[sync]: {e}"))?;
    c.mode.set(core.mode() as i64);
    tracing::info!(mode = core.mode().as_str(), "sync started");
    loop {
        let started = Instant::now();
        match client.connect(ctx.hub, &ctx.server_name).await {
            Ok(conn) => {
                ctx.link.report(LinkEvent::Connected {
                    handshake: started.elapsed(),
                });
                c.connects.inc();
                c.connected.set(1);
                tracing::info!(hub = %ctx.hub, "connected to the hub");
                let r = session(&ctx, &conn, &mut core, &c).await;
                core.disconnected();
                ctx.link.report(LinkEvent::Disconnected);
                c.connected.set(0);
                c.in_flight.set(0);
                conn.close(quic::CLOSE_SHUTDOWN, b"reconnecting");
                tracing::warn!(hub = %ctx.hub, reason = %r.err().unwrap_or_else(|| "closed".into()), "uplink session ended");
            }
            Err(e) => {
                ctx.link.report(LinkEvent::ConnectFailed);
                tracing::warn!(hub = %ctx.hub, error = %e, "cannot connect to the hub");
            }
        }
        let (attempt, mut delay) = backoff.next_delay(Some(started.elapsed()), fastrand::f64());
        if ctx.link.class() == LinkClass::Intermittent {
            // During an outage a fresh handshake is the probe: try often, so the end of the
            // outage is seen within about a second.
            delay = delay.min(OUTAGE_RETRY);
        }
        tracing::debug!(
            attempt,
            delay_ms = delay.as_millis() as u64,
            "reconnecting to the hub"
        );
        // Follow the class while disconnected too (store-and-forward is what an outage is).
        switch_mode(&ctx, &mut core, &c, None).await?;
        tokio::time::sleep(delay).await;
    }
}

/// Applies the wanted mode; frames flushed by the change (summaries) are sent on `send`
/// when connected.
async fn switch_mode(
    ctx: &SyncContext,
    core: &mut SyncCore,
    c: &Counters,
    send: Option<&mut quic::SendStream>,
) -> Result<(), String> {
    let want = wanted_mode(ctx);
    if want == core.mode() {
        return Ok(());
    }
    let old = core.mode();
    let end = ctx.outbox.stats().durable_seq;
    let flushed = core.set_mode(want, end);
    c.mode.set(want as i64);
    ctx.metrics
        .counter(
            "outpost_sync_mode_changes",
            "Sync mode changes, by new mode",
            &[("to", want.as_str())],
        )
        .inc();
    tracing::info!(
        from = old.as_str(),
        to = want.as_str(),
        in_flight = core.in_flight(),
        "sync mode changed"
    );
    if let Some(send) = send {
        for f in flushed {
            send_summary(ctx, send, f).await?;
        }
    }
    Ok(())
}

async fn send_summary(
    ctx: &SyncContext,
    send: &mut quic::SendStream,
    f: DataFrame,
) -> Result<(), String> {
    let n = f.summaries.len();
    match frame::encode(&Message::Data(f)) {
        Ok(bytes) => {
            quic::send_all(send, &bytes)
                .await
                .map_err(|e| e.to_string())?;
            Counters::sent(&ctx.metrics, SyncMode::Summary, "summary", n, bytes.len());
        }
        Err(e) => tracing::error!(error = %e, "summary frame cannot be encoded; dropped"),
    }
    Ok(())
}

/// One connection's life: Hello, then ship and apply acks until something fails.
async fn session(
    ctx: &SyncContext,
    conn: &QuicConnection,
    core: &mut SyncCore,
    c: &Counters,
) -> Result<(), String> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = frame::encode(&Message::Hello(Hello {
        gateway_id: ctx.gateway_id.clone(),
        max_version: frame::VERSION,
    }))
    .map_err(|e| e.to_string())?;
    quic::send_all(&mut send, &hello)
        .await
        .map_err(|e| e.to_string())?;

    // Acks are read by their own task so sending never blocks reading.
    let (ack_tx, mut ack_rx) = mpsc::channel::<Result<Ack, String>>(256);
    let _reader = AbortOnDrop(tokio::spawn(read_acks(recv, ack_tx)));
    let heard = Arc::new(pinger::Heard::new());
    let mut pings = AbortOnDrop(tokio::spawn(pinger::run(
        conn.clone(),
        ctx.link.clone(),
        ctx.options.ping_interval,
        heard.clone(),
    )));
    let _path = AbortOnDrop(tokio::spawn(pinger::watch_path(
        conn.clone(),
        ctx.link.clone(),
        heard.clone(),
        crate::link::monitor::TICK,
    )));
    let mut pings_done = false;
    let mut class_rx = ctx.link.watch_class();
    let mut stats_tick = tokio::time::interval(crate::link::monitor::TICK);
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut summary_tick = tokio::time::interval(Duration::from_millis(500));
    summary_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        switch_mode(ctx, core, c, Some(&mut send)).await?;
        // Read and send until the window is full or nothing new is read (bounded, so acks
        // are applied in between).
        for _ in 0..64 {
            let read = fill(ctx, core, c).await?;
            let mut sent = 0;
            while let Some(out) = core.next_frame() {
                send_frame(ctx, core, c, &mut send, out).await?;
                sent += 1;
            }
            if (read == 0 && sent == 0) || core.window_full() {
                break;
            }
        }
        c.held.set(i64::from(core.backfill_pending()));
        tokio::select! {
            a = ack_rx.recv() => {
                let ack = a.ok_or_else(|| "ack reader stopped".to_string())??;
                heard.now();
                let (done, bytes) = core.acked(&ack);
                ctx.link.report(LinkEvent::Delivered { bytes });
                c.acked.inc_by(done.len() as u64);
                c.in_flight.set(core.in_flight() as i64);
                remove(ctx, done).await?;
            }
            _ = ctx.wake.notified() => {}
            _ = class_rx.changed() => {}
            _ = stats_tick.tick() => {
                if ctx.link.class() == LinkClass::Intermittent && heard.silent_for() > SILENT_SESSION {
                    return Err("the link is down: nothing heard from the hub".into());
                }
            }
            _ = summary_tick.tick() => {
                for f in core.poll_summaries(now_ns()) {
                    send_summary(ctx, &mut send, f).await?;
                }
            }
            r = &mut pings.0, if !pings_done => {
                pings_done = true;
                let why = r.unwrap_or_else(|e| e.to_string());
                tracing::warn!(reason = %why, "RTT pings stopped; the link class now rests on data traffic only");
            }
            e = conn.closed() => return Err(format!("connection closed: {e}")),
        }
    }
}

async fn send_frame(
    ctx: &SyncContext,
    core: &mut SyncCore,
    c: &Counters,
    send: &mut quic::SendStream,
    out: Outgoing,
) -> Result<(), String> {
    let mode = core.mode();
    let Outgoing { frame, lane, seqs } = out;
    let n = seqs.len();
    match frame::encode(&Message::Data(frame)) {
        Ok(bytes) => {
            quic::send_all(send, &bytes)
                .await
                .map_err(|e| e.to_string())?;
            core.commit(lane, &seqs, bytes.len());
            Counters::sent(&ctx.metrics, mode, lane.label(), n, bytes.len());
            let backlogged = core.window_full() || core.has_buffered();
            ctx.link.report(LinkEvent::Sent {
                bytes: bytes.len() as u64,
                backlogged,
            });
        }
        Err(e) => {
            tracing::error!(error = %e, samples = n, "records cannot be encoded; dropped from the outbox");
            c.corrupt.inc_by(n as u64);
            let ids = core.abandon(lane, seqs);
            remove(ctx, ids).await?;
        }
    }
    c.in_flight.set(core.in_flight() as i64);
    Ok(())
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

/// Reads the outbox for every lane that asks (one blocking call), decodes, and feeds the
/// core; undecodable records are dropped from the outbox and counted.
async fn fill(ctx: &SyncContext, core: &mut SyncCore, c: &Counters) -> Result<usize, String> {
    let reqs = core.scans();
    if reqs.is_empty() {
        return Ok(0);
    }
    let ob = ctx.outbox.clone();
    let reqs2 = reqs.clone();
    type Batch = (
        Vec<(Seq, outpost_runtime::model::Sample)>,
        Option<Seq>,
        Vec<(Priority, Seq)>,
    );
    let batches: Vec<Batch> = tokio::task::spawn_blocking(move || {
        reqs2
            .iter()
            .map(|r: &ScanRequest| {
                let p = r.lane.class();
                let recs = ob.scan(p, r.after, r.limit, 512 * 1024)?;
                let upto = recs.last().map(|r| r.seq);
                let mut ok = Vec::with_capacity(recs.len());
                let mut bad = Vec::new();
                for rec in recs {
                    match record::decode(&rec.value) {
                        Ok(s) => ok.push((rec.seq, s)),
                        Err(e) => {
                            tracing::error!(seq = rec.seq, error = %e, "undecodable outbox record dropped");
                            bad.push((p, rec.seq));
                        }
                    }
                }
                Ok((ok, upto, bad))
            })
            .collect::<Result<Vec<_>, outpost_runtime::storage::StorageError>>()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("outbox scan: {e}"))?;
    let mut corrupt = Vec::new();
    let mut read = 0;
    for (req, (ok, upto, bad)) in reqs.iter().zip(batches) {
        read += ok.len() + bad.len();
        core.fill(req, ok, upto);
        corrupt.extend(bad);
    }
    if !corrupt.is_empty() {
        c.corrupt.inc_by(corrupt.len() as u64);
        // Backfill may read a corrupt record that live reading already dropped: harmless.
        corrupt.sort_unstable();
        corrupt.dedup();
        remove(ctx, corrupt).await?;
    }
    Ok(read)
}

async fn remove(ctx: &SyncContext, ids: Vec<(Priority, Seq)>) -> Result<(), String> {
    if ids.is_empty() {
        return Ok(());
    }
    let ob = ctx.outbox.clone();
    tokio::task::spawn_blocking(move || ob.remove(&ids))
        .await
        .map_err(|e| e.to_string())?
        .map(|_| ())
        .map_err(|e| format!("outbox remove: {e}"))
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
