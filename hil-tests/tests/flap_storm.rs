//! `flap_storm`: 200 outages of 1–5 s each between the gateway and the hub while
//! data flows: nothing lost, nothing duplicated at the hub.
//!
//! Set-up, all real: Mosquitto (a test peer); two MQTT devices of the gateway, a normal one
//! fed at 100 readings/s and a critical one at 10 readings/s, each reading at QoS 1 with a
//! counter; the gateway in-process; the link emulator between it and an in-process hub
//! with a seeded schedule: 200 outages of 1–5 s (uniform), separated by up phases of
//! 0.5–1.5 s at 20 Mbit/s and 20 ms RTT, then the link stays up. After the storm the test
//! waits for the outbox to drain and checks the hub's sink: every published reading (the
//! broker acknowledged it) exactly once, nothing else, no (gateway, stream, seq) twice.
//! It holds whatever sync mode the gateway picks during the storm.
//!
//! About 14 minutes of wall time, mostly sleeping (about 110 readings/s), so it can run
//! alongside other tests. `OUTPOST_FLAP_OUTAGES=20` runs a short version;
//! `OUTPOST_FLAP_SEED` changes the schedule (both are printed). Run through
//! `hil-tests/run-tests.sh` (it installs Mosquitto).

use std::time::Duration;

use outpost_actors::gateway::Gateway;
use outpost_hil::emulator::{Emulator, Phase, Schedule};
use outpost_hil::harness::{self, Pki};
use outpost_hil::observe::{self, Tally};
use outpost_hil::peers::mosquitto::Mosquitto;
use outpost_hil::traffic::{PacedPublisher, reading_device_toml};
use outpost_runtime::metrics::Metrics as Registry;
use tokio::time::Instant;

const GATEWAY: &str = "gw-flap";
const DEFAULT_OUTAGES: usize = 200;
const DEFAULT_SEED: u64 = 0x00f1_a951_0a11;
/// Link up at the start, for the warm-up.
const WARM_UP: Duration = Duration::from_secs(10);
/// Up phases between outages.
const UP_RATE_BPS: f64 = 20e6;
const UP_RTT: Duration = Duration::from_millis(20);

struct Stream {
    device: &'static str,
    priority: &'static str,
    topic: &'static str,
    stream: &'static str,
    rate: f64,
}

const STREAMS: [Stream; 2] = [
    Stream {
        device: "dev-normal",
        priority: "normal",
        topic: "flap/normal",
        stream: "flap/norm",
        rate: 100.0,
    },
    Stream {
        device: "dev-critical",
        priority: "critical",
        topic: "flap/critical",
        stream: "flap/crit",
        rate: 10.0,
    },
];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// The storm: a warm-up phase, `outages` outages of 1–5 s each followed by 0.5–1.5 s of
/// link, then the link stays up.
fn storm(outages: usize, seed: u64) -> Schedule {
    let mut rng = fastrand::Rng::with_seed(seed);
    let up = |label: String, d: Duration| Phase::symmetric(&label, d, Some(UP_RATE_BPS), UP_RTT);
    let mut phases = vec![up("warm-up".into(), WARM_UP)];
    for i in 0..outages {
        let down = Duration::from_millis(rng.u64(1_000..=5_000));
        let back = Duration::from_millis(rng.u64(500..=1_500));
        phases.push(Phase::outage(&format!("outage {}", i + 1), down));
        phases.push(up(format!("up {}", i + 1), back));
    }
    phases.push(up("after".into(), Duration::from_secs(1_800)));
    Schedule::new(phases)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_short_outages_lose_and_duplicate_nothing() {
    let outages: usize = env_or("OUTPOST_FLAP_OUTAGES", DEFAULT_OUTAGES);
    let seed: u64 = env_or("OUTPOST_FLAP_SEED", DEFAULT_SEED);
    let schedule = storm(outages, seed);
    // The end of each outage's following up phase, from the schedule's start.
    let mut ends = Vec::with_capacity(outages);
    let mut t = WARM_UP;
    for pair in schedule.phases[1..1 + 2 * outages].chunks(2) {
        t += pair[0].duration + pair[1].duration;
        ends.push(t);
    }
    let storm_len = t - WARM_UP;
    let down: Duration = schedule.phases[1..1 + 2 * outages]
        .iter()
        .filter(|p| p.outage)
        .map(|p| p.duration)
        .sum();
    eprintln!(
        "flap_storm: {outages} outages (OUTPOST_FLAP_OUTAGES, default {DEFAULT_OUTAGES}), seed \
         {seed} (OUTPOST_FLAP_SEED); storm lasts {storm_len:?}, link down {down:?} of it"
    );

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GATEWAY]);
    let broker = Mosquitto::start();
    let hub_dir = dir.path().join("hub");
    let hub = harness::start_hub(&pki, &hub_dir).await;
    let sink = hub_dir.join("sink");
    let emu = Emulator::start(hub.addr, schedule.clone(), seed)
        .await
        .unwrap();
    let t0 = emu.started();

    let devices: String = STREAMS
        .iter()
        .map(|s| reading_device_toml(s.device, s.priority, &broker.address(), s.topic, s.stream))
        .collect();
    let cfg = observe::gateway_config_with_metrics(
        GATEWAY,
        &dir.path().join("gw"),
        &devices,
        &harness::uplink_toml(&pki, GATEWAY, &emu.local_addr().to_string()),
    );
    let gw = Gateway::start(&cfg, Registry::new()).await.unwrap();
    let maddr = gw.metrics_addr().expect("metrics endpoint enabled");

    // Warm-up: a probe reading (counter -1) per topic until each device stored one, so the
    // subscriptions are in place before reading 0.
    let warm: Vec<(String, &'static str)> = STREAMS
        .iter()
        .map(|s| (s.device.to_string(), s.topic))
        .collect();
    observe::warm_up(
        maddr,
        broker.port(),
        &warm,
        WARM_UP.saturating_sub(t0.elapsed()),
    )
    .await;

    let pub_start = Instant::now();
    let publishers: Vec<PacedPublisher> = STREAMS
        .iter()
        .map(|s| PacedPublisher::start(broker.port(), s.topic, 1, s.rate))
        .collect();

    // The storm: sleep through it, reporting every 50 outages.
    for (i, end) in ends.iter().enumerate() {
        tokio::time::sleep_until(t0 + *end).await;
        let done = i + 1;
        if done % 50 == 0 || done == outages {
            let lines = harness::read_sink(&sink);
            let at_hub: Vec<usize> = STREAMS
                .iter()
                .map(|s| Tally::of(&lines, s.stream).distinct())
                .collect();
            let published: Vec<u64> = publishers.iter().map(|p| p.published()).collect();
            let left = observe::scrape(maddr)
                .await
                .map(|m| m.sum("outpost_outbox_records"))
                .unwrap_or(f64::NAN);
            eprintln!(
                "flap_storm: {done}/{outages} outages after {:.0?}: published {published:?}, \
                 at the hub {at_hub:?}, outbox {left} records, emulator {:?}",
                t0.elapsed(),
                emu.stats()
            );
        }
    }
    // Readings keep flowing a moment after the last outage, then stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut total = Vec::new();
    for p in publishers {
        total.push(tokio::task::spawn_blocking(move || p.stop()).await.unwrap());
    }
    eprintln!(
        "flap_storm: published (normal, critical): {total:?}, all acknowledged by the broker"
    );

    // Drain: every reading at the hub and the outbox empty, for 2 s.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut settled: Option<Instant> = None;
    let drained = loop {
        let lines = harness::read_sink(&sink);
        let all_there = STREAMS
            .iter()
            .zip(&total)
            .all(|(s, n)| Tally::of(&lines, s.stream).missing(0..*n as i64).is_empty());
        let left = observe::scrape(maddr)
            .await
            .map(|m| m.sum("outpost_outbox_records"))
            .unwrap_or(f64::NAN);
        if all_there && left == 0.0 {
            let s = *settled.get_or_insert_with(Instant::now);
            if s.elapsed() >= Duration::from_secs(2) {
                break true;
            }
        } else {
            settled = None;
        }
        if Instant::now() > deadline {
            eprintln!("flap_storm: not drained 300 s after the storm; outbox {left} records");
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "flap_storm: {} after the storm; emulator {:?}",
        if drained { "drained" } else { "NOT drained" },
        emu.stats()
    );
    let m = observe::scrape(maddr).await.unwrap_or_default();
    eprintln!(
        "flap_storm: uplink connects {}, outbox evictions {}",
        m.value("outpost_sync_connects_total", &[]),
        m.sum("outpost_outbox_evicted_total")
    );

    let lines = harness::read_sink(&sink);
    // Where in the schedule was reading `n` of `s` published? For failure reports.
    let when = |s: &Stream, n: i64| {
        let at = (pub_start + Duration::from_secs_f64(n as f64 / s.rate)).duration_since(t0);
        schedule
            .phase_at(at)
            .map(|(_, start, p)| format!("{} (+{:.2?})", p.label, at - start))
            .unwrap_or_else(|| "after the schedule".into())
    };
    let mut failures = Vec::new();
    for (s, n) in STREAMS.iter().zip(&total) {
        let mut t = Tally::of(&lines, s.stream);
        assert_eq!(t.not_integer, 0, "{}: non-integer readings", s.stream);
        t.seen.remove(&-1); // the warm-up probes
        let n = *n as i64;
        let missing = observe::ranges(&t.missing(0..n));
        let dups = t.duplicates();
        let invented = t.outside(0..n);
        if !missing.is_empty() {
            let detail: Vec<String> = missing
                .iter()
                .take(20)
                .map(|r| {
                    format!(
                        "{r:?} published in {} .. {}",
                        when(s, *r.start()),
                        when(s, *r.end())
                    )
                })
                .collect();
            failures.push(format!(
                "{}: {} of {n} readings lost, in {} runs: {detail:#?}",
                s.stream,
                t.missing(0..n).len(),
                missing.len()
            ));
        }
        if !dups.is_empty() {
            let detail: Vec<String> = dups
                .iter()
                .take(20)
                .map(|(k, c)| format!("{k} ×{c} published in {}", when(s, *k)))
                .collect();
            failures.push(format!(
                "{}: {} readings duplicated: {detail:#?}",
                s.stream,
                dups.len()
            ));
        }
        if !invented.is_empty() {
            failures.push(format!(
                "{}: readings never published: {invented:?}",
                s.stream
            ));
        }
        eprintln!(
            "flap_storm: {}: {} of {n} readings at the hub",
            s.stream,
            t.distinct()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(drained, "the outbox did not drain after the storm");
    harness::assert_exactly_once(&lines);

    gw.shutdown().await.unwrap();
    hub.stop().await;
}
