//! `bench -- kalman [STEPS] [ROUNDS]`: predict + update of a 4-state constant-velocity model with
//! a 2-D position measurement, our `KalmanFilter<4, 2, 0>` against the `adskalman` crate
//! (Joseph form, same F, Q, H, R, same seeded measurements), in alternating rounds of the same
//! run. Reports the median ns per step of each and ratio = ours / adskalman.

use std::hint::black_box;
use std::time::Instant;

use adskalman::{
    KalmanFilterNoControl, ObservationModel, StateAndCovariance, TransitionModelLinearNoControl,
};
use nalgebra::{Matrix2, Matrix2x4, Matrix4, Matrix4x2, SMatrix, Vector2, Vector4};
use outpost_actors::fusion::kalman::{KalmanFilter, MotionModel, kinematic_matrices};
use serde_json::{Value, json};

struct Motion {
    f: Matrix4<f64>,
    ft: Matrix4<f64>,
    q: Matrix4<f64>,
}
impl TransitionModelLinearNoControl<f64, nalgebra::U4> for Motion {
    fn F(&self) -> &Matrix4<f64> {
        &self.f
    }
    fn FT(&self) -> &Matrix4<f64> {
        &self.ft
    }
    fn Q(&self) -> &Matrix4<f64> {
        &self.q
    }
}

struct Obs {
    h: Matrix2x4<f64>,
    ht: Matrix4x2<f64>,
    r: Matrix2<f64>,
}
impl ObservationModel<f64, nalgebra::U4, nalgebra::U2> for Obs {
    fn H(&self) -> &Matrix2x4<f64> {
        &self.h
    }
    fn HT(&self) -> &Matrix4x2<f64> {
        &self.ht
    }
    fn R(&self) -> &Matrix2<f64> {
        &self.r
    }
}

fn arg(args: &[String], i: usize, default: usize) -> Result<usize, String> {
    match args.get(i) {
        None => Ok(default),
        Some(s) => s.parse().map_err(|e| format!("argument {s:?}: {e}")),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark; `args`: optional step count (default 20000) and rounds (default 41).
pub fn run(args: &[String]) -> Result<Value, String> {
    let steps = arg(args, 0, 20_000)?.max(1);
    let rounds = arg(args, 1, 41)?.max(1);
    let dt = 0.1;
    let (f, _b, q) = kinematic_matrices::<4, 0>(MotionModel::ConstantVelocity, 2, dt, 0.5)
        .map_err(|e| e.to_string())?;
    let h = Matrix2x4::new(1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0);
    let r = Matrix2::identity() * 4.0;
    let p0 = Matrix4::identity() * 100.0;
    let mut rng = fastrand::Rng::with_seed(0xbe4c);
    let zs: Vec<Vector2<f64>> = (0..steps)
        .map(|k| {
            let t = k as f64 * dt;
            Vector2::new(
                2.0 * t + 4.0 * (rng.f64() - 0.5),
                -t + 4.0 * (rng.f64() - 0.5),
            )
        })
        .collect();

    let motion = Motion {
        f,
        ft: f.transpose(),
        q,
    };
    let obs = Obs {
        h,
        ht: h.transpose(),
        r,
    };
    let u = SMatrix::<f64, 0, 1>::zeros();

    let ours = |zs: &[Vector2<f64>]| -> Result<(f64, f64), String> {
        let mut kf =
            KalmanFilter::<4, 2, 0>::new(Vector4::zeros(), p0, f, SMatrix::zeros(), q, h, r)
                .map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        for z in zs {
            kf.predict(black_box(&u)).map_err(|e| e.to_string())?;
            black_box(kf.update(black_box(z)).map_err(|e| e.to_string())?);
        }
        let ns = t0.elapsed().as_nanos() as f64 / zs.len() as f64;
        Ok((ns, kf.state()[0]))
    };
    let theirs = |zs: &[Vector2<f64>]| -> Result<(f64, f64), String> {
        let kf = KalmanFilterNoControl::new(&motion, &obs);
        let mut est = StateAndCovariance::new(Vector4::zeros(), p0);
        let t0 = Instant::now();
        for z in zs {
            est = black_box(
                kf.step(black_box(&est), black_box(z))
                    .map_err(|e| format!("{e:?}"))?,
            );
        }
        let ns = t0.elapsed().as_nanos() as f64 / zs.len() as f64;
        Ok((ns, est.state()[0]))
    };

    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut last = (0.0, 0.0);
    for round in 0..rounds {
        // Alternate which filter goes first so neither always gets the warm cache.
        let (x, y) = if round % 2 == 0 {
            let x = ours(&zs)?;
            (x, theirs(&zs)?)
        } else {
            let y = theirs(&zs)?;
            (ours(&zs)?, y)
        };
        a.push(x.0);
        b.push(y.0);
        last = (x.1, y.1);
    }
    // Same maths, same data: the final estimates must agree.
    if (last.0 - last.1).abs() > 1e-6 * last.0.abs().max(1.0) {
        return Err(format!(
            "filters disagree: ours {} adskalman {}",
            last.0, last.1
        ));
    }
    let (ns, theirs_ns) = (median(&mut a), median(&mut b));
    eprintln!(
        "kalman: {steps} steps x {rounds} rounds; final x ours {} adskalman {}",
        last.0, last.1
    );
    Ok(json!({
        "bench": "kalman",
        "ns_per_step": (ns * 10.0).round() / 10.0,
        "adskalman_ns_per_step": (theirs_ns * 10.0).round() / 10.0,
        "ratio": ((ns / theirs_ns) * 1000.0).round() / 1000.0,
    }))
}
