//! Cross-checks the fusion cores against independent Python implementations.
//!
//! - Kalman: the same inputs through `filterpy.kalman.KalmanFilter` must give the same states
//!   and covariances to 1e-9 relative (1-D, 2-D constant velocity, 6-state GPS+IMU, and a
//!   constant-velocity track with a dropout of predict-only steps; no gating).
//! - Attitude: the complementary and Madgwick filters and `imufusion` (x-io Fusion, a different
//!   algorithm) run on the same simulated IMU data; the RMS errors are printed side by side.
//!
//! The interpreter is `OUTPOST_PYTHON` (a venv with `hil-tests/requirements.txt`); without it
//! the tests fail with the install step. Data goes to the scripts in `hil-tests/py/` as JSON on
//! stdin; results come back as JSON on stdout.

use std::io::Write;
use std::process::{Command, Stdio};

use nalgebra::Vector3;
use nalgebra::{SMatrix, SVector};
use outpost_actors::fusion::complementary::{
    Complementary, ComplementaryConfig, Madgwick, MadgwickConfig, wrap_pi,
};
use outpost_actors::fusion::kalman::{KalmanFilter, MotionModel, kinematic_matrices};
use serde_json::{Value, json};

const INSTALL: &str = "OUTPOST_PYTHON is not set. Create the test venv with \
`python3 -m venv hil-tests/.venv && hil-tests/.venv/bin/pip install -r hil-tests/requirements.txt`, \
then run with `OUTPOST_PYTHON=hil-tests/.venv/bin/python` (absolute path, or relative to the \
workspace root).";

fn python() -> std::path::PathBuf {
    let Some(p) = std::env::var_os("OUTPOST_PYTHON") else {
        panic!("{INSTALL}");
    };
    let p = std::path::PathBuf::from(p);
    if p.is_absolute() {
        return p;
    }
    // Tests run with the crate directory as cwd; accept a path relative to the workspace root.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if root.join(&p).exists() {
        root.join(p)
    } else {
        p
    }
}

/// Runs `hil-tests/py/<script>` with `input` as JSON on stdin and returns its JSON stdout.
fn run_py(script: &str, input: &Value) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("py")
        .join(script);
    let mut child = Command::new(python())
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start OUTPOST_PYTHON: {e}. {INSTALL}"));
    let body = serde_json::to_vec(input).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&body));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn mat<const R: usize, const C: usize>(m: &SMatrix<f64, R, C>) -> Value {
    json!(
        (0..R)
            .map(|i| (0..C).map(|j| m[(i, j)]).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    )
}

fn vec_json<const R: usize>(v: &SVector<f64, R>) -> Value {
    json!(v.iter().copied().collect::<Vec<_>>())
}

/// Seeded Gaussian (Box–Muller over fastrand), the same generator as the actors' test `sim`.
struct Gauss(fastrand::Rng);
impl Gauss {
    fn n(&mut self, sd: f64) -> f64 {
        let u1 = 1.0 - self.0.f64();
        let u2 = self.0.f64();
        sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    fn u(&mut self) -> f64 {
        self.0.f64()
    }
}

/// One Kalman case: our filter's trajectory plus the JSON to replay it in filterpy.
struct Case<const N: usize> {
    json: Value,
    xs: Vec<SVector<f64, N>>,
    ps: Vec<SMatrix<f64, N, N>>,
}

/// Runs `steps` (F, B, Q, u, z) through our filter and records everything.
#[allow(clippy::type_complexity)]
fn run_case<const N: usize, const M: usize, const U: usize>(
    name: &str,
    x0: SVector<f64, N>,
    p0: SMatrix<f64, N, N>,
    h: SMatrix<f64, M, N>,
    r: SMatrix<f64, M, M>,
    steps: &[(
        SMatrix<f64, N, N>,
        SMatrix<f64, N, U>,
        SMatrix<f64, N, N>,
        SVector<f64, U>,
        Option<SVector<f64, M>>,
    )],
) -> Case<N> {
    let mut kf =
        KalmanFilter::<N, M, U>::new(x0, p0, steps[0].0, steps[0].1, steps[0].2, h, r).unwrap();
    let (mut xs, mut ps, mut js) = (Vec::new(), Vec::new(), Vec::new());
    for (f, b, q, u, z) in steps {
        kf.set_transition(*f, *b, *q).unwrap();
        kf.predict(u).unwrap();
        if let Some(z) = z {
            kf.update(z).unwrap();
        }
        xs.push(*kf.state());
        ps.push(*kf.covariance());
        js.push(json!({
            "f": mat(f), "b": mat(b), "q": mat(q), "u": vec_json(u),
            "z": z.as_ref().map(vec_json),
        }));
    }
    Case {
        json: json!({"name": name, "n": N, "m": M, "u": U, "x0": vec_json(&x0), "p0": mat(&p0),
                     "h": mat(&h), "r": mat(&r), "steps": js}),
        xs,
        ps,
    }
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

fn compare<const N: usize>(case: &Case<N>, result: &Value) -> (f64, usize) {
    let name = case.json["name"].as_str().unwrap();
    let xs = result["x"].as_array().unwrap();
    let ps = result["p"].as_array().unwrap();
    assert_eq!(xs.len(), case.xs.len(), "{name}: step count");
    let mut worst = 0.0f64;
    for (k, (ours_x, ours_p)) in case.xs.iter().zip(&case.ps).enumerate() {
        for i in 0..N {
            let theirs = xs[k][i].as_f64().unwrap();
            assert!(
                close(ours_x[i], theirs),
                "{name} step {k} x[{i}]: ours {} filterpy {theirs}",
                ours_x[i]
            );
            worst = worst.max((ours_x[i] - theirs).abs() / ours_x[i].abs().max(1e-300));
            for j in 0..N {
                let theirs = ps[k][i][j].as_f64().unwrap();
                assert!(
                    close(ours_p[(i, j)], theirs),
                    "{name} step {k} P[{i},{j}]: ours {} filterpy {theirs}",
                    ours_p[(i, j)]
                );
                if ours_p[(i, j)] != 0.0 {
                    worst = worst.max((ours_p[(i, j)] - theirs).abs() / ours_p[(i, j)].abs());
                }
            }
        }
    }
    (worst, case.xs.len())
}

#[test]
fn kalman_matches_filterpy() {
    let mut g = Gauss(fastrand::Rng::with_seed(0xf117e5));
    let mut rng = fastrand::Rng::with_seed(7);

    // 1-D: scalar random walk x' = x + w, z = x + v; 10 % of measurements missing.
    let one: Vec<_> = (0..300)
        .map(|k| {
            let z = (rng.f64() > 0.1).then(|| SVector::<f64, 1>::new(0.01 * k as f64 + g.n(0.5)));
            (
                SMatrix::<f64, 1, 1>::new(1.0),
                SMatrix::<f64, 1, 0>::zeros(),
                SMatrix::<f64, 1, 1>::new(0.01),
                SVector::<f64, 0>::zeros(),
                z,
            )
        })
        .collect();
    let c1 = run_case::<1, 1, 0>(
        "1d",
        SVector::<f64, 1>::new(0.0),
        SMatrix::<f64, 1, 1>::new(10.0),
        SMatrix::<f64, 1, 1>::new(1.0),
        SMatrix::<f64, 1, 1>::new(0.25),
        &one,
    );

    // 2-D constant velocity (4 states), jittered dt in [0.05, 0.15] s, position measurements.
    let mut t = 0.0;
    let two: Vec<_> = (0..300)
        .map(|_| {
            let dt = 0.05 + 0.1 * rng.f64();
            t += dt;
            let (f, b, q) =
                kinematic_matrices::<4, 0>(MotionModel::ConstantVelocity, 2, dt, 0.5).unwrap();
            let z = (rng.f64() > 0.1)
                .then(|| SVector::<f64, 2>::new(3.0 * t + g.n(1.0), -t + g.n(1.0)));
            (f, b, q, SVector::<f64, 0>::zeros(), z)
        })
        .collect();
    let c2 = run_case::<4, 2, 0>(
        "cv2d",
        SVector::zeros(),
        SMatrix::identity() * 100.0,
        SMatrix::<f64, 2, 4>::new(1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        SMatrix::identity() * 1.0,
        &two,
    );

    // 6 states: 3-D GPS position + IMU acceleration as control input, IMU at 100 Hz, GPS 10 Hz.
    let six: Vec<_> = (0..500)
        .map(|k| {
            let dt = 0.01;
            let tk = k as f64 * dt;
            let (f, b, mut q) =
                kinematic_matrices::<6, 3>(MotionModel::GpsImu, 3, dt, 0.2).unwrap();
            q += SMatrix::<f64, 6, 6>::identity() * 1e-6; // make Q full rank: also exercised
            let u =
                SVector::<f64, 3>::new(-(tk).sin() + g.n(0.2), -(tk).cos() + g.n(0.2), g.n(0.2));
            let z = (k % 10 == 0).then(|| {
                SVector::<f64, 3>::new(tk.sin() + g.n(2.0), tk.cos() + g.n(2.0), g.n(3.0))
            });
            (f, b, q, u, z)
        })
        .collect();
    let c6 = run_case::<6, 3, 3>(
        "gps_imu_3d",
        SVector::zeros(),
        SMatrix::identity() * 25.0,
        SMatrix::<f64, 3, 6>::from_fn(|i, j| if j == 2 * i { 1.0 } else { 0.0 }),
        SMatrix::<f64, 3, 3>::from_diagonal(&SVector::<f64, 3>::new(4.0, 4.0, 9.0)),
        &six,
    );

    // A dropout: 1-D constant velocity at 5 Hz, 10 s of track, then 9.8 s of predict-only
    // steps (the longest a group predicts with max_dt_s = 10), then the track again.
    let drop: Vec<_> = (0..150)
        .map(|k| {
            let (f, b, q) =
                kinematic_matrices::<2, 0>(MotionModel::ConstantVelocity, 1, 0.2, 0.05).unwrap();
            let t = k as f64 * 0.2;
            let z = (!(50..99).contains(&k)).then(|| SVector::<f64, 1>::new(2.0 * t + g.n(0.5)));
            (f, b, q, SVector::<f64, 0>::zeros(), z)
        })
        .collect();
    let cd = run_case::<2, 1, 0>(
        "cv1d_dropout",
        SVector::zeros(),
        SMatrix::identity() * 100.0,
        SMatrix::<f64, 1, 2>::new(1.0, 0.0),
        SMatrix::<f64, 1, 1>::new(0.25),
        &drop,
    );
    let growth: Vec<f64> = cd.ps[49..99].iter().map(|p| p[(0, 0)].sqrt()).collect();
    assert!(growth.windows(2).all(|w| w[1] > w[0]), "{growth:?}");

    let out = run_py(
        "kalman_filterpy.py",
        &json!({"cases": [c1.json, c2.json, c6.json, cd.json]}),
    );
    let res = out["results"].as_array().unwrap();
    let (w1, n1) = compare(&c1, &res[0]);
    let (w2, n2) = compare(&c2, &res[1]);
    let (w6, n6) = compare(&c6, &res[2]);
    let (wd, nd) = compare(&cd, &res[3]);
    println!(
        "filterpy cross-check: 1d {n1} steps worst rel diff {w1:.2e}; cv2d {n2} steps {w2:.2e}; \
         gps_imu_3d {n6} steps {w6:.2e}; cv1d_dropout {nd} steps {wd:.2e} (position std \
         {:.3} → {:.3} over 49 predict-only steps)",
        growth[0],
        growth[growth.len() - 1]
    );
}

fn rms(e: &[f64]) -> f64 {
    (e.iter().map(|x| x * x).sum::<f64>() / e.len().max(1) as f64).sqrt()
}

/// Attitude on the simulated IMU of the actors' accuracy test (seed 0xa771): roll
/// `0.35 sin(0.5 t)`, pitch `0.26 sin(0.3 t + 1)`, yaw `0.2 sin(0.1 t)` rad; gyro bias
/// (0.01, −0.008, 0.005) rad/s + N(0, 0.003²); accelerometer N(0, 0.3²) m/s²; 100 Hz ± 10 %
/// jitter; 120 s, errors after 5 s. Ours must stay under 2° RMS; imufusion is reported beside
/// them (and must be under 5°, which shows the data and conventions were passed correctly).
#[test]
fn attitude_beside_imufusion() {
    let mut g = Gauss(fastrand::Rng::with_seed(0xa771));
    let mut comp = Complementary::new(ComplementaryConfig {
        time_constant_s: 1.0,
        accel_rejection: 0.0,
        gravity: 9.80665,
        max_dt_s: 1.0,
    })
    .unwrap();
    let mut madg = Madgwick::new(MadgwickConfig {
        beta: 0.1,
        max_dt_s: 1.0,
    })
    .unwrap();
    let bias = Vector3::new(0.01, -0.008, 0.005);
    let (mut t, mut dt) = (0.0f64, 0.0f64);
    let mut truth = Vec::new();
    let mut samples = Vec::new();
    let (mut ours_c, mut ours_m) = (Vec::new(), Vec::new());
    while t < 120.0 {
        let (ph, th) = (0.35 * (0.5 * t).sin(), 0.26 * (0.3 * t + 1.0).sin());
        let (dph, dth, dps) = (
            0.35 * 0.5 * (0.5 * t).cos(),
            0.26 * 0.3 * (0.3 * t + 1.0).cos(),
            0.2 * 0.1 * (0.1 * t).cos(),
        );
        let rates = Vector3::new(
            dph - th.sin() * dps,
            ph.cos() * dth + ph.sin() * th.cos() * dps,
            -ph.sin() * dth + ph.cos() * th.cos() * dps,
        );
        let gyro = rates + bias + Vector3::new(g.n(0.003), g.n(0.003), g.n(0.003));
        let accel = 9.81 * Vector3::new(-th.sin(), ph.sin() * th.cos(), ph.cos() * th.cos())
            + Vector3::new(g.n(0.3), g.n(0.3), g.n(0.3));
        ours_c.push(comp.update(&gyro, &accel, dt).unwrap().unwrap());
        ours_m.push(madg.update(&gyro, &accel, dt).unwrap().unwrap());
        let d = gyro.map(f64::to_degrees);
        let a = accel / 9.81;
        samples.push(json!({"gyro": [d.x, d.y, d.z], "accel": [a.x, a.y, a.z], "dt": dt}));
        truth.push((t, ph, th));
        dt = 0.01 + 0.002 * (g.u() - 0.5);
        t += dt;
    }
    let out = run_py("attitude_imufusion.py", &json!({ "samples": samples }));
    let roll: Vec<f64> = out["roll"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let pitch: Vec<f64> = out["pitch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(roll.len(), truth.len());
    let mut err = [(); 6].map(|_| Vec::new());
    for (i, &(t, ph, th)) in truth.iter().enumerate() {
        if t <= 5.0 {
            continue;
        }
        err[0].push(wrap_pi(ours_c[i].roll - ph).to_degrees());
        err[1].push((ours_c[i].pitch - th).to_degrees());
        err[2].push(wrap_pi(ours_m[i].roll - ph).to_degrees());
        err[3].push((ours_m[i].pitch - th).to_degrees());
        err[4].push(wrap_pi(roll[i].to_radians() - ph).to_degrees());
        err[5].push((pitch[i].to_radians() - th).to_degrees());
    }
    let r: Vec<f64> = err.iter().map(|e| rms(e)).collect();
    println!("attitude RMS error (deg)      roll    pitch");
    println!("  complementary (ours)     {:7.3}  {:7.3}", r[0], r[1]);
    println!("  madgwick beta 0.1 (ours) {:7.3}  {:7.3}", r[2], r[3]);
    println!("  imufusion (x-io Fusion)  {:7.3}  {:7.3}", r[4], r[5]);
    assert!(r[..4].iter().all(|e| *e < 2.0), "ours above 2 deg: {r:?}");
    assert!(
        r[4..].iter().all(|e| e.is_finite() && *e < 5.0),
        "imufusion: {r:?}"
    );
}
