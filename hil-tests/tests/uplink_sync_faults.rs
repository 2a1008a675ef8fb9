//! The sync loop against a pinned mode on a fast link and against a hub that stops reading.
//!
//! - A gateway pinned to `[sync] mode = "delta"` on a fast link (loopback to an in-process
//!   hub: broadband or fiber) sends what its deadband held back too: every sample of a
//!   flat signal reaches the hub, while the mode stays delta.
//! - A QUIC peer (quinn, in this test) that completes the handshake, reads and acknowledges
//!   the first frames, then stops reading the data stream while it still answers pings and
//!   QUIC keeps the connection alive: the gateway's send makes no progress, the session ends
//!   after `[uplink] send_timeout`, the gateway reconnects and sends again what was not
//!   acknowledged; every sample reaches the peer, and the resends are counted.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_actors::gateway::Gateway;
use outpost_hil::harness::{self, Pki};
use outpost_hil::observe;
use outpost_protocols::frame::{self, Ack, FrameBuffer, Message};
use outpost_protocols::uplink::quic::ALPN;
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Priority, Sample, StreamId, Value};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

async fn produce(gw: &Gateway, n: i64, value: impl Fn(i64) -> Value, stream: StreamId) {
    let mut i = 0;
    while i < n {
        let end = (i + 500).min(n);
        let batch = (i..end)
            .map(|k| Sample::new(stream, k * 1_000_000, value(k)))
            .collect();
        gw.ingest()
            .submit_durable(Priority::Normal, batch)
            .await
            .expect("durable");
        i = end;
    }
}

fn gauge(m: &Metrics, name: &str) -> f64 {
    observe::Metrics::parse(&m.encode()).value(name, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_delta_mode_sends_what_its_deadband_held_once_the_link_is_fast() {
    const GW: &str = "gw-pinned";
    const N: i64 = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GW]);
    let hub_dir = dir.path().join("hub");
    let hub = harness::start_hub(&pki, &hub_dir).await;
    let sink = hub_dir.join("sink");
    let cfg = harness::gateway_config(
        GW,
        &dir.path().join("gw"),
        "[sync]\nmode = \"delta\"\n[sync.delta]\ndefault = { absolute = 1.0 }\n",
        Some(&harness::uplink_toml(&pki, GW, &hub.addr.to_string())),
    );
    let metrics = Metrics::new();
    let gw = Gateway::start(&cfg, metrics.clone()).await.unwrap();
    // A flat signal: the deadband sends the first sample and holds the rest.
    let stream = StreamId::intern("pinned/flat").unwrap();
    produce(&gw, N, |_| Value::F64(20.0), stream).await;

    let all = harness::wait_for(Duration::from_secs(30), || {
        harness::read_sink(&sink).len() as i64 >= N
    })
    .await;
    let lines = harness::read_sink(&sink);
    let class = gauge(&metrics, "outpost_link_class");
    let mode = gauge(&metrics, "outpost_sync_mode");
    eprintln!(
        "pinned delta: {} of {N} samples at the hub; link class {class}, sync mode {mode}",
        lines.len()
    );
    assert!(
        all,
        "a pinned delta mode on a fast link (class {class}: 0 fiber, 1 broadband) sent {} of \
         {N} samples: what the deadband held back was never backfilled",
        lines.len()
    );
    assert_eq!(mode, 2.0, "the pinned mode is delta throughout");
    let per_stream = harness::assert_exactly_once(&lines);
    assert_eq!(per_stream.get("pinned/flat"), Some(&(N as usize)));
    gw.shutdown().await.unwrap();
    hub.stop().await;
}

/// What the stalling peer saw.
#[derive(Default)]
struct PeerState {
    connections: usize,
    /// Sequences of every data frame read, on any connection.
    seqs: BTreeSet<u64>,
    /// The first connection stopped reading its data stream.
    stalled: bool,
}

/// A QUIC peer in the hub's place: the hub's certificate, no client authentication (not
/// what is tested), ALPN `outpost/1`. Every stream gets its frames acknowledged and its
/// pings answered, except that the first connection stops reading a stream once it has
/// read `stall_after` samples from it (and keeps the stream and connection open).
fn start_peer(pki: &Pki, stall_after: usize) -> (SocketAddr, Arc<Mutex<PeerState>>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.bundle.hub_cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&pki.bundle.hub_key).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(500)));
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let state = Arc::new(Mutex::new(PeerState::default()));
    let st = state.clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let first = {
                let mut s = st.lock().unwrap();
                s.connections += 1;
                s.connections == 1
            };
            let st = st.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else {
                    return;
                };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let stall = first.then_some(stall_after);
                    tokio::spawn(serve_stream(send, recv, st.clone(), stall));
                }
            });
        }
    });
    (addr, state)
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    state: Arc<Mutex<PeerState>>,
    stall_after: Option<usize>,
) {
    let mut buf = FrameBuffer::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut read = 0usize;
    loop {
        let reply = match buf.next_message() {
            Ok(Some(Message::Data(d))) => {
                read += d.samples.len();
                state
                    .lock()
                    .unwrap()
                    .seqs
                    .extend(d.samples.iter().map(|s| s.seq));
                Message::Ack(Ack::for_frame(&d))
            }
            Ok(Some(Message::Ping(p))) => Message::Pong(p.pong()),
            Ok(Some(_)) => continue, // the Hello
            Ok(None) => match recv.read(&mut chunk).await {
                Ok(Some(n)) => {
                    buf.push(&chunk[..n]).expect("frames from the gateway");
                    continue;
                }
                _ => return,
            },
            Err(e) => panic!("bad frame from the gateway: {e}"),
        };
        if send
            .write_all(&frame::encode(&reply).unwrap())
            .await
            .is_err()
        {
            return;
        }
        if stall_after.is_some_and(|n| read >= n) {
            // Alive at the QUIC level (the connection answers, other streams are served),
            // but this stream is never read again (and never closed: `send` and `recv`
            // live as long as this task waits).
            state.lock().unwrap().stalled = true;
            std::future::pending::<()>().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_stops_reading_ends_the_session_and_the_rest_is_sent_again() {
    const GW: &str = "gw-stall";
    // 255-byte texts: a window of 16,000 samples is over 4 MB, far more than the 1.25 MB
    // a QUIC stream takes unread.
    const N: i64 = 20_000;
    const STALL_AFTER: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GW]);
    let (peer, state) = start_peer(&pki, STALL_AFTER);
    let uplink = format!(
        "{}send_timeout = \"1s\"\nmax_frame_samples = 2000\n",
        harness::uplink_toml(&pki, GW, &peer.to_string())
    );
    let cfg = harness::gateway_config(
        GW,
        &dir.path().join("gw"),
        "[sync]\nmode = \"full\"\n",
        Some(&uplink),
    );
    let metrics = Metrics::new();
    let gw = Gateway::start(&cfg, metrics.clone()).await.unwrap();
    let stream = StreamId::intern("stall/text").unwrap();
    let text = |k: i64| {
        let mut s = format!("{k:08}:");
        let mut x = k as u64;
        while s.len() < 255 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s.push(char::from(b'a' + (x >> 59) as u8));
        }
        Value::text(&s)
    };
    produce(&gw, N, text, stream).await;

    let stalled =
        harness::wait_for(Duration::from_secs(30), || state.lock().unwrap().stalled).await;
    assert!(stalled, "the peer never read {STALL_AFTER} samples");
    let reconnected = harness::wait_for(Duration::from_secs(15), || {
        state.lock().unwrap().connections >= 2
    })
    .await;
    assert!(
        reconnected,
        "15 s after the hub stopped reading, the gateway has not given the session up: its \
         send waits for ever (send_timeout is 1 s)"
    );
    let all = harness::wait_for(Duration::from_secs(60), || {
        state.lock().unwrap().seqs.len() as i64 >= N
            && metrics.counter_value("outpost_sync_samples_acked", &[]) >= N as u64
    })
    .await;
    let (connections, got) = {
        let s = state.lock().unwrap();
        (s.connections, s.seqs.len())
    };
    let resent = metrics.counter_value("outpost_sync_samples_resent", &[]);
    eprintln!(
        "stalled hub: {connections} connections, {got} of {N} samples read, {} acknowledged, \
         {resent} resent",
        metrics.counter_value("outpost_sync_samples_acked", &[])
    );
    assert!(all, "only {got} of {N} samples reached the peer");
    assert!(
        resent > 0,
        "what the stalled stream held unread was sent again: resends must be counted"
    );
    gw.shutdown().await.unwrap();
}
