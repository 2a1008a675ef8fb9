//! `bench -- e2e`: MQTT QoS 1 in, hub sink out, on loopback — a Mosquitto broker, a gateway
//! with one MQTT device and a QUIC uplink, and an in-process hub.
//!
//! Two phases in one run:
//! - latency: readings published at a steady 2,000 messages/s (4,000 samples/s) for 5 s,
//!   each stamped with its publish time (µs) as its source timestamp; latency is the hub's
//!   `received_ns` minus that (publish → broker → gateway → durable outbox → QUIC → hub
//!   durable sink). Reported as p50 / p99 / max in ms.
//! - throughput: 20,000 messages published as fast as `mosquitto_pub` can; samples/s from
//!   the first publish to the last sample in the hub's sink.
//!
//! Last line: `{"bench":"e2e","samples_per_s":…,"p99_latency_ms":…, …}`.

use std::io::Write;
use std::time::{Duration, Instant};

use outpost_actors::gateway::Gateway;
use outpost_runtime::metrics::Metrics;
use serde_json::json;

use crate::harness::{self, Pki};
use crate::peers::mosquitto::{self, Mosquitto};

const RATE: u64 = 2_000;
const LATENCY_SECS: u64 = 5;
const BLAST: u64 = 20_000;

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Publishes `count` readings `{"n":…,"v":…,"ts":<µs>}` to `topic`, `rate` per second (0:
/// as fast as possible).
fn publish(port: u16, topic: &str, first: u64, count: u64, rate: u64) -> Result<(), String> {
    let mut child = mosquitto::mosquitto_pub(port, 1, topic)
        .arg("-l")
        .spawn()
        .map_err(|e| format!("mosquitto_pub: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let start = Instant::now();
    let mut buf = String::new();
    for i in 0..count {
        if let Some(us) = (i * 1_000_000).checked_div(rate) {
            let due = start + Duration::from_micros(us);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            writeln!(stdin, r#"{{"n":{},"v":1.5,"ts":{}}}"#, first + i, now_us())
                .map_err(|e| e.to_string())?;
        } else {
            buf.push_str(&format!(
                "{{\"n\":{},\"v\":1.5,\"ts\":{}}}\n",
                first + i,
                now_us()
            ));
        }
    }
    if rate == 0 {
        stdin.write_all(buf.as_bytes()).map_err(|e| e.to_string())?;
    }
    drop(stdin);
    let st = child.wait().map_err(|e| e.to_string())?;
    st.success()
        .then_some(())
        .ok_or_else(|| format!("mosquitto_pub failed: {st}"))
}

pub fn run(_args: &[String]) -> Result<serde_json::Value, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let pki = Pki::new(dir.path(), &["gw-bench"]);
        let hub_dir = dir.path().join("hub");
        let hub = harness::start_hub(&pki, &hub_dir).await;
        let broker = Mosquitto::start();
        let cfg = harness::gateway_config(
            "gw-bench",
            &dir.path().join("gw"),
            &format!(
                "{}\n[storage]\ncommit_interval = \"5ms\"\n",
                mosquitto::telemetry_device_toml("bench", &broker.address(), "5")
            ),
            Some(&harness::uplink_toml(
                &pki,
                "gw-bench",
                &hub.addr.to_string(),
            )),
        );
        let metrics = Metrics::new();
        let gw = Gateway::start(&cfg, metrics.clone())
            .await
            .map_err(|e| e.to_string())?;
        let connected = harness::wait_for(Duration::from_secs(10), || {
            metrics
                .encode()
                .contains("outpost_mqtt_connected{device=\"bench\"} 1")
        })
        .await;
        if !connected {
            return Err("the gateway did not connect to the broker".into());
        }
        let sink = hub_dir.join("sink");
        let count_n = |lines: &[harness::SinkLine]| {
            lines.iter().filter(|l| l.stream.ends_with("/n")).count() as u64
        };

        // Phase 1: latency at a steady rate.
        let port = broker.port();
        let n1 = RATE * LATENCY_SECS;
        tokio::task::spawn_blocking(move || publish(port, "plant/lat/telemetry", 0, n1, RATE))
            .await
            .map_err(|e| e.to_string())??;
        harness::wait_for(Duration::from_secs(60), || {
            count_n(&harness::read_sink(&sink)) >= n1
        })
        .await;
        let lines = harness::read_sink(&sink);
        let mut lat: Vec<f64> = lines
            .iter()
            .filter(|l| l.stream == "plant/lat/n")
            .map(|l| (l.received_ns - l.ts_ns) as f64 / 1e6)
            .collect();
        if (lat.len() as u64) < n1 {
            return Err(format!(
                "latency phase: {} of {n1} readings arrived",
                lat.len()
            ));
        }
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];

        // Phase 2: throughput.
        let t0 = Instant::now();
        tokio::task::spawn_blocking(move || publish(port, "plant/tput/telemetry", n1, BLAST, 0))
            .await
            .map_err(|e| e.to_string())??;
        let ok = harness::wait_for(Duration::from_secs(120), || {
            count_n(&harness::read_sink(&sink)) >= n1 + BLAST
        })
        .await;
        let secs = t0.elapsed().as_secs_f64();
        if !ok {
            return Err("throughput phase: not everything arrived".into());
        }
        let lines = harness::read_sink(&sink);
        harness::assert_exactly_once(&lines);
        gw.shutdown().await.map_err(|e| e.to_string())?;
        hub.stop().await;
        let samples = (BLAST * 2) as f64;
        Ok(json!({
            "bench": "e2e",
            "samples_per_s": (samples / secs).round(),
            "p99_latency_ms": (pct(0.99) * 100.0).round() / 100.0,
            "p50_latency_ms": (pct(0.5) * 100.0).round() / 100.0,
            "max_latency_ms": (pct(1.0) * 100.0).round() / 100.0,
            "latency_rate_msgs_per_s": RATE,
            "throughput_messages": BLAST,
        }))
    })
}
