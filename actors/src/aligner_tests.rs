use super::*;
use crate::fusion::sim::Noise;
use outpost_runtime::model::Value;
use proptest::prelude::*;

const MS: i64 = 1_000_000;
const S: i64 = 1_000_000_000;

fn scfg(name: &str, interp: Interpolation, stale_ms: u64) -> AlignerStreamConfig {
    AlignerStreamConfig {
        stream: name.into(),
        interpolation: interp,
        stale_after_ms: stale_ms,
        max_gap_ms: None,
        correct_clock: false,
    }
}

fn cfg(period_ns: i64, lateness_ms: u64, streams: Vec<AlignerStreamConfig>) -> AlignerConfig {
    AlignerConfig {
        period_ns,
        allowed_lateness_ms: lateness_ms,
        late_policy: LatePolicy::Drop,
        history: 256,
        clock_window: 64,
        clock_bucket_ms: 1_000,
        max_pending_ticks: 10_000,
        max_future_ms: 0,
        idle_timeout_ms: None,
        streams,
    }
}

fn sample(name: &str, ts: i64, v: f64) -> Sample {
    Sample::new(StreamId::intern(name).unwrap(), ts, Value::F64(v))
}

fn poll(a: &mut Aligner) -> Vec<Frame> {
    let mut out = Vec::new();
    a.poll(&mut out);
    out
}

#[test]
fn interpolation_kinds() {
    let mut a = Aligner::new(&cfg(
        250 * MS,
        0,
        vec![
            scfg("al.hold", Interpolation::Hold, 10_000),
            scfg("al.lin", Interpolation::Linear, 10_000),
            scfg("al.cub", Interpolation::Cubic, 10_000),
        ],
    ))
    .unwrap();
    // v = t² (t in s) sampled every second: cubic Catmull-Rom is exact for quadratics only at
    // interior points with uniform spacing; linear has error h²/8·f'' = 0.25 at midpoints.
    for k in 0..6 {
        let t = k as f64;
        for name in ["al.hold", "al.lin", "al.cub"] {
            a.push(&sample(name, k * S, t * t), k * S);
        }
    }
    let frames = poll(&mut a);
    let at = |ts: i64| frames.iter().find(|f| f.ts_ns == ts).unwrap();
    let f = at(2 * S + 500 * MS);
    assert_eq!(f.values[0].value, Some(4.0));
    assert!((f.values[1].value.unwrap() - 6.5).abs() < 1e-12);
    assert!(
        (f.values[2].value.unwrap() - 6.25).abs() < 1e-9,
        "{:?}",
        f.values[2]
    );
    assert!(f.values.iter().all(|v| v.quality == Quality::Good));
    // Ticks strictly increase, every period.
    for w in frames.windows(2) {
        assert_eq!(w[1].ts_ns - w[0].ts_ns, 250 * MS);
    }
}

#[test]
fn frames_wait_for_watermark_and_slow_streams() {
    let mut a = Aligner::new(&cfg(
        100 * MS,
        200,
        vec![
            scfg("wm.fast", Interpolation::Linear, 5_000),
            scfg("wm.slow", Interpolation::Linear, 5_000),
        ],
    ))
    .unwrap();
    a.push(&sample("wm.slow", 0, 0.0), 0);
    for k in 0..=10 {
        a.push(&sample("wm.fast", k * 100 * MS, k as f64), k * 100 * MS);
    }
    // Watermark is 0.8 s but the slow stream has nothing after 0: only the tick at 0.
    let f = poll(&mut a);
    assert_eq!(f.iter().map(|f| f.ts_ns).collect::<Vec<_>>(), vec![0]);
    a.push(&sample("wm.slow", S, 10.0), S);
    let f = poll(&mut a);
    let ts: Vec<_> = f.iter().map(|f| f.ts_ns / MS).collect();
    assert_eq!(ts, vec![100, 200, 300, 400, 500, 600, 700, 800]);
    assert!((f[4].values[1].value.unwrap() - 5.0).abs() < 1e-12);
    assert_eq!(a.watermark(), Some(800 * MS));
}

#[test]
fn late_samples_drop_or_reemit() {
    for policy in [LatePolicy::Drop, LatePolicy::Reemit] {
        let mut c = cfg(
            100 * MS,
            100,
            vec![scfg("late.x", Interpolation::Linear, 5_000)],
        );
        c.late_policy = policy;
        let mut a = Aligner::new(&c).unwrap();
        for k in [0, 2, 3, 4, 5, 6] {
            a.push(&sample("late.x", k * 100 * MS, 0.0), 0);
        }
        let first = poll(&mut a);
        assert_eq!(first.len(), 6); // 0..=500 ms
        let out = a.push(&sample("late.x", 100 * MS, 10.0), 0);
        let again = poll(&mut a);
        match policy {
            LatePolicy::Drop => {
                assert_eq!(out, PushOutcome::LateDropped);
                assert_eq!(a.stats().late_dropped, 1);
                assert!(again.iter().all(|f| !f.correction));
            }
            LatePolicy::Reemit => {
                assert_eq!(out, PushOutcome::LateReemitted(1));
                let corr: Vec<_> = again.iter().filter(|f| f.correction).collect();
                assert_eq!(corr.len(), 1);
                assert_eq!(corr[0].ts_ns, 100 * MS);
                assert_eq!(corr[0].values[0].value, Some(10.0));
                assert_eq!(a.stats().corrections_emitted, 1);
            }
        }
    }
}

#[test]
fn silent_stream_goes_uncertain_then_bad_then_recovers() {
    let mut a = Aligner::new(&cfg(
        100 * MS,
        0,
        vec![
            scfg("st.a", Interpolation::Linear, 10_000),
            scfg("st.b", Interpolation::Linear, 300),
        ],
    ))
    .unwrap();
    a.push(&sample("st.b", 0, 1.0), 0);
    for k in 0..=10 {
        a.push(&sample("st.a", k * 100 * MS, 0.0), k * 100 * MS);
    }
    let f = poll(&mut a);
    assert_eq!(f.len(), 11);
    assert_eq!(f[0].values[1].quality, Quality::Good);
    assert_eq!(f[3].values[1].quality, Quality::Uncertain);
    assert_eq!(f[3].values[1].value, Some(1.0));
    assert_eq!(f[4].values[1].quality, Quality::Bad);
    assert_eq!(f[4].values[1].value, None);
    // It speaks again: good again from its new samples on.
    a.push(&sample("st.b", 1_100 * MS, 2.0), 1_100 * MS);
    a.push(&sample("st.a", 1_200 * MS, 0.0), 1_200 * MS);
    a.push(&sample("st.b", 1_200 * MS, 2.0), 1_200 * MS);
    let f = poll(&mut a);
    let last = f.last().unwrap();
    assert_eq!(last.ts_ns, 1_200 * MS);
    assert_eq!(last.values[1].quality, Quality::Good);
}

#[test]
fn unknown_nonnumeric_future_counted() {
    let mut c = cfg(100 * MS, 0, vec![scfg("u.a", Interpolation::Hold, 1000)]);
    c.max_future_ms = 1_000;
    let mut a = Aligner::new(&c).unwrap();
    assert_eq!(
        a.push(&sample("u.other", 0, 1.0), 0),
        PushOutcome::UnknownStream
    );
    let s = Sample::new(StreamId::intern("u.a").unwrap(), 0, Value::text("x"));
    assert_eq!(a.push(&s, 0), PushOutcome::NotNumeric);
    assert_eq!(
        a.push(&sample("u.a", 0, f64::NAN), 0),
        PushOutcome::NotNumeric
    );
    assert_eq!(a.push(&sample("u.a", 5 * S, 1.0), 0), PushOutcome::Future);
    let st = a.stats();
    assert_eq!(
        (st.unknown_stream, st.not_numeric, st.future_rejected),
        (1, 2, 1)
    );
}

#[test]
fn time_jump_is_bounded() {
    let mut c = cfg(MS, 0, vec![scfg("j.a", Interpolation::Hold, 1)]);
    c.max_pending_ticks = 100;
    let mut a = Aligner::new(&c).unwrap();
    a.push(&sample("j.a", 0, 1.0), 0);
    a.push(&sample("j.a", 1_000_000 * S, 1.0), 1_000_000 * S);
    let f = poll(&mut a);
    assert_eq!(f.len(), 100);
    assert!(a.stats().ticks_skipped > 0);
}

#[test]
fn extreme_timestamps_do_not_panic() {
    for interp in [
        Interpolation::Hold,
        Interpolation::Linear,
        Interpolation::Cubic,
    ] {
        let mut c = cfg(S, 0, vec![scfg("x.a", interp, 1)]);
        c.late_policy = LatePolicy::Reemit;
        c.max_pending_ticks = 10;
        let mut a = Aligner::new(&c).unwrap();
        let mut out = Vec::new();
        for ts in [
            i64::MIN,
            i64::MIN + 1,
            0,
            i64::MAX - 1,
            i64::MAX,
            -5,
            i64::MIN / 2,
        ] {
            a.push(&sample("x.a", ts, 1.0), ts);
            a.poll(&mut out);
        }
        assert!(
            out.iter()
                .flat_map(|f| &f.values)
                .all(|v| v.value.is_none_or(f64::is_finite))
        );
    }
}

#[test]
fn config_validation() {
    let mut c = cfg(0, 0, vec![scfg("v.a", Interpolation::Hold, 1)]);
    assert!(c.validate().unwrap_err().to_string().contains("period_ns"));
    c.period_ns = 1;
    c.streams.push(scfg("v.a", Interpolation::Hold, 1));
    assert!(c.validate().unwrap_err().to_string().contains("twice"));
    c.streams.pop();
    c.history = 1;
    assert!(c.validate().is_err());
    c.history = 8;
    assert!(c.validate().is_ok());
}

/// Clock estimate: source clock 5 s behind with +50 ppm drift; one-way delay 2 ms fixed plus an
/// exponential part with mean 5 ms (seed 0xc10c). Samples every 100 ms over 120 s; 64 buckets
/// of 1 s. Checked: drift within 10 ppm, corrected time within 2 ms of true time + 2 ms.
#[test]
fn clock_offset_and_drift_estimated_and_corrected() {
    let mut c = cfg(
        100 * MS,
        500,
        vec![AlignerStreamConfig {
            stream: "clk.a".into(),
            interpolation: Interpolation::Linear,
            stale_after_ms: 10_000,
            max_gap_ms: None,
            correct_clock: true,
        }],
    );
    c.max_future_ms = 1_000;
    let mut a = Aligner::new(&c).unwrap();
    let mut n = Noise::new(0xc10c);
    let t0 = 1_700_000_000 * S;
    let mut worst_corr = 0i64;
    for k in 0..1200 {
        let true_t = t0 + k * 100 * MS;
        let source = true_t - 5 * S + ((k * 100 * MS) as f64 * 50e-6) as i64;
        let delay = 2 * MS + (-(1.0 - n.uniform()).ln() * 5e6) as i64;
        let arrival = true_t + delay;
        assert_ne!(
            a.push(&sample("clk.a", source, 0.0), arrival),
            PushOutcome::Future
        );
        if k > 700 {
            let est = a
                .clock_estimate(StreamId::intern("clk.a").unwrap())
                .unwrap();
            let x = source - est.ref_source_ns;
            let corrected = source + (est.offset_ns + est.drift * x as f64) as i64;
            worst_corr = worst_corr.max((corrected - (true_t + 2 * MS)).abs());
        }
    }
    let est = a
        .clock_estimate(StreamId::intern("clk.a").unwrap())
        .unwrap();
    // Drift of the source clock relative to arrival: arrival − source grows at −50 ppm.
    assert!((est.drift + 50e-6).abs() < 10e-6, "drift {}", est.drift);
    assert!(worst_corr < 2 * MS, "corrected time off by {worst_corr} ns");
    // Frames come out on the arrival clock (around t0 + 60 s), not the source clock.
    let f = poll(&mut a);
    assert!(f.last().unwrap().ts_ns > t0 + 119 * S);
}

/// Linear-interpolation accuracy on `f(t) = sin(2π·0.05·t)` sampled at 1, 10 and 100 Hz.
///
/// Generator (seed 0x51e): sample k is taken at true time `k·h` with value `f(k·h)` but stamped
/// `k·h + j`, `j` uniform in ±J with J = h/10 (timestamp jitter); 5 % of samples swap arrival
/// order with their successor (out-of-order, within the allowed lateness of 3h). Tick 0.37·h.
///
/// Bound used, at every tick t between two stamps: `|L(t) − f(t)| ≤ H²/8·max|f''| + max|f'|·J`,
/// where H = largest gap between consecutive stamps (≤ h + 2J) — the classic linear
/// interpolation remainder on the stamped points, plus the value error `|f(kh) − f(kh + j)| ≤
/// max|f'|·J` at each node, which linear interpolation (a convex combination) does not amplify.
#[test]
fn linear_interpolation_error_within_analytic_bound() {
    let w = std::f64::consts::TAU * 0.05;
    let f = |t: f64| (w * t).sin();
    let (m1, m2) = (w, w * w);
    let mut n = Noise::new(0x51e);
    for rate_hz in [1.0f64, 10.0, 100.0] {
        let h = 1.0 / rate_hz;
        let jitter = h / 10.0;
        let h_ns = (h * 1e9) as i64;
        let mut c = cfg(
            (0.37 * h * 1e9) as i64,
            (3.0 * h * 1e3) as u64,
            vec![scfg("sine", Interpolation::Linear, 60_000)],
        );
        c.late_policy = LatePolicy::Drop;
        let mut a = Aligner::new(&c).unwrap();
        let count = 2_000;
        let mut samples: Vec<(i64, f64)> = (0..count)
            .map(|k| {
                let true_t = k as f64 * h;
                let stamp = 10 * h_ns
                    + k * h_ns
                    + (n.uniform() * 2.0 - 1.0).mul_add(jitter * 1e9, 0.0) as i64;
                (stamp, f(true_t))
            })
            .collect();
        let mut swaps = 0;
        let mut k = 0;
        while k + 1 < samples.len() {
            if n.uniform() < 0.05 {
                samples.swap(k, k + 1);
                swaps += 1;
                k += 2;
            } else {
                k += 1;
            }
        }
        let mut frames = Vec::new();
        for (stamp, v) in &samples {
            assert_eq!(
                a.push(&sample("sine", *stamp, *v), *stamp),
                PushOutcome::Accepted
            );
            a.poll(&mut frames);
        }
        let big_h = h + 2.0 * jitter;
        let bound = big_h * big_h / 8.0 * m2 + m1 * jitter;
        let mut worst = 0.0f64;
        let mut checked = 0;
        for fr in &frames {
            let fv = fr.values[0];
            if fv.quality != Quality::Good {
                continue;
            }
            let t = (fr.ts_ns - 10 * h_ns) as f64 / 1e9;
            let err = (fv.value.unwrap() - f(t)).abs();
            worst = worst.max(err);
            checked += 1;
        }
        eprintln!(
            "{rate_hz} Hz: {checked} frames, {swaps} swapped arrivals, worst error {worst:.3e}, bound {bound:.3e}"
        );
        assert!(checked > 400, "{checked}");
        assert_eq!(a.stats().late_dropped, 0);
        assert!(
            worst <= bound,
            "{rate_hz} Hz: error {worst} > bound {bound}"
        );
    }
}

proptest! {
    /// Any sequence of pushes (three streams, all interpolations, arbitrary order and values)
    /// yields finite values and strictly increasing timestamps for new frames, and bounded
    /// history.
    #[test]
    fn frames_finite_and_strictly_increasing(
        pushes in proptest::collection::vec((0usize..3, 0i64..5_000, -1e6f64..1e6, 0i64..50), 1..300),
        reemit in any::<bool>(),
        lateness in 0u64..300,
    ) {
        let names = ["pp.h", "pp.l", "pp.c"];
        let mut c = cfg(7 * MS, lateness, vec![
            scfg(names[0], Interpolation::Hold, 50),
            scfg(names[1], Interpolation::Linear, 100),
            scfg(names[2], Interpolation::Cubic, 200),
        ]);
        c.history = 16;
        if reemit { c.late_policy = LatePolicy::Reemit; }
        let mut a = Aligner::new(&c).unwrap();
        let mut last: Option<i64> = None;
        for (s, ts_ms, v, poll_every) in pushes {
            a.push(&sample(names[s], ts_ms * MS, v), ts_ms * MS);
            if poll_every % 3 == 0 {
                let mut out = Vec::new();
                // Now and then the time moves on (the group may be idle).
                if poll_every % 2 == 0 {
                    a.advance((ts_ms + poll_every * 10) * MS);
                }
                a.poll(&mut out);
                for f in &out {
                    for fv in &f.values {
                        if let Some(x) = fv.value { prop_assert!(x.is_finite()); }
                        prop_assert_eq!(fv.value.is_none(), fv.quality == Quality::Bad);
                    }
                    if !f.correction {
                        prop_assert!(last.is_none_or(|l| f.ts_ns > l));
                        last = Some(f.ts_ns);
                    } else {
                        prop_assert!(last.is_some_and(|l| f.ts_ns <= l));
                    }
                }
            }
            prop_assert!(a.streams.iter().all(|s| s.hist.len() <= 16));
        }
    }
}

/// A 3 s hole in every input of a 100 Hz group (stale after 1 s), the data after it pushed in
/// one go: the ticks inside the hole are not interpolated across it. Up to the staleness limit
/// after the last sample the value is held (uncertain, marked held), beyond it the stream is
/// missing; from the first sample after the hole on, values are good again.
#[test]
fn a_hole_in_every_input_is_not_bridged_by_interpolation() {
    let mut a = Aligner::new(&cfg(
        10 * MS,
        0,
        vec![
            scfg("hole.a", Interpolation::Linear, 1_000),
            scfg("hole.b", Interpolation::Cubic, 1_000),
        ],
    ))
    .unwrap();
    let mut frames = Vec::new();
    let push_range = |a: &mut Aligner, from_ms: i64, to_ms: i64| {
        for k in (from_ms / 10)..(to_ms / 10) {
            let t = k * 10 * MS;
            a.push(&sample("hole.a", t, k as f64), t);
            a.push(&sample("hole.b", t, -(k as f64)), t);
        }
    };
    push_range(&mut a, 0, 2_000);
    a.poll(&mut frames);
    // Samples stop at 1.99 s and resume at 5 s, all at once.
    push_range(&mut a, 5_000, 6_000);
    a.poll(&mut frames);
    let last_before = 1_990 * MS;
    let mut held = 0;
    let mut missing = 0;
    for f in frames
        .iter()
        .filter(|f| f.ts_ns > last_before && f.ts_ns < 5 * S)
    {
        for v in &f.values {
            assert_ne!(
                v.quality,
                Quality::Good,
                "tick {} ms interpolated across a 3 s hole: {v:?}",
                f.ts_ns / MS
            );
            if f.ts_ns - last_before <= S {
                assert!(v.held && v.value.is_some(), "{} ms: {v:?}", f.ts_ns / MS);
                held += 1;
            } else {
                assert_eq!(v.value, None, "{} ms", f.ts_ns / MS);
                missing += 1;
            }
        }
    }
    assert_eq!((held, missing), (2 * 100, 2 * 200));
    let after: Vec<_> = frames.iter().filter(|f| f.ts_ns >= 5 * S).collect();
    assert!(!after.is_empty());
    assert!(after.iter().all(|f| {
        f.values
            .iter()
            .all(|v| v.quality == Quality::Good && !v.held)
    }));
}

/// One sensor of two is silent for 2 s (stale after 1 s) while the other keeps the watermark
/// moving. When it speaks again, the ticks not yet emitted (within the allowed lateness) must
/// not get a value interpolated across its silence.
#[test]
fn the_ticks_after_a_single_silent_sensor_are_not_interpolated_across_its_silence() {
    let mut a = Aligner::new(&cfg(
        10 * MS,
        200,
        vec![
            scfg("one.a", Interpolation::Linear, 1_000),
            scfg("one.b", Interpolation::Linear, 1_000),
        ],
    ))
    .unwrap();
    let mut frames = Vec::new();
    for k in 0..400 {
        let t = k * 10 * MS;
        a.push(&sample("one.a", t, 0.0), t);
        // b is silent from 1 s to 3 s.
        if !(100..300).contains(&k) {
            a.push(&sample("one.b", t, k as f64), t);
        }
        a.poll(&mut frames);
    }
    let bad: Vec<_> = frames
        .iter()
        .filter(|f| f.ts_ns > 990 * MS && f.ts_ns < 3 * S)
        .filter(|f| f.values[1].quality == Quality::Good)
        .map(|f| f.ts_ns / MS)
        .collect();
    assert!(
        bad.is_empty(),
        "ticks interpolated across b's silence: {bad:?}"
    );
    // Beyond the staleness limit the silent sensor is missing, right up to its new sample.
    let f = frames.iter().find(|f| f.ts_ns == 2_990 * MS).unwrap();
    assert_eq!(f.values[1].value, None);
    let f = frames.iter().find(|f| f.ts_ns == 3 * S).unwrap();
    assert_eq!(f.values[1].quality, Quality::Good);
}

/// Every input silent: without the time, nothing is emitted past the newest sample. With
/// `advance(now)` the watermark moves on with the arrival clock once the group has been idle
/// for `idle_timeout`: the ticks of the silence are emitted (held, then stale), the watermark
/// never moves back, and a sample behind it is late.
#[test]
fn an_idle_group_moves_on_with_the_arrival_clock() {
    let mut c = cfg(
        100 * MS,
        100,
        vec![
            scfg("idle.a", Interpolation::Linear, 500),
            scfg("idle.b", Interpolation::Hold, 500),
        ],
    );
    c.idle_timeout_ms = Some(300);
    let mut a = Aligner::new(&c).unwrap();
    // Source clock 7 s behind the arrival clock, 20 ms of delay.
    let arrival = |ts: i64| ts + 7 * S + 20 * MS;
    for k in 0..=10 {
        let t = k * 100 * MS;
        a.push(&sample("idle.a", t, k as f64), arrival(t));
        a.push(&sample("idle.b", t, 1.0), arrival(t));
    }
    let mut frames = Vec::new();
    a.poll(&mut frames);
    assert_eq!(frames.last().unwrap().ts_ns, 900 * MS);
    assert_eq!(a.watermark(), Some(900 * MS));
    // Not idle long enough: nothing moves.
    a.advance(arrival(S) + 299 * MS);
    a.poll(&mut frames);
    assert_eq!(frames.len(), 10);
    // 2 s of silence on the arrival clock: watermark = 1 s + 2 s − 100 ms.
    a.advance(arrival(S) + 2 * S);
    assert_eq!(a.watermark(), Some(2_900 * MS));
    a.poll(&mut frames);
    let ts: Vec<i64> = frames[10..].iter().map(|f| f.ts_ns / MS).collect();
    assert_eq!(ts, (10..=29).map(|k| k * 100).collect::<Vec<_>>());
    for f in &frames[10..] {
        let age = f.ts_ns - S;
        for v in &f.values {
            if age == 0 {
                assert_eq!((v.quality, v.held), (Quality::Good, false));
            } else if age <= 500 * MS {
                assert_eq!((v.quality, v.held), (Quality::Uncertain, true), "{f:?}");
            } else {
                assert_eq!((v.value, v.quality), (None, Quality::Bad), "{f:?}");
            }
        }
    }
    // An earlier time changes nothing; a sample behind the watermark is late.
    a.advance(arrival(S));
    assert_eq!(a.watermark(), Some(2_900 * MS));
    assert_eq!(
        a.push(&sample("idle.a", 2_500 * MS, 0.0), arrival(3 * S)),
        PushOutcome::LateDropped
    );
    // Data resumes at 3 s: good frames again from there.
    for k in 30..=35 {
        let t = k * 100 * MS;
        a.push(&sample("idle.a", t, k as f64), arrival(t));
        a.push(&sample("idle.b", t, 2.0), arrival(t));
    }
    frames.clear();
    a.poll(&mut frames);
    assert_eq!(frames.first().unwrap().ts_ns, 3 * S);
    assert!(
        frames
            .iter()
            .all(|f| f.values.iter().all(|v| v.quality == Quality::Good))
    );
}

/// A tick gets the same value whether it is emitted during a silence (the group idle, the
/// time advancing) or only after the data that ends the silence arrived in one go.
#[test]
fn a_silence_gives_the_same_frames_polled_during_it_or_after_it() {
    let mut c = cfg(
        50 * MS,
        0,
        vec![
            scfg("same.a", Interpolation::Cubic, 400),
            scfg("same.b", Interpolation::Linear, 800),
        ],
    );
    c.streams[1].max_gap_ms = Some(300);
    let mut during = Aligner::new(&c).unwrap();
    let mut after = Aligner::new(&c).unwrap();
    let (mut fd, mut fa) = (Vec::new(), Vec::new());
    let data = |k: i64| {
        let t = k * 20 * MS;
        [
            ("same.a", t, (k as f64 * 0.1).sin()),
            ("same.b", t, k as f64),
        ]
    };
    // 0-2 s, a 3 s silence, 5-6 s; sample every 20 ms; a 250 ms gap in b alone at 1 s.
    let keep = |k: i64| !(100..250).contains(&k);
    for now_ms in (0..6_000).step_by(10) {
        let now = now_ms * MS;
        if now % (20 * MS) == 0 && keep(now / (20 * MS)) {
            for (name, t, v) in data(now / (20 * MS)) {
                if name == "same.b" && (50..62).contains(&(now / (20 * MS))) {
                    continue;
                }
                during.push(&sample(name, t, v), t);
                after.push(&sample(name, t, v), t);
            }
        }
        during.advance(now);
        during.poll(&mut fd);
        if !(2 * S..5_500 * MS).contains(&now) {
            after.advance(now);
            after.poll(&mut fa);
        }
    }
    assert!(fd.len() > 100);
    assert_eq!(fd, fa);
    // b's 250 ms gap is within its max_gap of 300 ms: interpolated, good.
    let f = fd.iter().find(|f| f.ts_ns == 1_100 * MS).unwrap();
    assert_eq!(
        (f.values[1].quality, f.values[1].held),
        (Quality::Good, false)
    );
}

/// `max_gap` shorter than `stale_after`: a gap up to it is interpolated, a longer one is held.
#[test]
fn max_gap_bounds_what_interpolation_bridges() {
    let mut c = cfg(
        100 * MS,
        0,
        vec![scfg("mg.a", Interpolation::Linear, 5_000)],
    );
    c.streams[0].max_gap_ms = Some(1_000);
    let mut a = Aligner::new(&c).unwrap();
    for (t, v) in [(0, 0.0), (S, 10.0), (3 * S, 30.0), (4 * S, 40.0)] {
        a.push(&sample("mg.a", t, v), t);
    }
    let frames = poll(&mut a);
    let at = |ms: i64| frames.iter().find(|f| f.ts_ns == ms * MS).unwrap().values[0];
    assert_eq!(at(500).value, Some(5.0));
    assert_eq!((at(500).quality, at(500).held), (Quality::Good, false));
    // 1 s → 3 s is longer than max_gap: held at 10, uncertain.
    assert_eq!(at(2_500).value, Some(10.0));
    assert_eq!(
        (at(2_500).quality, at(2_500).held),
        (Quality::Uncertain, true)
    );
    assert_eq!(at(3_500).value, Some(35.0));
    let mut bad = cfg(100 * MS, 0, vec![scfg("mg.b", Interpolation::Linear, 500)]);
    bad.streams[0].max_gap_ms = Some(501);
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("max_gap_ms")
    );
    bad.streams[0].max_gap_ms = Some(0);
    assert!(bad.validate().is_err());
    bad.streams[0].max_gap_ms = None;
    bad.idle_timeout_ms = Some(0);
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("idle_timeout_ms")
    );
}
