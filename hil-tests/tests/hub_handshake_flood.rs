//! A flood of QUIC handshakes that never finish must not lock a gateway out of the hub.
//! 240 real Initial packets (caught from a client by a socket that never answered) are
//! replayed at the hub from sockets on the gateway's own address and on another, again and
//! again, while a real gateway starts and sends: the hub asks the flood to validate its
//! addresses (QUIC Retry), which replayed packets never do, so it holds at most
//! `[hub.handshakes] retry_above` slots; the gateway is refused nothing and all its samples
//! arrive once.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use outpost_actors::gateway::Gateway;
use outpost_actors::hub::Hub;
use outpost_hil::harness::{self, Pki};
use outpost_protocols::uplink::quic::{ClientOptions, ClientTls, QuicClient};
use outpost_runtime::config;
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Priority, Sample, StreamId, Value};
use tokio::net::UdpSocket;

const GW: &str = "gw-flood";

/// The first datagrams of `n` connection attempts of a real client, each from its own
/// socket, caught by a socket that never answers.
async fn captured_initials(pki: &Pki, n: usize) -> Vec<Vec<u8>> {
    let g = pki.bundle.gateways.iter().find(|g| g.id == GW).unwrap();
    let tls = ClientTls {
        ca_pem: std::fs::read(&pki.bundle.ca_cert).unwrap(),
        cert_pem: std::fs::read(&g.cert).unwrap(),
        key_pem: std::fs::read(&g.key).unwrap(),
    };
    let client = QuicClient::new(&tls, ClientOptions::default()).unwrap();
    let trap = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let trap_addr = trap.local_addr().unwrap();
    let attempts: Vec<_> = (0..n)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.connect(trap_addr, "localhost").await })
        })
        .collect();
    let mut from = HashSet::new();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while out.len() < n {
        let (len, src) = tokio::time::timeout(Duration::from_secs(10), trap.recv_from(&mut buf))
            .await
            .expect("Initial packets")
            .unwrap();
        if from.insert(src) {
            out.push(buf[..len].to_vec());
        }
    }
    for a in attempts {
        a.abort();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_handshakes_do_not_lock_a_gateway_out_of_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GW]);
    let hub_dir = dir.path().join("hub");
    let text = format!(
        "{}\n[hub.handshakes]\ntimeout = \"10s\"\nmax_pending = 32\nmax_pending_per_source = 2\n\
         retry_above = 4\nreserved_for_known = 8\n",
        harness::hub_toml(&pki, &hub_dir, "127.0.0.1:0")
    )
    // The section belongs to [hub]: put it before the next table.
    .replacen("[metrics]\nenabled = false\n", "", 1)
        + "[metrics]\nenabled = false\n";
    let cfg = config::parse_hub(&text, Path::new("hub.toml"), Path::new("/"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(cfg.hub.handshakes.retry_above.get(), 4);
    let metrics = Metrics::new();
    let hub = Hub::start(&cfg, metrics.clone()).await.unwrap();
    let hub_addr = hub.addr;

    let initials = captured_initials(&pki, 240).await;
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut sockets = Vec::new();
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), other] {
        for _ in 0..2 {
            sockets.push(UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap());
        }
    }
    // The flood, replayed every 200 ms until the test ends.
    let flood = tokio::spawn(async move {
        loop {
            for (i, p) in initials.iter().enumerate() {
                let _ = sockets[i % sockets.len()].send_to(p, hub_addr).await;
                if i % 16 == 15 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let retried = || metrics.counter_value("outpost_hub_handshakes_retried", &[]);
    assert!(
        harness::wait_for(Duration::from_secs(10), || retried() >= 200).await,
        "the flood was asked to validate its addresses: {}",
        metrics.encode()
    );

    let gw_cfg = harness::gateway_config(
        GW,
        &dir.path().join("gw"),
        "",
        Some(&harness::uplink_toml(&pki, GW, &hub_addr.to_string())),
    );
    let gw = Gateway::start(&gw_cfg, Metrics::new()).await.unwrap();
    let stream = StreamId::intern("flood/ok").unwrap();
    let samples = (0..1000i64)
        .map(|i| Sample::new(stream, i, Value::I64(i)))
        .collect();
    gw.ingest()
        .submit_durable(Priority::Normal, samples)
        .await
        .unwrap();
    let sink = hub_dir.join("sink");
    let arrived = harness::wait_for(Duration::from_secs(30), || {
        harness::read_sink(&sink).len() >= 1000
    })
    .await;
    let lines = harness::read_sink(&sink);
    harness::assert_exactly_once(&lines);
    assert!(arrived, "{} of 1000 samples arrived", lines.len());

    tokio::time::sleep(Duration::from_millis(600)).await; // counters are sampled every 500 ms
    let refused = |r| metrics.counter_value("outpost_hub_handshakes_refused", &[("reason", r)]);
    assert_eq!(
        (refused("busy"), refused("per_source")),
        (0, 0),
        "nobody was refused, the gateway least of all: {}",
        metrics.encode()
    );
    assert_eq!(metrics.counter_value("outpost_hub_connections", &[]), 1);
    // The hub's own gauge (same name and labels: the same series).
    let pending = metrics
        .gauge(
            "outpost_hub_handshakes_pending",
            "QUIC handshakes in progress",
            &[],
        )
        .get();
    assert!(
        pending <= 4,
        "the flood holds at most retry_above slots: {pending}"
    );
    flood.abort();
    gw.shutdown().await.unwrap();
    hub.stop().await;
}
