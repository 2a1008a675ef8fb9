//! `outpost demo`: a whole Outpost on loopback with nothing installed — a simulated Modbus
//! boiler ([`super::sim`]), the gateway of `config/demo.toml` polling it through the real
//! Modbus driver and fusing its temperature, and a hub receiving everything over QUIC with
//! mutual TLS, using certificates generated for the run. It names the streams, prints their
//! latest values (the Kalman filter's output among them) with the counts every two seconds,
//! the link class and sync mode whenever they change, and the hub's output file once it
//! exists; when it ends, one JSON line with the figures.
//!
//! The simulated boiler listens where `config/demo.toml` says (127.0.0.1:5020), so
//! `outpost run config/demo.toml` can poll it too while the demo runs; if that port is
//! taken, it takes a free one and says so.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost_protocols::uplink::certs::generate_bundle;
use outpost_runtime::config::{self, Config};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{LinkClass, Priority, Quality, Sample, StreamId, SyncMode, Value};
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
    /// The hub's output files (JSON lines, one sample per line).
    pub sink_files: Vec<String>,
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
    let device = cfg
        .devices
        .first_mut()
        .and_then(|d| d.modbus.as_mut())
        .ok_or_else(|| DemoError::Setup("config/demo.toml has no Modbus device".into()))?;
    let wanted: SocketAddr = device
        .address
        .parse()
        .map_err(setup("demo device address"))?;
    let (sim, moved) = start_device(wanted).await?;
    device.address = sim.addr().to_string();
    cfg.metrics.listen = metrics_listen;
    let gw = Gateway::start(&cfg, metrics.clone())
        .await
        .map_err(setup("gateway"))?;
    if moved {
        println!(
            "Outpost demo: {wanted} is taken (another demo?): simulated boiler at {} instead",
            sim.addr()
        );
    }
    println!(
        "Outpost demo: simulated boiler at {} (Modbus TCP), hub at {} (QUIC, mutual TLS)",
        sim.addr(),
        hub.addr
    );
    let shown = Shown::of(&cfg)?;
    shown.describe();
    if let Some(a) = gw.metrics_addr() {
        println!("metrics: http://{a}/metrics");
    }
    println!("hub output in {}", sink_dir.display());
    let mut latest = gw.ingest().bus().subscribe(&shown.ids(), 256);
    let mut values: HashMap<StreamId, Sample> = HashMap::new();

    let started = Instant::now();
    let at = || format!("[{:>5.1}s]", started.elapsed().as_secs_f64());
    let deadline = seconds.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    // Link class, sync mode and the hub's files are looked at often, to show each change.
    let mut watch = tokio::time::interval(Duration::from_millis(100));
    let mut link = (None, None);
    let mut files = Vec::new();
    loop {
        let until = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(s) = latest.recv() => {
                values.insert(s.stream, s);
            }
            _ = watch.tick() => {
                let now = link_state(&metrics);
                if now != link {
                    link = now;
                    println!("{} {}", at(), describe_link(link));
                }
                for f in sink_files(&sink_dir) {
                    if !files.contains(&f) {
                        println!("{} hub output: {}", at(), f.display());
                        files.push(f);
                    }
                }
            }
            _ = tick.tick() => {
                let st = gw.outbox().stats();
                println!(
                    "{} {} · ingested {} · delivered {} · outbox {} records",
                    at(),
                    describe_link(link),
                    ingested(&metrics),
                    metrics.counter_value("outpost_hub_samples_written", &[("gateway", "demo-gw")]),
                    st.records.iter().sum::<u64>(),
                );
                shown.print(&values);
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
    let sink_files: Vec<String> = sink_files(&sink_dir)
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    for f in &sink_files {
        println!("hub output: {f}");
    }
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
        sink_files,
    })
}

/// Starts the simulated boiler on `wanted`, or on a free port of the same host when
/// `wanted` is taken (then `true`).
async fn start_device(wanted: SocketAddr) -> Result<(SimDevice, bool), DemoError> {
    match SimDevice::start(wanted, SimConfig::default()).await {
        Ok(sim) => Ok((sim, false)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let any = SocketAddr::new(wanted.ip(), 0);
            let sim = SimDevice::start(any, SimConfig::default())
                .await
                .map_err(setup("simulated Modbus device"))?;
            Ok((sim, true))
        }
        Err(e) => Err(setup("simulated Modbus device")(e)),
    }
}

/// The streams the demo shows, in config order, with what each one is.
struct Shown {
    streams: Vec<(StreamId, String)>,
    /// What each stream is, for the listing at the start.
    about: Vec<String>,
}

impl Shown {
    fn of(cfg: &Config) -> Result<Shown, DemoError> {
        let mut streams = Vec::new();
        let mut about = Vec::new();
        for d in &cfg.devices {
            let Some(m) = &d.modbus else { continue };
            for g in &m.poll_groups {
                let names: Vec<&str> = g.points.iter().map(|p| p.stream.as_str()).collect();
                about.push(format!(
                    "{}: {} (Modbus, every {:?})",
                    d.name,
                    names.join(", "),
                    g.interval.get()
                ));
                streams.extend(names.iter().map(|s| s.to_string()));
            }
        }
        for f in &cfg.fusion {
            let method = match f.method().map(|m| m.key()) {
                Some("kalman") => "Kalman filter",
                Some(k) => k,
                None => "fusion",
            };
            let mut outs = f.output_streams();
            about.push(format!(
                "{}: {} ({method} of {})",
                f.name,
                outs.join(", "),
                f.inputs.join(", ")
            ));
            if !f.std_outputs.is_empty() {
                about.push(format!(
                    "{}: {} (its standard deviation)",
                    f.name,
                    f.std_outputs.join(", ")
                ));
            }
            outs.extend(f.std_outputs.iter().cloned());
            streams.extend(outs);
        }
        let streams = streams
            .into_iter()
            .map(|s| {
                StreamId::intern(&s)
                    .map(|id| (id, s))
                    .map_err(setup("stream name"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Shown { streams, about })
    }

    fn ids(&self) -> Vec<StreamId> {
        self.streams.iter().map(|(id, _)| *id).collect()
    }

    /// The listing at the start.
    fn describe(&self) {
        println!("streams:");
        for a in &self.about {
            println!("  {a}");
        }
    }

    /// One line per stream: its latest value, as the gateway has it.
    fn print(&self, values: &HashMap<StreamId, Sample>) {
        let width = self.streams.iter().map(|(_, n)| n.len()).max().unwrap_or(0);
        for (id, name) in &self.streams {
            let shown = values.get(id).map_or("(no value yet)".to_owned(), show);
            println!("          {name:<width$}  {shown}{}", unit(name));
        }
    }
}

/// The unit of a stream of the simulated boiler, for the display.
fn unit(stream: &str) -> &'static str {
    let last = stream.rsplit('/').next().unwrap_or(stream);
    if last.starts_with("temperature") {
        " °C"
    } else if last.starts_with("pressure") {
        " bar"
    } else if last.starts_with("flow") {
        " l/min"
    } else {
        ""
    }
}

/// A sample's value for a person: numbers with two decimals, booleans as on/off, and its
/// quality when it is not good.
fn show(s: &Sample) -> String {
    let v = match &s.value {
        Value::F64(x) => format!("{x:.2}"),
        Value::I64(x) => x.to_string(),
        Value::Bool(b) => if *b { "on" } else { "off" }.to_owned(),
        Value::Str(x) => format!("{x:?}"),
    };
    match s.quality {
        Quality::Good => v,
        Quality::Uncertain => format!("{v} (uncertain)"),
        Quality::Bad => format!("{v} (bad)"),
    }
}

/// The link class and sync mode the gateway's metrics show (`None` until measured).
fn link_state(m: &Metrics) -> (Option<LinkClass>, Option<SyncMode>) {
    let class = m
        .gauge_value("outpost_link_class", &[])
        .and_then(|v| usize::try_from(v).ok())
        .and_then(|i| LinkClass::ALL.get(i).copied());
    let mode = m
        .gauge_value("outpost_sync_mode", &[])
        .and_then(|v| usize::try_from(v).ok())
        .and_then(|i| SYNC_MODES.get(i).copied());
    (class, mode)
}

/// The sync modes by their `outpost_sync_mode` gauge value (their on-wire code).
const SYNC_MODES: [SyncMode; 5] = [
    SyncMode::Full,
    SyncMode::FullZstd,
    SyncMode::Delta,
    SyncMode::Summary,
    SyncMode::StoreAndForward,
];

fn describe_link((class, mode): (Option<LinkClass>, Option<SyncMode>)) -> String {
    format!(
        "link {} · sync mode {}",
        class.map_or("(not measured yet)", LinkClass::as_str),
        mode.map_or("(not started yet)", SyncMode::as_str)
    )
}

/// The hub's sample files (not its summaries), sorted.
fn sink_files(sink: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = walk(sink)
        .into_iter()
        .filter(|f| !f.to_string_lossy().ends_with(".summary.jsonl"))
        .collect();
    files.sort();
    files
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_device_takes_the_configured_port_or_a_free_one_when_it_is_taken() {
        // A free port: the device listens there.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free = probe.local_addr().unwrap();
        drop(probe);
        let (sim, moved) = start_device(free).await.unwrap();
        assert_eq!((sim.addr(), moved), (free, false));
        // Taken (by the first device): another free port, and the caller is told.
        let (other, moved) = start_device(free).await.unwrap();
        assert!(moved);
        assert_ne!(other.addr().port(), free.port());
        assert_eq!(other.addr().ip(), free.ip());
        sim.stop();
        other.stop();
    }

    #[test]
    fn the_demo_config_names_the_port_the_device_prefers() {
        let cfg = config::parse(DEMO_TOML, Path::new("config/demo.toml"), Path::new("."))
            .unwrap()
            .config;
        let m = cfg.devices[0].modbus.as_ref().unwrap();
        // The port the file's comment promises the demo's device.
        assert_eq!(m.address, "127.0.0.1:5020");
    }

    #[test]
    fn values_are_shown_for_a_person() {
        let s = |value| Sample::new(StreamId::intern("demo/x").unwrap(), 0, value);
        assert_eq!(show(&s(Value::F64(61.236))), "61.24");
        assert_eq!(show(&s(Value::Bool(true))), "on");
        let mut bad = s(Value::I64(3));
        bad.quality = Quality::Bad;
        assert_eq!(show(&bad), "3 (bad)");
        assert_eq!(unit("demo/boiler/temperature_kf_std"), " °C");
    }
}
