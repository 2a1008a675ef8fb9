//! `overload_exactly_once`: an MQTT broker that sends far more, and far faster, than the
//! gateway can store — past the Receive Maximum the gateway announced, with up to 60,000
//! messages unacknowledged in the broker — while the real `outpost` binary relays to a
//! real `outpost hub`; the gateway is killed with SIGKILL twice in the middle of it and
//! restarted. At the end every QoS 1 message is at the hub's sink exactly once, the broker
//! saw no acknowledgement on a connection its message did not come on, and the gateway's
//! resident memory (sampled from `/proc/<pid>/status` every 50 ms) stayed under
//! [`RSS_BOUND_MB`] throughout.
//!
//! The broker is [`FloodBroker`], a minimal MQTT 5 broker in this crate: no real broker
//! overruns a client's Receive Maximum on demand. The gateway binary is `outpost-cli`
//! (this crate's build of the root package's `src/main.rs`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outpost_hil::harness::{self, Pki};
use outpost_hil::peers::flood_broker::FloodBroker;

/// QoS 1 messages the broker holds for the gateway.
const MESSAGES: usize = 200_000;
/// The gateway's limit of messages held unacknowledged (and its Receive Maximum).
const GATEWAY_IN_FLIGHT: usize = 1_024;
/// The broker's own limit of unacknowledged messages: ~63 × the gateway's.
const BROKER_IN_FLIGHT: usize = 65_000;
/// Streams the messages are spread over.
const STREAMS: usize = 50;
/// Bound on the gateway's resident memory, debug build: its idle footprint (about 45 MB)
/// plus sled's cache and working set for the backlog waiting for the hub (runs here peak
/// at 55-75 MB). The gateway holds at most `GATEWAY_IN_FLIGHT` unacknowledged messages
/// whatever the broker sends; the broker's 65,000 stay in the broker and in socket
/// buffers.
const RSS_BOUND_MB: u64 = 128;

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_outpost-cli")
}

fn spawn(args: &[&str], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn kill9(c: &mut Child) {
    let _ = c.kill(); // SIGKILL on Unix
    let _ = c.wait();
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_owned()
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Samples the resident memory of whichever gateway process `pid` names, every 50 ms.
struct RssWatch {
    pid: Arc<AtomicU32>,
    peak_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start() -> RssWatch {
        let pid = Arc::new(AtomicU32::new(0));
        let peak_kb = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, k, s) = (pid.clone(), peak_kb.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let pid = p.load(Ordering::Relaxed);
                if pid != 0
                    && let Some(kb) = rss_kb(pid)
                {
                    k.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssWatch {
            pid,
            peak_kb,
            stop,
            thread: Some(thread),
        }
    }

    fn watch(&self, c: &Child) {
        self.pid.store(c.id(), Ordering::Relaxed);
    }

    fn peak_mb(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak_kb.load(Ordering::Relaxed) / 1024
    }
}

/// Waits until `done()` or `limit` passes; returns whether it became true.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

#[test]
fn a_broker_overrunning_the_gateway_through_two_sigkills_loses_and_doubles_nothing() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(d, &["gw-overload"]);
    let hub_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hub_addr = format!("127.0.0.1:{hub_port}");
    let hub_toml = write(
        &d.join("hub.toml"),
        &format!(
            "[hub]\nlisten = \"{hub_addr}\"\ndata_dir = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = {{ file = \"{}\" }}\n[metrics]\nenabled = false\n",
            d.join("hub").display(),
            pki.bundle.ca_cert.display(),
            pki.bundle.hub_cert.display(),
            pki.bundle.hub_key.display()
        ),
    );
    let broker = FloodBroker::start(
        (0..MESSAGES)
            .map(|n| (format!("ovl/s{}", n % STREAMS), n.to_string().into_bytes()))
            .collect(),
        BROKER_IN_FLIGHT,
    );
    let gw_toml = write(
        &d.join("gateway.toml"),
        &format!(
            r#"[gateway]
id = "gw-overload"
data_dir = "{data}"
[metrics]
enabled = false
[[devices]]
name = "flood"
[devices.mqtt]
broker = "{broker}"
version = "5"
max_in_flight = {GATEWAY_IN_FLIGHT}
reconnect = {{ initial = "50ms", max = "500ms" }}
[[devices.mqtt.subscriptions]]
topic = "ovl/+"
qos = 1
format = "number"
stream = "ovl/{{1}}"
{uplink}"#,
            data = d.join("gw").display(),
            broker = broker.address(),
            uplink = harness::uplink_toml(&pki, "gw-overload", &hub_addr),
        ),
    );
    let hub_log = d.join("hub.log");
    let gw_log = d.join("gateway.log");
    let logs = || {
        format!(
            "gateway log:\n{}\nhub log:\n{}",
            std::fs::read_to_string(&gw_log).unwrap_or_default(),
            std::fs::read_to_string(&hub_log).unwrap_or_default()
        )
    };
    let mut hub = spawn(&["hub", hub_toml.to_str().unwrap()], &hub_log);
    let mut rss = RssWatch::start();
    let mut gw = spawn(&["run", gw_toml.to_str().unwrap()], &gw_log);
    rss.watch(&gw);

    // Two SIGKILLs while the broker has tens of thousands unacknowledged.
    let mut at_kill = Vec::new();
    for fraction in [3, 2] {
        let target = MESSAGES / fraction;
        assert!(
            wait_until(Duration::from_secs(60), || broker.score().acked >= target),
            "the gateway did not get through {target} messages: {:?}\n{}",
            broker.score(),
            logs()
        );
        kill9(&mut gw);
        let s = broker.score();
        at_kill.push(s.sent - s.acked);
        std::thread::sleep(Duration::from_millis(300));
        gw = spawn(&["run", gw_toml.to_str().unwrap()], &gw_log);
        rss.watch(&gw);
    }

    // Everything acknowledged to the broker, and at the hub.
    assert!(
        wait_until(Duration::from_secs(90), || broker.done()),
        "not every message was acknowledged: {:?}\n{}",
        broker.score(),
        logs()
    );
    let sink = d.join("hub").join("sink");
    let counters = |lines: &[harness::SinkLine]| {
        let mut seen = std::collections::BTreeMap::<i64, u32>::new();
        for l in lines {
            *seen.entry(l.value.as_i64().unwrap_or(-1)).or_default() += 1;
        }
        seen
    };
    wait_until(Duration::from_secs(60), || {
        counters(&harness::read_sink(&sink)).len() >= MESSAGES
    });
    // A little longer, so that late duplicates would show.
    std::thread::sleep(Duration::from_millis(500));
    let peak_mb = rss.peak_mb();
    kill9(&mut gw);
    kill9(&mut hub);

    let lines = harness::read_sink(&sink);
    let seen = counters(&lines);
    let score = broker.score();
    let missing: Vec<i64> = (0..MESSAGES as i64)
        .filter(|n| !seen.contains_key(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{} messages missing at the hub, e.g. {:?}; broker {score:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        logs()
    );
    let doubled: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        doubled.is_empty(),
        "{} messages at the hub more than once, e.g. {:?}; broker {score:?}",
        doubled.len(),
        &doubled[..doubled.len().min(10)]
    );
    harness::assert_exactly_once(&lines);
    assert_eq!(score.foreign_acks, 0, "an ack outlived its connection");
    // The broker did overrun the gateway, and had much unacknowledged at each kill.
    assert_eq!(score.client_receive_maximum, Some(GATEWAY_IN_FLIGHT as u16));
    assert!(
        score.peak_in_flight > 20 * GATEWAY_IN_FLIGHT,
        "the broker never got far ahead: {score:?}"
    );
    assert!(
        score.redelivered > 0,
        "no redelivery after a kill: {score:?}"
    );
    assert!(
        peak_mb <= RSS_BOUND_MB,
        "gateway RSS peaked at {peak_mb} MB > {RSS_BOUND_MB} MB"
    );
    eprintln!(
        "overload_exactly_once: {MESSAGES} messages exactly once at the hub through 2 SIGKILLs; \
         broker peak unacknowledged {} (gateway Receive Maximum {GATEWAY_IN_FLIGHT}), \
         unacknowledged at the kills {at_kill:?}, {} redelivered, {} connections; \
         gateway RSS peak {peak_mb} MB (bound {RSS_BOUND_MB} MB); {:.1} s",
        score.peak_in_flight,
        score.redelivered,
        score.connections,
        t0.elapsed().as_secs_f64()
    );
}
