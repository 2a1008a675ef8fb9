//! A userspace link emulator: a UDP proxy on 127.0.0.1 between a gateway and the hub
//! (QUIC is UDP) that applies a scripted [`Schedule`] of rate limit, one-way delay, jitter,
//! random loss and outages, per direction.
//!
//! Model of one direction, per client:
//!
//! ```text
//!  datagram ─► outage? drop ─► loss? drop ─► bottleneck queue (bytes, bounded: tail drop)
//!          ─► serialiser at `rate × jitter factor` ─► delay line (delay + jitter, in order)
//!          ─► outage at delivery? drop ─► out
//! ```
//!
//! - The bottleneck drains at the phase's rate (a token bucket with no stored credit: an
//!   idle link does not save up for a burst). Its queue holds `queue_bytes`, by default two
//!   bandwidth-delay products (at least 16 full-size packets), like a real bottleneck
//!   buffer; beyond it, arrivals are dropped.
//! - Rate jitter: the rate is multiplied by a factor drawn uniformly in `1 ± rate_jitter`,
//!   re-drawn every [`Schedule::rate_jitter_period`] (seeded).
//! - Delay jitter adds `0..jitter` to each packet's delay, keeping the order (QUIC would
//!   read heavy reordering as loss).
//! - An outage drops everything: arrivals, the queue and the delay line.
//! - Phases change at their scheduled times; after the last phase the emulator stops by
//!   itself (sockets closed, tasks ended).
//!
//! Each new client address gets its own upstream socket (so a gateway that reconnects from
//! a new port gets through), up to [`MAX_CLIENTS`] at a time. When the table is full, a new
//! client takes the place of the least recently active one if that one has been silent for
//! [`CLIENT_IDLE`] (as a NAT recycles its oldest mapping): a gateway that opens a new UDP
//! socket for every connection attempt, hundreds of times through a long flapping
//! schedule, keeps getting through. Only when every served client is active are datagrams
//! from a new one refused.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Most distinct client addresses served; datagrams from more are dropped.
pub const MAX_CLIENTS: usize = 64;
/// Silence after which a client's place may be given to a new one when the table is full.
pub const CLIENT_IDLE: Duration = Duration::from_secs(1);
/// Datagrams waiting between a socket and its shaper at most (beyond: dropped as queue
/// overflow).
const CHANNEL_DATAGRAMS: usize = 8_192;
/// A full-size datagram, for queue sizing.
const FULL_PACKET: usize = 1_500;

/// One direction of the link during a phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// Bottleneck rate, bits per second; `None`: unlimited.
    pub rate_bps: Option<f64>,
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly in `0..jitter` per packet.
    pub jitter: Duration,
    /// Probability of dropping each datagram, 0..1.
    pub loss: f64,
    /// Rate jitter: the rate varies by up to this fraction (0.3 = ±30 %).
    pub rate_jitter: f64,
    /// Bottleneck queue, bytes; `None`: two bandwidth-delay products (RTT = 2 × delay),
    /// at least 16 full-size packets.
    pub queue_bytes: Option<usize>,
}

impl LinkParams {
    /// A link of `rate_bps` (`None`: unlimited) with one-way `delay`, no loss, no jitter.
    pub fn new(rate_bps: Option<f64>, delay: Duration) -> Self {
        Self {
            rate_bps,
            delay,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_jitter: 0.0,
            queue_bytes: None,
        }
    }

    /// The bottleneck queue limit in bytes.
    pub fn queue_limit(&self) -> usize {
        if let Some(q) = self.queue_bytes {
            return q;
        }
        match self.rate_bps {
            None => 64 * 1024 * 1024,
            Some(r) => {
                let bdp = r / 8.0 * (2.0 * self.delay.as_secs_f64());
                ((2.0 * bdp) as usize).max(16 * FULL_PACKET)
            }
        }
    }
}

/// A stretch of time with fixed link parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    /// How long it lasts.
    pub duration: Duration,
    /// Gateway → hub.
    pub up: LinkParams,
    /// Hub → gateway.
    pub down: LinkParams,
    /// Drop everything.
    pub outage: bool,
    /// A name for reports.
    pub label: String,
}

impl Phase {
    /// The same rate both ways, `rtt` split evenly into one-way delays.
    pub fn symmetric(
        label: &str,
        duration: Duration,
        rate_bps: Option<f64>,
        rtt: Duration,
    ) -> Self {
        let p = LinkParams::new(rate_bps, rtt / 2);
        Self {
            duration,
            up: p,
            down: p,
            outage: false,
            label: label.to_string(),
        }
    }

    /// Nothing gets through for `duration`.
    pub fn outage(label: &str, duration: Duration) -> Self {
        let p = LinkParams::new(None, Duration::ZERO);
        Self {
            duration,
            up: p,
            down: p,
            outage: true,
            label: label.to_string(),
        }
    }

    /// Sets random loss both ways.
    pub fn with_loss(mut self, loss: f64) -> Self {
        self.up.loss = loss;
        self.down.loss = loss;
        self
    }

    /// Sets rate jitter (±fraction) both ways.
    pub fn with_rate_jitter(mut self, fraction: f64) -> Self {
        self.up.rate_jitter = fraction;
        self.down.rate_jitter = fraction;
        self
    }

    /// Sets delay jitter both ways.
    pub fn with_delay_jitter(mut self, jitter: Duration) -> Self {
        self.up.jitter = jitter;
        self.down.jitter = jitter;
        self
    }

    /// Sets the bottleneck queue both ways.
    pub fn with_queue_bytes(mut self, bytes: usize) -> Self {
        self.up.queue_bytes = Some(bytes);
        self.down.queue_bytes = Some(bytes);
        self
    }
}

/// A scripted sequence of phases.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The phases, in order.
    pub phases: Vec<Phase>,
    /// How often the rate-jitter factor is re-drawn.
    pub rate_jitter_period: Duration,
}

impl Schedule {
    /// A schedule of `phases` with rate jitter re-drawn every 100 ms.
    pub fn new(phases: Vec<Phase>) -> Self {
        Self {
            phases,
            rate_jitter_period: Duration::from_millis(100),
        }
    }

    /// Total length.
    pub fn total(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }

    /// The phase in force `elapsed` after the start, with its index and start offset.
    pub fn phase_at(&self, elapsed: Duration) -> Option<(usize, Duration, &Phase)> {
        let mut start = Duration::ZERO;
        for (i, p) in self.phases.iter().enumerate() {
            if elapsed < start + p.duration {
                return Some((i, start, p));
            }
            start += p.duration;
        }
        None
    }

    /// The rate-jitter factor (in `1 ± fraction`) at `elapsed`, from `seed`.
    pub fn jitter_factor(&self, seed: u64, elapsed: Duration, fraction: f64) -> f64 {
        if fraction <= 0.0 {
            return 1.0;
        }
        let period = self.rate_jitter_period.as_nanos().max(1);
        let k = (elapsed.as_nanos() / period) as u64;
        let u = fastrand::Rng::with_seed(seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).f64();
        1.0 + fraction * (2.0 * u - 1.0)
    }
}

/// Counters of one direction.
#[derive(Debug, Default)]
struct DirCounters {
    received: AtomicU64,
    delivered: AtomicU64,
    bytes_delivered: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_outage: AtomicU64,
}

/// What happened to the datagrams of one direction so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Datagrams that entered the emulator.
    pub received: u64,
    /// Datagrams delivered.
    pub delivered: u64,
    /// Bytes delivered.
    pub bytes_delivered: u64,
    /// Dropped by random loss.
    pub dropped_loss: u64,
    /// Dropped because the bottleneck queue was full.
    pub dropped_queue: u64,
    /// Dropped by an outage.
    pub dropped_outage: u64,
}

impl DirCounters {
    fn snapshot(&self) -> DirStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DirStats {
            received: l(&self.received),
            delivered: l(&self.delivered),
            bytes_delivered: l(&self.bytes_delivered),
            dropped_loss: l(&self.dropped_loss),
            dropped_queue: l(&self.dropped_queue),
            dropped_outage: l(&self.dropped_outage),
        }
    }
}

fn bump(a: &AtomicU64, by: u64) {
    a.fetch_add(by, Ordering::Relaxed);
}

/// Both directions' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmulatorStats {
    /// Gateway → hub.
    pub up: DirStats,
    /// Hub → gateway.
    pub down: DirStats,
    /// Datagrams dropped because [`MAX_CLIENTS`] active clients were already served.
    pub refused_clients: u64,
    /// Silent clients whose place was given to a new client.
    pub recycled_clients: u64,
}

#[derive(Debug, Default)]
struct Counters {
    up: DirCounters,
    down: DirCounters,
    refused_clients: AtomicU64,
    recycled_clients: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

/// A running emulator. Dropping it stops it.
#[derive(Debug)]
pub struct Emulator {
    addr: SocketAddr,
    start: Instant,
    end: Instant,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Emulator {
    /// Binds `127.0.0.1:0` and forwards what clients send there to `upstream` (and the
    /// replies back) under `schedule`, starting now. `seed` drives loss, jitter and rate
    /// jitter.
    pub async fn start(upstream: SocketAddr, schedule: Schedule, seed: u64) -> io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let start = Instant::now();
        let end = start + schedule.total();
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(run(
            front,
            upstream,
            Arc::new(schedule),
            seed,
            start,
            end,
            Arc::clone(&counters),
        ));
        Ok(Self {
            addr,
            start,
            end,
            counters,
            task,
        })
    }

    /// Where clients send (the "hub" address as the gateway sees it).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// When the schedule started.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// When the schedule ends (and the emulator stops).
    pub fn ends(&self) -> Instant {
        self.end
    }

    /// Counters so far.
    pub fn stats(&self) -> EmulatorStats {
        EmulatorStats {
            up: self.counters.up.snapshot(),
            down: self.counters.down.snapshot(),
            refused_clients: self.counters.refused_clients.load(Ordering::Relaxed),
            recycled_clients: self.counters.recycled_clients.load(Ordering::Relaxed),
        }
    }

    /// Waits until the emulator has stopped by itself.
    pub async fn finished(&mut self) {
        let _ = (&mut self.task).await;
    }
}

async fn run(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    schedule: Arc<Schedule>,
    seed: u64,
    start: Instant,
    end: Instant,
    counters: Arc<Counters>,
) {
    let mut tasks = JoinSet::new();
    let mut clients: HashMap<SocketAddr, Client> = HashMap::new();
    // Distinct clients ever served (seeds each one's random streams).
    let mut n_clients = 0u64;
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = tokio::select! {
            r = front.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors from a gone client surface here on some systems: ignore.
                Err(_) => continue,
            },
            _ = tokio::time::sleep_until(end) => break,
        };
        let now = Instant::now();
        let tx = match clients.get_mut(&from) {
            Some(c) => {
                c.last = now;
                c.tx.clone()
            }
            None => {
                if clients.len() >= MAX_CLIENTS {
                    let idlest = clients
                        .iter()
                        .min_by_key(|(_, c)| c.last)
                        .map(|(a, c)| (*a, c.last));
                    match idlest {
                        Some((addr, last)) if now - last >= CLIENT_IDLE => {
                            // Dropping its sender ends its up shaper; aborting its reader
                            // ends its down shaper; then its upstream socket closes.
                            if let Some(old) = clients.remove(&addr) {
                                old.read_back.abort();
                            }
                            while tasks.try_join_next().is_some() {}
                            bump(&counters.recycled_clients, 1);
                        }
                        _ => {
                            bump(&counters.refused_clients, 1);
                            continue;
                        }
                    }
                }
                let Ok(back) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if back.connect(upstream).await.is_err() {
                    continue;
                }
                let back = Arc::new(back);
                let (up_tx, up_rx) = mpsc::channel(CHANNEL_DATAGRAMS);
                let (down_tx, down_rx) = mpsc::channel(CHANNEL_DATAGRAMS);
                let n_client = n_clients;
                n_clients += 1;
                tasks.spawn(shape(
                    up_rx,
                    Out::Connected(Arc::clone(&back)),
                    Dir::Up,
                    Arc::clone(&schedule),
                    seed,
                    seed.wrapping_add(2 * n_client + 1),
                    start,
                    end,
                    Arc::clone(&counters),
                ));
                tasks.spawn(shape(
                    down_rx,
                    Out::To(Arc::clone(&front), from),
                    Dir::Down,
                    Arc::clone(&schedule),
                    seed,
                    seed.wrapping_add(2 * n_client + 2),
                    start,
                    end,
                    Arc::clone(&counters),
                ));
                let read_back = tasks.spawn(read_back(back, down_tx, end, Arc::clone(&counters)));
                clients.insert(
                    from,
                    Client {
                        tx: up_tx.clone(),
                        last: now,
                        read_back,
                    },
                );
                up_tx
            }
        };
        bump(&counters.up.received, 1);
        if tx.try_send(buf[..n].to_vec()).is_err() {
            bump(&counters.up.dropped_queue, 1);
        }
    }
    tasks.shutdown().await;
}

/// One served client: where its datagrams go, when it last sent one, and the task reading
/// the hub's replies for it.
struct Client {
    tx: mpsc::Sender<Vec<u8>>,
    last: Instant,
    read_back: tokio::task::AbortHandle,
}

async fn read_back(
    back: Arc<UdpSocket>,
    tx: mpsc::Sender<Vec<u8>>,
    end: Instant,
    counters: Arc<Counters>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = tokio::select! {
            r = back.recv(&mut buf) => match r {
                Ok(n) => n,
                Err(_) => continue,
            },
            _ = tokio::time::sleep_until(end) => return,
        };
        bump(&counters.down.received, 1);
        if tx.try_send(buf[..n].to_vec()).is_err() {
            bump(&counters.down.dropped_queue, 1);
        }
    }
}

enum Out {
    Connected(Arc<UdpSocket>),
    To(Arc<UdpSocket>, SocketAddr),
}

impl Out {
    async fn send(&self, data: &[u8]) {
        // A full socket buffer or a gone peer is loss, as on a real link.
        let _ = match self {
            Out::Connected(s) => s.send(data).await,
            Out::To(s, to) => s.send_to(data, *to).await,
        };
    }
}

/// One direction's bottleneck, delay line and drops; see the module documentation.
#[allow(clippy::too_many_arguments)]
async fn shape(
    mut rx: mpsc::Receiver<Vec<u8>>,
    out: Out,
    dir: Dir,
    schedule: Arc<Schedule>,
    jitter_seed: u64,
    rng_seed: u64,
    start: Instant,
    end: Instant,
    counters: Arc<Counters>,
) {
    let c = match dir {
        Dir::Up => &counters.up,
        Dir::Down => &counters.down,
    };
    let mut rng = fastrand::Rng::with_seed(rng_seed);
    let mut queue: VecDeque<Vec<u8>> = VecDeque::new();
    let mut queued_bytes = 0usize;
    let mut free_at = start;
    let mut line: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut last_due = start;
    let mut open = true;
    loop {
        let now = Instant::now();
        if now >= end {
            return;
        }
        let elapsed = now - start;
        let Some((_, phase_start, phase)) = schedule.phase_at(elapsed) else {
            return;
        };
        let p = match dir {
            Dir::Up => phase.up,
            Dir::Down => phase.down,
        };
        let phase_end = start + phase_start + phase.duration;

        // Arrivals.
        while let Ok(d) = rx.try_recv() {
            if phase.outage {
                bump(&c.dropped_outage, 1);
            } else if p.loss > 0.0 && rng.f64() < p.loss {
                bump(&c.dropped_loss, 1);
            } else if queued_bytes + d.len() > p.queue_limit() {
                bump(&c.dropped_queue, 1);
            } else {
                if queue.is_empty() && free_at < now {
                    free_at = now;
                }
                queued_bytes += d.len();
                queue.push_back(d);
            }
        }
        if phase.outage {
            let dropped = queue.len() + line.len();
            bump(&c.dropped_outage, dropped as u64);
            queue.clear();
            queued_bytes = 0;
            line.clear();
        }

        // The bottleneck: serialise at the (jittered) rate.
        while let Some(d) = queue.front() {
            let tx_time = match p.rate_bps {
                None => Duration::ZERO,
                Some(r) => {
                    let k = schedule.jitter_factor(jitter_seed, elapsed, p.rate_jitter);
                    Duration::from_secs_f64(d.len() as f64 * 8.0 / (r * k).max(1.0))
                }
            };
            if p.rate_bps.is_some() && free_at > now {
                break;
            }
            // Timer lateness is made up for, up to 10 ms (no more: an idle link saves
            // no credit).
            free_at = free_at.max(now - Duration::from_millis(10).min(elapsed)) + tx_time;
            let Some(d) = queue.pop_front() else { break };
            queued_bytes -= d.len();
            let extra = if p.jitter.is_zero() {
                Duration::ZERO
            } else {
                p.jitter.mul_f64(rng.f64())
            };
            let due = (free_at + p.delay + extra).max(last_due);
            last_due = due;
            line.push_back((due, d));
        }

        // The delay line.
        while let Some((due, _)) = line.front() {
            if *due > now {
                break;
            }
            let Some((_, d)) = line.pop_front() else {
                break;
            };
            bump(&c.delivered, 1);
            bump(&c.bytes_delivered, d.len() as u64);
            out.send(&d).await;
        }

        // Sleep until something is due.
        let mut wake = phase_end.min(end);
        if !queue.is_empty() {
            wake = wake.min(free_at);
        }
        if let Some((due, _)) = line.front() {
            wake = wake.min(*due);
        }
        if p.rate_jitter > 0.0 && !queue.is_empty() {
            wake = wake.min(now + schedule.rate_jitter_period);
        }
        if open {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(d) => {
                        // Put it back through the arrival path on the next turn.
                        if phase.outage {
                            bump(&c.dropped_outage, 1);
                        } else if p.loss > 0.0 && rng.f64() < p.loss {
                            bump(&c.dropped_loss, 1);
                        } else if queued_bytes + d.len() > p.queue_limit() {
                            bump(&c.dropped_queue, 1);
                        } else {
                            let now = Instant::now();
                            if queue.is_empty() && free_at < now {
                                free_at = now;
                            }
                            queued_bytes += d.len();
                            queue.push_back(d);
                        }
                    }
                    None => open = false,
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
        } else {
            if queue.is_empty() && line.is_empty() {
                return;
            }
            tokio::time::sleep_until(wake).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// An echo server: sends back every datagram it gets.
    async fn echo() -> (SocketAddr, JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (addr, h)
    }

    /// A sink that counts bytes and datagrams with their arrival times.
    async fn sink() -> (SocketAddr, mpsc::UnboundedReceiver<(Instant, usize)>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = s.recv(&mut buf).await {
                if tx.send((Instant::now(), n)).is_err() {
                    return;
                }
            }
        });
        (addr, rx)
    }

    #[test]
    fn schedule_lookup_and_queue_sizing() {
        let s = Schedule::new(vec![
            Phase::symmetric("a", ms(100), Some(8e6), ms(20)),
            Phase::outage("b", ms(50)),
        ]);
        assert_eq!(s.total(), ms(150));
        assert_eq!(s.phase_at(ms(99)).unwrap().0, 0);
        assert_eq!(s.phase_at(ms(100)).unwrap().0, 1);
        assert!(s.phase_at(ms(150)).is_none());
        // 8 Mbit/s × 20 ms = 20 kB BDP → 40 kB queue.
        assert_eq!(s.phases[0].up.queue_limit(), 40_000);
        let f: Vec<f64> = (0..100)
            .map(|i| s.jitter_factor(1, ms(i * 100), 0.3))
            .collect();
        assert!(f.iter().all(|k| (0.7..=1.3).contains(k)));
        assert!(f.iter().any(|k| *k < 0.9) && f.iter().any(|k| *k > 1.1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delivers_the_configured_rate() {
        let (dst, mut rx) = sink().await;
        // 4 Mbit/s, sent at ~8 Mbit/s for 2 s: the bottleneck caps it.
        let emu = Emulator::start(
            dst,
            Schedule::new(vec![Phase::symmetric("r", ms(4_000), Some(4e6), ms(10))]),
            1,
        )
        .await
        .unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let t0 = Instant::now();
        let mut sent = 0u64;
        while t0.elapsed() < ms(2_000) {
            for _ in 0..10 {
                tx.send_to(&[0u8; 1_000], emu.local_addr()).await.unwrap();
                sent += 1;
            }
            tokio::time::sleep(ms(10)).await;
        }
        tokio::time::sleep(ms(300)).await;
        let mut arrivals = Vec::new();
        while let Ok(a) = rx.try_recv() {
            arrivals.push(a);
        }
        // Rate over the steady part (after the first 200 ms, until the sender stopped).
        let from = t0 + ms(200);
        let to = t0 + ms(2_000);
        let bytes: usize = arrivals
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, n)| n)
            .sum();
        let rate = bytes as f64 * 8.0 / (to - from).as_secs_f64();
        assert!((rate - 4e6).abs() / 4e6 < 0.12, "delivered {rate} bit/s");
        let st = emu.stats();
        assert!(
            st.up.dropped_queue > 0,
            "overload must overflow the queue: {st:?}"
        );
        assert_eq!(st.up.received, sent);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn applies_delay_loss_and_outage() {
        let (dst, _h) = echo().await;
        let schedule = Schedule::new(vec![
            Phase::symmetric("delay", ms(1_500), None, ms(200)),
            Phase::symmetric("loss", ms(2_500), None, ms(10)).with_loss(0.2),
            Phase::outage("down", ms(1_000)),
            Phase::symmetric("back", ms(1_000), None, ms(10)),
        ]);
        let emu = Emulator::start(dst, schedule, 7).await.unwrap();
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.connect(emu.local_addr()).await.unwrap();
        let mut buf = [0u8; 64];

        // Delay: RTT = 2 × 100 ms.
        let mut rtts = Vec::new();
        for i in 0..5u8 {
            let t = Instant::now();
            s.send(&[i]).await.unwrap();
            tokio::time::timeout(ms(1_000), s.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            rtts.push(t.elapsed());
        }
        for r in &rtts {
            assert!(*r >= ms(200) && *r < ms(260), "rtt {r:?}");
        }

        // Loss: 20 % each way → 64 % of echoes come back.
        tokio::time::sleep_until(emu.started() + ms(1_600)).await;
        let n = 2_000u32;
        let s = Arc::new(s);
        let reader = {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let mut got = 0u32;
                while tokio::time::timeout(ms(300), s.recv(&mut buf))
                    .await
                    .is_ok()
                {
                    got += 1;
                }
                got
            })
        };
        for i in 0..n {
            s.send(&i.to_be_bytes()).await.unwrap();
            // Paced: a kernel socket buffer holds only a few hundred small datagrams.
            if i % 20 == 19 {
                tokio::time::sleep(ms(2)).await;
            }
        }
        let got = reader.await.unwrap();
        let ratio = got as f64 / n as f64;
        assert!(
            (ratio - 0.64).abs() < 0.05,
            "echo ratio {ratio}: {:?}",
            emu.stats()
        );

        // Outage: nothing gets through.
        tokio::time::sleep_until(emu.started() + ms(4_100)).await;
        for i in 0..20u8 {
            s.send(&[i]).await.unwrap();
        }
        assert!(
            tokio::time::timeout(ms(700), s.recv(&mut buf))
                .await
                .is_err(),
            "a datagram crossed an outage"
        );
        // And back.
        tokio::time::sleep_until(emu.started() + ms(5_100)).await;
        s.send(&[1]).await.unwrap();
        tokio::time::timeout(ms(500), s.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(emu.stats().up.dropped_outage >= 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_clients_make_room_for_new_ones() {
        let (dst, _h) = echo().await;
        let schedule = Schedule::new(vec![Phase::symmetric("lan", ms(20_000), None, ms(2))]);
        let emu = Emulator::start(dst, schedule, 11).await.unwrap();
        let mut buf = [0u8; 16];
        let round = |n: usize| {
            let mut socks = Vec::new();
            for _ in 0..n {
                socks.push(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
            }
            socks
        };
        // A full table of active clients: one more is refused.
        let first = round(MAX_CLIENTS);
        for s in &first {
            s.send_to(&[1], emu.local_addr()).unwrap();
        }
        let extra = round(1);
        extra[0].send_to(&[2], emu.local_addr()).unwrap();
        tokio::time::sleep(ms(200)).await;
        assert_eq!(emu.stats().refused_clients, 1);
        // Once they are silent, as many new clients again get through, each answered.
        tokio::time::sleep(CLIENT_IDLE + ms(100)).await;
        let second = round(MAX_CLIENTS);
        for s in &second {
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            s.send_to(&[3], emu.local_addr()).unwrap();
            let (n, _) = s.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[3]);
        }
        let st = emu.stats();
        assert_eq!(st.recycled_clients, MAX_CLIENTS as u64);
        assert_eq!(st.refused_clients, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queue_is_bounded_and_the_emulator_stops_by_itself() {
        let (dst, mut rx) = sink().await;
        // 1 Mbit/s, 10 kB queue: queueing delay at most 80 ms (+ 10 ms one-way).
        let phase = Phase::symmetric("q", ms(800), Some(1e6), ms(20)).with_queue_bytes(10_000);
        let mut emu = Emulator::start(dst, Schedule::new(vec![phase]), 3)
            .await
            .unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let t0 = Instant::now();
        for _ in 0..100 {
            tx.send_to(&[0u8; 1_000], emu.local_addr()).await.unwrap();
        }
        tokio::time::sleep(ms(400)).await;
        let mut arrivals = Vec::new();
        while let Ok(a) = rx.try_recv() {
            arrivals.push(a);
        }
        let st = emu.stats();
        // The queue holds 10 datagrams of 1000 bytes, plus the one being serialised.
        assert!(
            (10..=11).contains(&arrivals.len()),
            "{} delivered, {st:?}",
            arrivals.len()
        );
        assert_eq!(st.up.delivered, arrivals.len() as u64);
        assert_eq!(st.up.received, st.up.delivered + st.up.dropped_queue);
        let last = arrivals.last().unwrap().0 - t0;
        assert!(last >= ms(80) && last < ms(150), "last arrival {last:?}");
        tokio::time::timeout(ms(2_000), emu.finished())
            .await
            .unwrap();
        // Stopped: its port no longer forwards.
        tx.send_to(&[0u8; 10], emu.local_addr()).await.unwrap();
        assert!(tokio::time::timeout(ms(200), rx.recv()).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quic_works_through_it_and_sees_the_rtt() {
        use crate::harness::Pki;
        use outpost_protocols::uplink::quic::{
            self, ClientOptions, ClientTls, QuicClient, QuicServer, ServerOptions, ServerTls,
        };
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), &["gw-emu"]);
        let b = &pki.bundle;
        let server_tls = ServerTls::load(&b.ca_cert, &b.hub_cert, &b.hub_key).unwrap();
        let mut server = QuicServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            &server_tls,
            ServerOptions::default(),
        )
        .unwrap();
        let hub = server.local_addr().unwrap();
        let emu = Emulator::start(
            hub,
            Schedule::new(vec![Phase::symmetric("q", ms(10_000), Some(20e6), ms(100))]),
            5,
        )
        .await
        .unwrap();
        let g = &b.gateways[0];
        let client = QuicClient::new(
            &ClientTls::load(&b.ca_cert, &g.cert, &g.key).unwrap(),
            ClientOptions::default(),
        )
        .unwrap();
        let srv = tokio::spawn(async move {
            let c = server.accept().await.unwrap();
            let (mut s, mut r) = c.connection.accept_bi().await.unwrap();
            let data = quic::read_to_end(&mut r, 1 << 20).await.unwrap();
            quic::send_all(&mut s, &(data.len() as u64).to_be_bytes())
                .await
                .unwrap();
            quic::finish(&mut s).unwrap();
            c.connection.closed().await;
        });
        let conn = client.connect(emu.local_addr(), "localhost").await.unwrap();
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        quic::send_all(&mut s, &vec![7u8; 200_000]).await.unwrap();
        quic::finish(&mut s).unwrap();
        let reply = quic::read_to_end(&mut r, 64).await.unwrap();
        assert_eq!(reply, 200_000u64.to_be_bytes());
        let st = conn.path_stats();
        assert!(
            st.min_rtt >= ms(100) && st.min_rtt < ms(130),
            "QUIC's min RTT {:?}",
            st.min_rtt
        );
        conn.close(0, b"done");
        let _ = tokio::time::timeout(ms(2_000), srv).await;
    }
}
