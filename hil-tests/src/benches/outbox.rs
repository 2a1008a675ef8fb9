//! Outbox benchmarks.
//!
//! - `outbox`: durable append rate of the outbox (group-commit batches of `batch=` samples,
//!   default 1,000, of 24-40 bytes each; each batch appended as one segment and made
//!   `durable()` before the next) against raw sled doing the same work in the same run: the
//!   batch's records, length-prefixed, inserted as one value with one `flush()` per batch.
//!   Variants alternate batch by batch to cancel noise; ratios are medians of the per-round
//!   ratios. The outbox is measured as shipped (sled flush + `fdatasync` of the log, see
//!   `SledEngine`) and with `fdatasync` off (the same durability as the raw-sled baseline).
//!   A fourth variant, raw sled with one insert per sample (the outbox's layout before
//!   segments), shows what storing batches instead of samples buys.
//! - `outbox_space`: sled's on-disk size after 1M small records are written through the
//!   outbox and then removed (space amplification), after a reopen, and after a second
//!   write/remove cycle.

use std::path::Path;
use std::time::Instant;

use outpost_runtime::Priority;
use outpost_runtime::storage::{
    KvEngine, Outbox, OutboxConfig, SegmentBuf, SledEngine, SledOptions,
};
use serde_json::json;

const BATCH: usize = 1000;

fn arg(args: &[String], name: &str, default: usize) -> Result<usize, String> {
    for a in args {
        if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            return v
                .parse()
                .map_err(|_| format!("bad value for {name}: {v:?}"));
        }
    }
    Ok(default)
}

/// A realistic encoded sample: 24-40 bytes, contents varying.
fn sample(n: u64) -> Vec<u8> {
    let len = 24 + (n % 17) as usize;
    let mut v = Vec::with_capacity(len);
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    v
}

fn key(p: Priority, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = p as u8;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn open_outbox(dir: &Path, fdatasync: bool) -> Result<Outbox<SledEngine>, String> {
    let engine = SledEngine::open(
        dir,
        &SledOptions {
            fdatasync,
            ..SledOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    Outbox::open(
        engine,
        OutboxConfig {
            quota_bytes: u64::MAX / 2,
            metrics: None,
        },
    )
    .map_err(|e| e.to_string())
}

/// `bench outbox [rounds=N] [batches=N] [batch=N]`.
pub fn run(args: &[String]) -> Result<serde_json::Value, String> {
    let rounds = arg(args, "rounds", 15)?;
    let batches = arg(args, "batches", 20)?;
    let batch_len = arg(args, "batch", BATCH)?.max(1);
    let rt = runtime()?;
    let base = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ob = open_outbox(&base.path().join("outbox"), true)?;
    let ob_nosync = open_outbox(&base.path().join("outbox_nosync"), false)?;
    let open_raw = |name: &str| {
        sled::Config::new()
            .path(base.path().join(name))
            .cache_capacity(SledOptions::default().cache_capacity)
            .open()
            .map_err(|e| e.to_string())
    };
    let raw = open_raw("raw")?;
    let mut raw_seq = 0u64;
    let per_sample = open_raw("raw_per_sample")?;
    let mut per_sample_seq = 0u64;
    // Per round: seconds spent by each variant (outbox, outbox w/o fdatasync, raw sled one
    // value per batch, raw sled one insert per sample).
    let mut rates = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let mut ratios = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..rounds {
        let mut secs = [0f64; 4];
        for b in 0..batches {
            // The same samples for every variant; generated outside the timed sections.
            let first = ((round * batches + b) * batch_len) as u64;
            let values: Vec<Vec<u8>> = (0..batch_len as u64).map(|i| sample(first + i)).collect();
            // Variants alternate batch by batch, in rotating order, so that load from other
            // processes hits all of them alike.
            for k in 0..4 {
                let which = (k + b + round) % 4;
                let t0 = Instant::now();
                match which {
                    0 | 1 => {
                        let o = if which == 0 { &ob } else { &ob_nosync };
                        // What the ingest writer does: encode into one segment, append it.
                        let mut seg = SegmentBuf::with_capacity(values.len() * 41);
                        for v in &values {
                            seg.push(v);
                        }
                        let seg = seg.finish();
                        o.append_segments_with(&[(Priority::Normal, seg.as_slice())], &[])
                            .map_err(|e| e.to_string())?;
                        rt.block_on(o.durable()).map_err(|e| e.to_string())?;
                    }
                    2 => {
                        let mut v = Vec::with_capacity(values.len() * 41);
                        for x in &values {
                            v.push(x.len() as u8);
                            v.extend_from_slice(x);
                        }
                        raw.insert(key(Priority::Normal, raw_seq), v)
                            .map_err(|e| e.to_string())?;
                        raw_seq += values.len() as u64;
                        raw.flush().map_err(|e| e.to_string())?;
                    }
                    _ => {
                        for v in &values {
                            per_sample
                                .insert(key(Priority::Normal, per_sample_seq), v.as_slice())
                                .map_err(|e| e.to_string())?;
                            per_sample_seq += 1;
                        }
                        per_sample.flush().map_err(|e| e.to_string())?;
                    }
                }
                secs[which] += t0.elapsed().as_secs_f64();
            }
        }
        let n = (batches * batch_len) as f64;
        for (r, s) in rates.iter_mut().zip(secs) {
            r.push(n / s);
        }
        ratios[0].push(secs[2] / secs[0]);
        ratios[1].push(secs[2] / secs[1]);
        ratios[2].push(secs[3] / secs[0]);
        eprintln!(
            "round {round}: outbox {:.0}/s, outbox w/o fdatasync {:.0}/s, raw sled one value \
             per batch {:.0}/s, raw sled one insert per sample {:.0}/s, ratio {:.3}",
            n / secs[0],
            n / secs[1],
            n / secs[2],
            n / secs[3],
            secs[2] / secs[0]
        );
    }
    let [mut a, mut b, mut c, mut d] = rates;
    let (ob_rate, ob_nosync_rate, raw_rate) = (median(&mut a), median(&mut b), median(&mut c));
    let per_sample_rate = median(&mut d);
    let [mut r0, mut r1, mut r2] = ratios;
    let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
    Ok(json!({
        "bench": "outbox",
        "samples_per_s": ob_rate.round(),
        "sled_raw_samples_per_s": raw_rate.round(),
        // Median of the per-round ratios (each round's variants ran interleaved).
        "ratio": round3(median(&mut r0)),
        "samples_per_s_without_fdatasync": ob_nosync_rate.round(),
        "ratio_without_fdatasync": round3(median(&mut r1)),
        "sled_per_sample_samples_per_s": per_sample_rate.round(),
        "speedup_vs_per_sample": round3(median(&mut r2)),
        "batch": batch_len,
        "batches_per_round": batches,
        "rounds": rounds,
        "sample_bytes": "24-40",
    }))
}

/// Total length and allocated bytes of the files under `dir`.
fn dir_size(dir: &Path) -> Result<(u64, u64), String> {
    use std::os::unix::fs::MetadataExt;
    let mut len = 0;
    let mut alloc = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| e.to_string())? {
            let e = e.map_err(|e| e.to_string())?;
            let m = e.metadata().map_err(|e| e.to_string())?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                len += m.len();
                alloc += m.blocks() * 512;
            }
        }
    }
    Ok((len, alloc))
}

/// `bench outbox_space [records=N]`.
pub fn run_space(args: &[String]) -> Result<serde_json::Value, String> {
    let records = arg(args, "records", 1_000_000)?;
    let rt = runtime()?;
    let base = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = base.path().join("outbox");
    let mut ob = open_outbox(&dir, true)?;
    let mut logical = 0u64;
    let mut figures = serde_json::Map::new();

    let mut measure = |name: &str, ob: &Outbox<SledEngine>| -> Result<(), String> {
        let sled = ob.engine().size_on_disk().map_err(|e| e.to_string())?;
        let (len, alloc) = dir_size(&dir)?;
        eprintln!("{name}: sled size_on_disk {sled}, files {len} bytes, allocated {alloc}");
        figures.insert(
            name.to_owned(),
            json!({"sled_size_on_disk": sled, "file_bytes": len, "allocated_bytes": alloc}),
        );
        Ok(())
    };

    for cycle in 0..2 {
        let mut ids = Vec::with_capacity(records);
        let mut n = 0;
        while n < records {
            let k = BATCH.min(records - n);
            let values: Vec<Vec<u8>> = (0..k).map(|i| sample((n + i) as u64)).collect();
            let items: Vec<(Priority, &[u8])> = values
                .iter()
                .map(|v| (Priority::Normal, v.as_slice()))
                .collect();
            if cycle == 0 {
                logical += values.iter().map(|v| 9 + v.len() as u64).sum::<u64>();
            }
            let seqs = ob.append(&items).map_err(|e| e.to_string())?;
            ids.extend(seqs.into_iter().map(|s| (Priority::Normal, s)));
            rt.block_on(ob.durable()).map_err(|e| e.to_string())?;
            n += k;
        }
        measure(&format!("after_write_{}", cycle + 1), &ob)?;
        for chunk in ids.chunks(BATCH) {
            ob.remove(chunk).map_err(|e| e.to_string())?;
            rt.block_on(ob.durable()).map_err(|e| e.to_string())?;
        }
        measure(&format!("after_delete_{}", cycle + 1), &ob)?;
        if ob.stats().total_bytes() != 0 {
            return Err(format!("outbox not empty after delete: {:?}", ob.stats()));
        }
        drop(ob);
        ob = open_outbox(&dir, true)?;
        measure(&format!("after_reopen_{}", cycle + 1), &ob)?;
    }
    let mut out = json!({
        "bench": "outbox_space",
        "records": records,
        "logical_bytes_written": logical,
    });
    if let Some(o) = out.as_object_mut() {
        o.extend(figures);
    }
    Ok(out)
}
