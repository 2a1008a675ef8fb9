//! Crash test of the durable outbox: a writer process (`outbox_writer`)
//! appends self-checking batches, awaits the durable point and prints each batch number
//! once it is reached; we kill it with SIGKILL at random moments, 20 times, on the same
//! directory, and after each kill reopen the outbox ourselves and check that
//! - every batch whose durable point was printed is present, intact and in order (minus
//!   the batches the writer acknowledged and removed before that durable point);
//! - no batch is half there: a batch is all or nothing, across priority classes (one
//!   segment per class, one atomic append) — or, once the writer acknowledged its
//!   even-indexed records, exactly its odd-indexed ones, also after the restart (partial
//!   acknowledgements of a segment are durable too);
//! - sequence numbers increase in append order (within a class, in index order) and are
//!   never reused;
//! - the outbox's persisted counters and sequence mark agree with a full scan.
//!
//! If sled corrupts data this test fails loudly: that is the signal to move the outbox to
//! another engine behind the `KvEngine` trait. Set `OUTBOX_CRASH_SEED` to replay a run.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use outpost_hil::crash_record::{HALF_ACK, WINDOW, batch_len, class_of, decode};
use outpost_runtime::Priority;
use outpost_runtime::storage::{Outbox, OutboxConfig, Seq, SledEngine, SledOptions};

const KILLS: usize = 20;

/// What the test has learnt across rounds.
#[derive(Default)]
struct History {
    /// Highest batch number whose durable point was printed.
    printed: Option<u64>,
    /// Every (seq → batch, index) ever observed after a reopen.
    seen: BTreeMap<Seq, (u64, u32)>,
    /// Batches observed so far.
    batches: BTreeSet<u64>,
    /// Half-acknowledged batches found on disk, over all rounds.
    halved: usize,
}

/// One batch as found on disk: its records' (seq, class, index).
type Found = BTreeMap<u64, Vec<(Seq, Priority, u32)>>;

fn read_back(dir: &Path) -> Result<Found, String> {
    let engine = SledEngine::open(dir, &SledOptions::default())
        .map_err(|e| format!("reopen failed: {e}"))?;
    let ob = Outbox::open(
        engine,
        OutboxConfig {
            quota_bytes: 1 << 30,
            metrics: None,
        },
    )
    .map_err(|e| format!("outbox open failed: {e}"))?;
    ob.verify()
        .map_err(|e| format!("outbox counters/marks inconsistent: {e}"))?;
    let mut found: Found = BTreeMap::new();
    let mut total = 0u64;
    for p in Priority::ALL {
        let recs = ob
            .scan(p, None, usize::MAX, usize::MAX)
            .map_err(|e| format!("scan of {p:?} failed: {e}"))?;
        let mut prev: Option<Seq> = None;
        for r in recs {
            if prev.is_some_and(|s| s >= r.seq) {
                return Err(format!("{p:?} scan out of order at seq {}", r.seq));
            }
            prev = Some(r.seq);
            let (b, i) = decode(&r.value).map_err(|e| format!("seq {}: {e}", r.seq))?;
            if class_of(b, i) != p {
                return Err(format!(
                    "batch {b} record {i} found in class {p:?}, written as {:?}",
                    class_of(b, i)
                ));
            }
            found.entry(b).or_default().push((r.seq, p, i));
            total += 1;
        }
    }
    let st = ob.stats();
    if st.records.iter().sum::<u64>() != total {
        return Err(format!(
            "stats say {:?} records, scan found {total}",
            st.records
        ));
    }
    for recs in found.values_mut() {
        recs.sort_unstable();
    }
    if let Some(max) = found.values().flatten().map(|r| r.0).max()
        && st.next_seq <= max
    {
        return Err(format!(
            "sequence mark {} not above stored seq {max}",
            st.next_seq
        ));
    }
    Ok(found)
}

fn check(found: &Found, h: &mut History) -> Result<(), String> {
    // Whole, or exactly its odd-indexed records (its even ones acknowledged): nothing else.
    // Within a class, seqs follow index order (one segment per class and append); a whole
    // batch holds one contiguous seq range.
    let mut halved: BTreeSet<u64> = BTreeSet::new();
    for (b, recs) in found {
        let n = batch_len(*b);
        let whole = recs.len() == n as usize;
        let odd_only = recs.len() == (n / 2) as usize && recs.iter().all(|r| r.2 % 2 == 1);
        if !whole && !odd_only {
            return Err(format!(
                "batch {b} is half there: {} of {n} records ({recs:?})",
                recs.len()
            ));
        }
        if !whole {
            halved.insert(*b);
            h.halved += 1;
        }
        for p in Priority::ALL {
            let mine: Vec<&(Seq, Priority, u32)> = recs.iter().filter(|r| r.1 == p).collect();
            for w in mine.windows(2) {
                if w[1].2 <= w[0].2 || (whole && w[1].0 != w[0].0 + 1) {
                    return Err(format!(
                        "batch {b} class {p:?} records out of order: {mine:?}"
                    ));
                }
            }
        }
        if whole && recs[recs.len() - 1].0 - recs[0].0 + 1 != u64::from(n) {
            return Err(format!("batch {b} seqs not contiguous: {recs:?}"));
        }
    }
    // Batches in order: later batch numbers have higher seqs.
    let mut last: Option<(u64, Seq)> = None;
    for (b, recs) in found {
        let first = recs[0].0;
        if let Some((pb, pseq)) = last
            && first <= pseq
        {
            return Err(format!(
                "batch {b} starts at seq {first}, not after batch {pb} (last seq {pseq})"
            ));
        }
        last = Some((*b, recs[recs.len() - 1].0));
    }
    // Never reused: a seq seen before maps to the same record; a new batch's seqs lie above
    // everything seen before.
    let max_seen = h.seen.keys().next_back().copied();
    for (b, recs) in found {
        for (seq, _, i) in recs {
            match h.seen.get(seq) {
                Some(&(sb, si)) if (sb, si) != (*b, *i) => {
                    return Err(format!(
                        "seq {seq} reused: was batch {sb} record {si}, now batch {b} record {i}"
                    ));
                }
                _ => {}
            }
        }
        if !h.batches.contains(b)
            && let Some(m) = max_seen
            && recs[0].0 <= m
        {
            return Err(format!(
                "new batch {b} got seq {} although seq {m} was already seen",
                recs[0].0
            ));
        }
    }
    // Presence: after `durable P`, batches ≤ P - WINDOW were removed durably and
    // (P - WINDOW, P] are stored. Past P, a batch appended but killed before its durable
    // point was printed may have survived, with the removal that went with it; the next
    // writer resumes after the highest batch it finds, so rounds killed before printing
    // anything may each leave one more: the highest batch allowed is one past the highest
    // of P and every batch seen on disk before.
    let present: BTreeSet<u64> = found.keys().copied().collect();
    let seen_top = h.batches.last().copied();
    let top = h.printed.max(seen_top).map_or(0, |t| t + 1);
    match h.printed {
        None => {
            if present.iter().any(|b| *b > top) {
                return Err(format!(
                    "nothing was durable yet, found batches {present:?}"
                ));
            }
        }
        Some(p) => {
            let lo = (p + 1).saturating_sub(WINDOW);
            let allowed: BTreeSet<u64> = (lo..=top).collect();
            // Appending batch `n` removes the batches ≤ n - WINDOW: the highest batch
            // present may have taken some of (lo, p] with it.
            let removed_upto = present
                .last()
                .filter(|&&hi| hi > p)
                .and_then(|hi| (hi + 1).checked_sub(WINDOW));
            // A batch with no odd-indexed record is gone once its even ones are (by the
            // removal that went with the highest batch present, durable or not).
            let present_top = present.last().copied().unwrap_or(p).max(p);
            let required: BTreeSet<u64> = (lo..=p)
                .filter(|b| removed_upto.is_none_or(|r| *b >= r))
                .filter(|b| batch_len(*b) / 2 > 0 || b + HALF_ACK > present_top)
                .collect();
            let missing: Vec<_> = required.difference(&present).collect();
            if !missing.is_empty() {
                return Err(format!(
                    "durable batches lost: {missing:?} (last durable point {p}, present {present:?})"
                ));
            }
            // Partial acknowledgements made before the durable point stay made.
            if let Some(b) = present
                .iter()
                .find(|b| *b + HALF_ACK <= p && !halved.contains(b))
            {
                return Err(format!(
                    "batch {b} is whole, but its even records were acknowledged before durable \
                     point {p}: a partial acknowledgement was lost"
                ));
            }
            let extra: Vec<_> = present.difference(&allowed).collect();
            if !extra.is_empty() {
                return Err(format!(
                    "unexpected batches {extra:?} (last durable point {p}): an acknowledged \
                     removal came back or a batch appeared from nowhere"
                ));
            }
        }
    }
    // Nothing is acknowledged before the writer got that far.
    let reach = present.last().copied().max(top.checked_sub(1)).unwrap_or(0);
    if let Some(b) = halved.iter().find(|b| *b + HALF_ACK > reach + 1) {
        return Err(format!(
            "batch {b} lost its even records although the writer cannot have reached batch {}",
            b + HALF_ACK
        ));
    }
    for (b, recs) in found {
        h.batches.insert(*b);
        for (seq, _, i) in recs {
            h.seen.insert(*seq, (*b, *i));
        }
    }
    Ok(())
}

#[test]
fn outbox_survives_random_sigkills() {
    let seed = std::env::var("OUTBOX_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("outbox_crash: seed {seed} (set OUTBOX_CRASH_SEED={seed} to replay)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut h = History::default();
    let mut rounds_with_progress = 0;
    let mut undurable_seen = 0;

    for round in 0..KILLS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_outbox_writer"))
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        // A quarter of the kills land early (during open/recovery), the rest mid-stream.
        let delay = if rng.u8(0..4) == 0 {
            rng.u64(0..40)
        } else {
            rng.u64(40..700)
        };
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        let lines = reader.join().unwrap();
        let errors = err_reader.join().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "round {round} (seed {seed}): writer was not killed but exited with {status}: {errors}"
        );

        let mut printed_now = Vec::new();
        for line in &lines {
            if let Some(b) = line.strip_prefix("durable ") {
                printed_now.push(b.parse::<u64>().unwrap());
            } else {
                assert!(
                    line.starts_with("start "),
                    "unexpected writer output {line:?}"
                );
            }
        }
        for w in printed_now.windows(2) {
            assert!(
                w[0] < w[1],
                "round {round}: durable points out of order {w:?}"
            );
        }
        if let (Some(first), Some(prev)) = (printed_now.first(), h.printed) {
            assert!(
                *first > prev,
                "round {round}: batch {first} printed again after {prev}"
            );
        }
        if let Some(last) = printed_now.last() {
            h.printed = Some(*last);
            rounds_with_progress += 1;
        }

        let found = read_back(dir.path())
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}, kill after {delay} ms): {e}"));
        if let Some(p) = h.printed
            && found.contains_key(&(p + 1))
        {
            undurable_seen += 1;
        }
        if let Err(e) = check(&found, &mut h) {
            panic!(
                "round {round} (seed {seed}, kill after {delay} ms, last durable {:?}): {e}",
                h.printed
            );
        }
        eprintln!(
            "outbox_crash: round {round}: killed after {delay} ms, {} durable points printed \
             (last {:?}), {} batches on disk",
            printed_now.len(),
            h.printed,
            found.len()
        );
    }
    eprintln!(
        "outbox_crash: {KILLS} kills, {rounds_with_progress} rounds made progress, last durable \
         batch {:?}, {undurable_seen} times a not-yet-durable batch survived, {} seqs checked, \
         {} half-acknowledged batches found",
        h.printed,
        h.seen.len(),
        h.halved
    );
    // The test must actually have exercised the writer, including the removal window and
    // partial acknowledgements found after a restart.
    assert!(
        h.halved > 0,
        "no half-acknowledged batch was ever found on disk"
    );
    assert!(
        rounds_with_progress >= KILLS / 2,
        "writer made too little progress"
    );
    assert!(
        h.printed.is_some_and(|p| p >= 2 * WINDOW),
        "writer made too little progress: {:?}",
        h.printed
    );
}
