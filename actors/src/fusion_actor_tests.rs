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
    let out = g.poll();
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
    let out = g.poll();
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
    let out = g.poll();
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
    let out = g.poll();
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
