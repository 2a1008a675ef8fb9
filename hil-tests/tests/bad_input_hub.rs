//! Hostile input on the hub's port: random UDP bytes, TLS clients from another CA, an
//! authenticated gateway sending garbage, one claiming another gateway's id, and one that
//! opens a stream and stalls. Each is counted; nothing crashes; a well-behaved gateway's
//! samples keep arriving exactly once.

use std::time::Duration;

use outpost_actors::gateway::Gateway;
use outpost_actors::hub::Hub;
use outpost_hil::harness::{self, Pki};
use outpost_protocols::frame::{self, Hello, Message};
use outpost_protocols::uplink::quic::{self, ClientOptions, ClientTls, QuicClient};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Priority, Sample, StreamId, Value};

fn client_for(pki: &Pki, id: &str) -> QuicClient {
    let g = pki.bundle.gateways.iter().find(|g| g.id == id).unwrap();
    let tls = ClientTls {
        ca_pem: std::fs::read(&pki.bundle.ca_cert).unwrap(),
        cert_pem: std::fs::read(&g.cert).unwrap(),
        key_pem: std::fs::read(&g.key).unwrap(),
    };
    QuicClient::new(&tls, ClientOptions::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_counted_and_do_not_disturb_good_gateways() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &["good", "evil", "other"]);
    let rogue = Pki::new(&dir.path().join("rogue"), &["good"]);
    let hub_dir = dir.path().join("hub");
    let metrics = Metrics::new();
    let hub = Hub::start(
        &harness::hub_config(&pki, &hub_dir, "127.0.0.1:0"),
        metrics.clone(),
    )
    .await
    .unwrap();
    let addr = hub.addr;

    let cfg = harness::gateway_config(
        "good",
        &dir.path().join("gw"),
        "",
        Some(&harness::uplink_toml(&pki, "good", &addr.to_string())),
    );
    let gw = Gateway::start(&cfg, Metrics::new()).await.unwrap();
    let stream = StreamId::intern("bad_input/good").unwrap();
    let producer = {
        let ingest = gw.ingest().clone();
        tokio::spawn(async move {
            for i in 0..40i64 {
                let batch = (0..100)
                    .map(|j| Sample::new(stream, i * 100 + j, Value::I64(i * 100 + j)))
                    .collect();
                ingest
                    .submit_durable(Priority::Normal, batch)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };

    // 1. Random datagrams.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..2_000 {
        let len = rng.usize(1..1400);
        let bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        let _ = udp.send_to(&bytes, addr).await;
    }

    // 2. A certificate from another CA: refused at the handshake.
    let g = &rogue.bundle.gateways[0];
    let rogue_client = QuicClient::new(
        &ClientTls {
            ca_pem: std::fs::read(&pki.bundle.ca_cert).unwrap(),
            cert_pem: std::fs::read(&g.cert).unwrap(),
            key_pem: std::fs::read(&g.key).unwrap(),
        },
        ClientOptions::default(),
    )
    .unwrap();
    for _ in 0..3 {
        if let Ok(c) = rogue_client.connect(addr, "localhost").await {
            // TLS 1.3: the refusal may come after the client thinks it is connected.
            if let Ok((mut s, _r)) = c.open_bi().await {
                let _ = quic::send_all(&mut s, b"hello?").await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), c.closed()).await;
        }
    }

    // 3. An authenticated gateway sending garbage.
    let evil = client_for(&pki, "evil");
    let c = evil.connect(addr, "localhost").await.unwrap();
    let (mut s, _r) = c.open_bi().await.unwrap();
    let hello = frame::encode(&Message::Hello(Hello {
        gateway_id: "evil".parse().unwrap(),
        max_version: 1,
    }))
    .unwrap();
    quic::send_all(&mut s, &hello).await.unwrap();
    let _ = quic::send_all(
        &mut s,
        &[0x4f, 0x50, 0x01, 0x02, 0xff, 0xff, 0xff, 0xff, 1, 2, 3],
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), c.closed()).await;

    // 4. An authenticated gateway claiming another id.
    let c = evil.connect(addr, "localhost").await.unwrap();
    let (mut s, _r) = c.open_bi().await.unwrap();
    let hello = frame::encode(&Message::Hello(Hello {
        gateway_id: "other".parse().unwrap(),
        max_version: 1,
    }))
    .unwrap();
    quic::send_all(&mut s, &hello).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.closed()).await;

    // 5. Half-open: connects, opens a stream, sends half a frame and stalls.
    let stall = client_for(&pki, "other");
    let stalled = stall.connect(addr, "localhost").await.unwrap();
    let (mut s, _r) = stalled.open_bi().await.unwrap();
    quic::send_all(&mut s, &hello[..5]).await.unwrap();

    producer.await.unwrap();
    let sink = hub_dir.join("sink");
    let ok = harness::wait_for(Duration::from_secs(30), || {
        harness::read_sink(&sink)
            .iter()
            .filter(|l| l.gateway == "good")
            .count()
            == 4_000
    })
    .await;
    let lines = harness::read_sink(&sink);
    assert!(ok, "good gateway: {} of 4000 arrived", lines.len());
    let per_stream = harness::assert_exactly_once(&lines);
    assert_eq!(
        per_stream.len(),
        1,
        "nothing from the hostile peers reached the sink"
    );

    tokio::time::sleep(Duration::from_millis(600)).await; // counters are sampled every 500 ms
    let bad = |k| metrics.counter_value("outpost_hub_bad_input", &[("kind", k)]);
    let refused = |r| metrics.counter_value("outpost_hub_handshakes_refused", &[("reason", r)]);
    assert!(bad("identity") >= 1, "{}", metrics.encode());
    let frame_errors: u64 = [
        "bad_magic",
        "version",
        "too_long",
        "truncated",
        "trailing_bytes",
        "checksum",
        "message_type",
        "encoding",
        "priority",
        "limit",
        "decompress",
        "malformed",
    ]
    .iter()
    .map(|k| bad(k))
    .sum();
    assert!(
        frame_errors >= 1,
        "garbage frame counted: {}",
        metrics.encode()
    );
    assert!(refused("tls_failed") >= 1, "{}", metrics.encode());
    drop(stalled);
    gw.shutdown().await.unwrap();
    hub.stop().await;
}
