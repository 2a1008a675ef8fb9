//! The hub's two ways in — QUIC straight from a gateway, and MQTT through a broker (its
//! `[mqtt_ingress]`) — must treat a gateway's frames alike. One hub with both, plus
//! `[republish]`, on a real Mosquitto:
//!
//! 1. The same frames (Hello, raw samples, window summaries, both sent twice) from one
//!    gateway over QUIC and another over MQTT: the same acknowledgements, the same sink
//!    content, the same per-gateway metrics (samples and summaries written, duplicates),
//!    and every written sample republished, whichever way it came.
//! 2. Over MQTT as over QUIC, a Data frame needs a Hello first: without one it is counted
//!    (`outpost_hub_bad_input{kind="no_hello"}`), not written and not acknowledged, and the
//!    hub asks the gateway (a Hello on its down topic) to start a new session; after its
//!    Hello the same frame is written once.
//! 3. A hub restart forgets every MQTT gateway's Hello: a real gateway (sync loop, MQTT
//!    uplink) whose frames reach the restarted hub is asked to start over, does, and every
//!    sample reaches the sink exactly once.
//!
//! Mosquitto must be installed (`hil-tests/run-tests.sh` installs it); without it the tests
//! fail and say how to install it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use outpost_actors::gateway::Gateway;
use outpost_actors::hub::Hub;
use outpost_hil::harness::{self, Pki};
use outpost_hil::peers::mosquitto::{self, Mosquitto};
use outpost_protocols::encoding::summary::{SummaryAggregator, SummaryConfig};
use outpost_protocols::frame::{self, Ack, DataFrame, Encoding, FrameBuffer, Hello, Message};
use outpost_protocols::uplink::mqtt::{MqttUplinkOptions, MqttUplinkSession};
use outpost_protocols::uplink::quic::{self, ClientOptions, ClientTls, QuicClient};
use outpost_runtime::config::{self, HubConfig};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Priority, Sample, StreamId, Value};

fn id(s: &str) -> outpost_runtime::config::GatewayId {
    s.parse().unwrap()
}

const GW_QUIC: &str = "gw-quic";
const GW_MQTT: &str = "gw-mqtt";
const MQTT: (&str, &str) = ("transport", "mqtt");
/// Raw samples per gateway.
const N: u64 = 50;
/// Window summaries per gateway (30 s of 1 Hz samples in 10 s windows).
const WINDOWS: u64 = 3;

/// A hub with `[mqtt_ingress]` and, when `republish` is set, `[republish]` under that
/// topic prefix, both on `broker`.
fn hub_config(pki: &Pki, dir: &Path, broker: &str, republish: Option<&str>) -> HubConfig {
    let mut text = format!(
        "{}\n[mqtt_ingress]\nbroker = \"{broker}\"\nclient_id = \"parity-ingress\"\n\
         keep_alive = \"2s\"\nreconnect = {{ initial = \"50ms\", max = \"500ms\" }}\n",
        harness::hub_toml(pki, dir, "127.0.0.1:0")
    );
    if let Some(prefix) = republish {
        text.push_str(&format!(
            "[republish]\nbroker = \"{broker}\"\ntopic_prefix = \"{prefix}\"\n"
        ));
    }
    config::parse_hub(&text, Path::new("hub.toml"), Path::new("/")).expect("hub config")
}

async fn start_hub(cfg: &HubConfig, metrics: &Metrics) -> Hub {
    let hub = Hub::start(cfg, metrics.clone()).await.expect("hub starts");
    let subscribed = harness::wait_for(Duration::from_secs(10), || {
        metrics
            .encode()
            .contains("outpost_hub_ingress_connected{transport=\"mqtt\"} 1")
    })
    .await;
    assert!(subscribed, "the hub's MQTT ingress subscribes within 10 s");
    hub
}

fn hello(gw: &str) -> Vec<u8> {
    frame::encode(&Message::Hello(Hello {
        gateway_id: id(gw),
        max_version: frame::VERSION,
    }))
    .unwrap()
}

/// `n` raw samples of `parity/temp` from `gw`, sequences `first..first + n`.
fn raw(gw: &str, first: u64, n: u64) -> Vec<u8> {
    let s = StreamId::intern("parity/temp").unwrap();
    let samples: Vec<(u64, Sample)> = (first..first + n)
        .map(|q| {
            let ts = 1_700_000_000_000_000_000 + q as i64 * 1_000_000;
            (q, Sample::new(s, ts, Value::F64(q as f64 / 4.0)))
        })
        .collect();
    let f = DataFrame::from_samples(
        &id(gw),
        Priority::Normal,
        Encoding::Raw,
        samples.iter().map(|(q, s)| (*q, s)),
    );
    frame::encode(&Message::Data(f)).unwrap()
}

/// A summary-only frame from `gw`: [`WINDOWS`] windows of `parity/level`, sequences from
/// 1000.
fn summaries(gw: &str) -> Vec<u8> {
    let s = StreamId::intern("parity/level").unwrap();
    let t0 = 1_700_000_000_000_000_000i64; // a multiple of 10 s
    let mut agg = SummaryAggregator::new(&SummaryConfig { window_ms: 10_000 }).unwrap();
    for i in 0..30i64 {
        let sample = Sample::new(s, t0 + i * 1_000_000_000, Value::F64(i as f64));
        assert!(agg.push(1000 + i as u64, &sample).is_none());
    }
    let windows = agg.flush();
    assert_eq!(windows.len() as u64, WINDOWS);
    frame::encode(&Message::Data(DataFrame::from_summaries(
        &id(gw),
        Priority::Normal,
        &windows,
    )))
    .unwrap()
}

/// What both gateways send: Hello, raw samples, summaries, then both Data frames again.
fn script(gw: &str) -> Vec<Vec<u8>> {
    let (r, s) = (raw(gw, 0, N), summaries(gw));
    vec![hello(gw), r.clone(), s.clone(), r, s]
}

/// The number of samples each of the hub's acks names, in order.
fn ack_counts(acks: &[Ack]) -> Vec<u128> {
    acks.iter().map(Ack::count).collect()
}

async fn over_quic(pki: &Pki, hub: &Hub, frames: &[Vec<u8>], acks: usize) -> Vec<Ack> {
    let g = pki
        .bundle
        .gateways
        .iter()
        .find(|g| g.id == GW_QUIC)
        .unwrap();
    let tls = ClientTls {
        ca_pem: std::fs::read(&pki.bundle.ca_cert).unwrap(),
        cert_pem: std::fs::read(&g.cert).unwrap(),
        key_pem: std::fs::read(&g.key).unwrap(),
    };
    let client = QuicClient::new(&tls, ClientOptions::default()).unwrap();
    let conn = client.connect(hub.addr, "localhost").await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    for f in frames {
        quic::send_all(&mut send, f).await.unwrap();
    }
    let mut buf = FrameBuffer::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    while out.len() < acks {
        match buf.next_message().unwrap() {
            Some(Message::Ack(a)) => out.push(a),
            Some(other) => panic!("unexpected message over QUIC: {other:?}"),
            None => {
                let n = tokio::time::timeout(
                    Duration::from_secs(10),
                    quic::read_some(&mut recv, &mut chunk),
                )
                .await
                .expect("acks over QUIC within 10 s")
                .unwrap()
                .expect("the stream stays open");
                buf.push(&chunk[..n]).unwrap();
            }
        }
    }
    conn.close(quic::CLOSE_SHUTDOWN, b"done");
    out
}

async fn mqtt_session(broker: &Mosquitto) -> MqttUplinkSession {
    let mut opts = MqttUplinkOptions::new("127.0.0.1", broker.port(), &id(GW_MQTT));
    opts.keep_alive = Duration::from_secs(2);
    opts.connect_timeout = Duration::from_secs(5);
    MqttUplinkSession::connect(&opts)
        .await
        .expect("gateway connects to the broker")
}

/// The hub's next message on the gateway's down topic, within 10 s.
async fn next_down(s: &mut MqttUplinkSession) -> Message {
    tokio::time::timeout(Duration::from_secs(10), s.recv())
        .await
        .expect("a message from the hub within 10 s")
        .expect("the session stays up")
}

async fn over_mqtt(broker: &Mosquitto, frames: &[Vec<u8>], acks: usize) -> Vec<Ack> {
    let mut s = mqtt_session(broker).await;
    for f in frames {
        s.send(f).await.unwrap();
    }
    let mut out = Vec::new();
    while out.len() < acks {
        match next_down(&mut s).await {
            Message::Ack(a) => out.push(a),
            other => panic!("expected an ack over MQTT, got {other:?}"),
        }
    }
    s.close().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ingress_paths_write_republish_and_count_alike() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GW_QUIC, GW_MQTT]);
    let hub_dir = dir.path().join("hub");
    let metrics = Metrics::new();
    let hub = start_hub(
        &hub_config(&pki, &hub_dir, &broker.address(), Some("parity")),
        &metrics,
    )
    .await;

    let expected = 2 * N as usize;
    let sub = Command::new(mosquitto::client_binary("mosquitto_sub"))
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .args(["-q", "1", "-v", "-t", "parity/#"])
        .args(["-C", &expected.to_string(), "-W", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // subscribed

    let quic_acks = over_quic(&pki, &hub, &script(GW_QUIC), 4).await;
    let mqtt_acks = over_mqtt(&broker, &script(GW_MQTT), 4).await;
    // Samples acknowledged, summaries not (their raw samples follow by backfill).
    assert_eq!(ack_counts(&quic_acks), [N as u128, 0, N as u128, 0]);
    assert_eq!(ack_counts(&mqtt_acks), ack_counts(&quic_acks));

    // The sink: each gateway's samples once, its summaries once.
    let sink = hub_dir.join("sink");
    let lines = harness::read_sink(&sink);
    harness::assert_exactly_once(&lines);
    for gw in [GW_QUIC, GW_MQTT] {
        let n = lines.iter().filter(|l| l.gateway == gw).count() as u64;
        assert_eq!(n, N, "samples of {gw} in the sink");
        let s = harness::read_summaries(&sink)
            .iter()
            .filter(|l| l["gateway"] == gw)
            .count() as u64;
        assert_eq!(s, WINDOWS, "summaries of {gw} in the sink");
    }

    // The same figures under each transport's labels.
    let figures = |gw: &str, extra: &[(&'static str, &'static str)]| -> Vec<u64> {
        let mut l = vec![("gateway", gw)];
        l.extend_from_slice(extra);
        [
            "outpost_hub_samples_written",
            "outpost_hub_duplicates",
            "outpost_hub_summaries_written",
            "outpost_hub_summary_duplicates",
        ]
        .iter()
        .map(|name| metrics.counter_value(name, &l))
        .collect()
    };
    assert_eq!(figures(GW_QUIC, &[]), [N, N, WINDOWS, WINDOWS]);
    assert_eq!(figures(GW_MQTT, &[MQTT]), figures(GW_QUIC, &[]));
    assert_eq!(metrics.counter_value("outpost_hub_acks_sent", &[]), 4);
    assert_eq!(metrics.counter_value("outpost_hub_acks_sent", &[MQTT]), 4);

    // Every sample written was republished, whichever way it came in.
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut republished: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in text.lines() {
        let (topic, payload) = line.split_once(' ').unwrap();
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        republished
            .entry(topic.to_owned())
            .or_default()
            .push(v["seq"].as_u64().unwrap());
    }
    for gw in [GW_QUIC, GW_MQTT] {
        let topic = format!("parity/{gw}/parity/temp");
        let mut seqs = republished.remove(&topic).unwrap_or_default();
        seqs.sort_unstable();
        assert!(
            seqs.iter().copied().eq(0..N),
            "{gw}: every sample republished once on {topic}, got {} messages:\n{text}",
            seqs.len()
        );
    }
    assert!(republished.is_empty(), "nothing else: {republished:?}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_data_without_a_hello_is_refused_and_the_gateway_asked_to_start_over() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GW_MQTT]);
    let hub_dir = dir.path().join("hub");
    let metrics = Metrics::new();
    let hub = start_hub(
        &hub_config(&pki, &hub_dir, &broker.address(), None),
        &metrics,
    )
    .await;
    let sink = hub_dir.join("sink");
    let no_hello = || metrics.counter_value("outpost_hub_bad_input", &[("kind", "no_hello"), MQTT]);

    // A session that skips its Hello: its data is refused, and the hub asks for a Hello.
    let data = raw(GW_MQTT, 0, N);
    let mut s = mqtt_session(&broker).await;
    s.send(&data).await.unwrap();
    match next_down(&mut s).await {
        Message::Hello(h) => assert_eq!(h.gateway_id, GW_MQTT),
        other => panic!("expected the hub to ask for a Hello, got {other:?}"),
    }
    assert_eq!(no_hello(), 1);
    assert!(harness::read_sink(&sink).is_empty(), "nothing written");
    s.close().await;

    // A new session with its Hello: the same frame is written and acknowledged.
    let acks = over_mqtt(&broker, &[hello(GW_MQTT), data], 1).await;
    assert_eq!(ack_counts(&acks), [N as u128]);
    let lines = harness::read_sink(&sink);
    harness::assert_exactly_once(&lines);
    assert_eq!(lines.len() as u64, N);
    assert_eq!(no_hello(), 1);
    assert_eq!(
        metrics.counter_value("outpost_hub_hello_requests", &[MQTT]),
        1
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_hub_gets_an_mqtt_gateway_to_say_hello_again_and_loses_nothing() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GW_MQTT]);
    let hub_dir = dir.path().join("hub");
    let cfg = hub_config(&pki, &hub_dir, &broker.address(), None);
    let hub = start_hub(&cfg, &Metrics::new()).await;

    let gw_cfg = harness::gateway_config(
        GW_MQTT,
        &dir.path().join("gw"),
        // Pinned: what is checked here is the hub, not how the gateway's link monitor reads
        // the hub's absence.
        "[sync]\nmode = \"full_zstd\"\n",
        Some(&harness::mqtt_uplink_toml(&broker.address(), "64KiB")),
    );
    let gw = Gateway::start(&gw_cfg, Metrics::new()).await.unwrap();
    let stream = StreamId::intern("parity/restart").unwrap();
    const BATCHES: i64 = 60;
    let producer = {
        let ingest = gw.ingest().clone();
        tokio::spawn(async move {
            for i in 0..BATCHES {
                let batch = (0..50)
                    .map(|j| Sample::new(stream, i * 50 + j, Value::I64(i * 50 + j)))
                    .collect();
                ingest
                    .submit_durable(Priority::Normal, batch)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // The hub goes away for a second while the gateway keeps publishing: its messages wait
    // in the broker for the hub's persistent session, and the restarted hub has no Hello
    // for them.
    tokio::time::sleep(Duration::from_millis(800)).await;
    hub.stop().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let metrics = Metrics::new();
    let hub = start_hub(&cfg, &metrics).await;
    producer.await.unwrap();

    let sink = hub_dir.join("sink");
    let total = (BATCHES * 50) as usize;
    let all = harness::wait_for(Duration::from_secs(30), || {
        harness::read_sink(&sink).len() >= total
    })
    .await;
    let lines = harness::read_sink(&sink);
    harness::assert_exactly_once(&lines);
    assert!(all, "{} of {total} samples at the hub", lines.len());
    assert_eq!(lines.len(), total);
    let asked = metrics.counter_value("outpost_hub_hello_requests", &[MQTT]);
    let refused = metrics.counter_value("outpost_hub_bad_input", &[("kind", "no_hello"), MQTT]);
    eprintln!("after the restart: {refused} frames without a Hello, {asked} Hello requests");
    assert!(
        refused >= 1 && asked >= 1,
        "the frames queued while the hub was away came without a Hello"
    );
    gw.shutdown().await.unwrap();
    hub.stop().await;
}
