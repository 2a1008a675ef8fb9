//! The link monitor's active probes, carried out on their own QUIC stream of the sync
//! connection (so they do not queue behind data frames): an RTT [`Ping`] every
//! `[link] ping_interval`, and, when the link monitor asks for one, a throughput probe — a
//! burst of padded Pings, 8 KiB of padding each, written at once. Each Pong is a delivery
//! the link monitor samples like the hub's acknowledgements (so a link that slows down
//! under a long probe shows while it lasts); the probe lasts until its last Pong, however
//! slow the link turned out to be. Results and time-outs go to the link monitor as
//! [`LinkEvent`]s. [`watch_path`] reports the
//! connection's path statistics on its own task, so a sync loop blocked on a congested
//! send does not make a busy link look silent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outpost_protocols::frame::{self, FrameBuffer, MAX_PING_PAD, Message, Ping};
use outpost_protocols::uplink::quic::{self, QuicConnection};

use crate::link::monitor::{LinkEvent, LinkHandle};

/// When the hub was last heard from on a connection (acks or pongs).
#[derive(Debug)]
pub struct Heard {
    epoch: Instant,
    /// Milliseconds since `epoch`.
    last_ms: AtomicU64,
}

impl Heard {
    /// Heard now (a connection just came up).
    pub fn new() -> Heard {
        Heard {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Something arrived from the hub.
    pub fn now(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long since the hub was last heard from.
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

impl Default for Heard {
    fn default() -> Self {
        Self::new()
    }
}

/// Reports the connection's path statistics to the link monitor every `period`, and marks
/// the hub heard whenever anything (QUIC acknowledgements included) arrived. Runs until
/// aborted with the session.
pub async fn watch_path(
    conn: QuicConnection,
    link: LinkHandle,
    heard: Arc<Heard>,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut received = 0u64;
    loop {
        tick.tick().await;
        let stats = conn.path_stats();
        if stats.bytes_received > received {
            received = stats.bytes_received;
            heard.now();
        }
        link.report(LinkEvent::PathStats(stats));
    }
}

/// Nonces of throughput-probe pings have this bit set.
const PROBE_BIT: u64 = 1 << 63;
/// Padding per probe ping: each answer is a delivery the link monitor can time, so a long
/// probe on a slow link is sampled while it lasts.
const PROBE_CHUNK: u32 = 8 * 1024;

/// A throughput probe in progress.
struct Probe {
    started: Instant,
    /// Padding of each probe ping still unanswered, by nonce.
    waiting: HashMap<u64, u32>,
}

/// Runs until the stream or the connection fails; the caller aborts it with the session.
pub async fn run(
    conn: QuicConnection,
    mut link: LinkHandle,
    interval: Duration,
    heard: Arc<Heard>,
) -> String {
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return format!("ping stream: {e}"),
    };
    let epoch = Instant::now();
    let mut nonce: u64 = 0;
    let mut outstanding: HashMap<u64, Instant> = HashMap::new();
    let mut probe: Option<Probe> = None;
    let mut min_rtt: Option<Duration> = None;
    let mut buf = FrameBuffer::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                // Time-outs first.
                let limit = link.probe_timeout();
                outstanding.retain(|_, sent| {
                    let late = now.saturating_duration_since(*sent) >= limit;
                    if late {
                        link.report(LinkEvent::PingTimedOut { sent: *sent });
                    }
                    !late
                });
                nonce = nonce.wrapping_add(1) & !PROBE_BIT;
                let ping = Ping { nonce, sent_ns: ns_since(epoch, now), pad: 0 };
                if let Err(e) = send_ping(&mut send, ping).await {
                    return e;
                }
                outstanding.insert(nonce, now);
                link.report(LinkEvent::PingSent);
                // One probe at a time; it lasts until its last answer is back, however slow
                // the link turned out to be (its padding is on the link until then).
                if probe.is_none() && let Some(bytes) = link.take_probe() {
                    match start_probe(&mut send, bytes, epoch, &mut nonce).await {
                        Ok(p) => {
                            // Reported before any answer can be read (this task reads them).
                            link.report(LinkEvent::ProbeStarted { bytes });
                            probe = Some(p);
                        }
                        Err(e) => {
                            link.report(LinkEvent::ProbeFailed { bytes });
                            return e;
                        }
                    }
                }
            }
            r = quic::read_some(&mut recv, &mut chunk) => {
                match r {
                    Ok(Some(n)) => {
                        if let Err(e) = buf.push(&chunk[..n]) {
                            return format!("bad frame on the ping stream: {e}");
                        }
                    }
                    Ok(None) => return "hub closed the ping stream".into(),
                    Err(e) => return format!("ping stream: {e}"),
                }
                loop {
                    match buf.next_message() {
                        Ok(Some(Message::Pong(p))) => {
                            let now = Instant::now();
                            heard.now();
                            if p.nonce & PROBE_BIT != 0 {
                                if let Some(pr) = &mut probe
                                    && let Some(pad) = pr.waiting.remove(&p.nonce)
                                {
                                    link.report(LinkEvent::ProbeDelivered { bytes: u64::from(pad) });
                                    if pr.waiting.is_empty() {
                                        // The padding took the elapsed time less one RTT.
                                        let took = now.saturating_duration_since(pr.started)
                                            .saturating_sub(min_rtt.unwrap_or_default());
                                        link.report(LinkEvent::ProbeDone { duration: took });
                                        probe = None;
                                    }
                                }
                            } else if let Some(sent) = outstanding.remove(&p.nonce) {
                                let rtt = now.saturating_duration_since(sent);
                                min_rtt = Some(min_rtt.map_or(rtt, |m| m.min(rtt)));
                                link.report(LinkEvent::PingAnswered { rtt });
                            }
                        }
                        Ok(Some(_)) => return "unexpected message on the ping stream".into(),
                        Ok(None) => break,
                        Err(e) => return format!("bad frame on the ping stream: {e}"),
                    }
                }
            }
        }
    }
}

fn ns_since(epoch: Instant, now: Instant) -> u64 {
    now.saturating_duration_since(epoch).as_nanos() as u64
}

async fn send_ping(send: &mut quic::SendStream, ping: Ping) -> Result<(), String> {
    let bytes = frame::encode(&Message::Ping(ping)).map_err(|e| e.to_string())?;
    quic::send_all(send, &bytes)
        .await
        .map_err(|e| format!("ping stream: {e}"))
}

/// Sends `bytes` of padded pings back to back, [`PROBE_CHUNK`] each.
async fn start_probe(
    send: &mut quic::SendStream,
    bytes: u64,
    epoch: Instant,
    nonce: &mut u64,
) -> Result<Probe, String> {
    let started = Instant::now();
    let mut left = bytes;
    let mut waiting = HashMap::new();
    while left > 0 {
        let pad = left.min(u64::from(PROBE_CHUNK.min(MAX_PING_PAD))) as u32;
        left -= u64::from(pad);
        *nonce = nonce.wrapping_add(1) & !PROBE_BIT;
        let ping = Ping {
            nonce: *nonce | PROBE_BIT,
            sent_ns: ns_since(epoch, Instant::now()),
            pad,
        };
        send_ping(send, ping).await?;
        waiting.insert(*nonce | PROBE_BIT, pad);
    }
    Ok(Probe { started, waiting })
}
