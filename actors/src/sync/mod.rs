//! The sync actor: everything that leaves the gateway goes through it. It reads the
//! durable outbox (weighted by priority class), packs records into frames in the encoding of
//! the current sync mode, sends them to the hub, and deletes records from the outbox only
//! when the hub has acknowledged them. The mode follows the link class the link monitor
//! ([`crate::link::monitor`]) publishes, or `[sync] mode` when it is pinned. After a
//! reconnect everything not yet acknowledged is sent again (the hub de-duplicates).
//!
//! The frames go over the transport `[uplink] transport` names ([`uplink`]): QUIC straight
//! to the hub, or MQTT through a broker (each frame one QoS 1 message, the hub's `Ack`s
//! back on the gateway's down topic). The loop is the same for both; only what the link
//! monitor can be told differs (MQTT has no pings, path statistics or throughput probes:
//! its RTT is the broker's publish→PUBACK time).
//!
//! [`core::SyncCore`] is the pure bookkeeping (lanes, cursors, held records, encodings);
//! this module does the I/O and reports what it sees on the uplink to the link monitor.

pub mod core;
#[cfg(test)]
mod core_tests;
pub mod pinger;
pub mod uplink;

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocols::encoding::{Deadband, DeadbandConfig, SummaryConfig};
use outpost_protocols::frame::DataFrame;
use outpost_runtime::config::{Config, DeadbandSpec, GatewayId, SyncModeSetting};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{LinkClass, Priority, SyncMode, now_ns};
use outpost_runtime::record;
use outpost_runtime::storage::{GatewayOutbox, Seq};
use outpost_runtime::supervisor::{Backoff, BackoffPolicy};
use tokio::sync::Notify;

use self::core::{CoreConfig, Outgoing, SyncCore};
use self::uplink::{Connection, Incoming, Link, Transport, UplinkSettings};
use crate::link::monitor::{LinkEvent, LinkHandle};

/// Longest wait between connection attempts while the link is intermittent.
const OUTAGE_RETRY: Duration = Duration::from_millis(500);

/// Tuning of the sync loop.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Most samples per frame.
    pub max_frame_samples: usize,
    /// Most samples in flight (sent, unacknowledged).
    pub window: usize,
    pub reconnect: BackoffPolicy,
    /// Interval of the RTT pings (QUIC).
    pub ping_interval: Duration,
    /// A send that makes no progress for this long ends the session (`[uplink]
    /// send_timeout`).
    pub send_timeout: Duration,
}

/// Everything the sync loop needs.
#[derive(Clone)]
pub struct SyncContext {
    pub gateway_id: GatewayId,
    /// The transport and where it goes.
    pub uplink: UplinkSettings,
    pub options: SyncOptions,
    pub core: CoreConfig,
    /// A pinned mode, or `Auto` (follow the link class).
    pub mode: SyncModeSetting,
    pub link: LinkHandle,
    pub outbox: Arc<GatewayOutbox>,
    pub wake: Arc<Notify>,
    pub metrics: Metrics,
}

/// Builds the sync context from the config (reads the certificates, keys and passwords of
/// the transport). `link` is the link monitor's handle (it outlives restarts of the sync
/// actor).
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
    let uplink = UplinkSettings::from_config(&config.gateway.id, u)?;
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
        uplink,
        options: SyncOptions {
            max_frame_samples,
            window,
            reconnect: BackoffPolicy::new(
                u.reconnect.initial.get(),
                u.reconnect.max.get(),
                2.0,
                0.2,
            ),
            ping_interval: config.link.ping_interval.get(),
            send_timeout: u.send_timeout.get(),
        },
        core,
        mode: s.mode,
        link,
        outbox,
        wake,
        metrics,
    })
}

struct Counters {
    acked: prometheus_client::metrics::counter::Counter,
    resent: prometheus_client::metrics::counter::Counter,
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
            resent: m.counter(
                "outpost_sync_samples_resent",
                "Samples sent again that were sent before without an acknowledgement: in flight on a connection that dropped (the hub may have them and drops them as duplicates), or still in flight",
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

    /// A frame went as `parts` frames (over the transport's message size limit).
    fn split(m: &Metrics, parts: usize) {
        if parts > 1 {
            m.counter(
                "outpost_sync_frames_split",
                "Frames split in smaller ones to fit the uplink's message size limit (MQTT max_payload)",
                &[],
            )
            .inc();
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
    let transport = Transport::new(&ctx.uplink)?;
    let hub = ctx.uplink.target();
    let mut backoff = Backoff::new(ctx.options.reconnect);
    let mut core =
        SyncCore::new(ctx.core.clone(), wanted_mode(&ctx)).map_err(|e| format!("[sync]: {e}"))?;
    c.mode.set(core.mode() as i64);
    tracing::info!(mode = core.mode().as_str(), "sync started");
    loop {
        let started = Instant::now();
        match transport.connect().await {
            Ok((conn, handshake)) => {
                let probes = matches!(conn, Connection::Quic(_));
                ctx.link.report(LinkEvent::Connected { handshake, probes });
                c.connects.inc();
                c.connected.set(1);
                tracing::info!(%hub, "connected to the hub");
                let r = session(&ctx, conn, &mut core, &c).await;
                core.disconnected();
                ctx.link.report(LinkEvent::Disconnected);
                c.connected.set(0);
                c.in_flight.set(0);
                tracing::warn!(%hub, reason = %r.err().unwrap_or_else(|| "closed".into()), "uplink session ended");
            }
            Err(e) => {
                ctx.link.report(LinkEvent::ConnectFailed);
                tracing::warn!(%hub, error = %e, "cannot connect to the hub");
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
    send: Option<&mut Link>,
) -> Result<(), String> {
    // A pinned delta or summary mode backfills what it held once the link is fast.
    core.set_link(ctx.link.class());
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

async fn send_summary(ctx: &SyncContext, send: &mut Link, f: DataFrame) -> Result<(), String> {
    let n = f.summaries.len();
    match uplink::encode_within(f, send.max_frame_len()) {
        Ok(parts) => {
            let mut bytes = 0;
            for p in &parts {
                send.send(p, &ctx.link).await?;
                bytes += p.len();
            }
            Counters::split(&ctx.metrics, parts.len());
            Counters::sent(&ctx.metrics, SyncMode::Summary, "summary", n, bytes);
        }
        Err(e) => tracing::error!(error = %e, "summary frame cannot be encoded; dropped"),
    }
    Ok(())
}

/// One connection's life: Hello, then ship and apply acks until something fails; the
/// connection is closed when it ends.
async fn session(
    ctx: &SyncContext,
    conn: Connection,
    core: &mut SyncCore,
    c: &Counters,
) -> Result<(), String> {
    let mut link = conn
        .open(
            &ctx.gateway_id,
            &ctx.link,
            ctx.options.ping_interval,
            ctx.options.send_timeout,
        )
        .await?;
    let r = serve(ctx, &mut link, core, c).await;
    link.close().await;
    r
}

async fn serve(
    ctx: &SyncContext,
    send: &mut Link,
    core: &mut SyncCore,
    c: &Counters,
) -> Result<(), String> {
    let mut class_rx = ctx.link.watch_class();
    let mut stats_tick = tokio::time::interval(crate::link::monitor::TICK);
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut summary_tick = tokio::time::interval(Duration::from_millis(500));
    summary_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        switch_mode(ctx, core, c, Some(send)).await?;
        // Read and send until the window is full or nothing new is read (bounded, so acks
        // are applied in between).
        for _ in 0..64 {
            let read = fill(ctx, core, c).await?;
            let mut sent = 0;
            while let Some(out) = core.next_frame() {
                send_frame(ctx, core, c, send, out).await?;
                sent += 1;
            }
            if (read == 0 && sent == 0) || core.window_full() {
                break;
            }
        }
        c.held.set(i64::from(core.backfill_pending()));
        tokio::select! {
            i = send.next() => match i? {
                Incoming::Ack(ack) => {
                    let (done, bytes) = core.acked(&ack);
                    ctx.link.report(LinkEvent::Delivered { bytes });
                    c.acked.inc_by(done.len() as u64);
                    c.in_flight.set(core.in_flight() as i64);
                    remove(ctx, done).await?;
                }
                Incoming::PingsStopped(why) => {
                    tracing::warn!(reason = %why, "RTT pings stopped; the link class now rests on data traffic only");
                }
            },
            _ = ctx.wake.notified() => {}
            _ = class_rx.changed() => {}
            _ = stats_tick.tick() => send.observe(&ctx.link)?,
            _ = summary_tick.tick() => {
                for f in core.poll_summaries(now_ns()) {
                    send_summary(ctx, send, f).await?;
                }
            }
        }
    }
}

async fn send_frame(
    ctx: &SyncContext,
    core: &mut SyncCore,
    c: &Counters,
    send: &mut Link,
    out: Outgoing,
) -> Result<(), String> {
    let mode = core.mode();
    let Outgoing { frame, lane, seqs } = out;
    let n = seqs.len();
    // One frame, or several when the transport limits message sizes (MQTT).
    match uplink::encode_within(frame, send.max_frame_len()) {
        Ok(parts) => {
            let bytes: usize = parts.iter().map(Vec::len).sum();
            // In flight before the first byte goes: if the connection fails during the
            // send, `disconnected` knows these records were lost in flight and they are
            // sent again. (Committed after the send, a failed send left them behind the
            // live cursor, neither in flight nor held: never sent again.)
            let resent = core.stats().resent;
            core.commit(lane, &seqs, bytes);
            c.resent.inc_by(core.stats().resent - resent);
            for p in &parts {
                send.send(p, &ctx.link).await?;
            }
            Counters::split(&ctx.metrics, parts.len());
            Counters::sent(&ctx.metrics, mode, lane.label(), n, bytes);
            // Backlogged: what is left waits for acknowledgements. (Frames still to come in
            // this burst do not count: they go out at once, the link is not holding them.)
            let backlogged = core.window_full();
            ctx.link.report(LinkEvent::Sent {
                bytes: bytes as u64,
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

/// Reads the outbox for every lane that asks, decoding records straight from the stored
/// segments, and feeds the core; undecodable records and unreadable segments are dropped
/// from the outbox and counted.
///
/// Outbox reads and removals run on the sync task itself: with segments they are a few
/// storage operations per frame (microseconds, served from sled's cache), cheaper than
/// the hop to a blocking thread and back they used to take.
async fn fill(ctx: &SyncContext, core: &mut SyncCore, c: &Counters) -> Result<usize, String> {
    let reqs = core.scans();
    if reqs.is_empty() {
        return Ok(0);
    }
    let mut corrupt = Vec::new();
    let mut read = 0;
    for req in &reqs {
        let p = req.lane.class();
        let mut ok = Vec::with_capacity(req.limit.min(4096));
        let end = ctx
            .outbox
            .scan_each(
                p,
                req.after,
                req.limit,
                512 * 1024,
                &mut |seq, v| match record::decode(v) {
                    Ok(s) => ok.push((seq, s)),
                    Err(e) => {
                        tracing::error!(seq, error = %e, "undecodable outbox record dropped");
                        corrupt.push((p, seq));
                    }
                },
            )
            .map_err(|e| format!("outbox scan: {e}"))?;
        read += end.records.max(usize::from(end.last.is_some()));
        core.fill(req, ok, end.last);
        if !end.corrupt.is_empty() {
            let n = ctx
                .outbox
                .drop_segments(p, &end.corrupt)
                .map_err(|e| format!("outbox drop: {e}"))?;
            c.corrupt.inc_by(n);
            read += 1;
        }
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
    ctx.outbox
        .remove(&ids)
        .map(|_| ())
        .map_err(|e| format!("outbox remove: {e}"))
}
