//! `crash_exactly_once`: gateway and hub as separate `outpost` processes; the gateway is
//! killed with SIGKILL 10 times at random moments while Modbus and MQTT data flow, and the
//! hub once. At the end every QoS 1 MQTT message is at the hub exactly once (by content:
//! its counter), no (gateway, stream, sequence) appears twice, and the Modbus series has
//! no gap longer than the downtime. Peers: Mosquitto (apt) and pymodbus (the test venv);
//! run through `hil-tests/run-tests.sh`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_hil::harness::{self, Pki};
use outpost_hil::peers::mosquitto::{self, Mosquitto};
use outpost_hil::peers::pymodbus::{KnownPoint, PyModbusServer, Tbl};

const MESSAGES: u64 = 10_000;
const KILLS: usize = 10;

fn spawn(args: &[&str], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_outpost"))
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

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_owned()
}

#[test]
fn kill_minus_nine_never_loses_or_doubles_a_sample() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(d, &["gw-crash"]);
    let hub_port = free_udp_port();
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
    let broker = Mosquitto::start();
    let modbus = PyModbusServer::start(&[KnownPoint::new(
        "crash/modbus/level",
        Tbl::Holding,
        0,
        "u16",
        42.0,
    )]);
    let gw_toml = write(
        &d.join("gateway.toml"),
        &format!(
            "[gateway]\nid = \"gw-crash\"\ndata_dir = \"{data}\"\n[metrics]\nenabled = false\n\
             [storage]\ncommit_interval = \"10ms\"\n\
             [supervision]\nmax_restarts = 100\nwithin = \"60s\"\nbackoff = {{ initial = \"50ms\", max = \"500ms\" }}\n\
             {mqtt}\n{modbus}\n{uplink}",
            data = d.join("gw").display(),
            mqtt = mosquitto::telemetry_device_toml("mqtt1", &broker.address(), "5"),
            modbus = outpost_hil::peers::pymodbus::device_toml(
                "modbus1",
                modbus.addr(),
                500,
                0,
                &[(
                    100,
                    &[KnownPoint::new(
                        "crash/modbus/level",
                        Tbl::Holding,
                        0,
                        "u16",
                        42.0
                    )]
                )]
            ),
            uplink = harness::uplink_toml(&pki, "gw-crash", &hub_addr),
        ),
    );
    let hub_log = d.join("hub.log");
    let gw_log = d.join("gateway.log");
    let mut hub = spawn(&["hub", hub_toml.to_str().unwrap()], &hub_log);
    let mut gw = spawn(&["run", gw_toml.to_str().unwrap()], &gw_log);
    std::thread::sleep(Duration::from_millis(1500)); // first subscription (persistent session)

    // Publisher: MESSAGES QoS 1 readings at a steady rate over ~20 s, through one
    // `mosquitto_pub -l` fed line by line.
    let mut publisher = mosquitto::mosquitto_pub(broker.port(), 1, "plant/m1/telemetry")
        .arg("-l")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = publisher.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        for n in 0..MESSAGES {
            writeln!(stdin, "{}", mosquitto::telemetry_line(n)).unwrap();
            if n % 50 == 49 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });

    // Chaos: 10 SIGKILLs of the gateway at random moments, one of the hub.
    // Random moments, reproducible: the seed is printed; OUTPOST_CRASH_SEED replays a run.
    let seed = std::env::var("OUTPOST_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("crash_exactly_once: seed {seed} (OUTPOST_CRASH_SEED={seed} replays it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut longest_down = Duration::ZERO;
    for k in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.u64(300..2_000)));
        let t = Instant::now();
        kill9(&mut gw);
        if k == 4 {
            kill9(&mut hub);
            std::thread::sleep(Duration::from_millis(rng.u64(100..800)));
            hub = spawn(&["hub", hub_toml.to_str().unwrap()], &hub_log);
        }
        std::thread::sleep(Duration::from_millis(rng.u64(0..500)));
        gw = spawn(&["run", gw_toml.to_str().unwrap()], &gw_log);
        longest_down = longest_down.max(t.elapsed());
    }
    feeder.join().unwrap();
    drop(publisher.wait());

    // Everything must arrive: every counter, and the outbox drains.
    let sink = d.join("hub").join("sink");
    let deadline = Instant::now() + Duration::from_secs(90);
    let counters = |lines: &[harness::SinkLine]| {
        let mut seen = std::collections::BTreeMap::<i64, u32>::new();
        for l in lines.iter().filter(|l| l.stream.ends_with("/n")) {
            *seen.entry(l.value.as_i64().unwrap_or(-1)).or_default() += 1;
        }
        seen
    };
    loop {
        let seen = counters(&harness::read_sink(&sink));
        if seen.len() as u64 >= MESSAGES || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_millis(500));
    kill9(&mut gw);
    kill9(&mut hub);
    let lines = harness::read_sink(&sink);
    let seen = counters(&lines);
    let logs = || {
        format!(
            "gateway log:\n{}\nhub log:\n{}",
            std::fs::read_to_string(&gw_log).unwrap_or_default(),
            std::fs::read_to_string(&hub_log).unwrap_or_default()
        )
    };
    let missing: Vec<i64> = (0..MESSAGES as i64)
        .filter(|n| !seen.contains_key(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{} MQTT messages missing at the hub, e.g. {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        logs()
    );
    let doubled: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        doubled.is_empty(),
        "MQTT messages at the hub more than once: {:?}",
        &doubled[..doubled.len().min(10)]
    );
    harness::assert_exactly_once(&lines);

    // Modbus: arrival-stamped samples every 100 ms; no gap longer than the longest downtime
    // (plus start-up and one poll).
    let mut ts: Vec<i64> = lines
        .iter()
        .filter(|l| l.stream == "crash/modbus/level")
        .map(|l| l.ts_ns)
        .collect();
    ts.sort();
    assert!(ts.len() > 100, "modbus samples at the hub: {}", ts.len());
    let max_gap = ts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let allowed = (longest_down + Duration::from_millis(1_500)).as_nanos() as i64;
    assert!(
        max_gap <= allowed,
        "modbus gap {} ms > longest downtime {} ms + 1.5 s",
        max_gap / 1_000_000,
        longest_down.as_millis()
    );
    eprintln!(
        "crash_exactly_once: {KILLS} gateway kills + 1 hub kill; {} MQTT messages exactly once; \
         {} modbus samples, largest gap {} ms (longest downtime {} ms); {} sink lines",
        seen.len(),
        ts.len(),
        max_gap / 1_000_000,
        longest_down.as_millis(),
        lines.len()
    );
}
