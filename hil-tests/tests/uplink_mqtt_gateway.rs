//! A real gateway with `[uplink] transport = "mqtt"`: MQTT devices → the
//! gateway (outbox, sync loop) → Mosquitto → the hub's `[mqtt_ingress]` → the hub's sink.
//!
//! The devices read from one broker (the site's), the uplink goes through another (the
//! cloud's), so restarting the uplink's broker leaves the readings' source alone. Messages
//! are limited to 1 KiB (`[uplink.mqtt] max_payload`, its smallest), so the sync loop splits
//! the larger frames (the outage's backlog).
//!
//! 1. Every reading published, of a critical and a normal device, is at the hub exactly
//!    once, across a 3 s restart of the uplink's broker (which loses every session and every
//!    queued message: what the hub had not acknowledged is sent again) and a forced
//!    reconnect (another client takes the gateway's client id over, as a broker does when a
//!    rebooted gateway comes back before its old connection timed out). The link monitor
//!    saw the broker's outage (intermittent) and measured an RTT (publish→PUBACK). The mode
//!    is pinned to `full` so that frames are raw and the backlog's exceed 1 KiB.
//! 2. With `[sync] mode = "summary"` pinned, window summaries go over MQTT too, and the
//!    critical readings (never summarized) arrive, each once.
//!
//! Mosquitto must be installed (`hil-tests/run-tests.sh` installs it); without it the test
//! fails and says how to install it. Takes about 15 s.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use outpost_actors::gateway::Gateway;
use outpost_actors::hub::Hub;
use outpost_hil::harness::{self, Pki};
use outpost_hil::observe::{self, Metrics, Tally};
use outpost_hil::peers::mosquitto::Mosquitto;
use outpost_hil::traffic::{PacedPublisher, reading_device_toml};
use outpost_protocols::uplink::mqtt::{MqttUplinkOptions, MqttUplinkSession};
use outpost_runtime::metrics::Metrics as Registry;
use tokio::time::Instant;

/// Readings per second of each device.
const RATE: f64 = 100.0;

/// One device: its priority, the site topic it reads, the stream it writes.
struct Device {
    priority: &'static str,
    topic: &'static str,
    stream: &'static str,
}

const CRITICAL: Device = Device {
    priority: "critical",
    topic: "site/critical",
    stream: "mqtt-sync/critical",
};
const NORMAL: Device = Device {
    priority: "normal",
    topic: "site/normal",
    stream: "mqtt-sync/normal",
};
const DEVICES: [&Device; 2] = [&CRITICAL, &NORMAL];

fn device_name(d: &Device) -> String {
    format!("dev-{}", d.priority)
}

async fn scrape(addr: SocketAddr) -> Metrics {
    observe::scrape(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A hub taking frames from the broker at `broker`, and (after waiting for it) subscribed.
async fn start_hub(pki: &Pki, hub_dir: &Path, broker: &str) -> (Hub, Registry) {
    let metrics = Registry::new();
    let hub = Hub::start(
        &harness::mqtt_ingress_hub_config(pki, hub_dir, broker),
        metrics.clone(),
    )
    .await
    .expect("hub starts");
    let subscribed = harness::wait_for(Duration::from_secs(10), || {
        metrics
            .encode()
            .contains("outpost_hub_ingress_connected{transport=\"mqtt\"} 1")
    })
    .await;
    assert!(
        subscribed,
        "the hub's MQTT ingress did not subscribe in 10 s"
    );
    (hub, metrics)
}

/// A gateway `id` reading `DEVICES` from `site`, sending through `cloud`, with `extra`
/// config (a `[sync]` section) and its metrics endpoint; returns once every device has
/// stored a probe reading (`n = -1`), so the subscriptions are in place.
async fn start_gateway(
    id: &str,
    dir: &Path,
    site: &Mosquitto,
    cloud: &Mosquitto,
    extra: &str,
) -> (Gateway, SocketAddr) {
    let devices: String = DEVICES
        .iter()
        .map(|d| {
            reading_device_toml(
                &device_name(d),
                d.priority,
                &site.address(),
                d.topic,
                d.stream,
            )
        })
        .collect();
    let cfg = observe::gateway_config_with_metrics(
        id,
        dir,
        &format!("{extra}\n{devices}"),
        &harness::mqtt_uplink_toml(&cloud.address(), "1KiB"),
    );
    let gw = Gateway::start(&cfg, Registry::new())
        .await
        .expect("the gateway starts with transport = \"mqtt\"");
    let maddr = gw.metrics_addr().expect("metrics endpoint enabled");
    let warm: Vec<(String, &'static str)> =
        DEVICES.iter().map(|d| (device_name(d), d.topic)).collect();
    observe::warm_up(maddr, site.port(), &warm, Duration::from_secs(20)).await;
    (gw, maddr)
}

/// Waits until `outpost_sync_connects_total` exceeds `than`.
async fn wait_for_connects(maddr: SocketAddr, than: f64, within: Duration) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let n = scrape(maddr)
            .await
            .value("outpost_sync_connects_total", &[]);
        if n > than {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not connect to the broker again within {within:?} ({n} connections)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops the publishers; returns how many readings each published.
async fn stop(publishers: Vec<PacedPublisher>) -> Vec<u64> {
    let mut total = Vec::new();
    for p in publishers {
        total.push(tokio::task::spawn_blocking(move || p.stop()).await.unwrap());
    }
    total
}

/// The tally of `d`'s readings at the hub, probe readings left out; panics on a
/// duplicate, a non-integer or a reading never published (`0..published`).
fn tally(lines: &[harness::SinkLine], d: &Device, published: u64) -> Tally {
    let mut t = Tally::of(lines, d.stream);
    assert_eq!(t.not_integer, 0, "{}: non-integer readings", d.priority);
    t.seen.remove(&-1);
    let dups = t.duplicates();
    assert!(
        dups.is_empty(),
        "{}: readings twice at the hub: {dups:?}",
        d.priority
    );
    let outside = t.outside(0..published as i64);
    assert!(
        outside.is_empty(),
        "{}: readings never published at the hub: {outside:?}",
        d.priority
    );
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_reaches_the_hub_once_through_mosquitto_across_a_broker_restart_and_a_reconnect()
 {
    const GATEWAY: &str = "gw-mqtt-sync";
    let site = Mosquitto::start();
    let mut cloud = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GATEWAY]);
    let hub_dir = dir.path().join("hub");
    let sink = hub_dir.join("sink");
    let (hub, hub_metrics) = start_hub(&pki, &hub_dir, &cloud.address()).await;
    // Raw frames: the backlog's frames exceed 1 KiB whatever class the link monitor reads
    // off a busy machine (in full_zstd, which a loaded CI machine's RTTs can give, the
    // test's counters compress under 1 KiB and nothing needs splitting).
    let full = "[sync]\nmode = \"full\"\n";
    let (gw, maddr) = start_gateway(GATEWAY, &dir.path().join("gw"), &site, &cloud, full).await;

    let publishers: Vec<PacedPublisher> = DEVICES
        .iter()
        .map(|d| PacedPublisher::start(site.port(), d.topic, 1, RATE))
        .collect();

    // Readings flow to the hub.
    let flowing = harness::wait_for(Duration::from_secs(15), || {
        harness::read_sink(&sink)
            .iter()
            .any(|l| l.stream == NORMAL.stream && l.value.as_i64() >= Some(100))
    })
    .await;
    assert!(
        flowing,
        "no reading reached the hub through the MQTT uplink"
    );

    // The uplink's broker goes away for 3 s and comes back empty.
    let connects = scrape(maddr)
        .await
        .value("outpost_sync_connects_total", &[]);
    tokio::task::block_in_place(|| cloud.stop());
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| cloud.restart());
    let connects = wait_for_connects(maddr, connects, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Another client connects with the gateway's client id: the broker drops the gateway's
    // connection, the gateway connects again.
    let mut intruder =
        MqttUplinkOptions::new("127.0.0.1", cloud.port(), &"intruder".parse().unwrap());
    intruder.client_id = format!("outpost-{GATEWAY}-uplink");
    intruder.connect_timeout = Duration::from_secs(5);
    let session = MqttUplinkSession::connect(&intruder)
        .await
        .expect("a client with the gateway's client id connects");
    session.close().await;
    wait_for_connects(maddr, connects, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let published = stop(publishers).await;
    eprintln!("uplink_mqtt_gateway: published (critical, normal) {published:?}");

    // Everything drains: the outbox empties (every record acknowledged by the hub) and the
    // hub holds every reading.
    let want: u64 = published.iter().sum();
    let drained = harness::wait_for(Duration::from_secs(120), || {
        gw.outbox().stats().records.iter().sum::<u64>() == 0
            && DEVICES.iter().zip(&published).all(|(d, n)| {
                Tally::of(&harness::read_sink(&sink), d.stream)
                    .seen
                    .range(0..*n as i64)
                    .count() as u64
                    == *n
            })
    })
    .await;
    let lines = harness::read_sink(&sink);
    if !drained {
        let m = scrape(maddr).await;
        let state: Vec<(&str, f64)> = [
            "outpost_sync_mode",
            "outpost_link_class",
            "outpost_sync_backfill_pending",
            "outpost_sync_in_flight",
            "outpost_sync_connected",
        ]
        .into_iter()
        .map(|n| (n, m.value(n, &[])))
        .collect();
        panic!(
            "not everything arrived within 120 s: {} sink lines for {want} readings (and the \
             probes), outbox {:?}, gateway {state:?}",
            lines.len(),
            gw.outbox().stats()
        );
    }
    harness::assert_exactly_once(&lines);
    for (d, n) in DEVICES.iter().zip(&published) {
        let t = tally(&lines, d, *n);
        let missing = t.missing(0..*n as i64);
        assert!(
            missing.is_empty(),
            "{}: readings lost: {:?} of {n}",
            d.priority,
            observe::ranges(&missing)
        );
    }

    // What the gateway and the hub saw.
    let m = scrape(maddr).await;
    let connects = m.value("outpost_sync_connects_total", &[]);
    assert!(
        connects >= 3.0,
        "{connects} connections: the gateway did not reconnect after the restart and the take-over"
    );
    let intermittent: f64 = ["fiber", "broadband", "mobile", "satellite"]
        .into_iter()
        .flat_map(|from| {
            ["downgrade", "upgrade"].map(|reason| {
                m.value(
                    "outpost_link_class_changes_total",
                    &[("from", from), ("to", "intermittent"), ("reason", reason)],
                )
            })
        })
        .sum();
    assert!(
        intermittent >= 1.0,
        "the link monitor did not see the broker's 3 s outage"
    );
    assert!(
        m.value("outpost_link_rtt_us", &[]) > 0.0,
        "the link monitor has no RTT of the MQTT uplink"
    );
    let split = m.value("outpost_sync_frames_split_total", &[]);
    assert!(
        split >= 1.0,
        "no frame was split to fit max_payload = 1KiB (the outage's backlog should not fit)"
    );
    let mqtt = ("transport", "mqtt");
    let duplicates =
        hub_metrics.counter_value("outpost_hub_duplicates", &[("gateway", GATEWAY), mqtt]);
    let messages = hub_metrics.counter_value("outpost_hub_ingress_messages", &[mqtt]);
    eprintln!(
        "uplink_mqtt_gateway: {connects} connections, {split} frames split, {messages} \
         messages at the hub, {duplicates} samples received again and dropped"
    );

    gw.shutdown().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_summaries_and_alarms_go_over_mqtt_in_summary_mode() {
    const GATEWAY: &str = "gw-mqtt-summary";
    let site = Mosquitto::start();
    let cloud = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GATEWAY]);
    let hub_dir = dir.path().join("hub");
    let sink = hub_dir.join("sink");
    let (hub, _hub_metrics) = start_hub(&pki, &hub_dir, &cloud.address()).await;
    let sync =
        "[sync]\nmode = \"summary\"\n[sync.summary]\nwindow = \"1s\"\nlateness = \"200ms\"\n";
    let (gw, _maddr) = start_gateway(GATEWAY, &dir.path().join("gw"), &site, &cloud, sync).await;

    let publishers: Vec<PacedPublisher> = DEVICES
        .iter()
        .map(|d| PacedPublisher::start(site.port(), d.topic, 1, RATE))
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let published = stop(publishers).await;

    // Summaries of the normal stream's windows arrive.
    let summarized = harness::wait_for(Duration::from_secs(15), || {
        harness::read_summaries(&sink)
            .iter()
            .filter(|s| s["stream"].as_str() == Some(NORMAL.stream))
            .count()
            >= 3
    })
    .await;
    let summaries = harness::read_summaries(&sink);
    assert!(
        summarized,
        "fewer than 3 window summaries of {} reached the hub: {summaries:?}",
        NORMAL.stream
    );
    assert!(
        summaries
            .iter()
            .all(|s| s["gateway"].as_str() == Some(GATEWAY) && s["count"].as_u64() >= Some(1)),
        "{summaries:?}"
    );

    // Critical readings are never summarized: every one arrives, once.
    let all_critical = harness::wait_for(Duration::from_secs(30), || {
        Tally::of(&harness::read_sink(&sink), CRITICAL.stream)
            .seen
            .range(0..published[0] as i64)
            .count() as u64
            == published[0]
    })
    .await;
    let lines = harness::read_sink(&sink);
    harness::assert_exactly_once(&lines);
    let t = tally(&lines, &CRITICAL, published[0]);
    assert!(
        all_critical,
        "critical readings lost: {:?} of {}",
        observe::ranges(&t.missing(0..published[0] as i64)),
        published[0]
    );
    tally(&lines, &NORMAL, published[1]);

    gw.shutdown().await.unwrap();
    hub.stop().await;
}
