//! `mqtt_ingest`: how fast the gateway takes QoS 1 MQTT messages into its durable outbox,
//! against `mosquitto_sub` (QoS 1) writing the same messages to a file, in the same run.
//!
//! Each round starts a fresh Mosquitto broker; `N` JSON readings ([`telemetry_line`], two
//! fields each, so two samples) are published with four `mosquitto_pub -l` (one per plant
//! topic). The gateway variant times from the first publish until the last sample is
//! durable (`outpost_stream_samples_stored` reaches `2N`: it counts after durability); the
//! baseline times from the first publish until `mosquitto_sub -C N` has written all `N`
//! messages and exited. Variants alternate round by round; figures are medians. Both are
//! given in samples/s (two per message), so `ratio` is also the ratio of message rates.
//!
//! Arguments: `--n=20000`, `--rounds=3`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost_actors::gateway::Gateway;
use outpost_runtime::metrics::Metrics;
use serde_json::json;

use crate::peers::mosquitto::{
    Mosquitto, Publisher, client_binary, telemetry_device_toml, telemetry_line,
};

const TOPICS: u64 = 4;

fn arg(args: &[String], name: &str, default: usize) -> Result<usize, String> {
    for a in args {
        if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            return v
                .parse()
                .map_err(|_| format!("bad value for {name}: {v:?}"));
        }
    }
    Ok(default)
}

fn publish(port: u16, n: u64) -> Vec<Publisher> {
    (0..TOPICS)
        .map(|d| {
            let lines = (0..n)
                .filter(|i| i % TOPICS == d)
                .map(telemetry_line)
                .collect();
            Publisher::lines(port, &format!("plant/m{d}/telemetry"), 1, lines)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Samples/s of the gateway for one round.
async fn gateway_round(n: u64, round: usize) -> Result<f64, String> {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let text = format!(
        "[gateway]\nid = \"bench-{round}\"\ndata_dir = \"{}\"\n[metrics]\nenabled = false\n{}",
        dir.path().join("data").display(),
        telemetry_device_toml("plant", &broker.address(), "5")
    );
    let cfg = outpost_runtime::config::parse(&text, "bench.toml".as_ref(), dir.path())
        .map_err(|e| e.to_string())?
        .strict()
        .map_err(|e| e.to_string())?;
    let metrics = Metrics::new();
    let gw = Gateway::start(&cfg, metrics.clone())
        .await
        .map_err(|e| e.to_string())?;
    let connected = |m: &Metrics| {
        m.encode()
            .lines()
            .any(|l| l.starts_with("outpost_mqtt_connected{") && l.ends_with(" 1"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !connected(&metrics) {
        if Instant::now() > deadline {
            return Err("the gateway did not connect to the broker".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t0 = Instant::now();
    let pubs = publish(broker.port(), n);
    let deadline = Instant::now() + Duration::from_secs(300);
    while metrics.counter_value("outpost_stream_samples_stored", &[("device", "plant")]) < 2 * n {
        if Instant::now() > deadline {
            return Err("the gateway did not take in every message within 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    for p in pubs {
        p.wait();
    }
    gw.shutdown().await.map_err(|e| e.to_string())?;
    Ok(2.0 * n as f64 / secs)
}

/// Samples/s of `mosquitto_sub` writing the same messages to a file.
fn sub_round(n: u64) -> Result<f64, String> {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = std::fs::File::create(dir.path().join("sub.out")).map_err(|e| e.to_string())?;
    let mut sub = Command::new(client_binary("mosquitto_sub"))
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .args(["-q", "1", "-t", "plant/+/telemetry", "-C", &n.to_string()])
        .stdout(Stdio::from(out))
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("mosquitto_sub: {e}"))?;
    // mosquitto_sub gives no sign that it has subscribed; give it ample time.
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let pubs = publish(broker.port(), n);
    let status = sub.wait().map_err(|e| e.to_string())?;
    let secs = t0.elapsed().as_secs_f64();
    for p in pubs {
        p.wait();
    }
    if !status.success() {
        return Err(format!("mosquitto_sub failed: {status}"));
    }
    let lines = std::fs::read_to_string(dir.path().join("sub.out"))
        .map_err(|e| e.to_string())?
        .lines()
        .count() as u64;
    if lines != n {
        return Err(format!("mosquitto_sub wrote {lines} of {n} messages"));
    }
    Ok(2.0 * n as f64 / secs)
}

/// Runs the benchmark.
pub fn run(args: &[String]) -> Result<serde_json::Value, String> {
    let n = arg(args, "--n", 20_000)? as u64;
    let rounds = arg(args, "--rounds", 3)?.max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (mut gw, mut sub) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let (a, b) = if r % 2 == 0 {
            let a = rt.block_on(gateway_round(n, r))?;
            (a, sub_round(n)?)
        } else {
            let b = sub_round(n)?;
            (rt.block_on(gateway_round(n, r))?, b)
        };
        eprintln!("round {r}: gateway {a:.0} samples/s, mosquitto_sub {b:.0} samples/s");
        gw.push(a);
        sub.push(b);
    }
    let (g, s) = (median(gw), median(sub));
    Ok(json!({
        "bench": "mqtt_ingest",
        "messages": n,
        "rounds": rounds,
        "samples_per_s": g.round(),
        "mosquitto_sub_samples_per_s": s.round(),
        "ratio": (g / s * 1000.0).round() / 1000.0,
    }))
}
