//! Shared scaffolding for system tests and benchmarks: a certificate bundle, an in-process
//! hub, gateway configs pointing at it, and readers of the hub's sink.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use outpost_actors::hub::Hub;
use outpost_protocols::uplink::certs::{Bundle, generate_bundle};
use outpost_runtime::config::{self, Config, HubConfig};
use outpost_runtime::metrics::Metrics;

/// A folder with a CA, a hub certificate (`localhost`, `127.0.0.1`) and gateway certificates.
pub struct Pki {
    pub dir: PathBuf,
    pub bundle: Bundle,
}

impl Pki {
    pub fn new(dir: &Path, gateways: &[&str]) -> Pki {
        let gws: Vec<outpost_runtime::config::GatewayId> = gateways
            .iter()
            .map(|g| g.parse().expect("a test gateway id"))
            .collect();
        let bundle = generate_bundle(
            &dir.join("certs"),
            &["outpost-hub".into(), "localhost".into(), "127.0.0.1".into()],
            &gws,
        )
        .expect("generate certificates");
        Pki {
            dir: dir.join("certs"),
            bundle,
        }
    }
}

/// The hub config text: listening on `listen`, state in `data_dir`, metrics off.
pub fn hub_toml(pki: &Pki, data_dir: &Path, listen: &str) -> String {
    format!(
        r#"
[hub]
listen = "{listen}"
data_dir = "{data}"
ca = "{ca}"
cert = "{cert}"
key = {{ file = "{key}" }}
[metrics]
enabled = false
"#,
        data = data_dir.display(),
        ca = pki.bundle.ca_cert.display(),
        cert = pki.bundle.hub_cert.display(),
        key = pki.bundle.hub_key.display(),
    )
}

/// A hub config (TOML) for a hub listening on `listen` with its state in `data_dir`.
pub fn hub_config(pki: &Pki, data_dir: &Path, listen: &str) -> HubConfig {
    let text = hub_toml(pki, data_dir, listen);
    config::parse_hub(&text, Path::new("hub.toml"), Path::new("/")).expect("hub config")
}

/// [`hub_config`] (listening on an ephemeral port) that also takes frames from gateways
/// using the MQTT uplink: `[mqtt_ingress]` through `broker` (`host:port`), keep-alive 2 s,
/// reconnecting within half a second.
pub fn mqtt_ingress_hub_config(pki: &Pki, data_dir: &Path, broker: &str) -> HubConfig {
    let text = format!(
        r#"{base}
[mqtt_ingress]
broker = "{broker}"
client_id = "outpost-hub-ingress-test"
keep_alive = "2s"
reconnect = {{ initial = "50ms", max = "500ms" }}
"#,
        base = hub_toml(pki, data_dir, "127.0.0.1:0"),
    );
    config::parse_hub(&text, Path::new("hub.toml"), Path::new("/")).expect("hub config")
}

/// The `[uplink]` section of a gateway that sends through the MQTT broker at `broker`
/// (`host:port`, no TLS, no credentials) in messages of at most `max_payload` (a size such
/// as `"4KiB"`), keep-alive 2 s, reconnecting within a second.
pub fn mqtt_uplink_toml(broker: &str, max_payload: &str) -> String {
    format!(
        r#"
[uplink]
transport = "mqtt"
reconnect = {{ initial = "50ms", max = "1s" }}
[uplink.mqtt]
broker = "{broker}"
keep_alive = "2s"
max_in_flight = 8
max_payload = "{max_payload}"
"#
    )
}

/// Starts an in-process hub on an ephemeral port.
pub async fn start_hub(pki: &Pki, data_dir: &Path) -> Hub {
    start_hub_on(pki, data_dir, "127.0.0.1:0").await
}

/// Starts an in-process hub on `listen`.
pub async fn start_hub_on(pki: &Pki, data_dir: &Path, listen: &str) -> Hub {
    Hub::start(&hub_config(pki, data_dir, listen), Metrics::new())
        .await
        .expect("hub starts")
}

/// The `[uplink]` section for gateway `id` to reach a hub at `hub`.
pub fn uplink_toml(pki: &Pki, id: &str, hub: &str) -> String {
    let g = pki
        .bundle
        .gateways
        .iter()
        .find(|g| g.id == id)
        .expect("gateway certificate");
    format!(
        r#"
[uplink]
hub = "{hub}"
server_name = "localhost"
ca = "{ca}"
cert = "{cert}"
key = {{ file = "{key}" }}
keep_alive = "500ms"
reconnect = {{ initial = "50ms", max = "1s" }}
"#,
        ca = pki.bundle.ca_cert.display(),
        cert = g.cert.display(),
        key = g.key.display(),
    )
}

/// A gateway config from a TOML body (devices, fusion...) plus gateway/metrics/uplink parts.
pub fn gateway_config(id: &str, data_dir: &Path, body: &str, uplink: Option<&str>) -> Config {
    let text = format!(
        r#"
[gateway]
id = "{id}"
data_dir = "{data}"
[metrics]
enabled = false
[supervision]
max_restarts = 100
within = "60s"
backoff = {{ initial = "50ms", max = "1s" }}
{body}
{uplink}
"#,
        data = data_dir.display(),
        uplink = uplink.unwrap_or(""),
    );
    config::parse(&text, Path::new("gateway.toml"), Path::new("/"))
        .unwrap_or_else(|e| panic!("gateway config: {e}\n{text}"))
        .strict()
        .unwrap_or_else(|e| panic!("gateway config environment: {e}"))
}

/// One line of the hub's sink.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkLine {
    pub gateway: String,
    pub stream: String,
    pub seq: u64,
    pub ts_ns: i64,
    pub value: serde_json::Value,
    /// When the hub received it.
    pub received_ns: i64,
}

/// Every sample line of every sink file under `sink_dir` (all gateways, all days; the
/// `*.summary.jsonl` files of window summaries are not samples and are skipped).
pub fn read_sink(sink_dir: &Path) -> Vec<SinkLine> {
    let mut out = Vec::new();
    let Ok(gws) = std::fs::read_dir(sink_dir) else {
        return out;
    };
    for gw in gws.flatten() {
        let Ok(days) = std::fs::read_dir(gw.path()) else {
            continue;
        };
        for day in days.flatten() {
            if day
                .file_name()
                .to_string_lossy()
                .ends_with(".summary.jsonl")
            {
                continue;
            }
            let text = std::fs::read_to_string(day.path()).unwrap_or_default();
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("sink line is not JSON ({e}): {line}"));
                out.push(SinkLine {
                    gateway: v["gateway"].as_str().unwrap_or_default().to_owned(),
                    stream: v["stream"].as_str().unwrap_or_default().to_owned(),
                    seq: v["seq"].as_u64().unwrap_or(u64::MAX),
                    ts_ns: v["ts_ns"].as_i64().unwrap_or_default(),
                    value: v["value"].clone(),
                    received_ns: v["received_ns"].as_i64().unwrap_or_default(),
                });
            }
        }
    }
    out
}

/// The window summaries in the `*.summary.jsonl` files under `sink_dir`, as JSON objects.
pub fn read_summaries(sink_dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let Ok(gws) = std::fs::read_dir(sink_dir) else {
        return out;
    };
    for gw in gws.flatten() {
        let Ok(days) = std::fs::read_dir(gw.path()) else {
            continue;
        };
        for day in days.flatten() {
            if !day
                .file_name()
                .to_string_lossy()
                .ends_with(".summary.jsonl")
            {
                continue;
            }
            let text = std::fs::read_to_string(day.path()).unwrap_or_default();
            out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
    out
}

/// Checks that no (gateway, stream, seq) appears twice; returns the count per stream.
pub fn assert_exactly_once(lines: &[SinkLine]) -> HashMap<String, usize> {
    let mut seen = std::collections::HashSet::new();
    let mut per_stream = HashMap::new();
    for l in lines {
        assert!(
            seen.insert((l.gateway.clone(), l.stream.clone(), l.seq)),
            "duplicate at the hub: {l:?}"
        );
        *per_stream.entry(l.stream.clone()).or_insert(0) += 1;
    }
    per_stream
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub async fn wait_for(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    cond()
}
