//! Gateway → Mosquitto → hub (MQTT ingress) → JSON-lines sink: the MQTT uplink carries the
//! same frames as QUIC. A test gateway drives `MqttUplinkSession` as the sync loop would
//! (Hello, then Data frames; on a lost connection or a missing ack it reconnects and sends
//! again what is unacknowledged). Checked: every sample exactly once at the hub; a resent
//! frame is acknowledged again and not written twice; garbage and a frame naming another
//! gateway are counted and skipped while the ingress carries on; a broker restart mid-way
//! is survived by both sides; garbage on a gateway's down topic ends its session.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use outpost_actors::hub::Hub;
use outpost_hil::harness::{self, Pki};
use outpost_hil::peers::mosquitto::{Mosquitto, publish_bytes};
use outpost_protocols::frame::{self, DataFrame, Encoding, Hello, Message};
use outpost_protocols::uplink::mqtt::{MqttUplinkError, MqttUplinkOptions, MqttUplinkSession};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Priority, Sample, StreamId, Value};

const GW: &str = "gw-mqtt";
const PER_FRAME: u64 = 500;

/// One encoded Data frame and its sequences.
#[derive(Clone)]
struct Frame {
    seqs: Vec<u64>,
    bytes: Vec<u8>,
}

/// `n` samples with sequences `first..first + n` (value = sequence), from `gateway`.
fn frame(gateway: &str, first: u64, n: u64) -> Frame {
    let stream = StreamId::intern("mqtt/counter").unwrap();
    let seqs: Vec<u64> = (first..first + n).collect();
    let samples: Vec<Sample> = seqs
        .iter()
        .map(|s| {
            Sample::new(
                stream,
                1_700_000_000_000_000_000 + *s as i64,
                Value::I64(*s as i64),
            )
        })
        .collect();
    let f = DataFrame::from_samples(
        &gateway.parse().unwrap(),
        Priority::Normal,
        Encoding::Raw,
        seqs.iter().copied().zip(samples.iter()),
    );
    Frame {
        seqs,
        bytes: frame::encode(&Message::Data(f)).unwrap(),
    }
}

/// Frames `from..to` of [`PER_FRAME`] samples each.
fn frames(from: u64, to: u64) -> Vec<Frame> {
    (from..to)
        .map(|i| frame(GW, i * PER_FRAME, PER_FRAME))
        .collect()
}

/// A gateway's uplink as the sync loop drives it.
struct TestGateway {
    opts: MqttUplinkOptions,
    session: Option<MqttUplinkSession>,
    sessions: u32,
}

impl TestGateway {
    fn new(port: u16) -> TestGateway {
        let mut opts = MqttUplinkOptions::new("127.0.0.1", port, &GW.parse().unwrap());
        opts.keep_alive = Duration::from_secs(2);
        opts.connect_timeout = Duration::from_secs(2);
        opts.max_in_flight = 4;
        TestGateway {
            opts,
            session: None,
            sessions: 0,
        }
    }

    /// The current session, or a new one (retried until the broker answers) that starts
    /// with a Hello.
    async fn session(&mut self) -> &mut MqttUplinkSession {
        if self.session.is_none() {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut s = loop {
                match MqttUplinkSession::connect(&self.opts).await {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("gateway: connect failed ({e}), retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("gateway cannot connect: {e}"),
                }
            };
            let hello = frame::encode(&Message::Hello(Hello {
                gateway_id: GW.parse().unwrap(),
                max_version: frame::VERSION,
            }))
            .unwrap();
            s.send(&hello).await.expect("hello");
            self.sessions += 1;
            self.session = Some(s);
        }
        self.session.as_mut().unwrap()
    }

    async fn reconnect(&mut self) {
        if let Some(s) = self.session.take() {
            s.close().await;
        }
    }

    /// Sends `frames` and waits until the hub has acknowledged every sequence in them; after
    /// a lost connection or 3 s without progress, sends again what is unacknowledged (a new
    /// session after an error). Returns the number of acks received.
    async fn deliver(&mut self, frames: &[Frame]) -> usize {
        let mut pending: BTreeMap<usize, &Frame> = frames.iter().enumerate().collect();
        let mut acks = 0;
        let deadline = Instant::now() + Duration::from_secs(90);
        'resend: loop {
            assert!(
                Instant::now() < deadline,
                "{} frames never acknowledged",
                pending.len()
            );
            let s = self.session().await;
            for f in pending.values() {
                if let Err(e) = s.send(&f.bytes).await {
                    eprintln!("gateway: send failed ({e}), reconnecting");
                    self.session = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'resend;
                }
            }
            while !pending.is_empty() {
                let s = self.session.as_mut().unwrap();
                match tokio::time::timeout(Duration::from_secs(3), s.recv()).await {
                    Ok(Ok(Message::Ack(a))) => {
                        assert_eq!(a.gateway_id, GW);
                        acks += 1;
                        pending.retain(|_, f| !f.seqs.iter().all(|q| a.contains(*q)));
                    }
                    Ok(Ok(other)) => panic!("unexpected message from the hub: {other:?}"),
                    Ok(Err(e)) => {
                        eprintln!("gateway: session ended ({e}), reconnecting");
                        self.session = None;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue 'resend;
                    }
                    Err(_) => {
                        eprintln!("gateway: no ack for 3 s, resending {}", pending.len());
                        continue 'resend;
                    }
                }
            }
            return acks;
        }
    }
}

const MQTT: (&str, &str) = ("transport", "mqtt");

fn subscribed(m: &Metrics) -> bool {
    m.encode()
        .contains("outpost_hub_ingress_connected{transport=\"mqtt\"} 1")
}

/// Panics unless the sink holds exactly the sequences `0..n` of [`GW`], once each, with
/// their values.
fn assert_sink_holds(sink: &Path, n: u64) {
    let lines = harness::read_sink(sink);
    harness::assert_exactly_once(&lines);
    assert!(
        lines.iter().all(|l| l.gateway == GW),
        "only {GW} in the sink"
    );
    let mut seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs.len() as u64, n, "samples in the sink");
    assert!(seqs.iter().copied().eq(0..n), "sequences 0..{n}");
    assert!(
        lines
            .iter()
            .all(|l| l.value.as_i64() == Some(l.seq as i64) && l.stream == "mqtt/counter"),
        "values and streams"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_reach_the_hub_through_mosquitto_exactly_once() {
    let mut broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GW]);
    let hub_dir = dir.path().join("hub");
    let sink = hub_dir.join("sink");
    let metrics = Metrics::new();
    let hub = Hub::start(
        &harness::mqtt_ingress_hub_config(&pki, &hub_dir, &broker.address()),
        metrics.clone(),
    )
    .await
    .expect("hub starts");
    assert!(
        harness::wait_for(Duration::from_secs(10), || subscribed(&metrics)).await,
        "the hub's ingress subscribes"
    );
    let mut gw = TestGateway::new(broker.port());

    // Hello + 20 Data frames of 500 samples.
    let first = frames(0, 20);
    let acks = gw.deliver(&first).await;
    assert!(acks >= 20, "{acks} acks");
    assert_sink_holds(&sink, 20 * PER_FRAME);
    let written =
        |m: &Metrics| m.counter_value("outpost_hub_samples_written", &[("gateway", GW), MQTT]);
    assert_eq!(written(&metrics), 20 * PER_FRAME);
    let stats = gw.session.as_ref().unwrap().stats();
    assert!(stats.acked_messages >= 21, "{stats:?}");
    assert!(
        stats.acked_bytes >= first.iter().map(|f| f.bytes.len() as u64).sum::<u64>(),
        "{stats:?}"
    );
    assert!(stats.srtt.is_some() && stats.min_rtt.is_some(), "{stats:?}");
    assert_eq!(stats.bad_messages, 0);

    // 5 frames again, as after a reconnect: acknowledged again, not written again.
    gw.reconnect().await;
    let acks = gw.deliver(&first[5..10]).await;
    assert!(acks >= 5, "{acks} acks");
    assert_sink_holds(&sink, 20 * PER_FRAME);
    assert_eq!(
        metrics.counter_value("outpost_hub_duplicates", &[("gateway", GW), MQTT]),
        5 * PER_FRAME
    );

    // Garbage and a frame naming another gateway on this gateway's topic: counted and
    // skipped; the next frame still goes through.
    {
        let s = gw.session().await;
        s.send(b"this is not a frame at all").await.unwrap();
        s.send(&frame("gw-other", 50_000, 10).bytes).await.unwrap();
    }
    let acks = gw.deliver(&frames(20, 21)).await;
    assert!(acks >= 1);
    let bad = |kind: &str| metrics.counter_value("outpost_hub_bad_input", &[("kind", kind), MQTT]);
    assert!(
        harness::wait_for(Duration::from_secs(5), || bad("bad_magic") == 1
            && bad("identity") == 1)
        .await,
        "bad_magic {}, identity {}",
        bad("bad_magic"),
        bad("identity")
    );
    assert_sink_holds(&sink, 21 * PER_FRAME);

    // The broker restarts (losing every session) while half of the rest is in flight; both
    // sides reconnect, and what the hub had not acknowledged is sent again.
    let rest = frames(21, 40);
    {
        let s = gw.session().await;
        for f in &rest[..10] {
            s.send(&f.bytes).await.unwrap();
        }
    }
    let connections = metrics.counter_value("outpost_hub_connections", &[MQTT]);
    tokio::task::block_in_place(|| broker.restart());
    let acks = gw.deliver(&rest).await;
    assert!(acks >= rest.len(), "{acks} acks");
    assert!(
        gw.sessions >= 3,
        "the gateway reconnected ({} sessions)",
        gw.sessions
    );
    assert!(
        metrics.counter_value("outpost_hub_connections", &[MQTT]) > connections,
        "the hub's ingress reconnected"
    );
    assert!(metrics.counter_value("outpost_hub_ingress_disconnects", &[MQTT]) >= 1);
    assert_sink_holds(&sink, 40 * PER_FRAME);
    assert_eq!(written(&metrics), 40 * PER_FRAME);

    // Garbage on the gateway's down topic ends its session, counted.
    let s = gw.session().await;
    let port = broker.port();
    tokio::task::block_in_place(|| {
        publish_bytes(port, &format!("outpost/{GW}/down"), 1, b"not an ack")
    });
    match tokio::time::timeout(Duration::from_secs(5), s.recv()).await {
        Ok(Err(MqttUplinkError::Undecodable(_))) => {}
        other => panic!("expected an undecodable message, got {other:?}"),
    }
    assert_eq!(s.stats().bad_messages, 1);
    assert!(matches!(
        s.send(&rest[0].bytes).await,
        Err(MqttUplinkError::Ended(_))
    ));

    gw.reconnect().await;
    hub.stop().await;
}
