//! `quota`: a 60 s outage with a small outbox quota. Bulk is evicted first, then
//! normal oldest-first; no critical reading is lost; a metric and a log line say what was
//! evicted; nothing reaches the hub twice.
//!
//! Set-up, all real: Mosquitto (a test peer), three MQTT devices of the gateway with
//! priority critical, normal and bulk, each fed by its own `mosquitto_pub` at a steady rate
//! with a counter in every reading; the gateway in-process with its Prometheus endpoint;
//! the link emulator between the gateway and an in-process hub: link up 15 s, down 60 s,
//! up again. The publishers stop 1 s before the link comes back, so after the outage nothing
//! new enters the outbox and nothing more is evicted: what the hub ends up with is exactly
//! what survived the outage, whatever sync mode the gateway picks to send it.
//!
//! # The arithmetic (see `outpost_runtime::storage::{outbox, quota}`)
//!
//! The quota counts key + value bytes of each outbox segment (one per class and durable
//! batch, a few readings each at these rates). A segment costs `KEY_LEN` = 9 key bytes and
//! a 10-byte header; each reading in it a 2-byte length and its record
//! (`outpost_runtime::record`: 3 header bytes + 8 timestamp bytes + 1 name-length byte +
//! the stream name + 8 value bytes, the counter). The three streams have names of 160 bytes
//! (long, as plant tag paths are, so that a modest message rate fills the smallest quota
//! the config accepts, 1 MiB), so every reading costs **s = 2 + 12 + 160 + 8 = 182 bytes**
//! plus its share of a 19-byte segment overhead: about 189 bytes at these rates, the figure
//! used below. (Sled's on-disk size is not what is counted.)
//!
//! Rates: critical 20/s, normal 150/s, bulk 150/s; quota Q = 1 MiB = 1 048 576 bytes;
//! readings enter the outbox during W = 59 s of the outage.
//!
//! - Critical brings 59 × 20 × 189 = 223 020 bytes: 21 % of the quota, so it always fits.
//! - The outbox fills after Q / ((20 + 150 + 150) × 189 B/s) = 1 048 576 / 60 480 ≈ 17.3 s.
//! - From then on every critical and normal batch evicts bulk first, and a bulk batch may
//!   only evict older bulk: bulk shrinks by (20 + 150) × 189 = 32 130 B/s from
//!   17.3 × 150 × 189 ≈ 490 800 bytes, so it is gone ≈ 15.3 s later, ≈ 32.6 s into the
//!   outage. Later bulk readings find no bulk to evict and are dropped at intake
//!   (`outpost_ingest_dropped{class="bulk"}`).
//! - Only then is normal evicted, oldest first. At the end the outbox holds all critical
//!   (223 020 bytes) and the newest 825 556 / 189 ≈ 4 368 normal readings: of the ≈ 8 850
//!   normal readings of the outage ≈ 4 480 are lost, against all ≈ 8 850 bulk readings.
//!
//! Run through `hil-tests/run-tests.sh` (it installs Mosquitto); takes about 90 s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use outpost_actors::gateway::Gateway;
use outpost_hil::emulator::{Emulator, Phase, Schedule};
use outpost_hil::harness::{self, Pki};
use outpost_hil::observe::{self, LogCapture, Metrics, Tally};
use outpost_hil::peers::mosquitto::Mosquitto;
use outpost_hil::traffic::{PacedPublisher, reading_device_toml};
use outpost_runtime::metrics::Metrics as Registry;
use tokio::time::Instant;

const GATEWAY: &str = "gw-quota";
/// Link up before the outage: warm-up, then steady traffic that reaches the hub.
const BEFORE: Duration = Duration::from_secs(15);
const OUTAGE: Duration = Duration::from_secs(60);
/// The publishers stop this long before the link comes back.
const STOP_EARLY: Duration = Duration::from_secs(1);
const QUOTA: u64 = 1 << 20;
/// Quota bytes of one reading in its segment, without the segment's overhead.
const READING_BYTES: u64 = 182;
/// Quota bytes of a segment beyond its readings (key and header).
const SEGMENT_OVERHEAD: u64 = 19;
/// Most readings in one segment at these rates (a durable batch of one class), with room.
const MAX_SEGMENT_READINGS: u64 = 64;
/// Length of every stream name (see the module documentation).
const STREAM_NAME_LEN: usize = 160;

/// One class of readings: device, topic, stream tag and rate.
struct Class {
    name: &'static str,
    topic: &'static str,
    tag: &'static str,
    rate: f64,
}

impl Class {
    /// The stream: `quota/<tag>/` and a plant tag path, padded to `STREAM_NAME_LEN` bytes.
    fn stream(&self) -> String {
        let s = format!(
            "quota/{}/site-lyon/building-7/hall-3/line-2/cell-14/press-6/hydraulics/\
             main-cylinder/pressure-transducer-a/channel-1/filtered/",
            self.tag
        );
        assert!(s.len() <= STREAM_NAME_LEN);
        format!("{s:-<STREAM_NAME_LEN$}")
    }
}

const CRITICAL: Class = Class {
    name: "critical",
    topic: "quota/critical",
    tag: "crit",
    rate: 20.0,
};
const NORMAL: Class = Class {
    name: "normal",
    topic: "quota/normal",
    tag: "norm",
    rate: 150.0,
};
const BULK: Class = Class {
    name: "bulk",
    topic: "quota/bulk",
    tag: "bulk",
    rate: 150.0,
};
const CLASSES: [&Class; 3] = [&CRITICAL, &NORMAL, &BULK];

const EVICTION_LOG: &str = "outbox quota reached: evicted oldest records";

fn device_name(c: &Class) -> String {
    format!("dev-{}", c.name)
}

/// One scrape during the run.
#[derive(Debug, Clone)]
struct Sample {
    /// Seconds since the outage began (negative before).
    t: f64,
    evicted: BTreeMap<&'static str, f64>,
    bytes: BTreeMap<&'static str, f64>,
    records: BTreeMap<&'static str, f64>,
}

async fn scrape(addr: SocketAddr) -> Metrics {
    observe::scrape(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn sample(m: &Metrics, t: f64) -> Sample {
    let per = |name: &str| {
        ["control", "critical", "normal", "bulk"]
            .into_iter()
            .map(|c| (c, m.value(name, &[("class", c)])))
            .collect()
    };
    Sample {
        t,
        evicted: per("outpost_outbox_evicted_total"),
        bytes: per("outpost_outbox_bytes"),
        records: per("outpost_outbox_records"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_quota_through_a_long_outage_evicts_bulk_then_oldest_normal_never_critical() {
    // The gateway runs in this process: its warnings are captured as `outpost run` would
    // print them with `[log] format = "json"`.
    let logs = LogCapture::install("warn");
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &[GATEWAY]);
    let broker = Mosquitto::start();
    let hub_dir = dir.path().join("hub");
    let hub = harness::start_hub(&pki, &hub_dir).await;
    let sink = hub_dir.join("sink");

    let lan = |label: &str, d: Duration| Phase::symmetric(label, d, None, Duration::from_millis(2));
    let emu = Emulator::start(
        hub.addr,
        Schedule::new(vec![
            lan("before", BEFORE),
            Phase::outage("outage", OUTAGE),
            lan("after", Duration::from_secs(600)),
        ]),
        5,
    )
    .await
    .unwrap();
    let outage_start = emu.started() + BEFORE;
    let outage_end = outage_start + OUTAGE;

    let devices: String = CLASSES
        .iter()
        .map(|c| {
            reading_device_toml(
                &device_name(c),
                c.name,
                &broker.address(),
                c.topic,
                &c.stream(),
            )
        })
        .collect();
    let body = format!("[storage]\nquota = {QUOTA}\n{devices}");
    let cfg = observe::gateway_config_with_metrics(
        GATEWAY,
        &dir.path().join("gw"),
        &body,
        &harness::uplink_toml(&pki, GATEWAY, &emu.local_addr().to_string()),
    );
    let gw = Gateway::start(&cfg, Registry::new()).await.unwrap();
    let maddr = gw.metrics_addr().expect("metrics endpoint enabled");

    // Warm-up: a probe reading (counter -1) on each topic until each device has stored one,
    // so the subscriptions are in place before reading 0 is published.
    let warm: Vec<(String, &'static str)> =
        CLASSES.iter().map(|c| (device_name(c), c.topic)).collect();
    observe::warm_up(maddr, broker.port(), &warm, Duration::from_secs(20)).await;
    let lead = outage_start.saturating_duration_since(Instant::now());
    assert!(
        lead >= Duration::from_secs(6),
        "warm-up took too long: only {lead:?} of traffic before the outage"
    );
    eprintln!("quota: traffic starts {lead:?} before the outage; quota {QUOTA} B");

    let publishers: Vec<PacedPublisher> = CLASSES
        .iter()
        .map(|c| PacedPublisher::start(broker.port(), c.topic, 1, c.rate))
        .collect();

    // Watch the metrics through the outage.
    let mut samples: Vec<Sample> = Vec::new();
    let since_outage = |now: Instant| {
        if now >= outage_start {
            (now - outage_start).as_secs_f64()
        } else {
            -(outage_start - now).as_secs_f64()
        }
    };
    tokio::time::sleep_until(outage_start).await;
    let at_outage: Vec<u64> = publishers.iter().map(|p| p.published()).collect();
    eprintln!("quota: outage begins; published so far (critical, normal, bulk): {at_outage:?}");
    let stop_at = outage_end - STOP_EARLY;
    while Instant::now() < stop_at {
        let m = scrape(maddr).await;
        samples.push(sample(&m, since_outage(Instant::now())));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut total = Vec::new();
    for p in publishers {
        total.push(tokio::task::spawn_blocking(move || p.stop()).await.unwrap());
    }
    eprintln!("quota: published (critical, normal, bulk): {total:?}");
    // Settled: nothing enters the outbox any more; the link is still down.
    tokio::time::sleep_until(outage_end - Duration::from_millis(300)).await;
    let end_of_outage = sample(&scrape(maddr).await, since_outage(Instant::now()));
    samples.push(end_of_outage.clone());

    // The link is back: wait until the outbox is empty (every record acknowledged by the
    // hub) and stays so.
    let drain_deadline = Instant::now() + Duration::from_secs(180);
    let mut empty_since: Option<Instant> = None;
    let drained = loop {
        let m = scrape(maddr).await;
        let left = m.sum("outpost_outbox_records");
        if left == 0.0 {
            let s = *empty_since.get_or_insert_with(Instant::now);
            if s.elapsed() >= Duration::from_secs(2) {
                break true;
            }
        } else {
            empty_since = None;
        }
        if Instant::now() > drain_deadline {
            let per: Vec<String> = ["control", "critical", "normal", "bulk"]
                .iter()
                .map(|c| format!("{c} {}", m.value("outpost_outbox_records", &[("class", c)])))
                .collect();
            eprintln!(
                "quota: outbox not drained 180 s after the outage: {left} records left ({}); \
                 link class {}, sync mode {}, backfill pending {}, connected {}",
                per.join(", "),
                m.value("outpost_link_class", &[]),
                m.value("outpost_sync_mode", &[]),
                m.value("outpost_sync_backfill_pending", &[]),
                m.value("outpost_sync_connected", &[]),
            );
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let drained_after = Instant::now() - outage_end;
    let m = scrape(maddr).await;
    let lines = harness::read_sink(&sink);
    assert!(
        drained,
        "the outbox did not drain after the link came back ({} sink lines, emulator {:?})",
        lines.len(),
        emu.stats()
    );
    eprintln!(
        "quota: drained {drained_after:?} after the outage; {} sink lines",
        lines.len()
    );

    // Nothing at all twice at the hub.
    harness::assert_exactly_once(&lines);
    let mut tallies: Vec<Tally> = CLASSES
        .iter()
        .map(|c| Tally::of(&lines, &c.stream()))
        .collect();
    for (t, c) in tallies.iter_mut().zip(CLASSES) {
        assert_eq!(
            t.not_integer, 0,
            "{}: non-integer readings at the hub",
            c.name
        );
        // The warm-up probes.
        t.seen.remove(&-1);
        let dups = t.duplicates();
        assert!(
            dups.is_empty(),
            "{}: readings twice at the hub: {dups:?}",
            c.name
        );
    }
    let (crit, norm, bulk) = (&tallies[0], &tallies[1], &tallies[2]);
    let [n_crit, n_norm, n_bulk] = [total[0] as i64, total[1] as i64, total[2] as i64];
    let [o_norm, o_bulk] = [at_outage[1] as i64, at_outage[2] as i64];
    for (t, (c, n)) in tallies.iter().zip(CLASSES.iter().zip(&total)) {
        let outside = t.outside(0..*n as i64);
        assert!(
            outside.is_empty(),
            "{}: readings never published at the hub: {outside:?}",
            c.name
        );
    }

    // Critical: every reading, exactly once.
    let lost_crit = crit.missing(0..n_crit);
    assert!(
        lost_crit.is_empty(),
        "critical readings lost: {:?} of {n_crit}",
        observe::ranges(&lost_crit)
    );

    // Bulk: everything from the outage on is gone (evicted, or dropped once no bulk was
    // left to evict); what was shipped before the outage arrived.
    let lost_bulk = bulk.missing(0..n_bulk);
    let outage_bulk_present: Vec<i64> = bulk.seen.range(o_bulk..).map(|(k, _)| *k).collect();
    assert!(
        outage_bulk_present.is_empty(),
        "bulk readings of the outage survived it although normal was evicted: {:?}",
        observe::ranges(&outage_bulk_present)
    );
    let slack_bulk = (2.0 * BULK.rate) as i64;
    let early_bulk_lost: Vec<i64> = lost_bulk
        .iter()
        .copied()
        .filter(|n| *n < o_bulk - slack_bulk)
        .collect();
    assert!(
        early_bulk_lost.is_empty(),
        "bulk readings shipped before the outage are missing: {:?}",
        observe::ranges(&early_bulk_lost)
    );

    // Normal: the lost readings are the oldest of the outage, one contiguous run; what
    // was shipped before the outage and the newest readings arrived.
    let lost_norm = norm.missing(0..n_norm);
    let runs = observe::ranges(&lost_norm);
    eprintln!(
        "quota: lost critical 0, normal {} {:?}, bulk {} {:?}",
        lost_norm.len(),
        runs,
        lost_bulk.len(),
        observe::ranges(&lost_bulk)
    );
    assert!(
        !lost_norm.is_empty(),
        "no normal reading was evicted: the quota was never under pressure from normal"
    );
    assert_eq!(
        runs.len(),
        1,
        "normal readings were not evicted oldest-first: lost runs {runs:?}"
    );
    let slack_norm = (2.0 * NORMAL.rate) as i64;
    assert!(
        *runs[0].start() >= o_norm - slack_norm,
        "normal readings shipped before the outage are missing: {runs:?} (outage began at \
         reading {o_norm})"
    );
    assert!(
        *runs[0].end() < n_norm - 1,
        "the newest normal readings did not survive: lost {runs:?} of 0..{n_norm}"
    );
    // At the end of the outage the outbox was full to the last segment (whole segments are
    // evicted), and its normal part is exactly the readings the hub got after the lost run:
    // the quota counts what the module documentation says.
    let norm_kept = norm.seen.range(runs[0].end() + 1..).count() as u64;
    let held: f64 = end_of_outage.bytes.values().sum();
    let max_segment = SEGMENT_OVERHEAD + MAX_SEGMENT_READINGS * READING_BYTES;
    assert!(
        held <= QUOTA as f64 && held > (QUOTA - max_segment) as f64,
        "the outbox held {held} bytes at the end of the outage, not within its last \
         segment ({max_segment} bytes at most) of the quota: {end_of_outage:?}"
    );
    assert_eq!(
        end_of_outage.records["normal"], norm_kept as f64,
        "normal records held at the end of the outage are not the {norm_kept} normal readings \
         the hub got after the lost run"
    );
    let norm_bytes = end_of_outage.bytes["normal"];
    assert!(
        norm_bytes >= (norm_kept * READING_BYTES) as f64
            && norm_bytes <= (norm_kept * (READING_BYTES + SEGMENT_OVERHEAD)) as f64,
        "normal bytes held at the end of the outage ({norm_bytes}) are not those of \
         {norm_kept} readings of {READING_BYTES} bytes in their segments"
    );
    assert!(
        lost_bulk.len() >= lost_norm.len(),
        "normal lost more ({}) than bulk ({})",
        lost_norm.len(),
        lost_bulk.len()
    );

    // The metric says what was evicted.
    let evicted = |c: &str| m.value("outpost_outbox_evicted_total", &[("class", c)]);
    let dropped_bulk = m.value("outpost_ingest_dropped_total", &[("class", "bulk")]);
    eprintln!(
        "quota: evicted bulk {}, normal {}, critical {}, control {}; bulk dropped at intake {}",
        evicted("bulk"),
        evicted("normal"),
        evicted("critical"),
        evicted("control"),
        dropped_bulk
    );
    assert_eq!(evicted("critical"), 0.0, "critical records were evicted");
    assert_eq!(evicted("control"), 0.0, "control records were evicted");
    assert_eq!(
        m.value(
            "outpost_outbox_backpressure_total",
            &[("class", "critical")]
        ),
        0.0,
        "critical intake was refused: the quota did not fit critical"
    );
    // Records in flight when the link went down may have reached the hub and still be
    // evicted afterwards: allow two seconds of traffic for them.
    let in_flight_slack = |rate: f64| 2.0 * rate;
    let ev_norm = evicted("normal");
    assert!(
        ev_norm >= lost_norm.len() as f64
            && ev_norm <= lost_norm.len() as f64 + in_flight_slack(NORMAL.rate),
        "outpost_outbox_evicted{{class=\"normal\"}} = {ev_norm} but {} normal readings were \
         lost",
        lost_norm.len()
    );
    let gone_bulk = evicted("bulk") + dropped_bulk;
    assert!(
        evicted("bulk") > 0.0
            && gone_bulk >= lost_bulk.len() as f64
            && gone_bulk <= lost_bulk.len() as f64 + in_flight_slack(BULK.rate),
        "bulk evicted {} + dropped {dropped_bulk} does not account for {} lost bulk readings",
        evicted("bulk"),
        lost_bulk.len()
    );

    // Bulk was evicted first: its evictions began before normal's, and when normal's
    // began no bulk was left.
    let first = |class: &str| samples.iter().position(|s| s.evicted[class] > 0.0);
    let fb = first("bulk").expect("bulk evictions seen during the outage");
    let fnorm = first("normal").expect("normal evictions seen during the outage");
    eprintln!(
        "quota: bulk evictions from {:.1} s into the outage, normal from {:.1} s (expected \
         about 17.3 s and 32.6 s)",
        samples[fb].t, samples[fnorm].t
    );
    assert!(
        fb < fnorm,
        "normal was evicted before bulk: bulk at {:.1} s, normal at {:.1} s",
        samples[fb].t,
        samples[fnorm].t
    );
    assert!(
        samples[fnorm].bytes["bulk"] <= 20_000.0,
        "normal was evicted while {} bytes of bulk were stored",
        samples[fnorm].bytes["bulk"]
    );
    assert_eq!(
        end_of_outage.bytes["bulk"], 0.0,
        "bulk left in the outbox at the end of the outage: {end_of_outage:?}"
    );

    // The log says what was evicted: one line per eviction, adding up to the metric.
    let events = logs.with_message(EVICTION_LOG);
    let mut logged: BTreeMap<String, f64> = BTreeMap::new();
    for e in &events {
        let class = e["class"].as_str().unwrap_or("?").to_owned();
        *logged.entry(class).or_default() += e["records"].as_f64().unwrap_or(f64::NAN);
    }
    eprintln!(
        "quota: {} \"{EVICTION_LOG}\" lines: {logged:?}",
        events.len()
    );
    assert!(
        !events.is_empty(),
        "no \"{EVICTION_LOG}\" log line; captured {} events",
        logs.events().len()
    );
    assert_eq!(
        logged.keys().map(String::as_str).collect::<Vec<_>>(),
        ["bulk", "normal"],
        "eviction log lines name other classes than bulk and normal"
    );
    for c in ["bulk", "normal"] {
        assert_eq!(
            logged[c],
            evicted(c),
            "eviction log lines of {c} add up to {} records, the metric says {}",
            logged[c],
            evicted(c)
        );
    }

    gw.shutdown().await.unwrap();
    hub.stop().await;
}
