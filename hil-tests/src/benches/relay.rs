//! `bench -- relay`: the gateway's most common job — relaying readings from a site's MQTT
//! broker to an upstream one — measured side by side, in the same run, with a Mosquitto
//! bridge doing the same relay. It drives only the real `outpost` binary (config files,
//! real brokers, /proc), so it measures whatever product is built.
//!
//! Set-up, all on 127.0.0.1 with ephemeral ports:
//! - Mosquitto A (the devices' broker) and Mosquitto B (upstream), both without queue
//!   limits, so a broker never drops what a slow relay leaves queued.
//! - `outpost hub` reading the gateway's frames from B (`[mqtt_ingress]`) into its
//!   JSON-lines sink; its CPU is reported apart.
//! - the relay under test, one at a time (the machine has 2 cores):
//!   - `outpost run`: an MQTT device subscribed to `op/+/r` on A (QoS 1, MQTT 5), mapping
//!     each reading to 4 streams (`seq` and three of the numeric fields), `[sync] mode =
//!     "full"`, `[uplink] transport = "mqtt"` to B; everything else at its default;
//!   - the baseline: a third Mosquitto with two bridge connections, `br/#` in from A at
//!     QoS 1 and out to B at QoS 1 (`cleansession true`).
//! - the load generator (in this process): 100 device connections to A (MQTT 3.1.1, clean
//!   sessions, a minimal client written for this bench so the generator costs a few µs per
//!   reading, not the relay's CPU), sharded over `RELAY_GEN_SHARDS` writer tasks paced on a
//!   5 ms tick, round-robin over the devices. Each reading is
//!   `{"seq":…,"ts":<µs since the epoch>,"temp":…,"hum":…,"press":…,"volt":…}` at QoS 1;
//!   `seq` is unique in the run (phase · 10¹² + per-device counter · 1000 + device) and
//!   `ts` is stamped when the reading is written. The generator's own capacity is measured
//!   first (A with nobody subscribed).
//! - two observers on B (QoS 0, minimal clients too): one decodes the gateway's frames on
//!   `outpost/+/up` with `outpost_protocols::frame` (the `…/seq` samples: the value is the
//!   reading's `seq`, the sample's timestamp its `ts`), the other reads the bridge's
//!   `br/+/r` JSON. Latency is `ts` → arrival at the observer on B for both relays.
//!
//! For each offered rate (`RELAY_RATES`, default 1k, 5k, 10k, 20k readings/s), first the
//! gateway then the bridge: a warm-up (`RELAY_WARMUP_S`, 3 s), a measuring window
//! (`RELAY_PHASE_S`, 15 s), then the load stops and the relay drains. Figures of a phase:
//! offered/s and delivered/s (distinct readings first seen at B in the window), the relay
//! process's CPU (utime+stime from /proc/<pid>/stat over the window) per delivered reading,
//! p50/p99 latency of the readings sent in the window, peak RSS (VmRSS sampled every 100 ms
//! from the load's start to its end). The gateway is stopped (SIGTERM) while the bridge runs
//! and started again after it.
//!
//! Then: the ceiling is the gateway's highest delivered rate over those phases (and, when it
//! kept up at the highest rate, over a ramp ×1.5 per step of `RELAY_RAMP_S`, 10 s, while it
//! keeps up and the generator can offer it). Overload: 2× the ceiling for `RELAY_OVERLOAD_S`
//! (60 s) — `overload_plateau` is delivered/ceiling over the phase, also given per 5 s —
//! then SIGKILL of the gateway with the load still running, the load stopped, the gateway
//! started again and left to drain: until the hub's sink holds every reading, or no reading
//! it lacked arrived for `RELAY_STALL_S` (60 s; copies of readings it holds do not count),
//! or `RELAY_DRAIN_S` (300 s) passed. `lost_after_restart` counts the readings missing at
//! the sink when the drain ended (why it ended, and what the gateway's outbox and broker A
//! still held then, are in the JSON), `dup_after_restart` the extra copies there; both over
//! every reading A acknowledged to the generator in the gateway's phases (the short probe
//! phases that check the path is up are left out: readings published before the gateway
//! first subscribed are lost by design). Idle RSS is the gateway's VmRSS 3 s after it
//! connected, before any load.
//!
//! The gateway's outbox and the hub's sink grow with the backlog (a few GB after an
//! overload of the current gateway): the run stops with an error when the disk of its
//! folder has less than `RELAY_MIN_FREE_MB` (3072) free. `RELAY_KEEP=1` keeps the folder
//! (configs, logs, outbox, sink) and prints its path.
//!
//! Last line: `{"bench":"relay","us_per_reading":{"1000":…},"bridge_us_per_reading":{…},
//! "ratio_max":…,"ceiling_per_s":…,"overload_plateau":…,"overload_rss_mb":…,
//! "idle_rss_mb":…,"p50_ms_1k":…,"lost_after_restart":…,"dup_after_restart":…, …}` (keys in
//! alphabetical order, with more figures: delivered rates, p99s, the hub's CPU...).
//! Progress goes to stderr.
//!
//! The `outpost` binary is `$OUTPOST_BIN` or the one next to this `bench` binary (build it
//! with `cargo build --release -p outpost --bin outpost`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Seek};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outpost_protocols::frame::{self, Message};
use outpost_runtime::Value;
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::runtime::Handle;

use crate::harness::Pki;
use crate::observe::{self, Metrics};
use crate::peers::free_port;
use crate::peers::mosquitto::{self, Mosquitto};

/// The gateway's id (and so its topics on B: `outpost/relay-gw/up`).
const GATEWAY: &str = "relay-gw";
/// Topic prefixes of the two relays' readings on A (each relay sees only its own).
const OP: &str = "op";
const BR: &str = "br";
/// `seq` = phase · SEQ_PHASE + k · SEQ_DEVICE + device.
const SEQ_PHASE: u64 = 1_000_000_000_000;
const SEQ_DEVICE: u64 = 1_000;
/// Unacknowledged publishes one device connection may have (below 65,535 packet ids).
const MAX_IN_FLIGHT: u64 = 20_000;
/// The writers' pacing tick.
const TICK: Duration = Duration::from_millis(5);
/// Longest MQTT packet the bench's clients accept (the gateway's frames are ≤ 1 MiB).
const MAX_PACKET: usize = 8 << 20;
/// Keep-alive of the bench's clients; observers ping well within it.
const KEEP_ALIVE_S: u16 = 600;
/// The rate asked of the generator when its capacity is measured.
const GENERATOR_CHECK: f64 = 100_000.0;
/// Width of the delivered-rate windows within a phase.
const WINDOW_S: f64 = 5.0;

// ---------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------

/// Phase lengths and sizes, from the environment.
#[derive(Debug, Clone)]
struct Params {
    rates: Vec<u64>,
    phase: Duration,
    warmup: Duration,
    ramp: Duration,
    overload: Duration,
    drain: Duration,
    stall: Duration,
    /// Stop before the disk of the run's folder has less free space than this.
    min_free_mb: u64,
    devices: usize,
    shards: usize,
}

fn env_secs(name: &str, default: f64) -> Result<Duration, String> {
    match std::env::var(name) {
        Err(_) => Ok(Duration::from_secs_f64(default)),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 86_400.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| format!("{name}={v:?}: expected seconds (0-86400)")),
    }
}

fn env_count(
    name: &str,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| format!("{name}={v:?}: expected a whole number in {range:?}")),
    }
}

impl Params {
    fn from_env() -> Result<Params, String> {
        let rates = match std::env::var("RELAY_RATES") {
            Err(_) => vec![1_000, 5_000, 10_000, 20_000],
            Ok(v) => v
                .split(',')
                .map(|r| {
                    r.trim()
                        .parse::<u64>()
                        .ok()
                        .filter(|r| (1..=1_000_000).contains(r))
                        .ok_or_else(|| {
                            format!("RELAY_RATES={v:?}: expected rates such as 1000,5000")
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        if rates.is_empty() {
            return Err("RELAY_RATES is empty".into());
        }
        Ok(Params {
            rates,
            phase: env_secs("RELAY_PHASE_S", 15.0)?,
            warmup: env_secs("RELAY_WARMUP_S", 3.0)?,
            ramp: env_secs("RELAY_RAMP_S", 10.0)?,
            overload: env_secs("RELAY_OVERLOAD_S", 60.0)?,
            drain: env_secs("RELAY_DRAIN_S", 300.0)?,
            stall: env_secs("RELAY_STALL_S", 60.0)?,
            min_free_mb: env_count("RELAY_MIN_FREE_MB", 3072, 0..=1 << 30)? as u64,
            devices: env_count("RELAY_DEVICES", 100, 1..=999)?,
            shards: env_count("RELAY_GEN_SHARDS", 4, 1..=64)?,
        })
    }
}

// ---------------------------------------------------------------------------------------
// A minimal MQTT 3.1.1 client: what the generator and the observers need, and no more.
// ---------------------------------------------------------------------------------------

/// MQTT 3.1.1 packets: encoding the few the bench sends, splitting what it reads.
mod wire {
    pub const PINGREQ: [u8; 2] = [0xC0, 0];
    pub const DISCONNECT: [u8; 2] = [0xE0, 0];
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const SUBACK: u8 = 9;

    fn remaining_len(buf: &mut Vec<u8>, mut n: usize) {
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            buf.push(b);
            if n == 0 {
                return;
            }
        }
    }

    fn str16(buf: &mut Vec<u8>, s: &[u8]) {
        buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
        buf.extend_from_slice(s);
    }

    /// CONNECT with a clean session.
    pub fn connect(client_id: &str, keep_alive_s: u16) -> Vec<u8> {
        let mut body = Vec::with_capacity(16 + client_id.len());
        str16(&mut body, b"MQTT");
        body.push(4); // protocol level 3.1.1
        body.push(0x02); // clean session
        body.extend_from_slice(&keep_alive_s.to_be_bytes());
        str16(&mut body, client_id.as_bytes());
        let mut out = vec![0x10];
        remaining_len(&mut out, body.len());
        out.extend_from_slice(&body);
        out
    }

    /// Appends a QoS 1 PUBLISH to `buf`.
    pub fn publish_qos1(buf: &mut Vec<u8>, topic: &[u8], pid: u16, payload: &[u8]) {
        buf.push(0x32);
        remaining_len(buf, 2 + topic.len() + 2 + payload.len());
        str16(buf, topic);
        buf.extend_from_slice(&pid.to_be_bytes());
        buf.extend_from_slice(payload);
    }

    /// SUBSCRIBE to one filter.
    pub fn subscribe(pid: u16, filter: &str, qos: u8) -> Vec<u8> {
        let mut out = vec![0x82];
        remaining_len(&mut out, 2 + 2 + filter.len() + 1);
        out.extend_from_slice(&pid.to_be_bytes());
        str16(&mut out, filter.as_bytes());
        out.push(qos);
        out
    }

    /// The first packet of `buf`, if complete: its first byte, the length of its fixed
    /// header and its total length. A length over `max` or a malformed length is an error.
    pub fn split(buf: &[u8], max: usize) -> Result<Option<(u8, usize, usize)>, String> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let mut len = 0usize;
        for i in 0..4 {
            let Some(&b) = buf.get(1 + i) else {
                return Ok(None);
            };
            len |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if len > max {
                    return Err(format!("a {len}-byte MQTT packet (most accepted: {max})"));
                }
                let header = 2 + i;
                return Ok((buf.len() >= header + len).then_some((first, header, header + len)));
            }
        }
        Err("a malformed MQTT remaining length".into())
    }

    /// The topic and payload of a PUBLISH body (after the fixed header) with the QoS of
    /// its first byte `first`.
    pub fn publish_parts(first: u8, body: &[u8]) -> Option<(&[u8], &[u8])> {
        let tlen = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
        let topic = body.get(2..2 + tlen)?;
        let skip = if (first >> 1) & 3 > 0 { 2 } else { 0 };
        Some((topic, body.get(2 + tlen + skip..)?))
    }
}

fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// Connects to the broker on loopback `port` and waits for a successful CONNACK; returns
/// the stream and whatever was read past the CONNACK.
async fn mqtt_connect(port: u16, client_id: String) -> Result<(TcpStream, Vec<u8>), String> {
    let hello = async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect to 127.0.0.1:{port}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.write_all(&wire::connect(&client_id, KEEP_ALIVE_S))
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::with_capacity(4096);
        loop {
            if let Some((first, header, total)) = wire::split(&buf, MAX_PACKET)? {
                if first >> 4 != wire::CONNACK || buf.get(header + 1) != Some(&0) {
                    return Err(format!(
                        "{client_id}: the broker refused the connection ({:?})",
                        &buf[..total]
                    ));
                }
                buf.drain(..total);
                return Ok((s, buf));
            }
            buf.reserve(4096);
            if s.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err(format!("{client_id}: the broker closed the connection"));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), hello)
        .await
        .map_err(|_| format!("{client_id}: no CONNACK from 127.0.0.1:{port} within 10 s"))?
}

// ---------------------------------------------------------------------------------------
// The load generator
// ---------------------------------------------------------------------------------------

fn seq_of(phase: u64, k: u64, device: usize) -> u64 {
    phase * SEQ_PHASE + k * SEQ_DEVICE + device as u64
}

fn phase_of(seq: u64) -> u64 {
    seq / SEQ_PHASE
}

/// Reading `seq` stamped `ts_us`: 4 numeric fields, the `seq` and the `ts`.
fn reading(buf: &mut Vec<u8>, seq: u64, ts_us: i64) {
    use std::io::Write;
    let x = seq / SEQ_DEVICE % 1000;
    let _ = write!(
        buf,
        r#"{{"seq":{seq},"ts":{ts_us},"temp":{}.{:02},"hum":{}.{},"press":{}.{:02},"volt":3.{:03}}}"#,
        18 + x % 10,
        x % 100,
        40 + x % 20,
        x % 10,
        1000 + x % 30,
        (x * 7) % 100,
        x
    );
}

struct LoadShared {
    stop: AtomicBool,
    sent: Vec<AtomicU64>,
    acked: Vec<AtomicU64>,
    sent_total: AtomicU64,
    /// Readings the schedule gave up: the generator was over 100 ms behind, or a device's
    /// window of unacknowledged publishes was full.
    behind: AtomicU64,
    error: Mutex<Option<String>>,
}

impl LoadShared {
    fn fail(&self, e: String) {
        let mut g = self.error.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert(e);
    }
}

struct Dev {
    index: usize,
    wr: OwnedWriteHalf,
    topic: Vec<u8>,
    k: u64,
    pid: u16,
    buf: Vec<u8>,
    queued: u64,
}

/// Paces `rate` readings/s over `devs`, round-robin, until stopped; gives the write halves
/// back.
async fn writer(
    shared: Arc<LoadShared>,
    phase: u64,
    rate: f64,
    mut devs: Vec<Dev>,
) -> Vec<OwnedWriteHalf> {
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let burst = ((rate * 0.1) as u64).max(1);
    let mut scheduled = 0u64;
    let mut next = 0usize;
    let mut payload = Vec::with_capacity(192);
    'run: while !shared.stop.load(Ordering::Acquire) {
        tick.tick().await;
        let due = (rate * t0.elapsed().as_secs_f64()) as u64;
        if due > scheduled + burst {
            shared
                .behind
                .fetch_add(due - scheduled - burst, Ordering::Relaxed);
            scheduled = due - burst;
        }
        let mut n = due.saturating_sub(scheduled);
        scheduled += n;
        let mut blocked = 0;
        while n > 0 && blocked < devs.len() {
            let i = next;
            next = (next + 1) % devs.len();
            let dev = &mut devs[i];
            if dev.k - shared.acked[dev.index].load(Ordering::Acquire) >= MAX_IN_FLIGHT {
                blocked += 1;
                continue;
            }
            blocked = 0;
            payload.clear();
            reading(&mut payload, seq_of(phase, dev.k, dev.index), wall_us());
            dev.pid = dev.pid.checked_add(1).unwrap_or(1);
            wire::publish_qos1(&mut dev.buf, &dev.topic, dev.pid, &payload);
            dev.k += 1;
            dev.queued += 1;
            n -= 1;
        }
        if n > 0 {
            shared.behind.fetch_add(n, Ordering::Relaxed);
        }
        for dev in devs.iter_mut().filter(|d| !d.buf.is_empty()) {
            if let Err(e) = dev.wr.write_all(&dev.buf).await {
                shared.fail(format!("device {} stopped writing: {e}", dev.index));
                break 'run;
            }
            dev.buf.clear();
            shared.sent[dev.index].store(dev.k, Ordering::Release);
            shared.sent_total.fetch_add(dev.queued, Ordering::Relaxed);
            dev.queued = 0;
        }
    }
    devs.into_iter().map(|d| d.wr).collect()
}

/// Counts the PUBACKs of device `d` (the broker acknowledges in order).
async fn acks(shared: Arc<LoadShared>, d: usize, mut rd: OwnedReadHalf) {
    let mut buf = Vec::with_capacity(4096);
    loop {
        buf.reserve(4096);
        match rd.read_buf(&mut buf).await {
            Ok(0) => {
                if !shared.stop.load(Ordering::Acquire) {
                    shared.fail(format!("broker A closed device {d}'s connection"));
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                if !shared.stop.load(Ordering::Acquire) {
                    shared.fail(format!("device {d}: {e}"));
                }
                return;
            }
        }
        let (mut pos, mut n) = (0, 0);
        loop {
            match wire::split(&buf[pos..], MAX_PACKET) {
                Ok(Some((first, _, total))) => {
                    n += u64::from(first >> 4 == wire::PUBACK);
                    pos += total;
                }
                Ok(None) => break,
                Err(e) => {
                    shared.fail(format!("device {d}: {e}"));
                    return;
                }
            }
        }
        buf.drain(..pos);
        shared.acked[d].fetch_add(n, Ordering::Release);
    }
}

/// What a load published: per device, readings written and acknowledged by broker A
/// (readings `0..acked[d]` of device `d` in this phase).
#[derive(Debug, Clone)]
struct LoadReport {
    phase: u64,
    sent: Vec<u64>,
    acked: Vec<u64>,
    behind: u64,
    error: Option<String>,
}

impl LoadReport {
    fn acked_total(&self) -> u64 {
        self.acked.iter().sum()
    }

    fn unacked(&self) -> u64 {
        self.sent
            .iter()
            .zip(&self.acked)
            .map(|(s, a)| s.saturating_sub(*a))
            .sum()
    }

    fn expected(&self) -> impl Iterator<Item = u64> + '_ {
        self.acked
            .iter()
            .enumerate()
            .flat_map(move |(d, n)| (0..*n).map(move |k| seq_of(self.phase, k, d)))
    }
}

/// `devices` connections to broker A publishing readings of `phase` at a total `rate`.
/// Its tasks are aborted on `Drop`.
struct Load {
    shared: Arc<LoadShared>,
    phase: u64,
    rt: Handle,
    writers: Vec<tokio::task::JoinHandle<Vec<OwnedWriteHalf>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(
        rt: &Handle,
        port: u16,
        prefix: &str,
        phase: u64,
        rate: f64,
        devices: usize,
        shards: usize,
    ) -> Result<Load, String> {
        let shared = Arc::new(LoadShared {
            stop: AtomicBool::new(false),
            sent: (0..devices).map(|_| AtomicU64::new(0)).collect(),
            acked: (0..devices).map(|_| AtomicU64::new(0)).collect(),
            sent_total: AtomicU64::new(0),
            behind: AtomicU64::new(0),
            error: Mutex::new(None),
        });
        let prefix_owned = prefix.to_owned();
        let streams = rt.block_on(async move {
            let handles: Vec<_> = (0..devices)
                .map(|d| tokio::spawn(mqtt_connect(port, format!("relay-{prefix_owned}-{d:03}"))))
                .collect();
            let mut out = Vec::with_capacity(devices);
            for h in handles {
                out.push(h.await.map_err(|e| e.to_string())??.0);
            }
            Ok::<_, String>(out)
        })?;
        let shards = shards.min(devices);
        let mut groups: Vec<Vec<Dev>> = (0..shards).map(|_| Vec::new()).collect();
        let mut readers = Vec::with_capacity(devices);
        for (d, s) in streams.into_iter().enumerate() {
            let (rd, wr) = s.into_split();
            readers.push(rt.spawn(acks(Arc::clone(&shared), d, rd)));
            groups[d % shards].push(Dev {
                index: d,
                wr,
                topic: format!("{prefix}/d{d:03}/r").into_bytes(),
                k: 0,
                pid: 0,
                buf: Vec::with_capacity(4096),
                queued: 0,
            });
        }
        let writers = groups
            .into_iter()
            .map(|g| {
                let r = rate * g.len() as f64 / devices as f64;
                rt.spawn(writer(Arc::clone(&shared), phase, r, g))
            })
            .collect();
        Ok(Load {
            shared,
            phase,
            rt: rt.clone(),
            writers,
            readers,
        })
    }

    fn sent_total(&self) -> u64 {
        self.shared.sent_total.load(Ordering::Relaxed)
    }

    fn error(&self) -> Option<String> {
        self.shared
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops publishing, waits (at most `ack_timeout`) for broker A to acknowledge what was
    /// written, disconnects.
    fn stop(&mut self, ack_timeout: Duration) -> LoadReport {
        self.shared.stop.store(true, Ordering::Release);
        let writers = std::mem::take(&mut self.writers);
        let halves: Vec<OwnedWriteHalf> = self.rt.block_on(async {
            let mut out = Vec::new();
            for mut h in writers {
                match tokio::time::timeout(Duration::from_secs(30), &mut h).await {
                    Ok(Ok(w)) => out.extend(w),
                    Ok(Err(_)) => {}
                    Err(_) => h.abort(),
                }
            }
            out
        });
        let deadline = Instant::now() + ack_timeout;
        let all_acked = |s: &LoadShared| {
            s.sent
                .iter()
                .zip(&s.acked)
                .all(|(w, a)| a.load(Ordering::Acquire) >= w.load(Ordering::Acquire))
        };
        while !all_acked(&self.shared) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let readers = std::mem::take(&mut self.readers);
        self.rt.block_on(async {
            for mut w in halves {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = w.write_all(&wire::DISCONNECT).await;
                    let _ = w.shutdown().await;
                })
                .await;
            }
            for mut h in readers {
                if tokio::time::timeout(Duration::from_secs(5), &mut h)
                    .await
                    .is_err()
                {
                    h.abort();
                }
            }
        });
        let load = |v: &[AtomicU64]| v.iter().map(|a| a.load(Ordering::Acquire)).collect();
        LoadReport {
            phase: self.phase,
            sent: load(&self.shared.sent),
            acked: load(&self.shared.acked),
            behind: self.shared.behind.load(Ordering::Relaxed),
            error: self.error(),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for h in &self.writers {
            h.abort();
        }
        for h in &self.readers {
            h.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Observers on broker B
// ---------------------------------------------------------------------------------------

/// One reading seen at B: its `seq`, its send time and when it arrived (µs since the epoch).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Arrival {
    seq: u64,
    ts_us: i64,
    at_us: i64,
}

#[derive(Debug, Clone, Copy)]
enum Payload {
    /// The gateway's frames: the `…/seq` samples.
    Frames,
    /// The readings themselves, as the bridge forwards them.
    Json,
}

struct ObserverShared {
    arrivals: Mutex<Vec<Arrival>>,
    undecodable: AtomicU64,
    error: Mutex<Option<String>>,
}

/// A QoS 0 subscriber on B recording every reading it sees; its task is aborted on `Drop`.
struct Observer {
    shared: Arc<ObserverShared>,
    task: tokio::task::JoinHandle<()>,
}

/// The integer after `key` (such as `"seq":`) in a JSON text.
fn number_after(text: &[u8], key: &[u8]) -> Option<i64> {
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Readings in one message's payload.
fn decode(kind: Payload, payload: &[u8], at_us: i64, out: &mut Vec<Arrival>) -> bool {
    match kind {
        Payload::Json => match (
            number_after(payload, b"\"seq\":"),
            number_after(payload, b"\"ts\":"),
        ) {
            (Some(seq), Some(ts_us)) => {
                out.push(Arrival {
                    seq: seq as u64,
                    ts_us,
                    at_us,
                });
                true
            }
            _ => false,
        },
        Payload::Frames => match frame::decode(payload) {
            Ok(Message::Data(f)) => {
                for s in &f.samples {
                    if !f.stream_name(s).ends_with("/seq") {
                        continue;
                    }
                    let seq = match s.value {
                        Value::I64(i) if i >= 0 => i as u64,
                        Value::F64(x) if x >= 0.0 && x.fract() == 0.0 => x as u64,
                        _ => return false,
                    };
                    out.push(Arrival {
                        seq,
                        ts_us: s.ts_ns / 1000,
                        at_us,
                    });
                }
                true
            }
            Ok(_) => true,
            Err(_) => false,
        },
    }
}

async fn observe_loop(shared: Arc<ObserverShared>, s: TcpStream, mut buf: Vec<u8>, kind: Payload) {
    let (mut rd, mut wr) = s.into_split();
    let mut ping = tokio::time::interval(Duration::from_secs(60));
    ping.tick().await;
    let mut batch = Vec::new();
    let fail = |e: String| {
        let mut g = shared.error.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert(e);
    };
    loop {
        tokio::select! {
            r = rd.read_buf(&mut buf) => {
                match r {
                    Ok(0) => return fail("broker B closed the observer's connection".into()),
                    Ok(_) => {}
                    Err(e) => return fail(format!("observer: {e}")),
                }
                let at = wall_us();
                let mut pos = 0;
                loop {
                    match wire::split(&buf[pos..], MAX_PACKET) {
                        Ok(Some((first, header, total))) => {
                            if first >> 4 == wire::PUBLISH {
                                let ok = wire::publish_parts(first, &buf[pos + header..pos + total])
                                    .is_some_and(|(_, p)| decode(kind, p, at, &mut batch));
                                if !ok {
                                    shared.undecodable.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            pos += total;
                        }
                        Ok(None) => break,
                        Err(e) => return fail(format!("observer: {e}")),
                    }
                }
                buf.drain(..pos);
                buf.reserve(64 * 1024);
                if !batch.is_empty() {
                    shared.arrivals.lock().unwrap_or_else(|e| e.into_inner()).append(&mut batch);
                }
            }
            _ = ping.tick() => {
                if let Err(e) = wr.write_all(&wire::PINGREQ).await {
                    return fail(format!("observer: {e}"));
                }
            }
        }
    }
}

impl Observer {
    fn start(
        rt: &Handle,
        port: u16,
        filter: &str,
        kind: Payload,
        name: &str,
    ) -> Result<Observer, String> {
        let (filter, name) = (filter.to_owned(), name.to_owned());
        let (s, buf) = rt.block_on(async move {
            let (mut s, mut buf) = mqtt_connect(port, name).await?;
            s.write_all(&wire::subscribe(1, &filter, 0))
                .await
                .map_err(|e| e.to_string())?;
            let suback = async {
                loop {
                    if let Some((first, header, total)) = wire::split(&buf, MAX_PACKET)? {
                        if first >> 4 == wire::SUBACK {
                            if buf.get(header + 2) == Some(&0x80) {
                                return Err(format!(
                                    "broker B refused the subscription to {filter}"
                                ));
                            }
                            buf.drain(..total);
                            return Ok(());
                        }
                        buf.drain(..total);
                        continue;
                    }
                    buf.reserve(4096);
                    if s.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                        return Err("broker B closed the observer's connection".to_string());
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(10), suback)
                .await
                .map_err(|_| format!("no SUBACK for {filter} within 10 s"))??;
            Ok::<_, String>((s, buf))
        })?;
        let shared = Arc::new(ObserverShared {
            arrivals: Mutex::new(Vec::new()),
            undecodable: AtomicU64::new(0),
            error: Mutex::new(None),
        });
        let task = rt.spawn(observe_loop(Arc::clone(&shared), s, buf, kind));
        Ok(Observer { shared, task })
    }

    fn check(&self) -> Result<(), String> {
        match self
            .shared
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The arrivals of readings of `phase`.
    fn of_phase(&self, phase: u64) -> Vec<Arrival> {
        let a = self
            .shared
            .arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        a.iter()
            .filter(|a| phase_of(a.seq) == phase)
            .copied()
            .collect()
    }

    /// Distinct readings of `phase` seen.
    fn distinct(&self, phase: u64) -> u64 {
        let a = self
            .shared
            .arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        a.iter()
            .filter(|a| phase_of(a.seq) == phase)
            .map(|a| a.seq)
            .collect::<HashSet<_>>()
            .len() as u64
    }

    fn undecodable(&self) -> u64 {
        self.shared.undecodable.load(Ordering::Relaxed)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Processes and /proc
// ---------------------------------------------------------------------------------------

/// A child process killed (SIGKILL) on `Drop`.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, bin: &Path, args: &[&str], log: &Path) -> Result<Proc, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// An error (with the end of the log) if the process has exited.
    fn check(&mut self) -> Result<(), String> {
        let Some(c) = self.child.as_mut() else {
            return Err(format!("{} is not running", self.name));
        };
        match c.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Err(format!(
                    "{} exited ({status}); its log ends:\n{}",
                    self.name,
                    tail.join("\n")
                ))
            }
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }

    /// SIGTERM, then SIGKILL after 30 s.
    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("relay: {} ignored SIGTERM for 30 s; killing it", self.name);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Clock ticks per second of /proc's CPU times.
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of `pid` (`0`: this process), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let path = if pid == 0 {
        "/proc/self/stat".to_owned()
    } else {
        format!("/proc/{pid}/stat")
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A `kB` line (`VmRSS`, `VmHWM`) of /proc/<pid>/status.
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Samples the VmRSS of one process every 100 ms and keeps the peak.
struct RssSampler {
    pid: Arc<AtomicU32>,
    peak_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let pid = Arc::new(AtomicU32::new(0));
        let peak_kb = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, k, s) = (Arc::clone(&pid), Arc::clone(&peak_kb), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                let pid = p.load(Ordering::Acquire);
                if pid != 0
                    && let Some(kb) = status_kb(pid, "VmRSS")
                {
                    k.fetch_max(kb, Ordering::AcqRel);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler {
            pid,
            peak_kb,
            stop,
            thread: Some(thread),
        }
    }

    /// Watches `pid` from now on, with a fresh peak.
    fn watch(&self, pid: u32) {
        self.pid.store(pid, Ordering::Release);
        self.peak_kb
            .store(status_kb(pid, "VmRSS").unwrap_or(0), Ordering::Release);
    }

    fn peak_mb(&self) -> f64 {
        self.peak_kb.load(Ordering::Acquire) as f64 / 1024.0
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The hub's sink
// ---------------------------------------------------------------------------------------

/// Reads the hub's sink files incrementally and counts each reading's `seq` samples.
struct SinkTail {
    dir: PathBuf,
    offsets: HashMap<PathBuf, u64>,
    seen: HashMap<u64, u32>,
    /// `seq` lines read (duplicates included).
    lines: u64,
    bad_lines: u64,
}

impl SinkTail {
    fn new(dir: PathBuf) -> SinkTail {
        SinkTail {
            dir,
            offsets: HashMap::new(),
            seen: HashMap::new(),
            lines: 0,
            bad_lines: 0,
        }
    }

    fn poll(&mut self) {
        let Ok(gws) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for gw in gws.flatten() {
            let Ok(days) = std::fs::read_dir(gw.path()) else {
                continue;
            };
            for day in days.flatten() {
                let name = day.file_name().to_string_lossy().into_owned();
                if name.ends_with(".jsonl") && !name.ends_with(".summary.jsonl") {
                    self.read(day.path());
                }
            }
        }
    }

    fn read(&mut self, path: PathBuf) {
        let offset = self.offsets.get(&path).copied().unwrap_or(0);
        let Ok(mut f) = std::fs::File::open(&path) else {
            return;
        };
        if f.seek(std::io::SeekFrom::Start(offset)).is_err() {
            return;
        }
        let mut r = std::io::BufReader::with_capacity(1 << 20, f);
        let mut line = Vec::with_capacity(256);
        let mut consumed = offset;
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if line.last() != Some(&b'\n') {
                        break; // written partly: read again next time
                    }
                    consumed += n as u64;
                    self.line(&line);
                }
            }
        }
        self.offsets.insert(path, consumed);
    }

    fn line(&mut self, line: &[u8]) {
        if !line.windows(5).any(|w| w == b"/seq\"") {
            return;
        }
        let seq = serde_json::from_slice::<Json>(line).ok().and_then(|v| {
            let s = v["stream"].as_str()?;
            if !s.ends_with("/seq") {
                return None;
            }
            v["value"].as_u64().or_else(|| {
                v["value"]
                    .as_f64()
                    .filter(|x| *x >= 0.0 && x.fract() == 0.0)
                    .map(|x| x as u64)
            })
        });
        match seq {
            Some(s) => {
                *self.seen.entry(s).or_default() += 1;
                self.lines += 1;
            }
            None => self.bad_lines += 1,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------

/// What one relay did during one phase.
#[derive(Debug, Clone, Default)]
struct PhaseStats {
    offered: f64,
    delivered: f64,
    us_per_reading: Option<f64>,
    hub_us_per_reading: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    rss_peak_mb: f64,
    /// Readings seen at B more than once (resends).
    dup_at_b: u64,
    /// Readings A acknowledged that B had not seen when the drain ended.
    undelivered: u64,
    drain_s: f64,
    /// Delivered/s in consecutive windows of `WINDOW_S` seconds.
    windows: Vec<f64>,
    bench_cpu_pct: f64,
}

impl PhaseStats {
    fn kept_up(&self) -> bool {
        self.offered > 0.0 && self.delivered >= 0.95 * self.offered
    }
}

/// The delivery figures of one phase from its arrivals at B: delivered/s (readings whose
/// first arrival is in `[w0, w1]`), per-window rates, latencies of readings sent in the
/// window (µs, sorted), distinct readings, extra copies.
#[derive(Debug, Clone, PartialEq)]
struct Delivery {
    delivered: u64,
    windows: Vec<f64>,
    latencies_us: Vec<i64>,
    distinct: u64,
    dups: u64,
}

fn delivery(arrivals: &[Arrival], w0: i64, w1: i64, window_us: i64) -> Delivery {
    let mut first: HashMap<u64, (i64, i64)> = HashMap::with_capacity(arrivals.len());
    let mut dups = 0;
    for a in arrivals {
        first
            .entry(a.seq)
            .and_modify(|e| {
                dups += 1;
                e.0 = e.0.min(a.at_us);
            })
            .or_insert((a.at_us, a.ts_us));
    }
    // Whole windows; a remainder belongs to the last one.
    let n_windows = (((w1 - w0) / window_us).max(1)) as usize;
    let mut per = vec![0u64; n_windows];
    let mut delivered = 0;
    let mut latencies_us = Vec::new();
    for &(at, ts) in first.values() {
        if (w0..w1).contains(&at) {
            delivered += 1;
            per[(((at - w0) / window_us) as usize).min(n_windows - 1)] += 1;
        }
        if (w0..w1).contains(&ts) {
            latencies_us.push(at - ts);
        }
    }
    latencies_us.sort_unstable();
    let windows = per
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let start = w0 + i as i64 * window_us;
            let len = if i + 1 == n_windows {
                w1 - start
            } else {
                window_us
            }
            .max(1);
            *n as f64 * 1e6 / len as f64
        })
        .collect();
    Delivery {
        delivered,
        windows,
        latencies_us,
        distinct: first.len() as u64,
        dups,
    }
}

/// The `p` quantile (0-1) of sorted values, in ms.
fn percentile_ms(sorted_us: &[i64], p: f64) -> Option<f64> {
    let i = ((sorted_us.len().checked_sub(1)?) as f64 * p).round() as usize;
    Some(sorted_us[i] as f64 / 1000.0)
}

/// A moment of a phase: the wall clock and the CPU counters.
struct Snap {
    at: Instant,
    wall_us: i64,
    relay: u64,
    hub: u64,
    me: u64,
    sent: u64,
}

impl Snap {
    fn take(relay: u32, hub: u32, load: &Load) -> Snap {
        Snap {
            at: Instant::now(),
            wall_us: wall_us(),
            relay: cpu_ticks(relay).unwrap_or(0),
            hub: cpu_ticks(hub).unwrap_or(0),
            me: cpu_ticks(0).unwrap_or(0),
            sent: load.sent_total(),
        }
    }
}

/// The relay a phase measures.
struct Target<'a> {
    name: &'static str,
    pid: u32,
    prefix: &'static str,
    observer: &'a Observer,
    /// The hub's pid, for the gateway's phases.
    hub: Option<u32>,
}

/// How a phase runs.
struct Spec {
    rate: f64,
    warmup: Duration,
    window: Duration,
    /// Wait for B to see everything after the load stops.
    drain: bool,
}

/// Everything a run shares.
struct Ctx {
    rt: tokio::runtime::Runtime,
    p: Params,
    a_port: u16,
    tck: f64,
    next_phase: u64,
    sampler: RssSampler,
    /// The loads of the gateway's measured phases (not its probes).
    outpost_loads: Vec<LoadReport>,
    disk: DiskGuard,
}

/// Stops the run before the disk fills: the gateway's outbox and the hub's sink grow with
/// the backlog, and a broken gateway can grow them without end.
struct DiskGuard {
    dir: PathBuf,
    min_free_mb: u64,
    checked: Mutex<Option<Instant>>,
}

impl DiskGuard {
    /// An error if the disk of the run's folder is short of space (checked every 2 s at
    /// most).
    fn check(&self) -> Result<(), String> {
        let mut last = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(2)) {
            return Ok(());
        }
        *last = Some(Instant::now());
        match free_mb(&self.dir) {
            Some(free) if free < self.min_free_mb => Err(format!(
                "only {free} MiB left on the disk of {} (RELAY_MIN_FREE_MB={}): stopping before \
                 the gateway's outbox and the hub's sink fill it",
                self.dir.display(),
                self.min_free_mb
            )),
            _ => Ok(()),
        }
    }
}

/// Free space (MiB) of the filesystem holding `dir`, from `df`.
fn free_mb(dir: &Path) -> Option<u64> {
    let out = Command::new("df").arg("-Pk").arg(dir).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let avail_kb: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(avail_kb / 1024)
}

impl Ctx {
    fn phase(&mut self) -> u64 {
        self.next_phase += 1;
        self.next_phase
    }
}

fn mb(kb: Option<u64>) -> f64 {
    kb.unwrap_or(0) as f64 / 1024.0
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Sleeps `d`, checking every 250 ms that the load, the observer and the watched
/// processes are fine.
fn sleep_checked(
    d: Duration,
    load: &Load,
    observer: &Observer,
    procs: &mut [&mut Proc],
    disk: &DiskGuard,
) -> Result<(), String> {
    let end = Instant::now() + d;
    loop {
        disk.check()?;
        if let Some(e) = load.error() {
            return Err(format!("load generator: {e}"));
        }
        observer.check()?;
        for p in procs.iter_mut() {
            p.check()?;
        }
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(250)));
    }
}

/// Runs one phase of `t` and measures it. `at_end` runs when the window closes, before the
/// load stops (the overload kills the gateway there). `procs` are checked for liveness
/// during the phase.
fn measure(
    ctx: &mut Ctx,
    t: &Target,
    spec: Spec,
    procs: &mut [&mut Proc],
    at_end: impl FnOnce(&mut [&mut Proc]),
) -> Result<(PhaseStats, LoadReport), String> {
    let phase = ctx.phase();
    ctx.sampler.watch(t.pid);
    let mut load = Load::start(
        ctx.rt.handle(),
        ctx.a_port,
        t.prefix,
        phase,
        spec.rate,
        ctx.p.devices,
        ctx.p.shards,
    )?;
    sleep_checked(spec.warmup, &load, t.observer, procs, &ctx.disk)?;
    let hub = t.hub.unwrap_or(u32::MAX);
    let s0 = Snap::take(t.pid, hub, &load);
    sleep_checked(spec.window, &load, t.observer, procs, &ctx.disk)?;
    let s1 = Snap::take(t.pid, hub, &load);
    at_end(procs);
    let report = load.stop(Duration::from_secs(60));
    let rss_peak_mb = ctx.sampler.peak_mb();
    if let Some(e) = &report.error {
        return Err(format!("load generator: {e}"));
    }
    let acked = report.acked_total();
    let drained_at = Instant::now();
    if spec.drain {
        let cap = Instant::now() + ctx.p.drain;
        let (mut last, mut progress) = (0, Instant::now());
        loop {
            t.observer.check()?;
            ctx.disk.check()?;
            let seen = t.observer.distinct(phase);
            if seen >= acked {
                break;
            }
            if seen > last {
                (last, progress) = (seen, Instant::now());
            }
            if progress.elapsed() > ctx.p.stall || Instant::now() > cap {
                eprintln!(
                    "relay: {}: {} of {acked} readings reached B; giving up the drain",
                    t.name, seen
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let drain_s = drained_at.elapsed().as_secs_f64();
    let d = delivery(
        &t.observer.of_phase(phase),
        s0.wall_us,
        s1.wall_us,
        (WINDOW_S * 1e6) as i64,
    );
    let secs = (s1.at - s0.at).as_secs_f64();
    let cpu_us = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / ctx.tck * 1e6;
    let per = |us: f64| (d.delivered > 0).then(|| round(us / d.delivered as f64, 2));
    let stats = PhaseStats {
        offered: s1.sent.saturating_sub(s0.sent) as f64 / secs,
        delivered: d.delivered as f64 / secs,
        us_per_reading: per(cpu_us(s0.relay, s1.relay)),
        hub_us_per_reading: t.hub.and_then(|_| per(cpu_us(s0.hub, s1.hub))),
        p50_ms: percentile_ms(&d.latencies_us, 0.5),
        p99_ms: percentile_ms(&d.latencies_us, 0.99),
        rss_peak_mb,
        dup_at_b: d.dups,
        undelivered: acked.saturating_sub(d.distinct),
        drain_s,
        windows: d.windows,
        bench_cpu_pct: cpu_us(s0.me, s1.me) / 1e4 / secs,
    };
    eprintln!(
        "relay: {:>7} @ {:>6.0}/s: offered {:>6.0}/s, delivered {:>6.0}/s, {} µs CPU/reading{}, \
         p50 {} ms, p99 {} ms, RSS peak {:.1} MB, {} resent at B, {} not delivered, drain {:.1} s, \
         bench CPU {:.0}%{}",
        t.name,
        spec.rate,
        stats.offered,
        stats.delivered,
        fmt_opt(stats.us_per_reading),
        stats
            .hub_us_per_reading
            .map(|h| format!(" (hub {h})"))
            .unwrap_or_default(),
        fmt_opt(stats.p50_ms),
        fmt_opt(stats.p99_ms),
        stats.rss_peak_mb,
        stats.dup_at_b,
        stats.undelivered,
        stats.drain_s,
        stats.bench_cpu_pct,
        if report.behind > 0 {
            format!(
                ", {} readings the generator could not offer in time",
                report.behind
            )
        } else {
            String::new()
        },
    );
    Ok((stats, report))
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v}"))
}

/// Publishes a trickle on `prefix` until a reading arrives at `observer` (the path is up).
fn probe(ctx: &mut Ctx, prefix: &str, observer: &Observer, what: &str) -> Result<(), String> {
    let phase = ctx.phase();
    let mut load = Load::start(ctx.rt.handle(), ctx.a_port, prefix, phase, 50.0, 1, 1)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let ok = loop {
        if observer.distinct(phase) > 0 {
            break true;
        }
        if let Some(e) = load.error() {
            return Err(format!("probe of {what}: {e}"));
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    load.stop(Duration::from_secs(10));
    if ok {
        Ok(())
    } else {
        Err(format!("no reading went through {what} within 30 s"))
    }
}

/// The number in the retained `$SYS` message `topic` of the broker on `port` (Mosquitto
/// publishes them every `sys_interval`), waiting at most `within`.
fn sys_value(rt: &Handle, port: u16, topic: &str, within: Duration) -> Option<f64> {
    let topic = topic.to_owned();
    rt.block_on(async move {
        let read = async {
            let (mut s, mut buf) = mqtt_connect(port, "relay-sys".into()).await.ok()?;
            s.write_all(&wire::subscribe(1, &topic, 0)).await.ok()?;
            loop {
                while let Some((first, header, total)) = wire::split(&buf, MAX_PACKET).ok()? {
                    if first >> 4 == wire::PUBLISH
                        && let Some((t, p)) = wire::publish_parts(first, &buf[header..total])
                        && t == topic.as_bytes()
                    {
                        return std::str::from_utf8(p).ok()?.trim().parse().ok();
                    }
                    buf.drain(..total);
                }
                buf.reserve(4096);
                if s.read_buf(&mut buf).await.ok()? == 0 {
                    return None;
                }
            }
        };
        tokio::time::timeout(within, read).await.ok().flatten()
    })
}

fn scrape(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> Option<Metrics> {
    rt.block_on(observe::scrape(addr)).ok()
}

/// Waits (30 s at most) until `pred` holds for the metrics of `p` at `addr`.
fn wait_ready(
    rt: &tokio::runtime::Runtime,
    p: &mut Proc,
    addr: SocketAddr,
    pred: impl Fn(&Metrics) -> bool,
    what: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        p.check()?;
        if scrape(rt, addr).is_some_and(|m| pred(&m)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{what} within 30 s (log: {})", p.log.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The gateway's files and how to start it.
struct GatewayFiles {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    metrics: SocketAddr,
}

fn start_gateway(ctx: &Ctx, g: &GatewayFiles) -> Result<Proc, String> {
    let config = g.config.to_string_lossy().into_owned();
    let mut p = Proc::spawn(
        "the gateway (outpost run)",
        &g.bin,
        &["run", &config],
        &g.log,
    )?;
    wait_ready(
        &ctx.rt,
        &mut p,
        g.metrics,
        |m| {
            m.value("outpost_mqtt_connected", &[("device", "relay")]) == 1.0
                && m.value("outpost_sync_connected", &[]) == 1.0
        },
        "the gateway did not connect to broker A and to broker B",
    )?;
    Ok(p)
}

fn gateway_toml(data: &Path, metrics: SocketAddr, a: &str, b: &str) -> String {
    format!(
        r#"[gateway]
id = "{GATEWAY}"
data_dir = "{data}"

[log]
level = "warn"

[metrics]
enabled = true
listen = "{metrics}"

[sync]
mode = "full"

[uplink]
transport = "mqtt"

[uplink.mqtt]
broker = "{b}"

[[devices]]
name = "relay"

[devices.mqtt]
broker = "{a}"
version = "5"

[[devices.mqtt.subscriptions]]
topic = "{OP}/+/r"
qos = 1
format = "json"
timestamp_pointer = "/ts"
fields = [
    {{ pointer = "/seq", stream = "{OP}/{{1}}/seq" }},
    {{ pointer = "/temp", stream = "{OP}/{{1}}/temp" }},
    {{ pointer = "/hum", stream = "{OP}/{{1}}/hum" }},
    {{ pointer = "/press", stream = "{OP}/{{1}}/press" }},
]
"#,
        data = data.display(),
    )
}

fn hub_toml(pki: &Pki, data: &Path, metrics: SocketAddr, b: &str) -> String {
    format!(
        r#"[hub]
listen = "127.0.0.1:0"
data_dir = "{data}"
ca = "{ca}"
cert = "{cert}"
key = {{ file = "{key}" }}

[log]
level = "warn"

[metrics]
enabled = true
listen = "{metrics}"

[mqtt_ingress]
broker = "{b}"
client_id = "outpost-hub-ingress-relay"
"#,
        data = data.display(),
        ca = pki.bundle.ca_cert.display(),
        cert = pki.bundle.hub_cert.display(),
        key = pki.bundle.hub_key.display(),
    )
}

/// Mosquitto C: bridges `br/#` from A to B at QoS 1.
fn bridge_conf(a: u16, b: u16) -> String {
    format!(
        "connection relay-in\naddress 127.0.0.1:{a}\ntopic {BR}/# in 1\ncleansession true\n\
         notifications false\n\
         connection relay-out\naddress 127.0.0.1:{b}\ntopic {BR}/# out 1\ncleansession true\n\
         notifications false\n"
    )
}

/// The `outpost` binary: `$OUTPOST_BIN`, or next to this executable.
fn outpost_binary() -> Result<PathBuf, String> {
    let p = match std::env::var_os("OUTPOST_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("outpost"),
    };
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "the outpost binary ({}) is missing: build it with `cargo build --release -p outpost \
             --bin outpost` (or set OUTPOST_BIN)",
            p.display()
        ))
    }
}

/// The readings of the gateway's phases at the hub's sink when the drain ended.
struct SinkCheck {
    lost: u64,
    dup: u64,
    /// Readings at the sink that A never acknowledged to the generator.
    unexpected: u64,
    secs: f64,
    /// Why the drain ended: `complete`, `stalled`, `time_cap` or `disk`.
    end: &'static str,
}

/// Waits until the hub's sink holds every reading of `loads`, or no reading it lacked
/// arrived for `stall` (copies of readings it holds do not count), or `cap` passed, or the
/// disk runs short. `status` describes the gateway for the progress lines.
fn drain_sink(
    sink: &mut SinkTail,
    loads: &[LoadReport],
    stall: Duration,
    cap: Duration,
    disk: &DiskGuard,
    status: &dyn Fn() -> String,
) -> SinkCheck {
    let t0 = Instant::now();
    let expected: HashSet<u64> = loads.iter().flat_map(LoadReport::expected).collect();
    let phases: HashSet<u64> = loads.iter().map(|l| l.phase).collect();
    let (mut last, mut progress) = (0usize, Instant::now());
    let mut report = Instant::now();
    let end = loop {
        sink.poll();
        let present = expected
            .iter()
            .filter(|s| sink.seen.contains_key(s))
            .count();
        if present == expected.len() {
            break "complete";
        }
        if present > last {
            (last, progress) = (present, Instant::now());
        }
        if report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "relay: draining: {present} of {} readings at the hub's sink ({} copies); {}",
                expected.len(),
                sink.lines,
                status()
            );
            report = Instant::now();
        }
        let end = if progress.elapsed() > stall {
            Some("stalled")
        } else if t0.elapsed() > cap {
            Some("time_cap")
        } else if let Err(e) = disk.check() {
            eprintln!("relay: {e}");
            Some("disk")
        } else {
            None
        };
        if let Some(end) = end {
            eprintln!(
                "relay: the drain ends ({end}) after {:.0} s: {present} of {} readings at the \
                 sink, none new for {:.0} s; {}",
                t0.elapsed().as_secs_f64(),
                expected.len(),
                progress.elapsed().as_secs_f64(),
                status()
            );
            break end;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let lost = expected
        .iter()
        .filter(|s| !sink.seen.contains_key(s))
        .count() as u64;
    let (mut dup, mut unexpected) = (0u64, 0u64);
    for (s, n) in &sink.seen {
        if !phases.contains(&phase_of(*s)) {
            continue;
        }
        dup += u64::from(n.saturating_sub(1));
        if !expected.contains(s) {
            unexpected += 1;
        }
    }
    SinkCheck {
        lost,
        dup,
        unexpected,
        secs: t0.elapsed().as_secs_f64(),
        end,
    }
}

/// Runs the benchmark. With `RELAY_KEEP` set, the run's folder (configs, the gateway's and
/// the hub's logs, outbox, sink) is kept and named at the end.
pub fn run(_args: &[String]) -> Result<Json, String> {
    mosquitto::find_broker()?;
    let bin = outpost_binary()?;
    let p = Params::from_env()?;
    let dir = tempfile::Builder::new()
        .prefix("outpost-relay-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let r = run_in(dir.path(), &bin, p);
    if std::env::var_os("RELAY_KEEP").is_some() {
        eprintln!("relay: the run's folder is kept: {}", dir.keep().display());
    }
    r
}

fn run_in(d: &Path, bin: &Path, p: Params) -> Result<Json, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // No queue limits: a broker holding a slow relay's backlog never drops it.
    // `sys_interval 1`: A's `$SYS` message count tells, after the drain, what it still holds.
    let unlimited = "max_queued_messages 0\n";
    let a = Mosquitto::start_configured(&format!("{unlimited}sys_interval 1\n"), &[]);
    let b = Mosquitto::start_configured(unlimited, &[]);
    let mut ctx = Ctx {
        rt,
        p: p.clone(),
        a_port: a.port(),
        tck: clk_tck(),
        next_phase: 0,
        sampler: RssSampler::start(),
        outpost_loads: Vec::new(),
        disk: DiskGuard {
            dir: d.to_path_buf(),
            min_free_mb: p.min_free_mb,
            checked: Mutex::new(None),
        },
    };
    eprintln!(
        "relay: {} devices, rates {:?}/s, phases {:?} + {:?} warm-up, overload {:?}; A on {}, B on {}",
        p.devices,
        p.rates,
        p.phase,
        p.warmup,
        p.overload,
        a.address(),
        b.address()
    );

    // The generator's own capacity: A alone, nobody subscribed.
    let (gen_max, gen_us) = {
        let phase = ctx.phase();
        let mut load = Load::start(
            ctx.rt.handle(),
            a.port(),
            "cal",
            phase,
            GENERATOR_CHECK,
            p.devices,
            p.shards,
        )?;
        std::thread::sleep(Duration::from_secs(1));
        let (t0, s0, me0) = (Instant::now(), load.sent_total(), cpu_ticks(0).unwrap_or(0));
        std::thread::sleep(Duration::from_secs(3));
        let (t1, s1, me1) = (Instant::now(), load.sent_total(), cpu_ticks(0).unwrap_or(0));
        let r = load.stop(Duration::from_secs(30));
        if let Some(e) = r.error {
            return Err(format!("load generator: {e}"));
        }
        let n = s1.saturating_sub(s0) as f64;
        let rate = n / (t1 - t0).as_secs_f64();
        let us = (me1.saturating_sub(me0)) as f64 / ctx.tck * 1e6 / n.max(1.0);
        eprintln!(
            "relay: the generator offers {rate:.0} readings/s to A at most ({} shards, {us:.1} µs CPU per reading)",
            p.shards
        );
        (rate, us)
    };

    // The hub, reading the gateway's frames from B.
    let pki = Pki::new(d, &[GATEWAY]);
    let hub_metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let hub_cfg = d.join("hub.toml");
    std::fs::write(
        &hub_cfg,
        hub_toml(&pki, &d.join("hub"), hub_metrics, &b.address()),
    )
    .map_err(|e| e.to_string())?;
    let hub_cfg_s = hub_cfg.to_string_lossy().into_owned();
    let mut hub = Proc::spawn(
        "the hub (outpost hub)",
        bin,
        &["hub", &hub_cfg_s],
        &d.join("hub.log"),
    )?;
    wait_ready(
        &ctx.rt,
        &mut hub,
        hub_metrics,
        |m| m.value("outpost_hub_ingress_connected", &[("transport", "mqtt")]) == 1.0,
        "the hub's MQTT ingress did not subscribe to broker B",
    )?;
    let mut sink = SinkTail::new(d.join("hub").join("sink"));

    let op_obs = Observer::start(
        ctx.rt.handle(),
        b.port(),
        &format!("outpost/{GATEWAY}/up"),
        Payload::Frames,
        "relay-observer-op",
    )?;
    let br_obs = Observer::start(
        ctx.rt.handle(),
        b.port(),
        &format!("{BR}/+/r"),
        Payload::Json,
        "relay-observer-br",
    )?;

    let gw_files = GatewayFiles {
        bin: bin.to_path_buf(),
        config: d.join("gateway.toml"),
        log: d.join("gateway.log"),
        metrics: SocketAddr::from(([127, 0, 0, 1], free_port())),
    };
    std::fs::write(
        &gw_files.config,
        gateway_toml(&d.join("gw"), gw_files.metrics, &a.address(), &b.address()),
    )
    .map_err(|e| e.to_string())?;

    // Idle footprint, then the path checked end to end.
    let mut gw = start_gateway(&ctx, &gw_files)?;
    std::thread::sleep(Duration::from_secs(3));
    let idle_rss_mb = mb(status_kb(gw.pid(), "VmRSS"));
    eprintln!("relay: the gateway's idle RSS is {idle_rss_mb:.1} MB");
    probe(&mut ctx, OP, &op_obs, "the gateway")?;
    let mut gw_running = true;

    let mut op: BTreeMap<u64, PhaseStats> = BTreeMap::new();
    let mut br: BTreeMap<u64, PhaseStats> = BTreeMap::new();
    for &rate in &p.rates {
        if !gw_running {
            gw = start_gateway(&ctx, &gw_files)?;
            probe(&mut ctx, OP, &op_obs, "the gateway")?;
        }
        let target = Target {
            name: "outpost",
            pid: gw.pid(),
            prefix: OP,
            observer: &op_obs,
            hub: Some(hub.pid()),
        };
        let spec = Spec {
            rate: rate as f64,
            warmup: p.warmup,
            window: p.phase,
            drain: true,
        };
        let (s, report) = measure(&mut ctx, &target, spec, &mut [&mut gw, &mut hub], |_| {})?;
        ctx.outpost_loads.push(report);
        op.insert(rate, s);
        gw.terminate();
        gw_running = false;

        let mut bridge = Mosquitto::start_configured(&bridge_conf(a.port(), b.port()), &[]);
        probe(&mut ctx, BR, &br_obs, "the bridge")?;
        let target = Target {
            name: "bridge",
            pid: bridge.pid().unwrap_or(0),
            prefix: BR,
            observer: &br_obs,
            hub: None,
        };
        let spec = Spec {
            rate: rate as f64,
            warmup: p.warmup,
            window: p.phase,
            drain: true,
        };
        let (s, _) = measure(&mut ctx, &target, spec, &mut [], |_| {})?;
        br.insert(rate, s);
        bridge.stop();
    }

    // The ceiling: the best the gateway delivered; past the highest rate if it kept up.
    gw = start_gateway(&ctx, &gw_files)?;
    probe(&mut ctx, OP, &op_obs, "the gateway")?;
    let mut ceiling = op.values().map(|s| s.delivered).fold(0.0, f64::max);
    let mut ramp: Vec<(f64, PhaseStats)> = Vec::new();
    let mut capped_by_generator = false;
    let top = *p.rates.iter().max().unwrap_or(&0) as f64;
    if op.values().last().is_some_and(PhaseStats::kept_up) && p.ramp > Duration::ZERO {
        let mut rate = top * 1.5;
        loop {
            if rate > gen_max * 0.95 {
                capped_by_generator = true;
                break;
            }
            let target = Target {
                name: "outpost",
                pid: gw.pid(),
                prefix: OP,
                observer: &op_obs,
                hub: Some(hub.pid()),
            };
            let spec = Spec {
                rate,
                warmup: Duration::from_secs(2).min(p.warmup),
                window: p.ramp,
                drain: true,
            };
            let (s, report) = measure(&mut ctx, &target, spec, &mut [&mut gw, &mut hub], |_| {})?;
            ctx.outpost_loads.push(report);
            ceiling = ceiling.max(s.delivered);
            let kept_up = s.kept_up();
            let offered_enough = s.offered >= 0.9 * rate;
            ramp.push((rate, s));
            if !offered_enough {
                capped_by_generator = true;
                break;
            }
            if !kept_up {
                break;
            }
            rate *= 1.5;
        }
    }
    eprintln!(
        "relay: the gateway's ceiling is {ceiling:.0} readings/s{}",
        if capped_by_generator {
            " (or more: the generator cannot offer more)"
        } else {
            ""
        }
    );

    // Overload at twice the ceiling, SIGKILL at its end, restart, drain.
    let overload_rate = (2.0 * ceiling).max(1.0);
    let target = Target {
        name: "outpost",
        pid: gw.pid(),
        prefix: OP,
        observer: &op_obs,
        hub: Some(hub.pid()),
    };
    let spec = Spec {
        rate: overload_rate,
        warmup: Duration::ZERO,
        window: p.overload,
        drain: false,
    };
    let (ov, report) = measure(&mut ctx, &target, spec, &mut [&mut gw, &mut hub], |procs| {
        procs[0].kill9()
    })?;
    let overload_rss = ov.rss_peak_mb;
    ctx.outpost_loads.push(report);
    let plateau = if ceiling > 0.0 {
        ov.delivered / ceiling
    } else {
        0.0
    };
    let min_window = ov.windows.iter().copied().fold(f64::INFINITY, f64::min);
    eprintln!(
        "relay: overload at {overload_rate:.0}/s: delivered {:.0}/s = {plateau:.2} of the ceiling \
         (per {WINDOW_S} s: {:?}), RSS peak {overload_rss:.1} MB; SIGKILL",
        ov.delivered,
        ov.windows.iter().map(|w| w.round()).collect::<Vec<_>>()
    );
    gw = start_gateway(&ctx, &gw_files)?;
    ctx.sampler.watch(gw.pid());
    let status = || {
        let m = scrape(&ctx.rt, gw_files.metrics).unwrap_or_default();
        format!(
            "the gateway's outbox holds {} records",
            m.sum("outpost_outbox_records")
        )
    };
    let check = drain_sink(
        &mut sink,
        &ctx.outpost_loads,
        p.stall,
        p.drain,
        &ctx.disk,
        &status,
    );
    let SinkCheck {
        lost,
        dup,
        unexpected,
        secs: drain_s,
        end: drain_end,
    } = check;
    let rss_after_drain = mb(status_kb(gw.pid(), "VmRSS"));
    let rss_restart_peak = ctx.sampler.peak_mb();
    let expected: u64 = ctx.outpost_loads.iter().map(LoadReport::acked_total).sum();
    eprintln!(
        "relay: after the restart: {lost} of {expected} readings missing at the hub's sink when the \
         drain ended ({drain_end}, {drain_s:.1} s), {dup} duplicated, {unexpected} never \
         acknowledged by A; RSS peak {rss_restart_peak:.1} MB"
    );
    // Where the missing readings are, if anywhere: still in the gateway's outbox, or still
    // held by broker A for the gateway's session (the drain stalled rather than lost them).
    let gm = scrape(&ctx.rt, gw_files.metrics).unwrap_or_default();
    let total = |name: &str| gm.sum(name) + gm.sum(&format!("{name}_total"));
    let outbox_records = total("outpost_outbox_records");
    let acks_given_up = total("outpost_mqtt_acks_given_up");
    let a_stored = sys_value(
        ctx.rt.handle(),
        a.port(),
        "$SYS/broker/store/messages/count",
        Duration::from_secs(5),
    );
    if lost > 0 {
        eprintln!(
            "relay: at the drain's end the gateway's outbox holds {outbox_records} records, it gave \
             up {acks_given_up} acknowledgements, broker A stores {} messages",
            fmt_opt(a_stored)
        );
    }
    gw.terminate();
    hub.terminate();

    let by_rate = |m: &BTreeMap<u64, PhaseStats>, f: &dyn Fn(&PhaseStats) -> Json| -> Json {
        Json::Object(m.iter().map(|(r, s)| (r.to_string(), f(s))).collect())
    };
    let opt = |v: Option<f64>| v.map_or(Json::Null, Json::from);
    let mut ratio_max: Option<f64> = None;
    for (r, s) in &op {
        if *r < 5_000 {
            continue;
        }
        if let (Some(o), Some(b)) = (s.us_per_reading, br.get(r).and_then(|b| b.us_per_reading))
            && b > 0.0
        {
            ratio_max = Some(ratio_max.map_or(o / b, |m: f64| m.max(o / b)));
        }
    }
    let p50_1k = op
        .get(&1_000)
        .or_else(|| op.values().next())
        .and_then(|s| s.p50_ms);
    let unacked: u64 = ctx.outpost_loads.iter().map(LoadReport::unacked).sum();
    let mut out = json!({
        "bench": "relay",
        "us_per_reading": by_rate(&op, &|s| opt(s.us_per_reading)),
        "bridge_us_per_reading": by_rate(&br, &|s| opt(s.us_per_reading)),
        "ratio_max": ratio_max.map(|r| round(r, 3)),
        "ceiling_per_s": ceiling.round(),
        "overload_plateau": round(plateau, 3),
        "overload_rss_mb": round(overload_rss, 1),
        "idle_rss_mb": round(idle_rss_mb, 1),
        "p50_ms_1k": p50_1k,
        "lost_after_restart": lost,
        "dup_after_restart": dup,
    });
    let more = [
        json!({
        "offered_per_s": by_rate(&op, &|s| s.offered.round().into()),
        "delivered_per_s": by_rate(&op, &|s| s.delivered.round().into()),
        "bridge_delivered_per_s": by_rate(&br, &|s| s.delivered.round().into()),
        "p50_ms": by_rate(&op, &|s| opt(s.p50_ms)),
        "p99_ms": by_rate(&op, &|s| opt(s.p99_ms)),
        "bridge_p50_ms": by_rate(&br, &|s| opt(s.p50_ms)),
        "bridge_p99_ms": by_rate(&br, &|s| opt(s.p99_ms)),
        "rss_peak_mb": by_rate(&op, &|s| round(s.rss_peak_mb, 1).into()),
        "bridge_rss_peak_mb": by_rate(&br, &|s| round(s.rss_peak_mb, 1).into()),
        "hub_us_per_reading": by_rate(&op, &|s| opt(s.hub_us_per_reading)),
        "resent_at_b": by_rate(&op, &|s| s.dup_at_b.into()),
        "undelivered_after_drain": by_rate(&op, &|s| s.undelivered.into()),
        "delivered_per_5s": by_rate(&op, &|s| s.windows.iter().map(|w| w.round()).collect::<Vec<_>>().into()),
        }),
        json!({
        "ramp": ramp.iter().map(|(r, s)| json!({
            "offered_target": r.round(),
            "offered_per_s": s.offered.round(),
            "delivered_per_s": s.delivered.round(),
            "us_per_reading": s.us_per_reading,
            "p99_ms": s.p99_ms,
        })).collect::<Vec<_>>(),
        "ceiling_capped_by_generator": capped_by_generator,
        "overload_offered_per_s": ov.offered.round(),
        "overload_delivered_per_s": ov.delivered.round(),
        "overload_min_5s_plateau": if ceiling > 0.0 && min_window.is_finite() { round(min_window / ceiling, 3) } else { 0.0 },
        "overload_per_5s": ov.windows.iter().map(|w| w.round()).collect::<Vec<_>>(),
        "overload_p99_ms": ov.p99_ms,
        "overload_us_per_reading": ov.us_per_reading,
        "restart_drain_s": round(drain_s, 1),
        "restart_drain_end": drain_end,
        "restart_rss_peak_mb": round(rss_restart_peak, 1),
        "rss_after_drain_mb": round(rss_after_drain, 1),
        "readings_checked_at_sink": expected,
        "sink_unexpected": unexpected,
        "outbox_records_after_drain": outbox_records,
        "acks_given_up": acks_given_up,
        "broker_a_stored_after_drain": a_stored,
        "sink_unreadable_lines": sink.bad_lines,
        "unacked_by_a": unacked,
        "undecodable_at_b": op_obs.undecodable() + br_obs.undecodable(),
        "generator_max_per_s": gen_max.round(),
        "generator_us_per_reading": round(gen_us, 2),
        "devices": p.devices,
        "samples_per_reading": 4,
        "latency_measured_at": "broker B (observer: the gateway's frames decoded, the bridge's messages)",
        "phase_s": p.phase.as_secs_f64(),
        "overload_s": p.overload.as_secs_f64(),
        }),
    ];
    if let Json::Object(o) = &mut out {
        for m in more {
            if let Json::Object(m) = m {
                o.extend(m);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_splits_back_into_its_topic_and_payload() {
        let mut buf = Vec::new();
        let payload = vec![7u8; 300]; // a two-byte remaining length
        wire::publish_qos1(&mut buf, b"op/d001/r", 513, &payload);
        wire::publish_qos1(&mut buf, b"x", 1, b"{}");
        let (first, header, total) = wire::split(&buf, MAX_PACKET).unwrap().unwrap();
        assert_eq!(first, 0x32);
        assert_eq!(header, 3);
        let (topic, p) = wire::publish_parts(first, &buf[header..total]).unwrap();
        assert_eq!(topic, b"op/d001/r");
        assert_eq!(p, &payload[..]);
        let (_, h2, t2) = wire::split(&buf[total..], MAX_PACKET).unwrap().unwrap();
        assert_eq!(
            wire::publish_parts(0x32, &buf[total + h2..total + t2])
                .unwrap()
                .1,
            b"{}"
        );
        // Incomplete packets wait for more bytes; oversized or malformed ones are errors.
        assert_eq!(wire::split(&buf[..total - 1], MAX_PACKET).unwrap(), None);
        assert_eq!(wire::split(&buf[..1], MAX_PACKET).unwrap(), None);
        assert!(wire::split(&buf, 100).is_err());
        assert!(wire::split(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0], MAX_PACKET).is_err());
    }

    #[test]
    fn connect_and_subscribe_are_well_formed() {
        let c = wire::connect("dev", 600);
        assert_eq!(
            c,
            [
                0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 2, 88, 0, 3, b'd', b'e', b'v'
            ]
        );
        let s = wire::subscribe(1, "a/#", 0);
        assert_eq!(s, [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'#', 0]);
    }

    #[test]
    fn a_reading_carries_its_seq_and_send_time() {
        let mut buf = Vec::new();
        let seq = seq_of(3, 12_345, 42);
        reading(&mut buf, seq, 1_700_000_000_123_456);
        let v: Json = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["seq"].as_u64(), Some(seq));
        assert_eq!(v["ts"].as_i64(), Some(1_700_000_000_123_456));
        for f in ["temp", "hum", "press", "volt"] {
            assert!(v[f].is_f64(), "{f} in {v}");
        }
        assert_eq!(phase_of(seq), 3);
        let mut out = Vec::new();
        assert!(decode(Payload::Json, &buf, 9, &mut out));
        assert_eq!(
            out,
            [Arrival {
                seq,
                ts_us: 1_700_000_000_123_456,
                at_us: 9
            }]
        );
    }

    #[test]
    fn delivery_counts_first_arrivals_in_the_window_and_latency_of_readings_sent_in_it() {
        let a = |seq, ts_us, at_us| Arrival { seq, ts_us, at_us };
        let arrivals = [
            a(1, 90, 105),  // sent before the window, arrives in it
            a(2, 100, 110), // in the window
            a(2, 100, 150), // a resend
            a(3, 150, 260), // sent in the window, arrives after it
            a(4, 190, 195),
        ];
        let d = delivery(&arrivals, 100, 200, 50);
        assert_eq!(d.delivered, 3);
        assert_eq!(d.distinct, 4);
        assert_eq!(d.dups, 1);
        assert_eq!(d.latencies_us, vec![5, 10, 110]);
        assert_eq!(d.windows, vec![2.0 * 1e6 / 50.0, 1e6 / 50.0]);
        assert_eq!(percentile_ms(&d.latencies_us, 0.5), Some(0.01));
        assert_eq!(percentile_ms(&[], 0.5), None);
    }

    #[test]
    fn proc_figures_of_this_process() {
        assert!(cpu_ticks(0).is_some());
        assert!(status_kb(std::process::id(), "VmRSS").unwrap() > 0);
    }
}
