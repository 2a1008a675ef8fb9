use super::*;
use crate::gateway::Gateway;
use outpost_runtime::config::Config;
use outpost_runtime::record;
use serde_json::json;

const MS: i64 = 1_000_000;

fn group(v: serde_json::Value) -> FusionGroupConfig {
    serde_json::from_value(v).unwrap()
}

/// A gateway config with no devices, metrics off, data in `dir`, and these groups.
fn gateway_config(dir: &std::path::Path, groups: serde_json::Value) -> Config {
    serde_json::from_value(json!({
        "gateway": { "id": "fusion-test", "data_dir": dir },
        "metrics": { "enabled": false },
        "fusion": groups,
    }))
    .unwrap()
}

/// A base time 60 s in the past on a whole second, so no sample is "from the future".
fn base() -> TimestampNs {
    (now_ns() / 1_000_000_000 - 60) * 1_000_000_000
}

/// Samples of `stream` in the outbox's `class`, in order.
fn outbox_samples(gw: &Gateway, class: Priority, stream: StreamId) -> Vec<Sample> {
    gw.outbox()
        .scan(class, None, 100_000, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| record::decode(&r.value).unwrap())
        .filter(|s| s.stream == stream)
        .collect()
}

/// Waits (up to 10 s) until `pred` holds on the samples of `stream` in `class`.
async fn wait_for(
    gw: &Gateway,
    class: Priority,
    stream: StreamId,
    pred: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = outbox_samples(gw, class, stream);
        if pred(&got) {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out; have {} samples of {stream}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn weighted_average_group_fuses_frames_and_counts_exclusions() {
    let mut g = FusionGroup::new(&group(json!({
        "name": "unit-wavg",
        "inputs": ["fa/u/a", "fa/u/b", "fa/u/c"],
        "output": "fa/u/out",
        "tick": "100ms",
        "allowed_lateness": "0ms",
        "weighted_average": { "variances": [1.0, 1.0, 4.0] },
    })))
    .unwrap();
    let ids: Vec<StreamId> = g.inputs().to_vec();
    let t0 = base();
    for k in 0..=10 {
        let t = t0 + k * 100 * MS;
        g.push(&Sample::new(ids[0], t, Value::F64(10.0)), t);
        g.push(&Sample::new(ids[1], t, Value::F64(10.2)), t);
        // Sensor c: an outlier on every other tick.
        let c = if k % 2 == 0 { 99.0 } else { 10.4 };
        g.push(&Sample::new(ids[2], t, Value::F64(c)), t);
    }
    // Polled right after the last sample arrived.
    let out = g.poll(t0 + 10 * 100 * MS);
    assert!(out.alarms.is_empty());
    let out_id = StreamId::intern("fa/u/out").unwrap();
    assert_eq!(out.samples.len(), 11, "{out:?}");
    for (k, s) in out.samples.iter().enumerate() {
        assert_eq!(s.stream, out_id);
        assert_eq!(s.ts_ns, t0 + k as i64 * 100 * MS, "stamped with the tick");
        let v = s.value.as_f64().unwrap();
        let want = if k % 2 == 0 {
            10.1 // c excluded: a and b weigh the same
        } else {
            (10.0 + 10.2 + 10.4 / 4.0) / 2.25
        };
        assert!((v - want).abs() < 1e-9, "tick {k}: {v} vs {want}");
        assert_eq!(s.quality, Quality::Good);
    }
    let st = g.stats();
    assert_eq!(st.frames, 11);
    assert_eq!(st.rejections, 6);
    assert_eq!(st.stale, 0);
}

#[test]
fn attitude_group_outputs_roll_and_pitch_in_degrees() {
    let mut g = FusionGroup::new(&group(json!({
        "name": "unit-att",
        "inputs": ["fa/att/gx", "fa/att/gy", "fa/att/gz", "fa/att/ax", "fa/att/ay", "fa/att/az"],
        "outputs": ["fa/att/roll", "fa/att/pitch"],
        "tick": "10ms",
        "allowed_lateness": "0ms",
        "madgwick": { "beta": 0.5 },
    })))
    .unwrap();
    let ids = g.inputs().to_vec();
    // At rest, tilted: roll 30°, pitch 0 (gravity in the y-z plane).
    let (ay, az) = (30f64.to_radians().sin(), 30f64.to_radians().cos());
    let t0 = base();
    for k in 0..200 {
        let t = t0 + k * 10 * MS;
        for (i, v) in [0.0, 0.0, 0.0, 0.0, ay * 9.81, az * 9.81]
            .iter()
            .enumerate()
        {
            g.push(&Sample::new(ids[i], t, Value::F64(*v)), t);
        }
    }
    let out = g.poll(t0 + 199 * 10 * MS);
    let roll = StreamId::intern("fa/att/roll").unwrap();
    let pitch = StreamId::intern("fa/att/pitch").unwrap();
    let last = |id| {
        out.samples
            .iter()
            .rev()
            .find(|s| s.stream == id)
            .and_then(|s| s.value.as_f64())
            .unwrap()
    };
    assert!((last(roll) - 30.0).abs() < 0.5, "roll {}", last(roll));
    assert!(last(pitch).abs() < 0.5, "pitch {}", last(pitch));
}

#[test]
fn majority_vote_holds_discrete_inputs() {
    let mut g = FusionGroup::new(&group(json!({
        "name": "unit-maj",
        "inputs": ["fa/maj/a", "fa/maj/b", "fa/maj/c"],
        "output": "fa/maj/out",
        "tick": "100ms",
        "allowed_lateness": "0ms",
        "interpolation": "linear",
        "voting": { "method": "majority", "faults": 1, "fault_frames": 2 },
    })))
    .unwrap();
    let ids = g.inputs().to_vec();
    let t0 = base();
    // Samples between ticks: held (not interpolated to 0.5).
    for k in 0..6 {
        let t = t0 + k * 100 * MS + 50 * MS;
        g.push(&Sample::new(ids[0], t, Value::Bool(true)), t);
        g.push(&Sample::new(ids[1], t, Value::Bool(true)), t);
        g.push(&Sample::new(ids[2], t, Value::Bool(false)), t);
    }
    let out = g.poll(t0 + 550 * MS);
    assert!(!out.samples.is_empty());
    assert!(
        out.samples.iter().all(|s| s.value == Value::I64(1)),
        "{out:?}"
    );
    assert_eq!(out.alarms.len(), 1);
    assert_eq!(out.alarms[0].value, Value::text("fa/maj/c"));
    assert_eq!(
        out.alarms[0].stream,
        StreamId::intern("unit-maj/alarm").unwrap()
    );
    assert_eq!(g.stats().faulty, 1);
}

/// Through a real gateway (no devices): input samples submitted to ingest reach the group over
/// the bus, and the Kalman-smoothed temperature appears in the outbox as its own stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kalman_group_output_lands_in_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = gateway_config(
        dir.path(),
        json!([{
            "name": "it-kf",
            "inputs": ["fa/kf/temp"],
            "output": "fa/kf/temp_kf",
            "tick": "100ms",
            "allowed_lateness": "0ms",
            "kalman": { "model": "constant_velocity", "process_noise": 0.01,
                        "measurement_std": 0.5, "gate": "0.999" },
        }]),
    );
    let gw = Gateway::start(&cfg, Metrics::new()).await.unwrap();
    let input = StreamId::intern("fa/kf/temp").unwrap();
    let output = StreamId::intern("fa/kf/temp_kf").unwrap();
    let t0 = base();
    // A slow ramp 20 → 25 °C with ±0.4 alternating noise and one wild spike (gated out).
    let truth = |k: i64| 20.0 + 0.01 * k as f64;
    let mut samples = Vec::new();
    for k in 0..500 {
        let noise = if k % 2 == 0 { 0.4 } else { -0.4 };
        let v = if k == 300 { 500.0 } else { truth(k) + noise };
        samples.push(Sample::new(input, t0 + k * 100 * MS, Value::F64(v)));
    }
    for chunk in samples.chunks(50) {
        gw.ingest()
            .submit(Priority::Normal, chunk.to_vec())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = wait_for(&gw, Priority::Normal, output, |s| s.len() >= 499).await;
    // Stamped with the ticks, strictly increasing.
    assert!(got.windows(2).all(|w| w[0].ts_ns < w[1].ts_ns));
    assert_eq!(got[0].ts_ns, t0);
    // Smoothed: after convergence, well inside the ±0.4 noise, and the spike did not pass.
    for s in &got[100..] {
        let k = (s.ts_ns - t0) / (100 * MS);
        let v = s.value.as_f64().unwrap();
        assert!((v - truth(k)).abs() < 0.25, "tick {k}: {v} vs {}", truth(k));
    }
    let m = gw.metrics();
    assert!(m.counter_value("outpost_fusion_frames", &[("group", "it-kf")]) >= 499);
    assert!(m.counter_value("outpost_fusion_rejections", &[("group", "it-kf")]) >= 1);
    gw.shutdown().await.unwrap();
}

/// A stuck sensor among four (Brooks–Iyengar, f = 1) is flagged within K frames and raises
/// one critical alarm sample naming it; the voted value follows the honest sensors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_sensor_raises_a_critical_alarm_sample() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = gateway_config(
        dir.path(),
        json!([{
            "name": "it-vote",
            "inputs": ["fa/vote/s0", "fa/vote/s1", "fa/vote/s2", "fa/vote/s3"],
            "output": "fa/vote/out",
            "tick": "100ms",
            "allowed_lateness": "0ms",
            "voting": { "method": "brooks_iyengar", "faults": 1, "fault_frames": 3,
                        "uncertainty": [0.5] },
        }]),
    );
    let gw = Gateway::start(&cfg, Metrics::new()).await.unwrap();
    let ids: Vec<StreamId> = (0..4)
        .map(|i| StreamId::intern(&format!("fa/vote/s{i}")).unwrap())
        .collect();
    let t0 = base();
    let mut samples = Vec::new();
    for k in 0..40 {
        let t = t0 + k * 100 * MS;
        let truth = 50.0 + 0.05 * k as f64;
        for (i, id) in ids.iter().enumerate() {
            let v = match i {
                3 if k >= 10 => 12.0, // stuck from tick 10 on
                _ => truth + 0.1 * i as f64,
            };
            samples.push(Sample::new(*id, t, Value::F64(v)));
        }
    }
    gw.ingest().submit(Priority::Normal, samples).await.unwrap();
    let alarm = StreamId::intern("it-vote/alarm").unwrap();
    let alarms = wait_for(&gw, Priority::Critical, alarm, |s| !s.is_empty()).await;
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(alarms[0].value, Value::text("fa/vote/s3"));
    // Flagged on the 3rd out-voted frame: tick 12.
    assert_eq!(alarms[0].ts_ns, t0 + 12 * 100 * MS);
    let out = StreamId::intern("fa/vote/out").unwrap();
    let voted = wait_for(&gw, Priority::Normal, out, |s| s.len() >= 39).await;
    for s in &voted {
        let k = (s.ts_ns - t0) / (100 * MS);
        let v = s.value.as_f64().unwrap();
        let truth = 50.0 + 0.05 * k as f64;
        assert!(v >= truth - 0.01 && v <= truth + 0.21, "tick {k}: {v}");
    }
    assert!(
        outbox_samples(&gw, Priority::Normal, alarm).is_empty(),
        "alarms are critical, not normal"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = gw.metrics().encode();
    assert!(
        text.contains("outpost_fusion_faulty_sensors{group=\"it-vote\"} 1"),
        "{text}"
    );
    gw.shutdown().await.unwrap();
}

#[test]
fn a_group_with_wrong_counts_is_refused() {
    let e = FusionGroup::new(&group(json!({
        "name": "bad",
        "inputs": ["fa/bad/a"],
        "outputs": ["fa/bad/roll"],
        "tick": "100ms",
        "complementary": {},
    })))
    .unwrap_err();
    assert!(
        e.to_string().contains("complementary needs 2 output"),
        "{e}"
    );
}

/// GPS + IMU in two axes: inputs are the positions, then the accelerations; one output per
/// axis. Noise-free constant acceleration (1, −0.5) m/s² from rest is tracked closely.
#[test]
fn gps_imu_group_tracks_each_axis() {
    let mut g = FusionGroup::new(&group(json!({
        "name": "unit-gi",
        "inputs": ["fa/gi/px", "fa/gi/py", "fa/gi/ax", "fa/gi/ay"],
        "outputs": ["fa/gi/x", "fa/gi/y"],
        "tick": "100ms",
        "allowed_lateness": "0ms",
        "kalman": { "model": "gps_imu", "axes": 2, "process_noise": 0.1,
                    "measurement_std": 1.0, "gate": "0.999" },
    })))
    .unwrap();
    let ids = g.inputs().to_vec();
    let t0 = base();
    let acc = [1.0, -0.5];
    for k in 0..100 {
        let t = t0 + k * 100 * MS;
        let ts = k as f64 * 0.1;
        for a in 0..2 {
            let p = 0.5 * acc[a] * ts * ts;
            g.push(&Sample::new(ids[a], t, Value::F64(p)), t);
            g.push(&Sample::new(ids[2 + a], t, Value::F64(acc[a])), t);
        }
    }
    let out = g.poll(t0 + 99 * 100 * MS);
    let x = StreamId::intern("fa/gi/x").unwrap();
    let y = StreamId::intern("fa/gi/y").unwrap();
    assert_eq!(out.samples.iter().filter(|s| s.stream == x).count(), 100);
    assert_eq!(out.samples.iter().filter(|s| s.stream == y).count(), 100);
    let last = |id| {
        out.samples
            .iter()
            .rev()
            .find(|s| s.stream == id)
            .unwrap()
            .value
            .as_f64()
            .unwrap()
    };
    let tl: f64 = 9.9;
    assert!((last(x) - 0.5 * tl * tl).abs() < 0.3, "x {}", last(x));
    assert!((last(y) + 0.25 * tl * tl).abs() < 0.3, "y {}", last(y));
    assert_eq!(g.stats().rejections, 0);
}

/// Through a real gateway: when the only input of a Kalman group falls silent, the group's
/// timer moves its watermark on, so the filter keeps predicting (uncertain outputs past the
/// last measurement) until `max_dt_s` after it, then restarts and says nothing until the
/// next measurement initialises it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kalman_group_predicts_through_a_dropout_then_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = gateway_config(
        dir.path(),
        json!([{
            "name": "it-kf-gap",
            "inputs": ["fa/kfgap/pos"],
            "output": "fa/kfgap/pos_kf",
            "tick": "100ms",
            "allowed_lateness": "100ms",
            "stale_after": "300ms",
            "kalman": { "model": "constant_velocity", "process_noise": 0.1,
                        "measurement_std": 0.5, "max_dt_s": 1.0 },
        }]),
    );
    let gw = Gateway::start(&cfg, Metrics::new()).await.unwrap();
    let input = StreamId::intern("fa/kfgap/pos").unwrap();
    let output = StreamId::intern("fa/kfgap/pos_kf").unwrap();
    // Ten samples stamped with the time they are sent, 50 ms apart.
    let mut last = 0;
    for k in 0..10 {
        last = now_ns();
        let s = Sample::new(input, last, Value::F64(k as f64));
        gw.ingest().submit(Priority::Normal, vec![s]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Predict-only steps up to 1 s after the last measurement: ten ticks.
    let got = wait_for(&gw, Priority::Normal, output, |s| {
        s.iter().filter(|s| s.ts_ns > last).count() >= 10
    })
    .await;
    let gap: Vec<&Sample> = got.iter().filter(|s| s.ts_ns > last).collect();
    assert!(
        gap.iter().all(|s| s.quality == Quality::Uncertain),
        "{gap:?}"
    );
    // Past max_dt_s the filter restarts: nothing more until a measurement comes.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got = outbox_samples(&gw, Priority::Normal, output);
    let late: Vec<_> = got.iter().filter(|s| s.ts_ns > last + 1_000 * MS).collect();
    assert!(late.is_empty(), "outputs after the restart: {late:?}");
    // New measurements start it again, from the first of them.
    let resume = now_ns();
    for _ in 0..5 {
        let s = Sample::new(input, now_ns(), Value::F64(100.0));
        gw.ingest().submit(Priority::Normal, vec![s]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = wait_for(&gw, Priority::Normal, output, |s| {
        s.iter().any(|s| s.ts_ns >= resume)
    })
    .await;
    let first = got.iter().find(|s| s.ts_ns >= resume).unwrap();
    assert!(
        (first.value.as_f64().unwrap() - 100.0).abs() < 1e-9,
        "{first:?}"
    );
    assert!(
        gw.metrics()
            .counter_value("outpost_fusion_restarts", &[("group", "it-kf-gap")])
            >= 1
    );
    gw.shutdown().await.unwrap();
}

/// The figure for a dropout: a 5 Hz position track (1-D, constant velocity 2 m/s, noise
/// σ = 0.5 m, seed 0xd209) with a 15 s hole, through a Kalman group (tick 200 ms, stale_after
/// 5 s, max_dt_s 10 s). The group is polled every 100 ms of a simulated gateway clock.
/// During the hole the filter predicts only: uncertain outputs whose standard deviation (the
/// `std_outputs` stream) grows at every tick, until 10 s after the last measurement; then it
/// restarts and says nothing until the track resumes and initialises it again.
#[test]
fn kalman_dropout_predicts_with_growing_uncertainty_then_restarts() {
    let cfg = group(json!({
        "name": "unit-kf-drop",
        "inputs": ["fa/drop/pos"],
        "output": "fa/drop/pos_kf",
        "std_outputs": ["fa/drop/pos_std"],
        "tick": "200ms",
        "allowed_lateness": "100ms",
        "kalman": { "model": "constant_velocity", "process_noise": 0.05,
                    "measurement_std": 0.5 },
    }));
    let run = |poll_during_hole: bool| {
        let mut g = FusionGroup::new(&cfg).unwrap();
        let id = g.inputs()[0];
        let mut noise = crate::fusion::sim::Noise::new(0xd209);
        let t0 = base();
        let mut out = GroupOutput::default();
        for step in 0..400 {
            // Simulated gateway clock, 100 ms a step; samples arrive 30 ms after their stamp.
            let now = t0 + step * 100 * MS;
            if step % 2 == 0 {
                let t = now - 30 * MS;
                let secs = (t - t0) as f64 / 1e9;
                let in_hole = (10.0..25.0).contains(&secs);
                if !in_hole {
                    let v = 2.0 * secs + noise.normal(0.5);
                    g.push(&Sample::new(id, t, Value::F64(v)), now);
                }
            }
            let hole = (10 * 1_000 * MS..25 * 1_000 * MS).contains(&(now - t0));
            if poll_during_hole || !hole {
                let o = g.poll(now);
                out.samples.extend(o.samples);
            }
        }
        (out, g.stats(), t0)
    };
    let (out, stats, t0) = run(true);
    let pos = StreamId::intern("fa/drop/pos_kf").unwrap();
    let sd = StreamId::intern("fa/drop/pos_std").unwrap();
    let of = |id| -> Vec<(f64, f64, Quality)> {
        out.samples
            .iter()
            .filter(|s| s.stream == id)
            .map(|s| {
                let t = (s.ts_ns - t0) as f64 / 1e9;
                (t, s.value.as_f64().unwrap(), s.quality)
            })
            .collect()
    };
    let (p, s) = (of(pos), of(sd));
    assert_eq!(p.len(), s.len());
    // The last sample before the hole is stamped 9.97 s; the first after it 25.17 s.
    let last_meas = 9.97;
    let in_gap: Vec<_> = s
        .iter()
        .filter(|(t, ..)| *t > last_meas && *t < 25.0)
        .collect();
    eprintln!("kalman through a 15 s dropout (tick 200 ms, max_dt_s 10):");
    eprintln!("  t (s)   position   std (m)   quality");
    for (i, (t, v, q)) in s.iter().enumerate() {
        let show = (*t > 8.9 && *t < 26.0 && (t.fract() < 0.05 || *t > 19.5)) || i == 0;
        if show {
            let pv = p[i].1;
            eprintln!("  {t:6.1}  {pv:9.3}  {v:8.3}   {q:?}");
        }
    }
    // Predict-only ticks 10.0 .. 19.8 s: 50 of them, uncertain, std strictly growing.
    assert_eq!(in_gap.len(), 50, "{in_gap:?}");
    assert!(in_gap.iter().all(|(_, _, q)| *q == Quality::Uncertain));
    assert!(in_gap.windows(2).all(|w| w[1].1 > w[0].1), "{in_gap:?}");
    let before = s.iter().rev().find(|(t, ..)| *t <= last_meas).unwrap();
    let worst = in_gap.last().unwrap();
    eprintln!(
        "  std {:.3} m at the last measurement, {:.3} m after {:.1} s of prediction",
        before.1,
        worst.1,
        worst.0 - last_meas
    );
    assert!(worst.1 > 10.0 * before.1);
    assert!(worst.0 < last_meas + 10.0);
    // Restarted once; the first output after the hole is a fresh start from a measurement.
    assert_eq!(stats.restarts, 1);
    let first_after = p.iter().find(|(t, ..)| *t >= 25.0).unwrap();
    assert!(
        (first_after.1 - 2.0 * first_after.0).abs() < 2.0,
        "{first_after:?}"
    );
    let sd_after = s.iter().find(|(t, ..)| *t >= 25.0).unwrap();
    assert!(
        (sd_after.1 - 0.5).abs() < 1e-9,
        "initialised from one measurement: {sd_after:?}"
    );
    // The same outputs when nothing polls the group during the hole (the data after it then
    // arrives as the first thing the group sees again).
    let (late, late_stats, _) = run(false);
    assert_eq!(late.samples, out.samples);
    assert_eq!(late_stats.restarts, 1);
}

/// An attitude filter does not integrate a gyroscope held past its last sample: a frame with
/// a held input is skipped, like a frame with a missing one.
#[test]
fn attitude_skips_frames_with_held_inputs() {
    let mut g = FusionGroup::new(&group(json!({
        "name": "unit-att-held",
        "inputs": ["fa/ah/gx", "fa/ah/gy", "fa/ah/gz", "fa/ah/ax", "fa/ah/ay", "fa/ah/az"],
        "outputs": ["fa/ah/roll", "fa/ah/pitch"],
        "tick": "10ms",
        "allowed_lateness": "0ms",
        "stale_after": "500ms",
        "max_gap": "50ms",
        "complementary": { "time_constant_s": 1000.0 },
    })))
    .unwrap();
    let ids = g.inputs().to_vec();
    let t0 = base();
    // Level and still, but the roll gyro reads 1 rad/s once and then falls silent for 300 ms
    // while the other inputs continue.
    for k in 0..=60 {
        let t = t0 + k * 10 * MS;
        for (i, v) in [1.0, 0.0, 0.0, 0.0, 0.0, 9.81].iter().enumerate() {
            if i == 0 && (1..31).contains(&k) {
                continue;
            }
            let v = if i == 0 && k > 0 { 0.0 } else { *v };
            g.push(&Sample::new(ids[i], t, Value::F64(v)), t);
        }
    }
    let out = g.poll(t0 + 600 * MS);
    let roll = StreamId::intern("fa/ah/roll").unwrap();
    let rolls: Vec<&Sample> = out.samples.iter().filter(|s| s.stream == roll).collect();
    // No output inside the gyro's silence (held values are no measurement)...
    assert!(
        rolls
            .iter()
            .all(|s| s.ts_ns <= t0 || s.ts_ns >= t0 + 300 * MS),
        "{rolls:?}"
    );
    // ...and the 1 rad/s of the single sample was not integrated over 300 ms (17°).
    let last = rolls.last().unwrap().value.as_f64().unwrap();
    assert!(last.abs() < 1.0, "roll {last}°");
}

/// Accelerometer corrections the complementary filter skips are counted as the group's
/// rejections (outpost_fusion_rejections), measured against 1 g in the configured unit.
#[test]
fn skipped_accelerometer_corrections_are_counted() {
    for (gravity, unit) in [(None, 9.80665), (Some(1.0), 1.0)] {
        let mut c = json!({ "accel_rejection": 0.1 });
        if let Some(g) = gravity {
            c["gravity"] = json!(g);
        }
        let mut g = FusionGroup::new(&group(json!({
            "name": "unit-att-rej",
            "inputs": ["fa/ar/gx", "fa/ar/gy", "fa/ar/gz", "fa/ar/ax", "fa/ar/ay", "fa/ar/az"],
            "outputs": ["fa/ar/roll", "fa/ar/pitch"],
            "tick": "10ms",
            "allowed_lateness": "0ms",
            "complementary": c,
        })))
        .unwrap();
        let ids = g.inputs().to_vec();
        let t0 = base();
        // Level; a 1.5 g bump on 20 of 100 frames (not the first).
        let mut bumps = 0;
        for k in 0..100 {
            let t = t0 + k * 10 * MS;
            let az = if k % 5 == 1 { 1.5 * unit } else { unit };
            bumps += u64::from(k % 5 == 1);
            for (i, v) in [0.0, 0.0, 0.0, 0.0, 0.0, az].iter().enumerate() {
                g.push(&Sample::new(ids[i], t, Value::F64(*v)), t);
            }
        }
        g.poll(t0 + 99 * 10 * MS);
        assert_eq!(bumps, 20);
        assert_eq!(g.stats().rejections, bumps, "gravity {gravity:?}");
    }
}

/// A weighted-average group flags a sensor stuck at a wrong value like voting does: one
/// critical alarm sample naming it on `<group>/alarm`, the faulty gauge at 1, and the fused
/// value without it even where the true signal passes the stuck value.
#[test]
fn weighted_average_flags_a_stuck_sensor_with_an_alarm() {
    let mut g = FusionGroup::new(&group(json!({
        "name": "unit-wavg-stuck",
        "inputs": ["fa/ws/a", "fa/ws/b", "fa/ws/c", "fa/ws/d"],
        "output": "fa/ws/out",
        "tick": "100ms",
        "allowed_lateness": "0ms",
        "weighted_average": { "variances": [0.01], "fault_window": 10, "recover_frames": 30 },
    })))
    .unwrap();
    let ids = g.inputs().to_vec();
    let t0 = base();
    let truth = |k: i64| 20.0 + 5.0 * (k as f64 * 0.05).sin();
    for k in 0..200 {
        let t = t0 + k * 100 * MS;
        for (i, id) in ids.iter().enumerate() {
            // d sticks at 22 from tick 20 on; the truth crosses 22 many times.
            let v = if i == 3 && k >= 20 {
                22.0
            } else {
                truth(k) + 0.01 * i as f64
            };
            g.push(&Sample::new(*id, t, Value::F64(v)), t);
        }
    }
    let out = g.poll(t0 + 199 * 100 * MS);
    assert_eq!(out.alarms.len(), 1, "{:?}", out.alarms);
    assert_eq!(out.alarms[0].value, Value::text("fa/ws/d"));
    assert_eq!(
        out.alarms[0].stream,
        StreamId::intern("unit-wavg-stuck/alarm").unwrap()
    );
    let flagged_at = (out.alarms[0].ts_ns - t0) / (100 * MS);
    assert!(
        (20..40).contains(&flagged_at),
        "flagged at tick {flagged_at}"
    );
    assert_eq!(g.stats().faulty, 1);
    // After the flag the fused value is the healthy sensors' mean (truth + 0.01).
    for s in out.samples.iter().filter(|s| s.ts_ns > out.alarms[0].ts_ns) {
        let k = (s.ts_ns - t0) / (100 * MS);
        let v = s.value.as_f64().unwrap();
        assert!((v - truth(k) - 0.01).abs() < 1e-9, "tick {k}: {v}");
    }
}

/// Every input of a voting group silent: the group's time moves on and its inputs go stale,
/// but a tick with no reading at all is nothing to vote on, not a failed vote.
#[test]
fn a_silent_voting_group_counts_no_errors() {
    let mut g = FusionGroup::new(&group(json!({
        "name": "unit-vote-silent",
        "inputs": ["fa/vs/a", "fa/vs/b", "fa/vs/c"],
        "output": "fa/vs/out",
        "tick": "100ms",
        "allowed_lateness": "0ms",
        "stale_after": "300ms",
        "voting": { "method": "median", "faults": 1, "uncertainty": [1.0] },
    })))
    .unwrap();
    let ids = g.inputs().to_vec();
    let t0 = base();
    for k in 0..10 {
        let t = t0 + k * 100 * MS;
        for id in &ids {
            g.push(&Sample::new(*id, t, Value::F64(1.0)), t);
        }
    }
    g.poll(t0 + 900 * MS);
    let frames = g.stats().frames;
    // 5 s of silence, polled every 100 ms.
    for k in 10..60 {
        g.poll(t0 + k * 100 * MS);
    }
    let st = g.stats();
    assert!(st.frames > frames + 40, "{st:?}");
    assert_eq!(st.stale, 3);
    assert_eq!(st.errors, 0, "{st:?}");
}
