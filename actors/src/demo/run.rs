//! `outpost demo`: a whole Outpost on loopback with nothing installed — a simulated Modbus
//! boiler ([`super::sim`]), the gateway of `config/demo.toml` polling it through the real
//! Modbus driver and fusing its temperature, and a hub receiving everything over QUIC with
//! mutual TLS, using certificates generated for the run. It prints what happens every two
//! seconds and, when it ends, one JSON line with the figures.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost_protocols::uplink::certs::generate_bundle;
use outpost_runtime::config::{self, Config};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::Priority;
use serde::Serialize;

use super::sim::{SimConfig, SimDevice};
use crate::gateway::{Gateway, ShutdownSignals};
use crate::hub::Hub;

/// The demo's gateway config, as shipped in `config/demo.toml`.
pub const DEMO_TOML: &str = include_str!("../../../config/demo.toml");

/// What the demo measured.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub seconds: f64,
    /// Samples made durable in the gateway's outbox (devices and fusion).
    pub samples_ingested: u64,
    /// Distinct samples in the hub's sink.
    pub samples_delivered: u64,
    /// Lines of the sink that repeat a (gateway, stream, sequence) already there: must be 0.
    pub duplicates: u64,
    /// Samples the hub received again (after reconnects) and dropped before the sink.
    pub resent_dropped_at_hub: u64,
    /// Records still in the gateway's outbox at the end.
    pub outbox_backlog: u64,
    pub device_restarts: u64,
    pub sink_dir: String,
}

/// Demo failures.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo setup: {0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// Runs the demo in `dir` (kept afterwards, so the sink can be read) until `seconds` pass
/// or SIGINT/SIGTERM arrives.
pub async fn run(
    dir: &Path,
    seconds: Option<u64>,
    metrics_listen: SocketAddr,
) -> Result<DemoReport, DemoError> {
    let mut signals = ShutdownSignals::install().map_err(setup("signals"))?;
    std::fs::create_dir_all(dir).map_err(setup("data folder"))?;
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() {
        generate_bundle(
            &certs,
            &["localhost".into(), "127.0.0.1".into()],
            &["demo-gw".parse().map_err(setup("gateway id"))?],
        )
        .map_err(setup("certificates"))?;
    }
    let sim = SimDevice::start(SocketAddr::from(([127, 0, 0, 1], 0)), SimConfig::default())
        .await
        .map_err(setup("simulated Modbus device"))?;
    let metrics = Metrics::new();

    let hub_text = format!(
        "[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{hub}\"\nca = \"{c}/ca.pem\"\ncert = \"{c}/hub.pem\"\nkey = {{ file = \"{c}/hub.key\" }}\n[metrics]\nenabled = false\n",
        hub = dir.join("hub").display(),
        c = certs.display(),
    );
    let hub_cfg = config::parse_hub(&hub_text, Path::new("demo-hub.toml"), dir)
        .map_err(setup("hub config"))?;
    let hub = Hub::start(&hub_cfg, metrics.clone())
        .await
        .map_err(setup("hub"))?;
    let sink_dir = hub_cfg.sink_dir();

    let mut cfg = demo_config(dir, &certs, hub.addr)?;
    if let Some(d) = cfg.devices.first_mut().and_then(|d| d.modbus.as_mut()) {
        d.address = sim.addr().to_string();
    }
    cfg.metrics.listen = metrics_listen;
    let gw = Gateway::start(&cfg, metrics.clone())
        .await
        .map_err(setup("gateway"))?;
    println!(
        "Outpost demo: simulated boiler at {}, hub at {} (QUIC, mutual TLS)",
        sim.addr(),
        hub.addr
    );
    if let Some(a) = gw.metrics_addr() {
        println!(
            "metrics: http://{a}/metrics    sink: {}",
            sink_dir.display()
        );
    }

    let started = Instant::now();
    let deadline = seconds.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    loop {
        let until = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {
                let r = sim.readings();
                let st = gw.outbox().stats();
                println!(
                    "[{:>5.1}s] boiler {:.2} °C {:.2} bar {:.2} l/min burner {} | ingested {} delivered {} | outbox {} records",
                    started.elapsed().as_secs_f64(),
                    r.temperature, r.pressure, r.flow, if r.burner { "on" } else { "off" },
                    ingested(&metrics),
                    metrics.counter_value("outpost_hub_samples_written", &[("gateway", "demo-gw")]),
                    st.records.iter().sum::<u64>(),
                );
            }
            _ = until => break,
            _ = signals.recv() => break,
        }
    }
    // Let the uplink drain what was just stored, then stop in order.
    let drain_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while gw.outbox().stats().records.iter().sum::<u64>() > 0
        && tokio::time::Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let backlog = gw.outbox().stats().records.iter().sum::<u64>();
    let samples_ingested = ingested(&metrics);
    let device_restarts = metrics.counter_value(
        "outpost_restarts",
        &[("supervisor", "devices"), ("child", "device:demo-boiler")],
    );
    gw.shutdown().await.map_err(setup("gateway shutdown"))?;
    hub.stop().await;
    sim.stop();
    let (lines, distinct) = count_sink(&sink_dir);
    Ok(DemoReport {
        seconds: started.elapsed().as_secs_f64(),
        samples_ingested,
        samples_delivered: distinct,
        duplicates: lines - distinct,
        resent_dropped_at_hub: metrics
            .counter_value("outpost_hub_duplicates", &[("gateway", "demo-gw")]),
        outbox_backlog: backlog,
        device_restarts,
        sink_dir: sink_dir.display().to_string(),
    })
}

fn ingested(m: &Metrics) -> u64 {
    Priority::ALL
        .iter()
        .map(|p| m.counter_value("outpost_samples_ingested", &[("class", p.as_str())]))
        .sum()
}

/// `config/demo.toml` with its data in `dir` and an uplink to the demo hub.
fn demo_config(dir: &Path, certs: &Path, hub: SocketAddr) -> Result<Config, DemoError> {
    let uplink = format!(
        "\n[uplink]\nhub = \"{hub}\"\nserver_name = \"localhost\"\nca = \"{c}/ca.pem\"\ncert = \"{c}/demo-gw.pem\"\nkey = {{ file = \"{c}/demo-gw.key\" }}\n",
        c = certs.display()
    );
    let text = format!("{DEMO_TOML}{uplink}");
    let mut cfg = config::parse(&text, Path::new("config/demo.toml"), dir)
        .and_then(|l| l.strict())
        .map_err(setup("demo config"))?;
    cfg.gateway.data_dir = dir.join("gateway");
    Ok(cfg)
}

/// (lines, distinct (gateway, stream, seq)) in the sink.
fn count_sink(dir: &Path) -> (u64, u64) {
    let mut seen = std::collections::HashSet::new();
    let mut lines = 0u64;
    let files = walk(dir);
    for f in files {
        // Window summaries are not samples.
        if f.to_string_lossy().ends_with(".summary.jsonl") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for l in text.lines() {
            lines += 1;
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                seen.insert((
                    v["gateway"].as_str().unwrap_or_default().to_owned(),
                    v["stream"].as_str().unwrap_or_default().to_owned(),
                    v["seq"].as_u64().unwrap_or(u64::MAX),
                ));
            }
        }
    }
    (lines, seen.len() as u64)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "jsonl") {
            out.push(p);
        }
    }
    out
}
