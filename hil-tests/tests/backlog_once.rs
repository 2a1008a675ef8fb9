//! `backlog_once`: after an uplink outage the backlog is sent once. The hub counts no
//! duplicate deliveries beyond the samples that were in flight when the link was cut (the
//! hub may have received those without its acknowledgement getting back), and its sink
//! holds every sample exactly once.
//!
//! Set-up, all in this process: a gateway with `[sync] mode = "full"` pinned (as a
//! gateway relaying readings is usually run), fed a steady 5,000 samples/s of one normal
//! stream; the link emulator between it and a hub: up for a warm-up, cut for 10 s (a
//! backlog of about 50,000 samples), then up for good. The load goes on for a few seconds
//! after the link is back, so fresh data and the backlog share the reconnected session, then
//! stops; the test waits for everything to reach the hub.
//!
//! What is read: the hub's `outpost_hub_duplicates{gateway}`; the gateway's
//! `outpost_sync_in_flight` (polled; the first reading after the cut bounds what the hub can
//! have received unacknowledged: in flight only grows after the cut until the connection
//! drops) and `outpost_sync_samples_resent` (every duplicate the hub saw is a resend the
//! gateway counted). About 20 s in a debug build.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use outpost_actors::gateway::Gateway;
use outpost_actors::hub::Hub;
use outpost_hil::emulator::{Emulator, Phase, Schedule};
use outpost_hil::harness::{self, Pki};
use outpost_hil::observe;
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Priority, Sample, StreamId, Value};
use tokio::time::Instant;

const GATEWAY: &str = "gw-backlog";
const STREAM: &str = "backlog/counter";
/// Samples per second offered to the gateway.
const RATE: f64 = 5_000.0;
const WARM_UP: Duration = Duration::from_secs(5);
const OUTAGE: Duration = Duration::from_secs(10);
/// How long the load goes on after the link is back.
const LOAD_AFTER: Duration = Duration::from_secs(4);
const DRAIN: Duration = Duration::from_secs(60);
const RTT: Duration = Duration::from_millis(2);

/// One reading of the gateway's registry.
#[derive(Debug, Clone, Copy)]
struct Reading {
    /// Since the emulator started.
    at: Duration,
    in_flight: f64,
    connected: f64,
}

fn gauges(m: &Metrics) -> (f64, f64) {
    let m = observe::Metrics::parse(&m.encode());
    (
        m.value("outpost_sync_in_flight", &[]),
        m.value("outpost_sync_connected", &[]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_the_hub_sees_no_duplicates_beyond_what_was_in_flight_at_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GATEWAY]);
    let hub_dir = dir.path().join("hub");
    let hub_metrics = Metrics::new();
    let hub = Hub::start(
        &harness::hub_config(&pki, &hub_dir, "127.0.0.1:0"),
        hub_metrics.clone(),
    )
    .await
    .expect("hub starts");
    let sink = hub_dir.join("sink");
    let up = |label: &str, d: Duration| Phase::symmetric(label, d, None, RTT);
    let schedule = Schedule::new(vec![
        up("warm-up", WARM_UP),
        Phase::outage("outage", OUTAGE),
        up("after", Duration::from_secs(600)),
    ]);
    let emu = Emulator::start(hub.addr, schedule, 9).await.unwrap();
    let t0 = emu.started();
    let cut = WARM_UP;
    let back = WARM_UP + OUTAGE;

    let cfg = harness::gateway_config(
        GATEWAY,
        &dir.path().join("gw"),
        "[sync]\nmode = \"full\"\n",
        Some(&harness::uplink_toml(
            &pki,
            GATEWAY,
            &emu.local_addr().to_string(),
        )),
    );
    let gw_metrics = Metrics::new();
    let gw = Gateway::start(&cfg, gw_metrics.clone()).await.unwrap();

    // The steady load: RATE samples/s (counter k at ts k), in batches every 20 ms, until
    // LOAD_AFTER past the end of the outage.
    let produced = Arc::new(AtomicI64::new(0));
    let load = {
        let ingest = gw.ingest().clone();
        let produced = produced.clone();
        let stream = StreamId::intern(STREAM).unwrap();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut next = 0i64;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while t0.elapsed() < back + LOAD_AFTER {
                tick.tick().await;
                let due = (start.elapsed().as_secs_f64() * RATE) as i64;
                while next < due {
                    let end = due.min(next + 2_000);
                    let batch = (next..end)
                        .map(|k| Sample::new(stream, k, Value::I64(k)))
                        .collect();
                    ingest
                        .submit_durable(Priority::Normal, batch)
                        .await
                        .expect("durable");
                    next = end;
                    produced.store(next, Ordering::Relaxed);
                }
            }
            next
        })
    };

    // The gateway's in-flight and connection gauges, every 10 ms until the link is back.
    let stop = Arc::new(AtomicBool::new(false));
    let watch = {
        let m = gw_metrics.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // The time first: a reading stamped after the cut was taken after it.
                let at = t0.elapsed();
                let (in_flight, connected) = gauges(&m);
                out.push(Reading {
                    at,
                    in_flight,
                    connected,
                });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            out
        })
    };

    tokio::time::sleep_until(t0 + cut).await;
    let before_cut = produced.load(Ordering::Relaxed);
    let at_hub_before = harness::read_sink(&sink).len();
    tokio::time::sleep_until(t0 + back).await;
    let backlog = produced.load(Ordering::Relaxed) - before_cut;
    stop.store(true, Ordering::Relaxed);
    let readings = watch.await.unwrap();
    let n = load.await.unwrap();
    eprintln!(
        "backlog_once: {at_hub_before} samples at the hub before the cut, {backlog} produced \
         during the outage, {n} in all"
    );
    assert!(
        at_hub_before > 0,
        "nothing reached the hub before the cut: the warm-up is too short for this machine"
    );
    assert!(
        backlog >= 20_000,
        "only {backlog} samples produced during the outage: the load did not keep up"
    );
    // In flight at the cut: the first reading after it, while the session still stood.
    let first_after = readings
        .iter()
        .find(|r| r.at >= cut)
        .copied()
        .expect("a reading after the cut");
    assert_eq!(
        first_after.connected, 1.0,
        "the gateway was not connected when the link was cut: {first_after:?}"
    );
    let in_flight_at_cut = first_after.in_flight;
    let dropped = readings
        .iter()
        .find(|r| r.at > cut && r.connected == 0.0)
        .map(|r| r.at - cut);
    eprintln!(
        "backlog_once: {in_flight_at_cut} samples in flight at the cut ({:?} after it); \
         session dropped {dropped:?} after the cut",
        first_after.at - cut
    );

    // Drain: every sample at the hub.
    let drained = harness::wait_for(DRAIN, || {
        harness::read_sink(&sink).len() as i64 >= n
            && gauges(&gw_metrics).0 == 0.0
            && gw_metrics.counter_value("outpost_sync_samples_acked", &[]) >= n as u64
    })
    .await;
    let drained_after = t0.elapsed().saturating_sub(back + LOAD_AFTER);
    let lines = harness::read_sink(&sink);
    let dups = hub_metrics.counter_value("outpost_hub_duplicates", &[("gateway", GATEWAY)]);
    let resent = gw_metrics.counter_value("outpost_sync_samples_resent", &[]);
    let connects = gw_metrics.counter_value("outpost_sync_connects", &[]);
    eprintln!(
        "backlog_once: {} lines at the hub ({} expected) {drained_after:.1?} after the load \
         stopped; hub duplicates {dups}, gateway resends {resent}, connections {connects}; \
         emulator {:?}",
        lines.len(),
        n,
        emu.stats()
    );
    assert!(drained, "not everything reached the hub within {DRAIN:?}");
    let per_stream = harness::assert_exactly_once(&lines);
    assert_eq!(per_stream.get(STREAM), Some(&(n as usize)));
    let mut values: Vec<i64> = lines
        .iter()
        .map(|l| l.value.as_i64().expect("integer value"))
        .collect();
    values.sort_unstable();
    assert!(
        values.iter().copied().eq(0..n),
        "the sink does not hold 0..{n}"
    );
    assert!(
        dups as f64 <= in_flight_at_cut,
        "the hub dropped {dups} duplicates, more than the {in_flight_at_cut} samples in flight \
         at the cut: the backlog was sent more than once"
    );
    assert!(
        dups <= resent,
        "the hub dropped {dups} duplicates but the gateway counted only {resent} resends"
    );

    gw.shutdown().await.unwrap();
    hub.stop().await;
}
