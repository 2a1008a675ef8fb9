//! The sync actor: everything that leaves the gateway goes through it. It reads the
//! durable outbox (highest priority class first), packs records into frames, sends them to
//! the hub over QUIC, and deletes records from the outbox only when the hub has
//! acknowledged them. After a reconnect everything not yet acknowledged is sent again
//! (the hub de-duplicates). [`InFlight`] is the pure bookkeeping; the actor does the I/O.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::frame::{self, Ack, DataFrame, Encoding, FrameBuffer, Hello, Message};
use outpost_protocols::uplink::quic::{self, ClientOptions, ClientTls, QuicClient, QuicConnection};
use outpost_runtime::config::UplinkConfig;
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::Priority;
use outpost_runtime::record;
use outpost_runtime::storage::{GatewayOutbox, Seq};
use outpost_runtime::supervisor::{Backoff, BackoffPolicy};
use tokio::sync::{Notify, mpsc};

use crate::drain::DrainScheduler;

/// Samples sent but not yet acknowledged, by sequence.
#[derive(Debug, Default)]
pub struct InFlight {
    by_seq: BTreeMap<Seq, Priority>,
    /// Per class, the highest sequence sent on this connection (the outbox scan cursor).
    cursor: [Option<Seq>; 4],
}

impl InFlight {
    pub fn len(&self) -> usize {
        self.by_seq.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    /// Where to continue scanning `priority` in the outbox.
    pub fn cursor(&self, priority: Priority) -> Option<Seq> {
        self.cursor[priority as usize]
    }

    /// Records that `seqs` of `priority` were sent.
    pub fn sent(&mut self, priority: Priority, seqs: &[Seq]) {
        for &s in seqs {
            self.by_seq.insert(s, priority);
        }
        if let Some(&max) = seqs.iter().max() {
            let c = &mut self.cursor[priority as usize];
            *c = Some(c.map_or(max, |c| c.max(max)));
        }
    }

    /// Applies an acknowledgement: returns the (class, sequence) pairs to delete from the
    /// outbox. Acknowledged sequences that are not in flight are ignored.
    pub fn acked(&mut self, ack: &Ack) -> Vec<(Priority, Seq)> {
        let mut out = Vec::new();
        for r in &ack.ranges {
            let keys: Vec<Seq> = self
                .by_seq
                .range(r.first..=r.last)
                .map(|(s, _)| *s)
                .collect();
            for s in keys {
                if let Some(p) = self.by_seq.remove(&s) {
                    out.push((p, s));
                }
            }
        }
        out
    }

    /// A new connection: nothing is in flight, scanning restarts from the oldest record.
    pub fn reset(&mut self) {
        self.by_seq.clear();
        self.cursor = [None; 4];
    }
}

/// Tuning of the sync loop.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Most samples per frame.
    pub max_frame_samples: usize,
    /// Most samples in flight (sent, unacknowledged).
    pub window: usize,
    pub keep_alive: Duration,
    pub reconnect: BackoffPolicy,
}

/// Everything the sync loop needs.
#[derive(Clone)]
pub struct SyncContext {
    pub gateway_id: String,
    pub hub: SocketAddr,
    pub server_name: String,
    pub tls: Arc<ClientTls>,
    pub options: SyncOptions,
    pub outbox: Arc<GatewayOutbox>,
    pub wake: Arc<Notify>,
    pub metrics: Metrics,
}

/// Builds the sync context from the uplink config (reads the certificates).
pub fn context_from_config(
    gateway_id: &str,
    u: &UplinkConfig,
    outbox: Arc<GatewayOutbox>,
    wake: Arc<Notify>,
    metrics: Metrics,
) -> Result<SyncContext, String> {
    // Only a config with transport = "mqtt" lacks them: that transport is not wired in yet.
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
    Ok(SyncContext {
        gateway_id: gateway_id.to_owned(),
        hub,
        server_name: u.server_name.clone().ok_or_else(|| need("server_name"))?,
        tls: Arc::new(tls),
        options: SyncOptions {
            max_frame_samples: u.max_frame_samples.get() as usize,
            window: (u.max_frame_samples.get() as usize * 8).max(1),
            keep_alive: u.keep_alive.get(),
            reconnect: BackoffPolicy::new(
                u.reconnect.initial.get(),
                u.reconnect.max.get(),
                2.0,
                0.2,
            ),
        },
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
    sent_samples: prometheus_client::metrics::counter::Counter,
    sent_bytes: prometheus_client::metrics::counter::Counter,
    acked: prometheus_client::metrics::counter::Counter,
    connects: prometheus_client::metrics::counter::Counter,
    corrupt: prometheus_client::metrics::counter::Counter,
    connected: prometheus_client::metrics::gauge::Gauge,
    in_flight: prometheus_client::metrics::gauge::Gauge,
}

/// Runs the sync loop forever: connect (with backoff), ship, reconnect. Returns only on an
/// error that a restart cannot fix (none today: connection errors are retried here).
pub async fn run(ctx: SyncContext) -> Result<(), String> {
    let m = &ctx.metrics;
    let c = Counters {
        sent_samples: m.counter(
            "outpost_sync_samples_sent",
            "Samples sent to the hub (resends included)",
            &[("mode", "full")],
        ),
        sent_bytes: m.counter(
            "outpost_sync_bytes_sent",
            "Frame bytes sent to the hub",
            &[("mode", "full")],
        ),
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
            "Outbox records that could not be decoded (dropped)",
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
    };
    let client = QuicClient::new(
        &ctx.tls,
        ClientOptions {
            keep_alive: ctx.options.keep_alive,
            idle_timeout: (ctx.options.keep_alive * 4).max(Duration::from_secs(2)),
            ..ClientOptions::default()
        },
    )
    .map_err(|e| format!("uplink TLS setup: {e}"))?;
    let mut backoff = Backoff::new(ctx.options.reconnect);
    let mut inflight = InFlight::default();
    loop {
        let started = tokio::time::Instant::now();
        match client.connect(ctx.hub, &ctx.server_name).await {
            Ok(conn) => {
                c.connects.inc();
                c.connected.set(1);
                tracing::info!(hub = %ctx.hub, "connected to the hub");
                inflight.reset();
                let r = session(&ctx, &conn, &mut inflight, &c).await;
                c.connected.set(0);
                c.in_flight.set(0);
                conn.close(quic::CLOSE_SHUTDOWN, b"reconnecting");
                tracing::warn!(hub = %ctx.hub, reason = %r.unwrap_err_or_default(), "uplink session ended");
            }
            Err(e) => {
                tracing::warn!(hub = %ctx.hub, error = %e, "cannot connect to the hub");
            }
        }
        let (attempt, delay) = backoff.next_delay(Some(started.elapsed()), fastrand::f64());
        tracing::debug!(
            attempt,
            delay_ms = delay.as_millis() as u64,
            "reconnecting to the hub"
        );
        tokio::time::sleep(delay).await;
    }
}

trait ErrDefault {
    fn unwrap_err_or_default(self) -> String;
}
impl ErrDefault for Result<(), String> {
    fn unwrap_err_or_default(self) -> String {
        self.err().unwrap_or_else(|| "closed".into())
    }
}

/// One connection's life: Hello, then ship and apply acks until something fails.
async fn session(
    ctx: &SyncContext,
    conn: &QuicConnection,
    inflight: &mut InFlight,
    c: &Counters,
) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
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
    let reader = tokio::spawn(async move {
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
    });
    let _abort_reader = AbortOnDrop(reader);
    let mut drain = DrainScheduler::new(
        crate::drain::DEFAULT_WEIGHTS,
        (ctx.options.max_frame_samples / 4).max(1) as u32,
    );

    loop {
        // Fill the window, highest class first.
        while inflight.len() < ctx.options.window {
            let room = (ctx.options.window - inflight.len()).min(ctx.options.max_frame_samples);
            let Some((p, recs)) = next_batch(ctx, inflight, &mut drain, room).await? else {
                break;
            };
            let mut seqs = Vec::with_capacity(recs.len());
            let mut samples = Vec::with_capacity(recs.len());
            let mut corrupt = Vec::new();
            for r in &recs {
                match record::decode(&r.value) {
                    Ok(s) => {
                        seqs.push(r.seq);
                        samples.push(s);
                    }
                    Err(e) => {
                        tracing::error!(seq = r.seq, error = %e, "undecodable outbox record dropped");
                        c.corrupt.inc();
                        corrupt.push((p, r.seq));
                    }
                }
            }
            if !corrupt.is_empty() {
                remove(ctx, corrupt).await?;
            }
            let last = recs.last().map(|r| r.seq);
            if samples.is_empty() {
                if let Some(l) = last {
                    inflight.sent(p, &[]);
                    inflight.cursor[p as usize] = Some(l);
                }
                continue;
            }
            let frame = DataFrame::from_samples(
                &ctx.gateway_id,
                p,
                Encoding::Raw,
                seqs.iter().copied().zip(samples.iter()),
            );
            let bytes = frame::encode(&Message::Data(frame)).map_err(|e| e.to_string())?;
            quic::send_all(&mut send, &bytes)
                .await
                .map_err(|e| e.to_string())?;
            c.sent_samples.inc_by(seqs.len() as u64);
            c.sent_bytes.inc_by(bytes.len() as u64);
            inflight.sent(p, &seqs);
            c.in_flight.set(inflight.len() as i64);
        }
        tokio::select! {
            a = ack_rx.recv() => {
                let ack = a.ok_or_else(|| "ack reader stopped".to_string())??;
                let done = inflight.acked(&ack);
                c.acked.inc_by(done.len() as u64);
                c.in_flight.set(inflight.len() as i64);
                remove(ctx, done).await?;
            }
            _ = ctx.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            e = conn.closed() => return Err(format!("connection closed: {e}")),
        }
    }
}

/// The next records to send: the class the weighted scheduler picks among those with
/// unsent records.
async fn next_batch(
    ctx: &SyncContext,
    inflight: &InFlight,
    drain: &mut DrainScheduler,
    room: usize,
) -> Result<Option<(Priority, Vec<outpost_runtime::storage::Record>)>, String> {
    let cursors = Priority::ALL.map(|p| inflight.cursor(p));
    let ob = ctx.outbox.clone();
    // One blocking call scans every class (a batch each), so the choice sees them all.
    let mut batches = tokio::task::spawn_blocking(move || {
        Priority::ALL
            .iter()
            .map(|&p| ob.scan(p, cursors[p as usize], room, 512 * 1024))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("outbox scan: {e}"))?;
    let waiting = [0, 1, 2, 3].map(|i| !batches[i].is_empty());
    let Some(p) = drain.next(waiting) else {
        return Ok(None);
    };
    let recs = std::mem::take(&mut batches[p as usize]);
    drain.sent(p, recs.len());
    Ok(Some((p, recs)))
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

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflight_tracks_cursors_and_acks() {
        let mut f = InFlight::default();
        f.sent(Priority::Normal, &[5, 6, 7]);
        f.sent(Priority::Critical, &[8]);
        assert_eq!(f.cursor(Priority::Normal), Some(7));
        assert_eq!(f.cursor(Priority::Bulk), None);
        let ack = Ack::from_seqs("gw", [6, 7, 8, 100]);
        let mut done = f.acked(&ack);
        done.sort();
        assert_eq!(
            done,
            vec![
                (Priority::Critical, 8),
                (Priority::Normal, 6),
                (Priority::Normal, 7)
            ]
        );
        assert_eq!(f.len(), 1);
        assert!(f.acked(&ack).is_empty(), "acks are idempotent");
        f.reset();
        assert!(f.is_empty() && f.cursor(Priority::Normal).is_none());
    }
}
