//! The MQTT source against a real Mosquitto broker (`mqtt_mosquitto` and the MQTT
//! part of `bad_input`): a gateway with one MQTT device subscribed to `plant/+/telemetry`,
//! readings published with `mosquitto_pub -l` at QoS 1, and the gateway's durable outbox
//! checked for each reading exactly once — plainly, across a broker restart and across a
//! gateway restart — and, through the QUIC uplink, the hub's sink. Also: malformed messages are counted and skipped while the
//! good ones around them arrive, and the reconnect backoff grows while the broker is down
//! and resets after a connection.
//!
//! Needs Debian's `mosquitto` and `mosquitto-clients` (`hil-tests/run-tests.sh` installs
//! them; `OUTPOST_MOSQUITTO` names the broker binary).

use std::path::Path;
use std::time::{Duration, Instant};

use outpost_actors::gateway::Gateway;
use outpost_hil::peers::mosquitto::{
    CounterCheck, Mosquitto, Publisher, publish_bytes, telemetry_device_toml, telemetry_line,
};
use outpost_runtime::config::Config;
use outpost_runtime::metrics::Metrics;
use outpost_runtime::{Priority, Sample, record};

const N: u64 = 10_000;
const DEVICES: u64 = 4;

fn config(dir: &Path, gateway_id: &str, devices_toml: &str) -> Config {
    let text = format!(
        "[gateway]\nid = \"{gateway_id}\"\ndata_dir = \"{}\"\n\n[metrics]\nenabled = false\n{devices_toml}",
        dir.join("data").display()
    );
    outpost_runtime::config::parse(&text, Path::new("test.toml"), dir)
        .unwrap()
        .strict()
        .unwrap()
}

/// Every sample in the gateway's outbox (all classes), decoded.
fn outbox_samples(gw: &Gateway) -> Vec<Sample> {
    let mut out = Vec::new();
    for p in Priority::ALL {
        let mut after = None;
        loop {
            let recs = gw.outbox().scan(p, after, 4096, 1 << 22).unwrap();
            let Some(last) = recs.last() else { break };
            after = Some(last.seq);
            for r in &recs {
                out.push(record::decode(&r.value).unwrap());
            }
        }
    }
    out
}

/// Publishes readings `range` with one `mosquitto_pub -l` per plant device topic.
fn publish(port: u16, range: std::ops::Range<u64>) -> Vec<Publisher> {
    (0..DEVICES)
        .map(|d| {
            let lines: Vec<String> = range
                .clone()
                .filter(|n| n % DEVICES == d)
                .map(telemetry_line)
                .collect();
            Publisher::lines(port, &format!("plant/m{d}/telemetry"), 1, lines)
        })
        .collect()
}

fn wait_all(publishers: Vec<Publisher>) {
    for p in publishers {
        p.wait();
    }
}

/// Waits until the outbox holds every reading `0..n`, then a little longer (so that late
/// duplicates would show), and returns the check.
async fn settle(gw: &Gateway, n: u64, timeout: Duration) -> CounterCheck {
    let deadline = Instant::now() + timeout;
    loop {
        let c = CounterCheck::of(&outbox_samples(gw));
        if c.distinct_in(n) as u64 >= n {
            tokio::time::sleep(Duration::from_millis(750)).await;
            return CounterCheck::of(&outbox_samples(gw));
        }
        if Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn durable_count(gw: &Gateway) -> usize {
    CounterCheck::of(&outbox_samples(gw)).seen.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_qos1_readings_land_exactly_once() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "gw-mqtt-plain",
        &telemetry_device_toml("plant", &broker.address(), "5"),
    );
    let metrics = Metrics::new();
    let gw = Gateway::start(&cfg, metrics.clone()).await.unwrap();
    wait_connected(&metrics, "plant").await;
    let t0 = Instant::now();
    let pubs = publish(broker.port(), 0..N);
    tokio::task::spawn_blocking(move || wait_all(pubs))
        .await
        .unwrap();
    let check = settle(&gw, N, Duration::from_secs(60)).await;
    eprintln!(
        "{N} readings durable in {:?}; redeliveries skipped {}",
        t0.elapsed(),
        metrics.counter_value("outpost_mqtt_redeliveries_skipped", &[("device", "plant")])
    );
    check.assert_exactly_once(N);
    // Two fields per reading; every sample counted once it was durable.
    assert_eq!(
        metrics.counter_value("outpost_stream_samples_stored", &[("device", "plant")]),
        2 * N
    );
    assert_eq!(outbox_samples(&gw).len() as u64, 2 * N);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_and_duplicates_nothing() {
    let mut broker = Mosquitto::start_persistent();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "gw-mqtt-broker-restart",
        // 3.1.1 here, 5 in the other tests: both protocol paths see real traffic.
        &telemetry_device_toml("plant", &broker.address(), "3.1.1"),
    );
    let metrics = Metrics::new();
    let gw = Gateway::start(&cfg, metrics.clone()).await.unwrap();
    wait_connected(&metrics, "plant").await;
    let port = broker.port();
    let half = N / 2;
    let pubs = publish(port, 0..half);
    let (pubs_done, broker) = tokio::task::spawn_blocking(move || {
        wait_all(pubs);
        // Stop while the gateway may still be taking in the first half: what the broker
        // had not delivered, or delivered without an ack yet, is kept in its session.
        broker.stop();
        (Instant::now(), broker)
    })
    .await
    .unwrap();
    let mut broker = broker;
    let at_restart = durable_count(&gw).await;
    eprintln!("broker stopped with {at_restart} of {half} readings durable at the gateway");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .unwrap();
    let _ = pubs_done;
    let pubs = publish(port, half..N);
    tokio::task::spawn_blocking(move || wait_all(pubs))
        .await
        .unwrap();
    let check = settle(&gw, N, Duration::from_secs(60)).await;
    eprintln!(
        "redeliveries skipped: {}; reconnects: {}",
        metrics.counter_value("outpost_mqtt_redeliveries_skipped", &[("device", "plant")]),
        metrics.counter_value("outpost_mqtt_reconnects", &[("device", "plant")])
    );
    assert!(metrics.counter_value("outpost_mqtt_reconnects", &[("device", "plant")]) >= 1);
    if !check.missing(N).is_empty() || !check.duplicates().is_empty() {
        eprintln!(
            "broker log:\n{}",
            std::fs::read_to_string(broker.log_path()).unwrap_or_default()
        );
    }
    check.assert_exactly_once(N);
    gw.shutdown().await.unwrap();
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restart_mid_stream_loses_and_duplicates_nothing() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "gw-mqtt-gw-restart",
        &telemetry_device_toml("plant", &broker.address(), "5"),
    );
    let metrics = Metrics::new();
    let gw = Gateway::start(&cfg, metrics.clone()).await.unwrap();
    wait_connected(&metrics, "plant").await;
    let pubs = publish(broker.port(), 0..N);
    // Stop the gateway once part of the stream is in; the publishers go on, and the broker
    // queues their messages in the gateway's persistent session.
    let deadline = Instant::now() + Duration::from_secs(30);
    while durable_count(&gw).await < (N / 5) as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = durable_count(&gw).await;
    gw.shutdown().await.unwrap();
    eprintln!("gateway stopped with {before} readings durable");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = Metrics::new();
    let gw = Gateway::start(&cfg, metrics.clone()).await.unwrap();
    tokio::task::spawn_blocking(move || wait_all(pubs))
        .await
        .unwrap();
    let check = settle(&gw, N, Duration::from_secs(60)).await;
    // Messages made durable but not yet acknowledged when the gateway stopped come again
    // (DUP): their receipts, stored with their samples, make the new run skip them.
    eprintln!(
        "after the gateway restart: {} redeliveries recognised as stored",
        metrics.counter_value("outpost_mqtt_redeliveries_skipped", &[("device", "plant")])
    );
    check.assert_exactly_once(N);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_counted_and_skipped_while_good_readings_flow() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let devices = format!(
        "{}\n[[devices.mqtt.subscriptions]]\ntopic = \"raw/+/num\"\nformat = \"number\"\nstream = \"raw/{{1}}\"\n",
        telemetry_device_toml("plant", &broker.address(), "5")
    );
    let cfg = config(dir.path(), "gw-mqtt-bad-input", &devices);
    let metrics = Metrics::new();
    let gw = Gateway::start(&cfg, metrics.clone()).await.unwrap();
    wait_connected(&metrics, "plant").await;
    let port = broker.port();
    let good = 300u64;
    tokio::task::spawn_blocking(move || {
        let t = "plant/m0/telemetry";
        for n in 0..good {
            match n {
                50 => publish_bytes(port, t, 1, br#"{"n": 1, "v": "#), // malformed JSON
                100 => publish_bytes(port, "raw/x/num", 1, &[0xff, 0xfe, 0x31]), // not UTF-8
                150 => publish_bytes(port, t, 1, &vec![b' '; 300 * 1024]), // over the limit
                200 => publish_bytes(port, t, 1, br#"{"n": 9999999, "ts": 1}"#), // no /v
                250 => {
                    // A topic level that makes a stream name over 255 bytes.
                    let topic = format!("plant/{}/telemetry", "x".repeat(300));
                    publish_bytes(port, &topic, 1, telemetry_line(9_999_998).as_bytes())
                }
                _ => {}
            }
            if n % 25 == 0 {
                publish_bytes(port, "raw/ok/num", 1, b"42.5");
            }
        }
        let lines = (0..good).map(telemetry_line).collect();
        Publisher::lines(port, "plant/m1/telemetry", 1, lines).wait();
    })
    .await
    .unwrap();
    let check = settle(&gw, good, Duration::from_secs(30)).await;
    let errors = |kind: &str| {
        metrics.counter_value(
            "outpost_stream_errors",
            &[("device", "plant"), ("kind", kind)],
        )
    };
    // Counted per message, except `bad_stream`: per field (both fields of that message).
    for (kind, n) in [
        ("bad_json", 1),
        ("not_text", 1),
        ("too_large", 1),
        ("missing_field", 1),
        ("bad_stream", 2),
    ] {
        assert_eq!(errors(kind), n, "outpost_stream_errors{{kind={kind:?}}}");
    }
    // The message without `/v` still gave its counter; the good readings all arrived.
    assert!(check.seen.contains_key(&9_999_999));
    let mut good_only = check.clone();
    good_only.seen.remove(&9_999_999);
    good_only.bad_timestamps = 0;
    good_only.assert_exactly_once(good);
    let raw = outbox_samples(&gw)
        .iter()
        .filter(|s| &*s.stream.name() == "raw/ok")
        .count();
    assert_eq!(raw, (good / 25) as usize);
    // Nothing crashed: the device never restarted and stayed connected.
    assert_eq!(
        metrics.counter_value(
            "outpost_restarts",
            &[("supervisor", "devices"), ("child", "device:plant")]
        ),
        0
    );
    assert_eq!(
        metrics.counter_value("outpost_mqtt_reconnects", &[("device", "plant")]),
        0
    );
    gw.shutdown().await.unwrap();
}

/// MQTT 3.1.1 cannot tell a broker the largest packet the client takes: a QoS 1 message
/// over `max_packet` (512 KiB by default) used to break the connection, come back on the
/// persistent session and break it again, for ever, blocking everything behind it (and
/// surviving restarts). It is now read past without being buffered, counted and
/// acknowledged, and the readings behind it arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_over_3_1_1_is_read_past_counted_and_acknowledged() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "gw-mqtt-oversized",
        &telemetry_device_toml("plant", &broker.address(), "3.1.1"),
    );
    let metrics = Metrics::new();
    let gw = Gateway::start(&cfg, metrics.clone()).await.unwrap();
    wait_connected(&metrics, "plant").await;
    let port = broker.port();
    let n = 200u64;
    tokio::task::spawn_blocking(move || {
        publish_bytes(port, "plant/m0/telemetry", 1, &vec![b'x'; 1 << 20]);
        let lines = (0..n).map(telemetry_line).collect();
        Publisher::lines(port, "plant/m0/telemetry", 1, lines).wait();
    })
    .await
    .unwrap();
    let check = settle(&gw, n, Duration::from_secs(30)).await;
    check.assert_exactly_once(n);
    let oversized = |m: &Metrics| {
        m.counter_value(
            "outpost_stream_errors",
            &[("device", "plant"), ("kind", "oversized")],
        )
    };
    assert_eq!(oversized(&metrics), 1);
    assert_eq!(
        metrics.counter_value("outpost_mqtt_reconnects", &[("device", "plant")]),
        0,
        "the big message broke the connection"
    );
    // It was acknowledged: a new run of the gateway does not get it again.
    gw.shutdown().await.unwrap();
    let metrics = Metrics::new();
    let gw = Gateway::start(&cfg, metrics.clone()).await.unwrap();
    wait_connected(&metrics, "plant").await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(oversized(&metrics), 0, "the broker delivered it again");
    gw.shutdown().await.unwrap();
}

/// The reconnect backoff of the source itself: delays grow while the broker is down, and
/// start again from the initial delay after a connection that lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_backoff_grows_while_the_broker_is_down_and_resets_after_a_connection() {
    use outpost_protocols::mqtt::source::{
        MqttSource, STABLE_CONNECTION, SourceEvent, SourceOptions,
    };
    let port = outpost_hil::peers::free_port();
    let toml = telemetry_device_toml("backoff", &format!("127.0.0.1:{port}"), "5");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "gw-backoff", &toml);
    let mqtt = cfg.devices[0].mqtt.clone().unwrap();
    let opts = SourceOptions::from_config(&mqtt, "gw-backoff", "backoff").unwrap();
    let policy = opts.reconnect;
    assert_eq!(policy.initial, Duration::from_millis(50));
    let mut source = MqttSource::start(opts);
    let next = async |s: &mut MqttSource| {
        tokio::time::timeout(Duration::from_secs(20), s.next())
            .await
            .expect("no event from the source")
            .expect("source stopped")
    };
    // Broker down: attempts 1, 2, 3... with delays drawn from (base/2, base], base doubling.
    let mut delays = Vec::new();
    let t0 = Instant::now();
    while delays.len() < 5 {
        if let SourceEvent::Disconnected {
            attempt, retry_in, ..
        } = next(&mut source).await
        {
            assert_eq!(attempt as usize, delays.len() + 1);
            let base = policy.base_delay(attempt - 1);
            assert!(
                retry_in <= base && retry_in >= base / 2,
                "attempt {attempt}: {retry_in:?} not in ({:?}, {base:?}]",
                base / 2
            );
            delays.push(retry_in);
        }
    }
    assert!(delays[4] > delays[0] * 4, "delays do not grow: {delays:?}");
    // The attempts really were spaced by those delays (rumqttc alone retries at once).
    assert!(t0.elapsed() >= delays[..4].iter().sum::<Duration>());
    // Broker up on that port: the source connects.
    let broker = tokio::task::spawn_blocking(move || Mosquitto::start_on(port))
        .await
        .unwrap();
    loop {
        if let SourceEvent::Connected { .. } = next(&mut source).await {
            break;
        }
    }
    tokio::time::sleep(STABLE_CONNECTION + Duration::from_millis(200)).await;
    drop(broker);
    // The connection lasted: the next failure starts from the initial delay again.
    loop {
        if let SourceEvent::Disconnected {
            attempt, retry_in, ..
        } = next(&mut source).await
        {
            assert_eq!(attempt, 1);
            assert!(retry_in <= policy.initial);
            break;
        }
    }
}

async fn wait_connected(metrics: &Metrics, device: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if metrics.encode().lines().any(|l| {
            l.starts_with("outpost_mqtt_connected{") && l.contains(device) && l.ends_with(" 1")
        }) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("device {device} did not connect to the broker within 20 s");
}

/// The same 10,000 QoS 1 readings, through the uplink: the hub's sink holds each exactly
/// once (by reading counter, and by (gateway, stream, sequence)).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_qos1_readings_reach_the_hub_sink_exactly_once() {
    use outpost_hil::harness::{self, Pki};
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &["gw-mqtt-hub"]);
    let hub_dir = dir.path().join("hub");
    let hub = harness::start_hub(&pki, &hub_dir).await;
    let cfg = harness::gateway_config(
        "gw-mqtt-hub",
        &dir.path().join("gw"),
        &telemetry_device_toml("plant", &broker.address(), "3.1.1"),
        Some(&harness::uplink_toml(
            &pki,
            "gw-mqtt-hub",
            &hub.addr.to_string(),
        )),
    );
    let metrics = Metrics::new();
    let gw = Gateway::start(&cfg, metrics.clone()).await.unwrap();
    wait_connected(&metrics, "plant").await;
    let pubs = publish(broker.port(), 0..N);
    tokio::task::spawn_blocking(move || wait_all(pubs))
        .await
        .unwrap();
    let sink = hub_dir.join("sink");
    let counters = |lines: &[harness::SinkLine]| {
        let mut seen = std::collections::BTreeMap::<i64, u32>::new();
        for l in lines.iter().filter(|l| l.stream.ends_with("/n")) {
            *seen.entry(l.value.as_i64().unwrap_or(-1)).or_default() += 1;
        }
        seen
    };
    harness::wait_for(Duration::from_secs(60), || {
        counters(&harness::read_sink(&sink)).len() as u64 >= N
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // late duplicates would show
    let lines = harness::read_sink(&sink);
    let seen = counters(&lines);
    assert_eq!(seen.len() as u64, N, "readings at the hub");
    assert!(seen.keys().all(|k| (0..N as i64).contains(k)));
    assert!(
        seen.values().all(|c| *c == 1),
        "a reading reached the hub twice"
    );
    let per_stream = harness::assert_exactly_once(&lines);
    assert_eq!(per_stream.values().sum::<usize>() as u64, 2 * N);
    gw.shutdown().await.unwrap();
    hub.stop().await;
}

/// A gateway with a Modbus device (the demo's simulated boiler) and an MQTT device: each
/// device's sample count is exported under a name of its own meaning — samples read from a
/// device (`outpost_stream_samples_read`), samples made durable (`_stored`) — with one
/// help text each, whichever device registers first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_and_mqtt_sample_counts_each_have_a_name_and_one_meaning() {
    use outpost_actors::demo::sim::{SimConfig, SimDevice};
    let broker = Mosquitto::start();
    let sim = SimDevice::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let modbus = format!(
        r#"
[[devices]]
name = "boiler"
[devices.modbus]
address = "{}"
[[devices.modbus.poll_groups]]
interval = "100ms"
[[devices.modbus.poll_groups.points]]
stream = "boiler/temperature"
table = "holding"
address = 0
type = "f32"
"#,
        sim.addr()
    );
    let devices = format!(
        "{modbus}{}",
        telemetry_device_toml("plant", &broker.address(), "5")
    );
    let m = Metrics::new();
    let gw = Gateway::start(&config(dir.path(), "gw-names", &devices), m.clone())
        .await
        .unwrap();
    wait_connected(&m, "plant").await;
    let value = |text: &str, name: &str, device: &str| -> Option<f64> {
        let prefix = format!("{name}_total{{device=\"{device}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let text = loop {
        publish_bytes(
            broker.port(),
            "plant/m0/telemetry",
            1,
            telemetry_line(n).as_bytes(),
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let text = m.encode();
        let read = value(&text, "outpost_stream_samples_read", "boiler");
        let stored = value(&text, "outpost_stream_samples_stored", "plant");
        if read.is_some_and(|v| v > 0.0) && stored.is_some_and(|v| v > 0.0) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no Modbus `outpost_stream_samples_read` or MQTT `outpost_stream_samples_stored` \
             count within 20 s:\n{text}"
        );
    };
    // Each name once, with its own help; the Modbus device is not counted as stored,
    // the MQTT device not as read, and the old two-meaning name is gone.
    let helps: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("# HELP outpost_stream_samples"))
        .collect();
    assert_eq!(helps.len(), 2, "{helps:?}");
    assert!(
        helps
            .iter()
            .any(|h| h.starts_with("# HELP outpost_stream_samples_read "))
            && helps
                .iter()
                .any(|h| h.starts_with("# HELP outpost_stream_samples_stored ")),
        "{helps:?}"
    );
    assert_eq!(
        value(&text, "outpost_stream_samples_stored", "boiler"),
        None
    );
    assert_eq!(value(&text, "outpost_stream_samples_read", "plant"), None);
    assert!(!text.contains("outpost_stream_samples_total"), "{text}");
    gw.shutdown().await.unwrap();
    sim.stop();
}
