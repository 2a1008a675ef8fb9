//! `bad_input`: hostile or broken input is counted, nothing crashes, the other streams go on.
//!
//! Modbus part (here): a device answering exceptions (a pymodbus server asked for an address
//! it does not serve) and a device answering garbage, truncated frames and silence (a raw
//! TCP server in this file). The MQTT payload and hub-port parts are added beside these by
//! their drivers' tests.
//!
//! Needs `OUTPOST_PYTHON` (see `outpost_hil::peers::pymodbus::INSTALL`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outpost_actors::gateway::Gateway;
use outpost_hil::peers::pymodbus::{
    KnownPoint, PyModbusServer, Tbl, device_toml, gateway_config, outbox_samples, verify_samples,
};
use outpost_runtime::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn restarts(m: &Metrics, device: &str) -> u64 {
    m.counter_value(
        "outpost_restarts",
        &[
            ("supervisor", "devices"),
            ("child", &format!("device:{device}")),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_exceptions_are_counted_and_other_groups_continue() {
    let good = vec![
        KnownPoint::new("ex/good/a", Tbl::Holding, 0, "u16", 11.0),
        KnownPoint::new("ex/good/b", Tbl::Holding, 1, "f32", 2.5),
    ];
    let server = PyModbusServer::start(&good);
    // Served: holding 0..3. Asked: 60000 (same table, another group) and input 100.
    let missing = vec![
        KnownPoint::new("ex/missing/hr", Tbl::Holding, 60_000, "u16", 0.0),
        KnownPoint::new("ex/missing/ir", Tbl::Input, 100, "i32", 0.0),
    ];
    let dir = tempfile::tempdir().unwrap();
    let devices = device_toml(
        "ex-dev",
        server.addr(),
        1000,
        0,
        &[(100, &good), (100, &missing)],
    );
    let m = Metrics::new();
    let gw = Gateway::start(&gateway_config(dir.path(), &devices, ""), m.clone())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let exc = m.counter_value(
            "outpost_modbus_exceptions",
            &[("device", "ex-dev"), ("code", "2")],
        );
        // Each missing point answers "illegal data address": found, counted, kept out of
        // the batched reads and retried alone at a slower pace (not every interval).
        let unreadable = m.gauge_value("outpost_modbus_unreadable", &[("device", "ex-dev")]);
        let ok = verify_samples(&good, &outbox_samples(&gw), 8);
        if exc >= 2 && unreadable == Some(2) && ok.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "exceptions {exc}, unreadable points {unreadable:?}, good group {ok:?}"
        );
    }
    let samples = outbox_samples(&gw);
    gw.shutdown().await.unwrap();
    assert!(
        samples
            .iter()
            .all(|s| s.stream.name().starts_with("ex/good/")),
        "no sample for a point the device refused"
    );
    // Exceptions are answers: no reconnect, no restart, no transport error.
    assert_eq!(restarts(&m, "ex-dev"), 0);
    for kind in ["timeout", "transport", "malformed", "connect"] {
        assert_eq!(
            m.counter_value(
                "outpost_stream_errors",
                &[("device", "ex-dev"), ("kind", kind)]
            ),
            0,
            "{kind}"
        );
    }
}

/// What the raw server does with request number `n` (counted over all connections), whose
/// header is `hdr`: the answer's bytes and whether to close the connection after them.
fn act(n: usize, hdr: &[u8; 12], rng: &mut fastrand::Rng) -> (Vec<u8>, bool) {
    let frame = |pdu: &[u8]| {
        let mut f = vec![hdr[0], hdr[1], 0, 0, 0, pdu.len() as u8 + 1, hdr[6]];
        f.extend_from_slice(pdu);
        f
    };
    match n % 12 {
        // Random bytes (mostly an incomplete frame: the client's timeout fires).
        1 => ((0..rng.usize(1..64)).map(|_| rng.u8(..)).collect(), false),
        // A frame cut short (header says 5 bytes follow, 1 comes), then the peer closes.
        3 => (vec![hdr[0], hdr[1], 0, 0, 0, 6, hdr[6], 3], true),
        // Silence.
        5 => (vec![], false),
        // Well framed, but an odd byte count with random data.
        7 => (frame(&[3, 3, rng.u8(..), rng.u8(..), rng.u8(..)]), false),
        // Two registers for a read of one.
        9 => (frame(&[3, 4, 0, 1, 0, 2]), false),
        // Another function code; then a wrong protocol id.
        11 if n % 24 == 11 => (frame(&[4, 2, 0, 42]), false),
        11 => {
            let mut f = frame(&[3, 2, 0, 42]);
            f[2] = 0xBE;
            (f, false)
        }
        // A valid answer: 42.
        _ => (frame(&[3, 2, 0, 42]), false),
    }
}

/// A Modbus TCP server that answers FC 3 reads of one register with 42 on even request
/// numbers and with garbage, truncated or malformed frames or silence on the others. Returns its address and
/// a count of accepted connections.
async fn misbehaving_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let c2 = conns.clone();
    tokio::spawn(async move {
        let mut seed = 7u64;
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            c2.fetch_add(1, Ordering::SeqCst);
            let requests = requests.clone();
            seed += 1;
            let mut rng = fastrand::Rng::with_seed(seed);
            tokio::spawn(async move {
                loop {
                    let mut hdr = [0u8; 12];
                    if s.read_exact(&mut hdr).await.is_err() {
                        return;
                    }
                    let n = requests.fetch_add(1, Ordering::SeqCst);
                    let (out, close) = act(n, &hdr, &mut rng);
                    if !out.is_empty() && s.write_all(&out).await.is_err() {
                        return;
                    }
                    if close {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_garbage_and_truncated_answers_are_counted_and_the_driver_reconnects() {
    let (addr, conns) = misbehaving_server().await;
    // A healthy device beside it.
    let good = vec![KnownPoint::new(
        "bad/neighbour",
        Tbl::Holding,
        0,
        "i16",
        -7.0,
    )];
    let server = PyModbusServer::start(&good);
    let p = vec![KnownPoint::new("bad/reg", Tbl::Holding, 0, "u16", 42.0)];
    let devices = [
        device_toml("bad-dev", addr, 150, 0, &[(50, &p)]),
        device_toml("neighbour", server.addr(), 1000, 0, &[(100, &good)]),
    ]
    .concat();
    let supervision = "[supervision]\nmax_restarts = 1000\nwithin = \"60s\"\n\
                       backoff = { initial = \"20ms\", max = \"200ms\" }\n";
    let dir = tempfile::tempdir().unwrap();
    let m = Metrics::new();
    let gw = Gateway::start(
        &gateway_config(dir.path(), &devices, supervision),
        m.clone(),
    )
    .await
    .unwrap();
    let err = |kind: &str| {
        m.counter_value(
            "outpost_stream_errors",
            &[("device", "bad-dev"), ("kind", kind)],
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let samples = outbox_samples(&gw);
        let good_ok =
            verify_samples(&p, &samples, 10).is_ok() && verify_samples(&good, &samples, 10).is_ok();
        if good_ok && err("malformed") >= 6 && err("timeout") >= 2 && err("transport") >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "malformed {} timeout {} transport {}",
            err("malformed"),
            err("timeout"),
            err("transport")
        );
    }
    let samples = outbox_samples(&gw);
    gw.shutdown().await.unwrap();
    // Every sample of the bad device is the valid answer: garbage never became a value.
    verify_samples(&p, &samples, 10).unwrap();
    verify_samples(&good, &samples, 10).unwrap();
    assert_eq!(
        m.counter_value("outpost_modbus_timeouts", &[("device", "bad-dev")]),
        err("timeout")
    );
    // Each bad answer cost its connection; a good answer between them keeps the driver up.
    assert!(conns.load(Ordering::SeqCst) >= 5, "reconnected");
    assert_eq!(restarts(&m, "neighbour"), 0);
}
