//! Gateway → QUIC (mutual TLS) → hub → JSON-lines sink: every sample exactly once, across
//! hub restarts and gateway restarts mid-stream.

use std::time::Duration;

use outpost_actors::gateway::Gateway;
use outpost_hil::harness::{self, Pki};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Priority, Sample, StreamId, Value};

const N: i64 = 20_000;

async fn produce(gw: &Gateway, from: i64, to: i64, stream: StreamId) {
    let mut i = from;
    while i < to {
        let end = (i + 500).min(to);
        let batch = (i..end)
            .map(|k| Sample::new(stream, k, Value::I64(k)))
            .collect();
        gw.ingest()
            .submit_durable(Priority::Normal, batch)
            .await
            .expect("durable");
        i = end;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sample_reaches_the_hub_exactly_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &["gw-e2e"]);
    let hub_dir = dir.path().join("hub");
    let hub = harness::start_hub(&pki, &hub_dir).await;
    let hub_addr = hub.addr.to_string();
    let sink = hub_dir.join("sink");
    let cfg = harness::gateway_config(
        "gw-e2e",
        &dir.path().join("gw"),
        "",
        Some(&harness::uplink_toml(&pki, "gw-e2e", &hub_addr)),
    );
    let stream = StreamId::intern("e2e/counter").unwrap();

    let gw = Gateway::start(&cfg, Metrics::new()).await.unwrap();
    produce(&gw, 0, N / 4, stream).await;
    // The hub goes down mid-stream and comes back on the same address.
    hub.stop().await;
    produce(&gw, N / 4, N / 2, stream).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hub = harness::start_hub_on(&pki, &hub_dir, &hub_addr).await;
    // The gateway restarts mid-stream (orderly: outbox flushed, unacked data resent).
    gw.shutdown().await.unwrap();
    let gw = Gateway::start(&cfg, Metrics::new()).await.unwrap();
    produce(&gw, N / 2, N, stream).await;

    let ok = harness::wait_for(Duration::from_secs(60), || {
        gw.outbox().stats().records.iter().sum::<u64>() == 0
            && harness::read_sink(&sink).len() as i64 >= N
    })
    .await;
    let lines = harness::read_sink(&sink);
    assert!(
        ok,
        "not everything arrived: {} of {N} at the hub, outbox {:?}",
        lines.len(),
        gw.outbox().stats()
    );
    let per_stream = harness::assert_exactly_once(&lines);
    assert_eq!(per_stream.get("e2e/counter"), Some(&(N as usize)));
    let mut values: Vec<i64> = lines.iter().map(|l| l.value.as_i64().unwrap()).collect();
    values.sort();
    assert_eq!(values, (0..N).collect::<Vec<_>>());
    gw.shutdown().await.unwrap();
    hub.stop().await;
}
