//! `bench -- link_detect [SCALE]`: how fast the link estimator and classifier
//! (`outpost_actors::link`) follow a link that changes under them.
//!
//! A QUIC connection (the project's `QuicClient`/`QuicServer`, mutual TLS) runs through the
//! userspace link emulator (`crate::emulator`) over the schedule
//!
//! ```text
//! fiber 200 Mbit/s, 10 ms → broadband 20 ±30 % → boundary 10 ±30 % → mobile 3 ±30 %
//!   → satellite 0.3 @ 700 ms RTT → outage 15 s → fiber 200
//! ```
//!
//! (A 60 s outage shortened to 15 s to bound the run; QUIC's idle timeout is 30 s.)
//! The traffic is what the sync actor sends while it drains a backlog: 4 KB frames written
//! back to back with at most 4 MB unacknowledged, the hub acknowledging cumulative bytes;
//! plus an RTT ping every 200 ms on its own stream. The estimator is fed exactly as the
//! link monitor will be: path statistics every 50 ms, `on_sent`/`on_delivered` per frame
//! and ack, ping results; during an outage a fresh QUIC handshake is attempted every second
//! (QUIC's own probe timer backs off exponentially, so the old connection may stay silent
//! long after the link is back); the first that succeeds ends the outage and carries on.
//!
//! **Scaling.** Userspace forwarding on loopback with 2 shared cores cannot carry
//! 200 Mbit/s. The bench first measures what QUIC through the unshaped emulator carries and
//! scales every rate of the schedule *and* the classifier's rate thresholds by
//! `SCALE = min(1, 0.1 × capacity / 200 Mbit/s)` (a shaped link carries far less than an
//! unshaped one here: at scale 1 the 200 Mbit/s phase delivered 85-160 Mbit/s) (or the SCALE argument), so each phase
//! sits in the same class relative to the thresholds as the unscaled one; RTTs are not
//! scaled.
//!
//! **Scoring** against the schedule's truth (the class the default `[link]` thresholds give the
//! phase's nominal rate and RTT; the 10 Mbit/s boundary phase accepts broadband or mobile):
//! per phase, the delay from its start until the class is acceptable (a down-grade or an
//! up-grade depending on the direction of the truth), and flaps = changes that leave the
//! truth once reached or reverse the phase's previous change (A → B → A); a climb in steps,
//! or one move between the two classes the boundary phase accepts, is not a flap. Last line: `{"bench":"link_detect","downgrade_s_max":…,
//! "upgrade_s_max":…,"flaps":…}` (targets ≤ 2 s, ≤ 10 s, 0).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_actors::link::{Classifier, ClassifierConfig, EstimatorConfig, LinkEstimator};
use outpost_protocols::uplink::quic::{
    self, ClientOptions, ClientTls, QuicClient, QuicConnection, QuicServer, ServerOptions,
    ServerTls,
};
use outpost_runtime::model::LinkClass;
use serde_json::{Value as Json, json};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::emulator::{Emulator, Phase, Schedule};
use crate::harness::Pki;

const FRAME: usize = 4_096;
const WINDOW: u64 = 4 * 1024 * 1024;
const PING_EVERY: Duration = Duration::from_millis(200);
const TICK: Duration = Duration::from_millis(50);

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Runs the benchmark; `args`: an optional rate scale in (0, 1] instead of the measured one.
pub fn run(args: &[String]) -> Result<Json, String> {
    let forced = match args.first() {
        None => None,
        Some(s) => Some(
            s.parse::<f64>()
                .ok()
                .filter(|v| *v > 0.0 && *v <= 1.0)
                .ok_or_else(|| format!("SCALE {s:?}: expected a number in (0, 1]"))?,
        ),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(bench(forced))
}

/// The hub side: every bi-stream starts with one byte, `D` (data: answered with the
/// cumulative byte count after each read) or `P` (pings: 8 bytes echoed).
async fn serve(mut server: QuicServer) {
    let mut conns = JoinSet::new();
    while let Some(gw) = server.accept().await {
        conns.spawn(async move {
            let mut streams = JoinSet::new();
            while let Ok((mut send, mut recv)) = gw.connection.accept_bi().await {
                streams.spawn(async move {
                    let mut kind = [0u8; 1];
                    if quic::read_exact(&mut recv, &mut kind).await.is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    if kind[0] == b'P' {
                        let mut ping = [0u8; 8];
                        while quic::read_exact(&mut recv, &mut ping).await.is_ok() {
                            if quic::send_all(&mut send, &ping).await.is_err() {
                                return;
                            }
                        }
                    } else {
                        let mut total = 0u64;
                        while let Ok(Some(n)) = quic::read_some(&mut recv, &mut buf).await {
                            total += n as u64;
                            if quic::send_all(&mut send, &total.to_be_bytes())
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                });
            }
        });
    }
}

type Shared = Arc<Mutex<LinkEstimator>>;

fn lock(e: &Shared) -> std::sync::MutexGuard<'_, LinkEstimator> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sync-like traffic and pings on `conn`, feeding `est`, until aborted.
async fn session(conn: QuicConnection, est: Shared, tasks: &mut JoinSet<()>) {
    let acked = Arc::new(tokio::sync::watch::channel(0u64).0);
    // Data: frames back to back, at most WINDOW unacknowledged.
    {
        let conn = conn.clone();
        let est = Arc::clone(&est);
        let acked = Arc::clone(&acked);
        tasks.spawn(async move {
            let Ok((mut send, mut recv)) = conn.open_bi().await else {
                return;
            };
            if quic::send_all(&mut send, b"D").await.is_err() {
                return;
            }
            let reader = {
                let est = Arc::clone(&est);
                let acked = Arc::clone(&acked);
                async move {
                    let mut last = 0u64;
                    let mut b = [0u8; 8];
                    while quic::read_exact(&mut recv, &mut b).await.is_ok() {
                        // The hub counts the kind byte too.
                        let total = u64::from_be_bytes(b).saturating_sub(1);
                        if total > last {
                            lock(&est).on_delivered(Instant::now().into_std(), total - last);
                            last = total;
                            acked.send_replace(total);
                        }
                    }
                }
            };
            let writer = async move {
                let frame = vec![0x5au8; FRAME];
                let mut sent = 0u64;
                let mut rx = acked.subscribe();
                loop {
                    while sent.saturating_sub(*rx.borrow()) >= WINDOW {
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                    if quic::send_all(&mut send, &frame).await.is_err() {
                        return;
                    }
                    sent += FRAME as u64;
                    // Backlogged: a draining outbox always has the next frame ready.
                    lock(&est).on_sent(Instant::now().into_std(), FRAME as u64, true);
                }
            };
            tokio::join!(reader, writer);
        });
    }
    // Pings.
    tasks.spawn(async move {
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            return;
        };
        if quic::send_all(&mut send, b"P").await.is_err() {
            return;
        }
        let pending: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
        let reader = {
            let pending = Arc::clone(&pending);
            let est = Arc::clone(&est);
            async move {
                let mut b = [0u8; 8];
                while quic::read_exact(&mut recv, &mut b).await.is_ok() {
                    let seq = u64::from_be_bytes(b);
                    let sent = pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&seq);
                    if let Some(t) = sent {
                        let now = Instant::now();
                        lock(&est).on_probe_answered(now.into_std(), now - t);
                    }
                }
            }
        };
        let writer = async move {
            let mut seq = 0u64;
            let mut tick = tokio::time::interval(PING_EVERY);
            loop {
                tick.tick().await;
                let now = Instant::now();
                let timeout = lock(&est).probe_timeout();
                let timed_out: Vec<_> = {
                    let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
                    let late: Vec<_> = p
                        .iter()
                        .filter(|(_, t)| now - **t >= timeout)
                        .map(|(s, t)| (*s, *t))
                        .collect();
                    for (s, _) in &late {
                        p.remove(s);
                    }
                    late
                };
                for (_, sent) in timed_out {
                    lock(&est).on_probe_timed_out(now.into_std(), Some(sent.into_std()));
                }
                seq += 1;
                pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(seq, now);
                lock(&est).on_probe_sent(now.into_std());
                if quic::send_all(&mut send, &seq.to_be_bytes()).await.is_err() {
                    return;
                }
            }
        };
        tokio::join!(reader, writer);
    });
}

/// What the bench learns from one phase.
struct PhaseResult {
    label: String,
    truth: Vec<LinkClass>,
    downgrade: bool,
    delay_s: Option<f64>,
    changes: usize,
    flaps: usize,
}

async fn measure_capacity(hub: SocketAddr, client: &QuicClient) -> Result<f64, String> {
    let emu = Emulator::start(
        hub,
        Schedule::new(vec![Phase::symmetric("capacity", ms(4_000), None, ms(0))]),
        1,
    )
    .await
    .map_err(|e| e.to_string())?;
    let conn = client
        .connect(emu.local_addr(), "localhost")
        .await
        .map_err(|e| e.to_string())?;
    let est: Shared = Arc::new(Mutex::new(LinkEstimator::new(EstimatorConfig::default())));
    let mut tasks = JoinSet::new();
    session(conn.clone(), Arc::clone(&est), &mut tasks).await;
    tokio::time::sleep(ms(1_000)).await;
    let d0 = emu.stats().up.bytes_delivered;
    let t0 = Instant::now();
    tokio::time::sleep(ms(2_000)).await;
    let d1 = emu.stats().up.bytes_delivered;
    let bps = (d1 - d0) as f64 * 8.0 / t0.elapsed().as_secs_f64();
    tasks.shutdown().await;
    conn.close(0, b"done");
    Ok(bps)
}

async fn bench(forced_scale: Option<f64>) -> Result<Json, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let pki = Pki::new(dir.path(), &["gw-link"]);
    let b = &pki.bundle;
    let server_tls =
        ServerTls::load(&b.ca_cert, &b.hub_cert, &b.hub_key).map_err(|e| e.to_string())?;
    let server = QuicServer::bind(
        "127.0.0.1:0".parse().map_err(|_| "addr")?,
        &server_tls,
        ServerOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let hub = server.local_addr().map_err(|e| e.to_string())?;
    let _hub = tokio::spawn(serve(server));
    let g = b.gateways.first().ok_or("no gateway certificate")?;
    let tls = ClientTls::load(&b.ca_cert, &g.cert, &g.key).map_err(|e| e.to_string())?;
    let client = QuicClient::new(
        &tls,
        ClientOptions {
            connect_timeout: ms(1_000),
            keep_alive: ms(1_000),
            ..ClientOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;

    let capacity = measure_capacity(hub, &client).await?;
    let scale = forced_scale.unwrap_or((0.1 * capacity / 200e6).min(1.0));
    eprintln!(
        "link_detect: QUIC through the unshaped emulator carries {:.1} Mbit/s; rate scale {scale:.3}",
        capacity / 1e6
    );
    let mbps = |v: f64| Some(v * 1e6 * scale);
    let phases = vec![
        Phase::symmetric("fiber", ms(15_000), mbps(200.0), ms(10)),
        Phase::symmetric("broadband", ms(12_000), mbps(20.0), ms(40)).with_rate_jitter(0.3),
        Phase::symmetric("boundary", ms(12_000), mbps(10.0), ms(40)).with_rate_jitter(0.3),
        Phase::symmetric("mobile", ms(12_000), mbps(3.0), ms(80)).with_rate_jitter(0.3),
        Phase::symmetric("satellite", ms(12_000), mbps(0.3), ms(700)),
        Phase::outage("outage", ms(15_000)),
        Phase::symmetric("fiber again", ms(15_000), mbps(200.0), ms(10)),
    ];
    let schedule = Schedule::new(phases.clone());

    // The default `[link]` thresholds, rates scaled.
    let mut ccfg = ClassifierConfig::default();
    ccfg.fiber_min_bps *= scale;
    ccfg.broadband_min_bps *= scale;
    ccfg.mobile_min_bps *= scale;
    let truth: Vec<Vec<LinkClass>> = phases
        .iter()
        .map(|p| {
            if p.outage {
                return vec![LinkClass::Intermittent];
            }
            let e = outpost_actors::link::Estimate {
                rate_bps: p.up.rate_bps,
                rate_fresh: true,
                rate_app_limited: false,
                rtt_min: Some(p.up.delay * 2),
                rtt_base: None,
                loss: 0.0,
                outage_since: None,
            };
            let c = ccfg.evidence(&e, false).unwrap_or(LinkClass::Intermittent);
            if p.label == "boundary" {
                vec![LinkClass::Broadband, LinkClass::Mobile]
            } else {
                vec![c]
            }
        })
        .collect();

    let emu = Emulator::start(hub, schedule.clone(), 0x11_4c)
        .await
        .map_err(|e| e.to_string())?;
    let start = emu.started();
    let est: Shared = Arc::new(Mutex::new(LinkEstimator::new(EstimatorConfig::default())));
    let mut classifier = Classifier::new(ccfg, LinkClass::Intermittent, start.into_std());
    let mut conn = client
        .connect(emu.local_addr(), "localhost")
        .await
        .map_err(|e| e.to_string())?;
    let mut tasks = JoinSet::new();
    session(conn.clone(), Arc::clone(&est), &mut tasks).await;

    let (re_tx, mut re_rx) = tokio::sync::mpsc::channel(4);
    let mut reconnecting = false;
    let mut last_attempt: Option<Instant> = None;
    let mut changes: Vec<(Duration, LinkClass)> = vec![(Duration::ZERO, LinkClass::Intermittent)];
    let mut tick = tokio::time::interval(TICK);
    let end = emu.ends();
    while Instant::now() < end {
        tokio::select! {
            _ = tick.tick() => {}
            r = re_rx.recv() => {
                reconnecting = false;
                if let Some(Ok((c, rtt))) = r {
                    let c: QuicConnection = c;
                    let now = Instant::now().into_std();
                    tasks.shutdown().await;
                    conn.close(0, b"replaced");
                    conn = c;
                    {
                        let mut e = lock(&est);
                        e.reset_in_flight();
                        e.on_probe_answered(now, rtt);
                    }
                    session(conn.clone(), Arc::clone(&est), &mut tasks).await;
                }
            }
        }
        let now = Instant::now();
        let estimate = {
            let mut e = lock(&est);
            e.on_path_stats(now.into_std(), &conn.path_stats());
            e.estimate(now.into_std())
        };
        if let Some(ch) = classifier.update(now.into_std(), &estimate) {
            let at = now - start;
            eprintln!(
                "link_detect: {:7.2} s  {} → {} ({:?}; rate {:.2} Mbit/s, rtt {:?}, loss {:.3})",
                at.as_secs_f64(),
                ch.from.as_str(),
                ch.to.as_str(),
                ch.reason,
                estimate.rate_bps.unwrap_or(0.0) / 1e6 / scale,
                estimate.rtt_min,
                estimate.loss
            );
            changes.push((at, ch.to));
        }
        // During an outage, a fresh handshake every second is the probe.
        if estimate.outage() && !reconnecting && last_attempt.is_none_or(|t| now - t >= ms(1_000)) {
            reconnecting = true;
            last_attempt = Some(now);
            let client = client.clone();
            let addr = emu.local_addr();
            let tx = re_tx.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = client
                    .connect(addr, "localhost")
                    .await
                    .map(|c| (c, t.elapsed()))
                    .map_err(|e| e.to_string());
                let _ = tx.send(r).await;
            });
        }
    }
    tasks.shutdown().await;
    conn.close(0, b"done");

    // Score.
    let class_at = |t: Duration| -> LinkClass {
        changes
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .map(|(_, c)| *c)
            .unwrap_or(LinkClass::Intermittent)
    };
    let mut results = Vec::new();
    let mut phase_start = Duration::ZERO;
    let mut prev_truth = vec![LinkClass::Intermittent];
    for (p, t) in phases.iter().zip(&truth) {
        let phase_end = phase_start + p.duration;
        let at_start = class_at(phase_start);
        let in_phase: Vec<&(Duration, LinkClass)> = changes
            .iter()
            .filter(|(at, _)| *at > phase_start && *at < phase_end)
            .collect();
        let delay_s = if t.contains(&at_start) {
            Some(0.0)
        } else {
            in_phase
                .iter()
                .find(|(_, c)| t.contains(c))
                .map(|(at, _)| (*at - phase_start).as_secs_f64())
        };
        // A flap: a change that leaves the truth once reached, or reverses the direction
        // of the phase's previous change (A → B → A). A climb in steps towards the truth,
        // or one move between two acceptable classes, is not one.
        let mut before = at_start;
        let mut reached = t.contains(&at_start);
        let mut last_dir: Option<bool> = None;
        let mut phase_flaps = 0;
        for (_, c) in &in_phase {
            let down = *c > before;
            let leaves = reached && !t.contains(c);
            let reverses = last_dir.is_some_and(|d| d != down);
            if leaves || reverses {
                phase_flaps += 1;
            }
            reached |= t.contains(c);
            last_dir = Some(down);
            before = *c;
        }
        let worst = |v: &[LinkClass]| v.iter().copied().max().unwrap_or(LinkClass::Intermittent);
        let best = |v: &[LinkClass]| v.iter().copied().min().unwrap_or(LinkClass::Intermittent);
        results.push(PhaseResult {
            label: p.label.clone(),
            truth: t.clone(),
            downgrade: worst(t) > best(&prev_truth),
            delay_s,
            changes: in_phase.len(),
            flaps: phase_flaps,
        });
        prev_truth = t.clone();
        phase_start = phase_end;
    }
    let mut down_max: f64 = 0.0;
    let mut up_max: f64 = 0.0;
    let mut flaps = 0;
    for r in &results {
        let d = r.delay_s.unwrap_or(f64::INFINITY);
        if r.downgrade {
            down_max = down_max.max(d);
        } else {
            up_max = up_max.max(d);
        }
        flaps += r.flaps;
        eprintln!(
            "link_detect: phase {:12} truth {:?}: {} in {} s, {} changes, {} flaps",
            r.label,
            r.truth.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
            if r.downgrade {
                "down-grade"
            } else {
                "up-grade"
            },
            r.delay_s.map_or("never".to_string(), |d| format!("{d:.2}")),
            r.changes,
            r.flaps
        );
    }
    let st = emu.stats();
    eprintln!("link_detect: emulator {st:?}");
    let round = |v: f64| {
        if v.is_finite() {
            json!((v * 100.0).round() / 100.0)
        } else {
            json!(null)
        }
    };
    Ok(json!({
        "bench": "link_detect",
        "downgrade_s_max": round(down_max),
        "upgrade_s_max": round(up_max),
        "flaps": flaps,
        "rate_scale": (scale * 1000.0).round() / 1000.0,
        "capacity_mbps": (capacity / 1e5).round() / 10.0,
    }))
}
