//! The hub against a hand-driven gateway connection (a real QUIC client with a gateway
//! certificate): Pings are answered on the data stream and on a second, ping-only stream
//! that never sent a Hello; a summary frame lands in the summaries file and a delta frame in
//! the samples file, exactly as the gateway chose to send them; streams beyond the hub's
//! per-connection limit are refused and counted; a Data frame still needs a Hello (counted
//! as `no_hello`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use outpost_actors::hub::Hub;
use outpost_actors::hub::server::{MAX_STREAMS_PER_CONNECTION, STREAM_REFUSED};
use outpost_hil::harness::{self, Pki};
use outpost_protocols::encoding::deadband::{Deadband, DeadbandConfig, DeadbandFilter};
use outpost_protocols::encoding::summary::{SummaryAggregator, SummaryConfig};
use outpost_protocols::frame::{
    self, DataFrame, Encoding, FrameBuffer, Hello, MAX_PING_PAD, Message, Ping, Pong,
};
use outpost_protocols::uplink::quic::{
    self, ClientOptions, ClientTls, QuicClient, QuicConnection, RecvStream, SendStream,
};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Priority, Sample, StreamId, Value};

const GW: &str = "gw-sp";

fn client_for(pki: &Pki, id: &str) -> QuicClient {
    let g = pki.bundle.gateways.iter().find(|g| g.id == id).unwrap();
    let tls = ClientTls {
        ca_pem: std::fs::read(&pki.bundle.ca_cert).unwrap(),
        cert_pem: std::fs::read(&g.cert).unwrap(),
        key_pem: std::fs::read(&g.key).unwrap(),
    };
    QuicClient::new(&tls, ClientOptions::default()).unwrap()
}

/// One side of a stream: what we write and a reassembly buffer for what the hub answers.
struct Stream {
    send: SendStream,
    recv: RecvStream,
    buf: FrameBuffer,
}

impl Stream {
    async fn open(conn: &QuicConnection) -> Stream {
        let (send, recv) = conn.open_bi().await.unwrap();
        Stream {
            send,
            recv,
            buf: FrameBuffer::new(),
        }
    }

    async fn send(&mut self, m: &Message) {
        quic::send_all(&mut self.send, &frame::encode(m).unwrap())
            .await
            .unwrap();
    }

    /// The hub's next message on this stream, or the read error.
    async fn next(&mut self) -> Result<Message, String> {
        let mut chunk = vec![0u8; 16 * 1024];
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(m) = self.buf.next_message().map_err(|e| e.to_string())? {
                    return Ok(m);
                }
                match quic::read_some(&mut self.recv, &mut chunk).await {
                    Ok(Some(n)) => self.buf.push(&chunk[..n]).map_err(|e| e.to_string())?,
                    Ok(None) => return Err("stream ended".to_string()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
    }

    async fn pong(&mut self) -> Pong {
        match self.next().await {
            Ok(Message::Pong(p)) => p,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

fn ping(nonce: u64, pad: u32) -> Message {
    Message::Ping(Ping {
        nonce,
        sent_ns: 1_000_000 + nonce * 7,
        pad,
    })
}

/// The hub's sink for `GW`: (samples lines, summaries lines), every file of every day.
fn sink_files(sink: &Path) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let (mut samples, mut summaries) = (Vec::new(), Vec::new());
    let Ok(files) = std::fs::read_dir(sink.join(GW)) else {
        return (samples, summaries);
    };
    for f in files.flatten() {
        let path = f.path();
        let text = std::fs::read_to_string(&path).unwrap();
        let out = if path.to_string_lossy().ends_with(".summary.jsonl") {
            &mut summaries
        } else {
            &mut samples
        };
        for l in text.lines() {
            out.push(serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")));
        }
    }
    (samples, summaries)
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_answers_pings_and_stores_summary_and_delta_frames() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GW]);
    let hub_dir = dir.path().join("hub");
    let metrics = Metrics::new();
    let hub = Hub::start(
        &harness::hub_config(&pki, &hub_dir, "127.0.0.1:0"),
        metrics.clone(),
    )
    .await
    .unwrap();
    let sink = hub_dir.join("sink");
    let client = client_for(&pki, GW);
    let conn = client.connect(hub.addr, "localhost").await.unwrap();

    // 1. Pings on the data stream, after the Hello.
    let mut data = Stream::open(&conn).await;
    data.send(&Message::Hello(Hello {
        gateway_id: GW.parse().unwrap(),
        max_version: frame::VERSION,
    }))
    .await;
    data.send(&ping(1, 0)).await;
    assert_eq!(
        data.pong().await,
        Pong {
            nonce: 1,
            sent_ns: 1_000_007
        }
    );

    // 2. A second, ping-only stream: no Hello; a padded ping gets an unpadded pong; a burst
    // of pings is answered in order.
    let mut pings = Stream::open(&conn).await;
    pings.send(&ping(2, MAX_PING_PAD)).await;
    assert_eq!(
        pings.pong().await,
        Pong {
            nonce: 2,
            sent_ns: 1_000_014
        }
    );
    for n in 3..13 {
        pings.send(&ping(n, (n as u32) * 100)).await;
    }
    for n in 3..13 {
        assert_eq!(pings.pong().await.nonce, n);
    }

    // 3. A summary frame: 30 s of a quantized temperature and a valve state at 1 Hz,
    // sequences 0..60, in 10 s windows.
    let temp = StreamId::intern("hubsp/line1/tt-101").unwrap();
    let valve = StreamId::intern("hubsp/line1/xv-7").unwrap();
    let t0 = 1_700_000_000_000_000_000i64; // a multiple of 10 s
    let mut agg = SummaryAggregator::new(&SummaryConfig { window_ms: 10_000 }).unwrap();
    let mut rng = fastrand::Rng::with_seed(5);
    for i in 0..30i64 {
        let ts = t0 + i * 1_000_000_000;
        let t = Sample::new(temp, ts, Value::F64((2150 + rng.i64(-3..=3)) as f64 * 0.01));
        let v = Sample::new(valve, ts, Value::Bool(i % 7 < 3));
        assert!(agg.push(2 * i as u64, &t).is_none());
        assert!(agg.push(2 * i as u64 + 1, &v).is_none());
    }
    let windows = agg.flush();
    assert_eq!(windows.len(), 6);
    let summary = DataFrame::from_summaries(&GW.parse().unwrap(), Priority::Normal, &windows);
    data.send(&Message::Data(summary)).await;
    match data.next().await {
        // Summaries are not acknowledged: their samples stay in the outbox for backfill.
        Ok(Message::Ack(a)) => assert_eq!(a.count(), 0, "{a:?}"),
        other => panic!("expected an ack, got {other:?}"),
    }

    // 4. A delta frame: the deadband's choice among 200 noisy readings, sequences 1000..1200.
    let records: Vec<(u64, Sample)> = (0..200i64)
        .map(|i| {
            let ts = t0 + 40_000_000_000 + i * 100_000_000;
            let v = (2150 + i / 20 + rng.i64(-2..=2)) as f64 * 0.01;
            (1000 + i as u64, Sample::new(temp, ts, Value::F64(v)))
        })
        .collect();
    let mut filter = DeadbandFilter::new(&DeadbandConfig {
        default: Some(Deadband::Absolute(0.025)),
        ..Default::default()
    })
    .unwrap();
    let outcome = filter.filter(records.iter().map(|(q, s)| (*q, s)));
    assert!(!outcome.skipped.is_empty() && outcome.send.len() > 10);
    let delta = DataFrame::from_filtered(
        &GW.parse().unwrap(),
        Priority::Normal,
        Encoding::Delta,
        records.iter().map(|(q, s)| (*q, s)),
        &outcome,
    );
    data.send(&Message::Data(delta)).await;
    // A ping right behind the data: answered after the frame's ack, on the same stream.
    data.send(&ping(99, 0)).await;
    let sent: Vec<&(u64, Sample)> = outcome.send.iter().map(|&i| &records[i]).collect();
    match data.next().await {
        Ok(Message::Ack(a)) => {
            assert_eq!(a.count(), sent.len() as u128);
            assert!(sent.iter().all(|(q, _)| a.contains(*q)));
        }
        other => panic!("expected an ack, got {other:?}"),
    }
    assert_eq!(data.pong().await.nonce, 99);

    // The sink holds exactly what was sent: the delta frame's samples, bit for bit...
    let (samples, summaries) = sink_files(&sink);
    let got: Vec<(u64, i64, f64)> = samples
        .iter()
        .map(|l| {
            assert_eq!(l["gateway"], GW);
            assert_eq!(l["stream"], "hubsp/line1/tt-101");
            (
                l["seq"].as_u64().unwrap(),
                l["ts_ns"].as_i64().unwrap(),
                l["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got.len(), sent.len());
    for ((seq, ts, v), (q, s)) in got.iter().zip(&sent) {
        let Value::F64(want) = s.value else {
            unreachable!()
        };
        assert_eq!((*seq, *ts), (*q, s.ts_ns));
        assert!(close(*v, want), "seq {seq}: {v} != {want}");
    }
    // ... and one summary line per window and stream, with the aggregator's figures.
    assert_eq!(summaries.len(), windows.len());
    let by_key: BTreeMap<(String, i64), &serde_json::Value> = summaries
        .iter()
        .map(|l| {
            (
                (
                    l["stream"].as_str().unwrap().to_owned(),
                    l["window_start_ns"].as_i64().unwrap(),
                ),
                l,
            )
        })
        .collect();
    for w in &windows {
        let s = &w.summary;
        let l = by_key[&(w.stream.name().to_string(), s.window_start_ns)];
        assert_eq!(l["gateway"], GW);
        assert_eq!(l["window_ns"].as_u64(), Some(10_000_000_000));
        assert_eq!(l["count"].as_u64(), Some(10));
        assert_eq!(
            (l["first_seq"].as_u64(), l["last_seq"].as_u64()),
            (Some(s.first_seq), Some(s.last_seq))
        );
        assert_eq!(
            (l["first_ts_ns"].as_i64(), l["last_ts_ns"].as_i64()),
            (Some(s.first_ts_ns), Some(s.last_ts_ns))
        );
        match (&s.numeric, &s.last) {
            (Some(n), Value::F64(last)) => {
                assert_eq!(l["numeric_count"].as_u64(), Some(n.n));
                for (field, want) in [
                    ("min", n.min),
                    ("max", n.max),
                    ("mean", n.mean),
                    ("stddev", n.stddev),
                    ("last", *last),
                ] {
                    let got = l[field].as_f64().unwrap();
                    assert!(close(got, want), "{field}: {got} != {want}");
                }
                assert!(n.min < n.max, "the noise makes a spread");
            }
            (None, Value::Bool(b)) => {
                assert_eq!(l["numeric_count"].as_u64(), Some(0));
                assert!(l["min"].is_null() && l["mean"].is_null());
                assert_eq!(l["last"].as_bool(), Some(*b));
            }
            other => panic!("unexpected summary {other:?}"),
        }
    }
    let m = |name| metrics.counter_value(name, &[("gateway", GW)]);
    assert_eq!(m("outpost_hub_summaries_written"), 6);
    assert_eq!(m("outpost_hub_samples_written"), sent.len() as u64);
    assert_eq!(m("outpost_hub_pongs_sent"), 13);

    // 5. Streams beyond the per-connection limit are refused; the others keep working.
    let mut extra = Vec::new();
    for n in 2..MAX_STREAMS_PER_CONNECTION {
        let mut s = Stream::open(&conn).await;
        s.send(&ping(200 + n as u64, 0)).await;
        assert_eq!(s.pong().await.nonce, 200 + n as u64);
        extra.push(s);
    }
    let mut refused = Stream::open(&conn).await;
    refused.send(&ping(300, 0)).await;
    let e = refused.next().await.unwrap_err();
    assert!(
        e.contains(&format!("reset by peer: error {STREAM_REFUSED}")),
        "refused stream: {e}"
    );
    assert_eq!(metrics.counter_value("outpost_hub_streams_refused", &[]), 1);
    pings.send(&ping(400, 0)).await;
    assert_eq!(pings.pong().await.nonce, 400);
    // A stream that ends frees its place.
    let mut gone = extra.pop().unwrap();
    quic::finish(&mut gone.send).unwrap();
    assert_eq!(gone.next().await.unwrap_err(), "stream ended");
    let mut again = Stream::open(&conn).await;
    again.send(&ping(500, 0)).await;
    assert_eq!(again.pong().await.nonce, 500);

    // 6. A Data frame on a stream without a Hello (here: the ping-only one) is refused and
    // closes the connection, as before.
    let stray = DataFrame::from_samples(
        &GW.parse().unwrap(),
        Priority::Normal,
        Encoding::Raw,
        [(5000u64, &Sample::new(temp, t0, Value::F64(1.0)))],
    );
    pings.send(&Message::Data(stray)).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the hub closes the connection");
    assert!(
        matches!(&closed, quic::ConnectionError::ApplicationClosed(c)
            if c.error_code.into_inner() == u64::from(quic::CLOSE_BAD_IDENTITY)),
        "{closed}"
    );
    assert_eq!(
        metrics.counter_value("outpost_hub_bad_input", &[("kind", "no_hello")]),
        1
    );
    assert_eq!(sink_files(&sink).0.len(), sent.len(), "nothing written");
    hub.stop().await;
}
