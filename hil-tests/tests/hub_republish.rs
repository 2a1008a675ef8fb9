//! The hub's optional MQTT republish: every sample written to the sink is also published to
//! `<prefix>/<gateway>/<stream>` on a real Mosquitto broker, read back with `mosquitto_sub`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use outpost_actors::gateway::Gateway;
use outpost_actors::hub::Hub;
use outpost_hil::harness::{self, Pki};
use outpost_hil::peers::mosquitto::{self, Mosquitto};
use outpost_runtime::config;
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Priority, Sample, StreamId, Value};

const N: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_written_to_the_sink_are_republished_over_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &["gw-rep"]);
    let broker = Mosquitto::start();
    let hub_text = format!(
        "[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = {{ file = \"{}\" }}\n\
         [metrics]\nenabled = false\n[republish]\nbroker = \"{}\"\ntopic_prefix = \"plantdata\"\n",
        dir.path().join("hub").display(),
        pki.bundle.ca_cert.display(),
        pki.bundle.hub_cert.display(),
        pki.bundle.hub_key.display(),
        broker.address(),
    );
    let hub_cfg = config::parse_hub(&hub_text, Path::new("hub.toml"), dir.path()).unwrap();
    let hub = Hub::start(&hub_cfg, Metrics::new()).await.unwrap();

    let sub = Command::new(mosquitto::client_binary("mosquitto_sub"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port().to_string(),
            "-q",
            "1",
            "-v",
        ])
        .args(["-t", "plantdata/#", "-C", &N.to_string(), "-W", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // subscribed

    let cfg = harness::gateway_config(
        "gw-rep",
        &dir.path().join("gw"),
        "",
        Some(&harness::uplink_toml(&pki, "gw-rep", &hub.addr.to_string())),
    );
    let gw = Gateway::start(&cfg, Metrics::new()).await.unwrap();
    let s = StreamId::intern("line/temp").unwrap();
    let samples = (0..N as i64)
        .map(|i| Sample::new(s, i, Value::F64(i as f64 / 2.0)))
        .collect();
    gw.ingest()
        .submit_durable(Priority::Normal, samples)
        .await
        .unwrap();

    let out = tokio::task::spawn_blocking(move || sub.wait_with_output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut seqs = Vec::new();
    for line in text.lines() {
        let (topic, payload) = line.split_once(' ').unwrap();
        assert_eq!(topic, "plantdata/gw-rep/line/temp");
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        let ts = v["ts_ns"].as_i64().unwrap();
        assert_eq!(v["value"].as_f64().unwrap(), ts as f64 / 2.0);
        assert_eq!(v["quality"], "good");
        seqs.push(v["seq"].as_u64().unwrap());
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), N, "every sample republished once:\n{text}");
    gw.shutdown().await.unwrap();
    hub.stop().await;
}
