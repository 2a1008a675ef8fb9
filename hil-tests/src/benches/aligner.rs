//! `bench -- aligner [SECONDS] [ROUNDS]`: a 10-stream fusion group at mixed rates (1 Hz to
//! 1 kHz; hold, linear and cubic interpolation) aligned onto a 100 Hz tick with 50 ms allowed
//! lateness. Samples are pre-generated (seeded, ±10 % timestamp jitter, arrival order by
//! timestamp) and pushed with a poll after every sample, as the actor does. Reports the median
//! frames per second of aligner work and the samples per second that implies.

use std::hint::black_box;
use std::time::Instant;

use outpost_actors::aligner::{
    Aligner, AlignerConfig, AlignerStreamConfig, Frame, Interpolation, LatePolicy,
};
use outpost_runtime::model::{Sample, StreamId, Value};
use serde_json::{Value as Json, json};

const RATES_HZ: [f64; 10] = [
    1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 100.0, 200.0, 500.0, 1000.0,
];

fn arg(args: &[String], i: usize, default: usize) -> Result<usize, String> {
    match args.get(i) {
        None => Ok(default),
        Some(s) => s.parse().map_err(|e| format!("argument {s:?}: {e}")),
    }
}

/// Runs the benchmark; `args`: optional simulated seconds (default 60) and rounds (default 7).
pub fn run(args: &[String]) -> Result<Json, String> {
    let seconds = arg(args, 0, 60)?.max(1) as f64;
    let rounds = arg(args, 1, 7)?.max(1);
    let interp = [
        Interpolation::Hold,
        Interpolation::Linear,
        Interpolation::Cubic,
    ];
    let cfg = AlignerConfig {
        period_ns: 10_000_000,
        allowed_lateness_ms: 50,
        late_policy: LatePolicy::Drop,
        history: 256,
        clock_window: 64,
        clock_bucket_ms: 1000,
        max_pending_ticks: 10_000,
        max_future_ms: 0,
        idle_timeout_ms: None,
        streams: (0..RATES_HZ.len())
            .map(|i| AlignerStreamConfig {
                stream: format!("bench.aligner.s{i}"),
                interpolation: interp[i % 3],
                stale_after_ms: 5_000,
                max_gap_ms: None,
                correct_clock: false,
            })
            .collect(),
    };
    let ids: Vec<StreamId> = cfg
        .streams
        .iter()
        .map(|s| StreamId::intern(&s.stream).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut rng = fastrand::Rng::with_seed(0xa119);
    let t0: i64 = 1_700_000_000_000_000_000;
    let mut samples: Vec<Sample> = Vec::new();
    for (i, &hz) in RATES_HZ.iter().enumerate() {
        let period = 1e9 / hz;
        let n = (seconds * hz) as i64;
        for k in 0..n {
            let jitter = (rng.f64() - 0.5) * 0.2 * period;
            let ts = t0 + (k as f64 * period + jitter) as i64;
            let v = (ts - t0) as f64 * 1e-9 * (i + 1) as f64;
            samples.push(Sample::new(ids[i], ts, Value::F64(v.sin())));
        }
    }
    samples.sort_by_key(|s| s.ts_ns);

    let mut fps = Vec::new();
    let mut frames_total = 0u64;
    for _ in 0..rounds {
        let mut al = Aligner::new(&cfg).map_err(|e| e.to_string())?;
        let mut out: Vec<Frame> = Vec::with_capacity(64);
        let mut frames = 0u64;
        let start = Instant::now();
        for s in &samples {
            black_box(al.push(black_box(s), s.ts_ns));
            al.poll(&mut out);
            frames += out.len() as u64;
            black_box(&out);
            out.clear();
        }
        let secs = start.elapsed().as_secs_f64();
        if frames == 0 {
            return Err("the aligner emitted no frames".into());
        }
        frames_total = frames;
        fps.push(frames as f64 / secs);
    }
    fps.sort_by(f64::total_cmp);
    let med = fps[fps.len() / 2];
    let samples_per_frame = samples.len() as f64 / frames_total as f64;
    eprintln!(
        "aligner: {} samples, {frames_total} frames per round, {rounds} rounds",
        samples.len()
    );
    Ok(json!({
        "bench": "aligner",
        "frames_per_s": med.round(),
        "samples_per_s": (med * samples_per_frame).round(),
    }))
}
