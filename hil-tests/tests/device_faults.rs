//! `device_faults`: a device that goes away and comes back. The pymodbus server is killed
//! (SIGKILL) and restarted 5 times; the Modbus device actor fails, is restarted by its
//! supervisor with growing delays while the device is down, and resumes with fresh samples
//! each time it is back.
//!
//! Beside it, an MQTT device in the same gateway receives readings published at a fixed
//! rate throughout; its ingest rate over the whole fault period stays within 5 % of the
//! publish rate: a device fault never reaches another device.
//!
//! Needs `OUTPOST_PYTHON` (see `outpost_hil::peers::pymodbus::INSTALL`) and Mosquitto.

use std::time::{Duration, Instant};

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use outpost_actors::gateway::Gateway;
use outpost_hil::peers::mosquitto::{self, Mosquitto};
use outpost_hil::peers::pymodbus::{
    KnownPoint, PyModbusServer, Tbl, device_toml, gateway_config, outbox_samples, verify_samples,
};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::now_ns;

const CYCLES: usize = 5;
/// How long the device stays dead each time.
const DOWNTIME: Duration = Duration::from_millis(1600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_device_killed_and_restarted_5_times_resumes_with_backoff() {
    let points = vec![
        KnownPoint::new("faults/temp", Tbl::Holding, 0, "f32", 21.5),
        KnownPoint::new("faults/count", Tbl::Input, 0, "u32", 123_456.0),
    ];
    let mut server = PyModbusServer::start(&points);
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let devices = format!(
        "{}\n{}",
        device_toml("flaky", server.addr(), 200, 0, &[(100, &points)]),
        mosquitto::telemetry_device_toml("steady", &broker.address(), "5")
    );
    // Backoff 50 ms doubling to 800 ms (reset after a run of 800 ms): 50, 100, 200, 400, 800
    // fit in the downtime. Enough restart budget for 5 outages.
    let supervision = "[supervision]\nmax_restarts = 1000\nwithin = \"60s\"\n\
                       backoff = { initial = \"50ms\", max = \"800ms\" }\n";
    let m = Metrics::new();
    let gw = Gateway::start(
        &gateway_config(dir.path(), &devices, supervision),
        m.clone(),
    )
    .await
    .unwrap();
    let restarts = || {
        m.counter_value(
            "outpost_restarts",
            &[("supervisor", "devices"), ("child", "device:flaky")],
        )
    };
    // Fresh samples: newer than `since` (ns), of every point, with the known values.
    let wait_fresh = |since: i64, what: String| {
        let gw = &gw;
        let points = &points;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let fresh: Vec<_> = outbox_samples(gw)
                    .into_iter()
                    .filter(|s| s.ts_ns > since)
                    .collect();
                if verify_samples(points, &fresh, 3).is_ok() {
                    return;
                }
                assert!(Instant::now() < deadline, "no fresh samples {what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_fresh(0, "at start".into()).await;

    // The MQTT stream: 200 readings/s, published from one `mosquitto_pub -l`.
    let published = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut publisher = mosquitto::mosquitto_pub(broker.port(), 1, "plant/steady/telemetry")
        .arg("-l")
        .spawn()
        .unwrap();
    let feeder = {
        let mut stdin = publisher.stdin.take().unwrap();
        let (published, stop) = (published.clone(), stop.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                writeln!(stdin, "{}", mosquitto::telemetry_line(n)).unwrap();
                n += 1;
                published.store(n, Ordering::Relaxed);
                let due = start + Duration::from_millis(n * 5);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        })
    };
    let mqtt_samples = || m.counter_value("outpost_stream_samples_stored", &[("device", "steady")]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (t0, p0, c0) = (
        Instant::now(),
        published.load(Ordering::Relaxed),
        mqtt_samples(),
    );

    let mut growing = 0;
    for cycle in 0..CYCLES {
        // A stable run longer than the backoff's reset_after (800 ms) before each outage.
        tokio::time::sleep(Duration::from_millis(900)).await;
        let before = restarts();
        server.kill();
        // Record when each restart attempt happens while the device is down.
        let down = Instant::now();
        let mut seen = before;
        let mut at = Vec::new();
        while down.elapsed() < DOWNTIME {
            let r = restarts();
            if r > seen {
                at.push(down.elapsed());
                seen = r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            at.len() >= 3,
            "cycle {cycle}: restarts while down at {at:?}"
        );
        eprintln!("cycle {cycle}: restarts while down at {at:?}");
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        // Doubling delays with 20 % jitter: each later gap clearly longer than the first.
        if gaps.len() >= 2 && gaps[gaps.len() - 1] > gaps[0] * 2 {
            growing += 1;
        }
        assert!(
            gaps.windows(2).all(|w| w[1] * 10 >= w[0] * 7),
            "cycle {cycle}: restart delays shrink: {gaps:?}"
        );
        let back = now_ns();
        server.restart();
        wait_fresh(back, format!("after restart {}", cycle + 1)).await;
        assert!(
            restarts() > before,
            "cycle {cycle}: the actor was restarted"
        );
    }
    assert_eq!(growing, CYCLES, "restart delays grew in every outage");
    // The MQTT stream's rate over the fault period (two samples per reading).
    let (p1, c1) = (published.load(Ordering::Relaxed), mqtt_samples());
    let secs = t0.elapsed().as_secs_f64();
    let publish_rate = (p1 - p0) as f64 / secs;
    let ingest_rate = (c1 - c0) as f64 / 2.0 / secs;
    eprintln!(
        "MQTT beside the faulty device: published {publish_rate:.1}/s, ingested {ingest_rate:.1}/s over {secs:.1} s"
    );
    assert!(
        (ingest_rate / publish_rate - 1.0).abs() <= 0.05,
        "MQTT rate disturbed: published {publish_rate:.1}/s, ingested {ingest_rate:.1}/s"
    );
    assert_eq!(
        m.counter_value(
            "outpost_restarts",
            &[("supervisor", "devices"), ("child", "device:steady")]
        ),
        0,
        "the MQTT device was never restarted"
    );
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    let _ = publisher.wait();
    let samples = outbox_samples(&gw);
    gw.shutdown().await.unwrap();
    verify_samples(&points, &samples, 10).unwrap();
    assert!(
        m.counter_value(
            "outpost_stream_errors",
            &[("device", "flaky"), ("kind", "connect")]
        ) >= CYCLES as u64
    );
}
