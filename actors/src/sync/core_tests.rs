//! Tests of [`super::core::SyncCore`] against an in-memory outbox.

use std::collections::{BTreeMap, BTreeSet};

use outpost_protocols::encoding::{Deadband, DeadbandConfig, SummaryConfig};
use outpost_protocols::frame::{Ack, Encoding};
use outpost_runtime::model::{LinkClass, Priority, Sample, StreamId, SyncMode, Value};
use outpost_runtime::storage::Seq;
use proptest::prelude::*;

use super::core::{CoreConfig, Lane, Outgoing, SyncCore};

/// The outbox: records by (class, sequence).
#[derive(Default)]
struct Outbox {
    recs: BTreeMap<(Priority, Seq), Sample>,
    next: Seq,
}

impl Outbox {
    fn add(&mut self, p: Priority, stream: &str, ts_ms: i64, v: f64) -> Seq {
        let seq = self.next;
        self.next += 1;
        let s = Sample::new(
            StreamId::intern(stream).unwrap(),
            ts_ms * 1_000_000,
            Value::F64(v),
        );
        self.recs.insert((p, seq), s);
        seq
    }

    /// One round: fill every lane that asks, then take every frame the core builds.
    fn round(&self, core: &mut SyncCore) -> Vec<Outgoing> {
        let mut out = Vec::new();
        loop {
            let mut read = 0;
            for req in core.scans() {
                let p = req.lane.class();
                let from = req.after.map_or(0, |a| a + 1);
                let recs: Vec<(Seq, Sample)> = self
                    .recs
                    .range((p, from)..=(p, Seq::MAX))
                    .take(req.limit)
                    .map(|((_, s), x)| (*s, x.clone()))
                    .collect();
                let upto = recs.last().map(|r| r.0);
                read += recs.len();
                core.fill(&req, recs, upto);
            }
            let mut sent = 0;
            while let Some(f) = core.next_frame() {
                core.commit(f.lane, &f.seqs, 10 * f.seqs.len());
                out.push(f);
                sent += 1;
            }
            if read == 0 && sent == 0 || core.window_full() {
                return out;
            }
        }
    }

    /// Acknowledges `frames` and deletes what the core says.
    fn ack(&mut self, core: &mut SyncCore, frames: &[Outgoing]) -> usize {
        let ack = Ack::from_seqs(
            &"gw".parse().unwrap(),
            frames.iter().flat_map(|f| f.seqs.iter().copied()),
        );
        let (done, _) = core.acked(&ack);
        for id in &done {
            self.recs.remove(id);
        }
        done.len()
    }
}

fn cfg() -> CoreConfig {
    CoreConfig {
        gateway_id: "gw".parse().unwrap(),
        max_frame_samples: 10,
        window: 40,
        backfill: true,
        deadband: DeadbandConfig {
            default: Some(Deadband::Absolute(0.5)),
            max_silence_ms: None,
            streams: Default::default(),
        },
        summary: SummaryConfig { window_ms: 1_000 },
        summary_lateness_ns: 0,
    }
}

fn seqs(frames: &[Outgoing]) -> BTreeSet<Seq> {
    frames.iter().flat_map(|f| f.seqs.iter().copied()).collect()
}

#[test]
fn full_mode_sends_everything_highest_class_first_and_acks_delete() {
    let mut ob = Outbox::default();
    let mut core = SyncCore::new(cfg(), SyncMode::Full).unwrap();
    for i in 0..20 {
        ob.add(Priority::Normal, "t/n", i, i as f64);
    }
    for i in 0..5 {
        ob.add(Priority::Critical, "t/c", i, i as f64);
    }
    let frames = ob.round(&mut core);
    assert_eq!(frames[0].lane, Lane::Live(Priority::Critical));
    assert!(frames.iter().all(|f| f.frame.encoding == Encoding::Raw));
    assert_eq!(seqs(&frames).len(), 25);
    assert_eq!(core.in_flight(), 25);
    assert_eq!(ob.ack(&mut core, &frames), 25);
    assert!(ob.recs.is_empty());
    assert!(ob.round(&mut core).is_empty());
}

#[test]
fn the_window_bounds_what_is_in_flight() {
    let mut ob = Outbox::default();
    let mut core = SyncCore::new(cfg(), SyncMode::FullZstd).unwrap();
    for i in 0..100 {
        ob.add(Priority::Normal, "t/n", i, i as f64);
    }
    let frames = ob.round(&mut core);
    assert_eq!(seqs(&frames).len(), 40);
    assert!(core.window_full());
    assert!(frames.iter().all(|f| f.frame.encoding == Encoding::Zstd));
    ob.ack(&mut core, &frames);
    assert_eq!(seqs(&ob.round(&mut core)).len(), 40);
}

#[test]
fn acknowledging_a_frame_gives_back_exactly_the_bytes_it_was_sent_with() {
    // The link estimator's bytes in flight are sums of these: a remainder lost per frame
    // would make them grow without bound.
    let mut ob = Outbox::default();
    for i in 0..7 {
        ob.add(Priority::Normal, "s/a", i, i as f64);
    }
    let mut core = SyncCore::new(cfg(), SyncMode::Full).unwrap();
    for req in core.scans() {
        let recs: Vec<(Seq, Sample)> = ob.recs.iter().map(|((_, s), x)| (*s, x.clone())).collect();
        let upto = recs.last().map(|r| r.0);
        core.fill(&req, recs, upto);
    }
    let f = core.next_frame().expect("a frame");
    assert_eq!(f.seqs.len(), 7);
    core.commit(f.lane, &f.seqs, 1_003);
    let (first, b1) = core.acked(&Ack::from_seqs(
        &"gw".parse().unwrap(),
        f.seqs[..3].iter().copied(),
    ));
    let (rest, b2) = core.acked(&Ack::from_seqs(
        &"gw".parse().unwrap(),
        f.seqs[3..].iter().copied(),
    ));
    assert_eq!(first.len() + rest.len(), 7);
    assert_eq!(b1 + b2, 1_003);
}

#[test]
fn delta_holds_what_the_deadband_skips_and_full_mode_backfills_it() {
    let mut ob = Outbox::default();
    let mut core = SyncCore::new(cfg(), SyncMode::Delta).unwrap();
    // A flat signal with a step: the deadband sends the first sample and the step.
    for i in 0..30 {
        ob.add(
            Priority::Normal,
            "t/flat",
            i,
            if i < 15 { 1.0 } else { 5.0 },
        );
    }
    let crit = ob.add(Priority::Critical, "t/alarm", 0, 1.0);
    let crit2 = ob.add(Priority::Critical, "t/alarm", 1, 1.0);
    let frames = ob.round(&mut core);
    let sent = seqs(&frames);
    assert!(
        sent.contains(&crit) && sent.contains(&crit2),
        "critical is never filtered"
    );
    let normal_sent: Vec<_> = frames
        .iter()
        .filter(|f| f.lane == Lane::Live(Priority::Normal))
        .flat_map(|f| f.seqs.clone())
        .collect();
    assert_eq!(normal_sent, vec![0, 15]);
    assert!(frames.iter().all(|f| f.frame.encoding == Encoding::Delta));
    assert_eq!(core.stats().deadband_skipped, 28);
    ob.ack(&mut core, &frames);
    assert_eq!(ob.recs.len(), 28, "skipped records stay in the outbox");
    // Nothing more in delta mode: backfill waits for a better link.
    assert!(ob.round(&mut core).is_empty());
    assert!(!core.backfill_pending());

    core.set_mode(SyncMode::Full, ob.next);
    assert!(core.backfill_pending());
    let frames = ob.round(&mut core);
    assert!(
        frames
            .iter()
            .all(|f| f.lane == Lane::Backfill(Priority::Normal))
    );
    assert_eq!(seqs(&frames).len(), 28);
    ob.ack(&mut core, &frames);
    assert!(ob.recs.is_empty());
    ob.round(&mut core);
    assert!(!core.backfill_pending());
}

#[test]
fn summary_mode_aggregates_normal_passes_critical_and_keeps_raw_for_backfill() {
    let mut ob = Outbox::default();
    let mut core = SyncCore::new(cfg(), SyncMode::Summary).unwrap();
    for i in 0..25 {
        ob.add(Priority::Normal, "t/n", i * 100, i as f64); // 2.5 s of samples
    }
    let alarm = ob.add(Priority::Critical, "t/alarm", 0, 1.0);
    let frames = ob.round(&mut core);
    assert_eq!(seqs(&frames), BTreeSet::from([alarm]));
    assert_eq!(frames[0].frame.encoding, Encoding::Zstd);
    assert_eq!(core.stats().summarized, 25);
    // Windows [0,1s) and [1s,2s) are closed at 2 s; [2s,3s) is not.
    let sums = core.poll_summaries(2_000_000_000);
    assert_eq!(sums.len(), 1);
    let ws: Vec<_> = sums[0].summaries.iter().map(|s| &s.summary).collect();
    assert_eq!(ws.len(), 2);
    assert_eq!(ws[0].count, 10);
    assert_eq!(ws[1].count, 10);
    assert!(sums[0].samples.is_empty(), "summaries acknowledge nothing");
    ob.ack(&mut core, &frames);
    assert_eq!(ob.recs.len(), 25, "the raw samples stay for backfill");
    // Leaving summary mode flushes the open window.
    let flushed = core.set_mode(SyncMode::FullZstd, ob.next);
    assert_eq!(flushed.len(), 1);
    assert_eq!(flushed[0].summaries[0].summary.count, 5);
    let frames = ob.round(&mut core);
    assert_eq!(seqs(&frames).len(), 25);
    assert!(
        frames
            .iter()
            .all(|f| f.lane == Lane::Backfill(Priority::Normal))
    );
    ob.ack(&mut core, &frames);
    assert!(ob.recs.is_empty());
}

#[test]
fn after_store_and_forward_fresh_data_goes_first_and_the_backlog_is_backfilled() {
    let mut ob = Outbox::default();
    let mut core = SyncCore::new(cfg(), SyncMode::StoreAndForward).unwrap();
    for i in 0..50 {
        ob.add(Priority::Normal, "t/n", i, i as f64);
    }
    let alarm = ob.add(Priority::Critical, "t/c", 0, 0.0);
    // Store-and-forward holds normal; an alarm still goes out while a connection is up.
    let frames = ob.round(&mut core);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].seqs, vec![alarm]);
    assert_eq!(frames[0].frame.encoding, Encoding::Zstd);
    ob.ack(&mut core, &frames);
    assert!(ob.round(&mut core).is_empty());
    core.set_mode(SyncMode::Full, ob.next);
    let crit = ob.add(Priority::Critical, "t/c", 1, 1.0);
    let fresh = ob.add(Priority::Normal, "t/n", 60, 60.0);
    let frames = ob.round(&mut core);
    assert_eq!(
        frames[0].seqs,
        vec![crit],
        "critical drains at its own priority"
    );
    let live: BTreeSet<_> = frames
        .iter()
        .filter(|f| f.lane == Lane::Live(Priority::Normal))
        .flat_map(|f| f.seqs.clone())
        .collect();
    assert_eq!(live, BTreeSet::from([fresh]));
    let back = frames
        .iter()
        .filter(|f| f.lane == Lane::Backfill(Priority::Normal))
        .count();
    assert!(back > 0);
    // Keep draining: everything arrives.
    let mut all = seqs(&frames);
    ob.ack(&mut core, &frames);
    for _ in 0..10 {
        let f = ob.round(&mut core);
        all.extend(seqs(&f));
        ob.ack(&mut core, &f);
    }
    assert!(ob.recs.is_empty());
    assert_eq!(all.len(), 52);
}

#[test]
fn a_lost_connection_resends_critical_live_and_backfills_normal() {
    let mut ob = Outbox::default();
    let mut core = SyncCore::new(cfg(), SyncMode::Full).unwrap();
    for i in 0..10 {
        ob.add(Priority::Normal, "t/n", i, i as f64);
        ob.add(Priority::Critical, "t/c", i, i as f64);
    }
    let lost = ob.round(&mut core);
    assert_eq!(seqs(&lost).len(), 20);
    core.disconnected();
    assert_eq!(core.in_flight(), 0);
    let again = ob.round(&mut core);
    assert_eq!(
        seqs(&again),
        seqs(&lost),
        "everything unacknowledged is sent again"
    );
    assert!(
        again
            .iter()
            .filter(|f| f.lane.class() == Priority::Normal)
            .all(|f| f.lane == Lane::Backfill(Priority::Normal))
    );
    ob.ack(&mut core, &again);
    assert!(ob.recs.is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Add(u8, u8, i16),
    Round,
    AckAll,
    AckHalf,
    Disconnect,
    Mode(u8),
    Link(u8),
    Poll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 0u8..3, any::<i16>()).prop_map(|(p, s, v)| Op::Add(p, s, v)),
        3 => Just(Op::Round),
        2 => Just(Op::AckAll),
        1 => Just(Op::AckHalf),
        1 => Just(Op::Disconnect),
        1 => (0u8..5).prop_map(Op::Mode),
        1 => (0u8..5).prop_map(Op::Link),
        1 => Just(Op::Poll),
    ]
}

const MODES: [SyncMode; 5] = [
    SyncMode::Full,
    SyncMode::FullZstd,
    SyncMode::Delta,
    SyncMode::Summary,
    SyncMode::StoreAndForward,
];

proptest! {
    /// Whatever happens (modes, lost connections, partial acks), once the link is good
    /// again everything in the outbox is sent and acknowledged: nothing is stranded.
    #[test]
    fn nothing_is_stranded(ops in proptest::collection::vec(op(), 1..200)) {
        let mut ob = Outbox::default();
        let mut core = SyncCore::new(cfg(), SyncMode::Full).unwrap();
        let mut pending: Vec<Outgoing> = Vec::new();
        let mut t = 0i64;
        for o in ops {
            match o {
                Op::Add(p, s, v) => {
                    t += 7;
                    let p = Priority::from_u8(p).unwrap();
                    ob.add(p, &format!("s/{s}"), t, f64::from(v) / 100.0);
                }
                Op::Round => pending.extend(ob.round(&mut core)),
                Op::AckAll => {
                    ob.ack(&mut core, &pending);
                    pending.clear();
                }
                Op::AckHalf => {
                    let half = pending.len() / 2;
                    let acked: Vec<Outgoing> = pending.drain(..half).collect();
                    ob.ack(&mut core, &acked);
                }
                Op::Disconnect => {
                    core.disconnected();
                    pending.clear();
                }
                Op::Mode(m) => {
                    core.set_mode(MODES[m as usize], ob.next);
                }
                Op::Link(l) => core.set_link(LinkClass::ALL[l as usize]),
                Op::Poll => {
                    for f in core.poll_summaries(t * 1_000_000) {
                        prop_assert!(f.samples.is_empty());
                    }
                }
            }
            prop_assert!(core.in_flight() <= 40);
        }
        core.set_mode(SyncMode::Full, ob.next);
        for _ in 0..200 {
            pending.extend(ob.round(&mut core));
            ob.ack(&mut core, &pending);
            pending.clear();
            if ob.recs.is_empty() {
                break;
            }
        }
        prop_assert!(ob.recs.is_empty(), "stranded: {:?}", ob.recs.keys().collect::<Vec<_>>());
        prop_assert_eq!(core.in_flight(), 0);
    }
}

#[test]
fn reduced_modes_backfill_the_outage_backlog_one_frame_at_a_time_but_not_their_own_holds() {
    for mode in [SyncMode::Delta, SyncMode::Summary] {
        let mut ob = Outbox::default();
        let mut core = SyncCore::new(cfg(), SyncMode::StoreAndForward).unwrap();
        // The backlog of an outage: 35 normal records.
        for i in 0..35 {
            ob.add(Priority::Normal, "t/n", i, i as f64);
        }
        core.set_mode(mode, ob.next);
        assert!(core.backfill_pending(), "{mode:?}");
        // Fresh records of a steady stream: the deadband skips them, or they are summarized.
        for i in 0..20 {
            ob.add(Priority::Normal, "t/n", 100 + i, 50.0);
        }
        let crit = ob.add(Priority::Critical, "t/c", 0, 1.0);
        let frames = ob.round(&mut core);
        assert_eq!(frames[0].seqs, vec![crit], "{mode:?}: live data goes first");
        let back: Vec<&Outgoing> = frames
            .iter()
            .filter(|f| f.lane == Lane::Backfill(Priority::Normal))
            .collect();
        assert_eq!(back.len(), 1, "{mode:?}: one backfill frame in flight");
        assert!(back[0].seqs.iter().all(|&s| s < 35));
        assert!(
            !core.window_full(),
            "{mode:?}: gentle backfill is not a backlog"
        );
        let mut got = seqs(&frames);
        ob.ack(&mut core, &frames);
        for _ in 0..10 {
            let f = ob.round(&mut core);
            assert!(f.len() <= 1, "{mode:?}");
            got.extend(seqs(&f));
            ob.ack(&mut core, &f);
        }
        let backlog: BTreeSet<Seq> = (0..35).collect();
        assert!(backlog.is_subset(&got), "{mode:?}: the backlog is all sent");
        assert!(!core.backfill_pending(), "{mode:?}");
        // What the mode held back itself waits for a full mode.
        let held = ob.recs.len();
        assert!(held >= 19, "{mode:?}: {held} held");
        core.set_mode(SyncMode::FullZstd, ob.next);
        for _ in 0..10 {
            let f = ob.round(&mut core);
            ob.ack(&mut core, &f);
        }
        assert!(ob.recs.is_empty(), "{mode:?}: {} left", ob.recs.len());
    }
}

#[test]
fn after_a_lost_connection_the_backlog_is_sent_once_not_by_both_lanes() {
    // In full mode the live lane resumes where it stopped and carries the outage's backlog,
    // while the backfill lane resends what was in flight when the connection dropped. The
    // backfill lane must stop before what the live lane has read but not yet sent.
    let mut ob = Outbox::default();
    let mut core = SyncCore::new(cfg(), SyncMode::Full).unwrap();
    for i in 0..20 {
        ob.add(Priority::Normal, "t/n", i, i as f64);
    }
    let first = ob.round(&mut core);
    let lost = seqs(&first);
    assert_eq!(lost.len(), 20);
    core.disconnected();
    // The backlog of the outage.
    for i in 20..400 {
        ob.add(Priority::Normal, "t/n", i, i as f64);
    }
    let mut times: BTreeMap<Seq, usize> = BTreeMap::new();
    for _ in 0..100 {
        let frames = ob.round(&mut core);
        for s in frames.iter().flat_map(|f| f.seqs.iter()) {
            *times.entry(*s).or_default() += 1;
        }
        ob.ack(&mut core, &frames);
        if ob.recs.is_empty() {
            break;
        }
    }
    assert!(ob.recs.is_empty(), "{} left", ob.recs.len());
    let twice: Vec<Seq> = times
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    assert!(
        twice.is_empty(),
        "sent twice after the reconnect: {twice:?}"
    );
    assert_eq!(times.len(), 400);
    // The 20 lost in flight were sent again: resends, and only those.
    assert_eq!(core.stats().resent, 20);
}

proptest! {
    /// Whatever happens, a record is sent again only when the connection that carried it
    /// dropped before the hub acknowledged it, and the core counts exactly those resends.
    #[test]
    fn nothing_is_sent_twice_but_what_a_lost_connection_lost(
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let mut ob = Outbox::default();
        let mut core = SyncCore::new(cfg(), SyncMode::Full).unwrap();
        let mut pending: Vec<Outgoing> = Vec::new();
        // Sent on this connection and not acknowledged; in flight when a connection
        // dropped and not sent since.
        let mut outstanding: BTreeSet<Seq> = BTreeSet::new();
        let mut lost: BTreeSet<Seq> = BTreeSet::new();
        let mut acked: BTreeSet<Seq> = BTreeSet::new();
        let mut resent = 0u64;
        let mut t = 0i64;
        let mut sent = |frames: &[Outgoing],
                        outstanding: &mut BTreeSet<Seq>,
                        lost: &mut BTreeSet<Seq>,
                        acked: &BTreeSet<Seq>|
         -> Result<(), TestCaseError> {
            for &s in frames.iter().flat_map(|f| f.seqs.iter()) {
                prop_assert!(!outstanding.contains(&s), "{} sent twice on one connection", s);
                prop_assert!(!acked.contains(&s), "{} sent after its acknowledgement", s);
                if lost.remove(&s) {
                    resent += 1;
                }
                outstanding.insert(s);
            }
            Ok(())
        };
        // Then: what is in flight is acknowledged, on a good link.
        let ops = ops.into_iter().chain([Op::AckAll, Op::Mode(0)]);
        for o in ops {
            match o {
                Op::Add(p, s, v) => {
                    t += 7;
                    let p = Priority::from_u8(p).unwrap();
                    ob.add(p, &format!("s/{s}"), t, f64::from(v) / 100.0);
                }
                Op::Round => {
                    let f = ob.round(&mut core);
                    sent(&f, &mut outstanding, &mut lost, &acked)?;
                    pending.extend(f);
                }
                Op::AckAll | Op::AckHalf => {
                    let n = if matches!(o, Op::AckAll) { pending.len() } else { pending.len() / 2 };
                    let done: Vec<Outgoing> = pending.drain(..n).collect();
                    for &s in done.iter().flat_map(|f| f.seqs.iter()) {
                        outstanding.remove(&s);
                        acked.insert(s);
                    }
                    ob.ack(&mut core, &done);
                }
                Op::Disconnect => {
                    core.disconnected();
                    pending.clear();
                    lost.append(&mut outstanding);
                }
                Op::Mode(m) => {
                    core.set_mode(MODES[m as usize], ob.next);
                }
                Op::Link(l) => core.set_link(LinkClass::ALL[l as usize]),
                Op::Poll => {
                    core.poll_summaries(t * 1_000_000);
                }
            }
        }
        // Drain on a good link: the same holds.
        for _ in 0..200 {
            let f = ob.round(&mut core);
            sent(&f, &mut outstanding, &mut lost, &acked)?;
            for &s in f.iter().flat_map(|f| f.seqs.iter()) {
                outstanding.remove(&s);
                acked.insert(s);
            }
            ob.ack(&mut core, &f);
            if ob.recs.is_empty() {
                break;
            }
        }
        prop_assert!(ob.recs.is_empty());
        prop_assert_eq!(core.stats().resent, resent);
    }
}

#[test]
fn a_pinned_reduced_mode_backfills_what_it_held_once_the_link_is_fast() {
    for mode in [SyncMode::Delta, SyncMode::Summary] {
        let mut ob = Outbox::default();
        let mut core = SyncCore::new(cfg(), mode).unwrap();
        let drain = |ob: &mut Outbox, core: &mut SyncCore| {
            let mut back = 0;
            for _ in 0..20 {
                let f = ob.round(core);
                back += f
                    .iter()
                    .filter(|f| matches!(f.lane, Lane::Backfill(_)))
                    .map(|f| f.seqs.len())
                    .sum::<usize>();
                ob.ack(core, &f);
            }
            back
        };
        // A flat signal: the deadband sends its first sample, or it is summarized.
        core.set_link(LinkClass::Mobile);
        for i in 0..30 {
            ob.add(Priority::Normal, "t/flat", i, 1.0);
        }
        assert_eq!(drain(&mut ob, &mut core), 0, "{mode:?}");
        assert!(ob.recs.len() >= 29, "{mode:?}: held on a mobile link");
        assert!(!core.backfill_pending(), "{mode:?}");
        // The same pinned mode on a fiber link: what it held goes out (as bulk).
        core.set_link(LinkClass::Fiber);
        assert_eq!(core.mode(), mode);
        assert!(core.backfill_pending(), "{mode:?}");
        assert!(drain(&mut ob, &mut core) >= 29, "{mode:?}");
        assert!(ob.recs.is_empty(), "{mode:?}: {} left", ob.recs.len());
        // New holds on a broadband link go out too.
        core.set_link(LinkClass::Broadband);
        for i in 30..60 {
            ob.add(Priority::Normal, "t/flat", i, 1.0);
        }
        drain(&mut ob, &mut core);
        assert!(ob.recs.is_empty(), "{mode:?}: {} left", ob.recs.len());
        // Satellite again: held back again.
        core.set_link(LinkClass::Satellite);
        for i in 60..90 {
            ob.add(Priority::Normal, "t/flat", i, 1.0);
        }
        assert_eq!(drain(&mut ob, &mut core), 0, "{mode:?}");
        assert!(ob.recs.len() >= 29, "{mode:?}");
    }
}
