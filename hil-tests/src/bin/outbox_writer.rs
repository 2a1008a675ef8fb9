//! Writer side of the outbox crash test (`tests/outbox_crash.rs`): `outbox_writer DIR`
//! opens the outbox in DIR, resumes after the highest batch it finds, and loops: append
//! batch `b` (one atomic append of self-checking records, see `outpost_hil::crash_record`),
//! remove the even-indexed records of batches up to `b - HALF_ACK` and whole batches up to
//! `b - WINDOW` (the ack path: partial acknowledgements of segments, then the rest), await
//! the durable point, then print
//! `durable b` on stdout and flush it. The test kills it with SIGKILL at random moments.
//! It stops by itself after 60 s in case its parent died.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use outpost_hil::crash_record::{HALF_ACK, WINDOW, batch_len, class_of, decode, encode};
use outpost_runtime::Priority;
use outpost_runtime::storage::{Outbox, OutboxConfig, Seq, SledEngine, SledOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox_writer: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let dir = std::env::args().nth(1).ok_or("usage: outbox_writer DIR")?;
    let engine = SledEngine::open(&dir, &SledOptions::default()).map_err(|e| e.to_string())?;
    let ob = Outbox::open(
        engine,
        OutboxConfig {
            quota_bytes: 1 << 30,
            metrics: None,
        },
    )
    .map_err(|e| e.to_string())?;

    // Resume: the ids of every batch still stored, by batch number.
    let mut live: BTreeMap<u64, Vec<(Priority, Seq, u32)>> = BTreeMap::new();
    for p in Priority::ALL {
        for r in ob
            .scan(p, None, usize::MAX, usize::MAX)
            .map_err(|e| e.to_string())?
        {
            let (b, i) = decode(&r.value)?;
            live.entry(b).or_default().push((p, r.seq, i));
        }
    }
    let mut next = live.keys().next_back().map_or(0, |b| b + 1);
    let mut out = std::io::stdout().lock();
    writeln!(out, "start {next}").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;

    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let values: Vec<(Priority, Vec<u8>)> = (0..batch_len(next))
            .map(|i| (class_of(next, i), encode(next, i)))
            .collect();
        let items: Vec<(Priority, &[u8])> =
            values.iter().map(|(p, v)| (*p, v.as_slice())).collect();
        let seqs = ob.append(&items).map_err(|e| e.to_string())?;
        live.insert(
            next,
            items
                .iter()
                .zip(seqs)
                .enumerate()
                .map(|(i, ((p, _), s))| (*p, s, i as u32))
                .collect::<Vec<_>>(),
        );
        // Ack the even records of every batch at or below next - HALF_ACK, and everything
        // at or below next - WINDOW (more than one batch after a resume whose previous run
        // lost a removal in the crash).
        let mut acked = Vec::new();
        while let Some(entry) = live.first_entry() {
            if *entry.key() + WINDOW > next {
                break;
            }
            acked.extend(entry.remove().into_iter().map(|(p, s, _)| (p, s)));
        }
        for (_, recs) in live.range_mut(..=next.saturating_sub(HALF_ACK)) {
            if next < HALF_ACK {
                break;
            }
            recs.retain(|&(p, s, i)| {
                if i % 2 == 0 {
                    acked.push((p, s));
                    false
                } else {
                    true
                }
            });
        }
        if !acked.is_empty() {
            ob.remove(&acked).map_err(|e| e.to_string())?;
        }
        ob.durable().await.map_err(|e| e.to_string())?;
        writeln!(out, "durable {next}").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
        next += 1;
    }
    Ok(())
}
