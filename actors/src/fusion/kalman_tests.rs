use super::*;
use crate::fusion::sim::{Noise, rms};
use nalgebra::{Matrix1, Matrix2, Vector1, Vector2};
use proptest::prelude::*;

fn cv1(gate: Option<GateConfidence>) -> KinematicFilter<2, 1, 0> {
    KinematicFilter::new(KinematicConfig {
        model: MotionModel::ConstantVelocity,
        axes: 1,
        process_noise: 0.1,
        measurement_std: 1.0,
        initial_std: 10.0,
        gate,
        max_dt_s: 10.0,
    })
    .unwrap()
}

#[test]
fn scalar_filter_matches_hand_computation() {
    // x' = x, z = x, P0 = 4, Q = 1, R = 2: P- = 5, K = 5/7, x = 0 + 5/7 * 7 = 5, P = 10/7.
    let mut kf = KalmanFilter::<1, 1, 0>::new(
        Vector1::new(0.0),
        Matrix1::new(4.0),
        Matrix1::new(1.0),
        SMatrix::zeros(),
        Matrix1::new(1.0),
        Matrix1::new(1.0),
        Matrix1::new(2.0),
    )
    .unwrap();
    kf.predict(&SVector::zeros()).unwrap();
    let out = kf.update(&Vector1::new(7.0)).unwrap();
    assert!((kf.state()[0] - 5.0).abs() < 1e-12);
    assert!((kf.covariance()[(0, 0)] - 10.0 / 7.0).abs() < 1e-12);
    match out {
        UpdateOutcome::Accepted { nis } => assert!((nis - 49.0 / 7.0).abs() < 1e-12),
        other => panic!("{other:?}"),
    }
}

#[test]
fn rejects_bad_matrices() {
    let bad_r = KalmanFilter::<1, 1, 0>::new(
        Vector1::new(0.0),
        Matrix1::new(1.0),
        Matrix1::new(1.0),
        SMatrix::zeros(),
        Matrix1::new(0.0),
        Matrix1::new(1.0),
        Matrix1::new(-1.0),
    );
    assert_eq!(
        bad_r.unwrap_err(),
        KalmanError::NotPositiveDefinite("R", "")
    );
    let bad_q = KalmanFilter::<2, 1, 0>::new(
        SVector::zeros(),
        Matrix2::identity(),
        Matrix2::identity(),
        SMatrix::zeros(),
        Matrix2::new(1.0, 0.0, 0.5, 1.0), // not symmetric
        SMatrix::<f64, 1, 2>::new(1.0, 0.0),
        Matrix1::new(1.0),
    );
    assert_eq!(
        bad_q.unwrap_err(),
        KalmanError::NotPositiveDefinite("Q", "semi-")
    );
    let nan_f = KalmanFilter::<1, 1, 0>::new(
        Vector1::new(0.0),
        Matrix1::new(1.0),
        Matrix1::new(f64::NAN),
        SMatrix::zeros(),
        Matrix1::new(0.0),
        Matrix1::new(1.0),
        Matrix1::new(1.0),
    );
    assert_eq!(nan_f.unwrap_err(), KalmanError::NonFinite("F"));
}

#[test]
fn linear_config_checks_dimensions_and_builds() {
    let toml_like = LinearModelConfig {
        f: vec![vec![1.0, 1.0], vec![0.0, 1.0]],
        h: vec![vec![1.0, 0.0]],
        q: vec![vec![0.1, 0.0], vec![0.0, 0.1]],
        r: vec![vec![1.0]],
        b: None,
        x0: None,
        p0: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
        gate: Some(GateConfidence::P99),
    };
    assert!(toml_like.build::<2, 1, 0>().is_ok());
    let err = toml_like.build::<3, 1, 0>().unwrap_err();
    assert!(
        matches!(err, KalmanError::Dimension { what: "F", .. }),
        "{err}"
    );
    let mut bad = toml_like.clone();
    bad.r = vec![vec![1.0, 0.0]];
    assert!(matches!(
        bad.validate_dims(2, 1, 0),
        Err(KalmanError::Dimension { what: "R", .. })
    ));
    let mut gate7 = toml_like;
    gate7.gate = Some(GateConfidence::P95);
    // 7 measurement dims cannot be gated by the table.
    assert!(
        KalmanFilter::<7, 7, 0>::new(
            SVector::zeros(),
            SMatrix::identity(),
            SMatrix::identity(),
            SMatrix::zeros(),
            SMatrix::zeros(),
            SMatrix::identity(),
            SMatrix::identity()
        )
        .unwrap()
        .set_gate(Some(GateConfidence::P95))
        .is_err()
    );
}

#[test]
fn chi2_table() {
    assert_eq!(chi2_threshold(2, GateConfidence::P95), Some(5.991));
    assert_eq!(chi2_threshold(6, GateConfidence::P999), Some(22.458));
    assert_eq!(chi2_threshold(0, GateConfidence::P99), None);
    assert_eq!(chi2_threshold(7, GateConfidence::P99), None);
}

#[test]
fn gate_rejects_outlier_and_counts() {
    let mut f = cv1(Some(GateConfidence::P99));
    let u = SVector::<f64, 0>::zeros();
    f.step(0.0, &u, Some(&Vector1::new(0.0))).unwrap();
    for i in 1..50 {
        f.step(i as f64 * 0.1, &u, Some(&Vector1::new(0.0)))
            .unwrap();
    }
    let before = *f.filter().state();
    let out = f.step(5.0, &u, Some(&Vector1::new(1000.0))).unwrap();
    assert!(
        matches!(out, Some(UpdateOutcome::Rejected { .. })),
        "{out:?}"
    );
    assert_eq!(f.filter().stats().rejections, 1);
    assert!((f.filter().state()[0] - before[0]).abs() < 1.0);
    // A normal measurement is accepted again.
    let out = f.step(5.1, &u, Some(&Vector1::new(0.1))).unwrap();
    assert!(matches!(out, Some(UpdateOutcome::Accepted { .. })));
}

#[test]
fn predict_only_steps_grow_covariance() {
    let mut f = cv1(None);
    let u = SVector::<f64, 0>::zeros();
    f.step(0.0, &u, Some(&Vector1::new(1.0))).unwrap();
    f.step(0.1, &u, Some(&Vector1::new(1.1))).unwrap();
    let p1 = f.filter().covariance()[(0, 0)];
    assert_eq!(f.step(0.2, &u, None).unwrap(), None);
    assert_eq!(f.step(0.3, &u, None).unwrap(), None);
    assert!(f.filter().covariance()[(0, 0)] > p1);
    assert_eq!(f.filter().stats().predicts, 3);
    assert_eq!(f.filter().stats().updates, 1);
    // Going back in time is refused.
    assert!(matches!(
        f.step(0.25, &u, None),
        Err(KalmanError::BadDt(..))
    ));
}

#[test]
fn kinematic_matrices_shapes() {
    let (f, _, q) =
        kinematic_matrices::<9, 0>(MotionModel::ConstantAcceleration, 3, 0.5, 2.0).unwrap();
    assert_eq!(f[(3, 5)], 0.125);
    assert_eq!(f[(4, 5)], 0.5);
    assert!(is_positive_definite(&q));
    assert!(kinematic_matrices::<4, 0>(MotionModel::ConstantAcceleration, 2, 0.5, 2.0).is_err());
    assert!(kinematic_matrices::<4, 1>(MotionModel::GpsImu, 2, 0.5, 2.0).is_err());
    let (_, b, q) = kinematic_matrices::<4, 2>(MotionModel::GpsImu, 2, 0.1, 0.2).unwrap();
    assert!((b[(0, 0)] - 0.005).abs() < 1e-15 && (b[(3, 1)] - 0.1).abs() < 1e-15);
    assert!(is_positive_semidefinite(&q));
}

#[test]
fn config_validate() {
    let mut c = KinematicConfig {
        model: MotionModel::ConstantVelocity,
        axes: 4,
        process_noise: 1.0,
        measurement_std: 1.0,
        initial_std: 1.0,
        gate: None,
        max_dt_s: 1.0,
    };
    assert!(c.validate().is_err());
    c.axes = 2;
    c.measurement_std = 0.0;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("measurement_std")
    );
    c.measurement_std = 1.0;
    assert!(c.validate().is_ok());
    assert_eq!(c.state_dim(), 4);
    assert!(KinematicFilter::<4, 1, 0>::new(c).is_err());
}

/// GPS + IMU accuracy against a simulated trajectory.
///
/// Generator (seed 0x6b61_6c6d): 2-D motion `p(t) = (20 sin(0.2 t), 15 cos(0.13 t) + 0.5 t)` m,
/// truth acceleration from its second derivative; IMU at 100 Hz measures that acceleration plus
/// N(0, 0.05²) m/s² noise and a 0.02 m/s² bias; GPS at 5 Hz measures position plus N(0, 3²) m.
/// 120 s; errors counted after a 5 s burn-in at each GPS epoch (after the update).
#[test]
fn gps_imu_rmse_at_most_half_of_raw_gps() {
    let mut noise = Noise::new(0x6b61_6c6d);
    let cfg = KinematicConfig {
        model: MotionModel::GpsImu,
        axes: 2,
        process_noise: 0.5, // above the 0.05 white noise: absorbs the unmodelled bias
        measurement_std: 3.0,
        initial_std: 10.0,
        gate: Some(GateConfidence::P999),
        max_dt_s: 1.0,
    };
    let mut f = KinematicFilter::<4, 2, 2>::new(cfg).unwrap();
    let pos = |t: f64| Vector2::new(20.0 * (0.2 * t).sin(), 15.0 * (0.13 * t).cos() + 0.5 * t);
    let acc = |t: f64| {
        Vector2::new(
            -20.0 * 0.04 * (0.2 * t).sin(),
            -15.0 * 0.13 * 0.13 * (0.13 * t).cos(),
        )
    };
    let (mut raw_err, mut filt_err) = (Vec::new(), Vec::new());
    for i in 0..12_000 {
        let t = i as f64 * 0.01;
        let u = acc(t) + Vector2::new(noise.normal(0.05) + 0.02, noise.normal(0.05) + 0.02);
        let gps =
            (i % 20 == 0).then(|| pos(t) + Vector2::new(noise.normal(3.0), noise.normal(3.0)));
        f.step(t, &u, gps.as_ref()).unwrap();
        if let Some(g) = gps
            && t > 5.0
        {
            let truth = pos(t);
            raw_err.push((g - truth).norm());
            let est = Vector2::new(f.position(0).unwrap(), f.position(1).unwrap());
            filt_err.push((est - truth).norm());
        }
    }
    let (raw, filt) = (rms(&raw_err), rms(&filt_err));
    eprintln!("GPS+IMU: raw GPS RMSE {raw:.3} m, filtered RMSE {filt:.3} m");
    assert!(filt <= 0.5 * raw, "filtered {filt} vs raw {raw}");
}

fn finite_pd<const N: usize>(p: &SMatrix<f64, N, N>) -> bool {
    p.iter().all(|v| v.is_finite()) && p.cholesky().is_some() && (p - p.transpose()).amax() == 0.0
}

proptest! {
    /// Finite input never gives NaN/inf, and P stays symmetric positive definite, for a
    /// constant-acceleration 2-axis filter with random steps, gaps and measurements.
    #[test]
    fn kinematic_stays_finite_and_pd(
        steps in proptest::collection::vec((0.0f64..2.0, proptest::option::of((-1e4f64..1e4, -1e4f64..1e4))), 1..200),
        q in 1e-4f64..1e3,
        r in 1e-3f64..1e3,
        gated in any::<bool>(),
    ) {
        let mut f = KinematicFilter::<6, 2, 0>::new(KinematicConfig {
            model: MotionModel::ConstantAcceleration,
            axes: 2,
            process_noise: q,
            measurement_std: r,
            initial_std: 50.0,
            gate: gated.then_some(GateConfidence::P99),
            max_dt_s: 1.5,
        }).unwrap();
        let mut t = 0.0;
        let u = SVector::<f64, 0>::zeros();
        for (dt, z) in steps {
            t += dt;
            let z = z.map(|(a, b)| Vector2::new(a, b));
            f.step(t, &u, z.as_ref()).unwrap();
            prop_assert!(f.filter().state().iter().all(|v| v.is_finite()));
            prop_assert!(finite_pd(f.filter().covariance()));
        }
        prop_assert_eq!(f.filter().stats().covariance_resets, 0);
    }

    /// Same for the generic filter with random (valid) scalar models and control inputs.
    #[test]
    fn generic_filter_stays_finite_and_pd(
        a in -1.5f64..1.5,
        bq in (0.0f64..10.0, 1e-6f64..10.0),
        r in 1e-6f64..100.0,
        inputs in proptest::collection::vec((-100.0f64..100.0, proptest::option::of(-1e3f64..1e3)), 1..100),
    ) {
        let mut kf = KalmanFilter::<2, 1, 1>::new(
            SVector::zeros(),
            Matrix2::identity(),
            Matrix2::new(1.0, 0.1, 0.0, a),
            SMatrix::<f64, 2, 1>::new(0.0, bq.0),
            Matrix2::identity() * bq.1,
            SMatrix::<f64, 1, 2>::new(1.0, 0.0),
            Matrix1::new(r),
        ).unwrap();
        for (u, z) in inputs {
            kf.predict(&Vector1::new(u)).unwrap();
            if let Some(z) = z {
                kf.update(&Vector1::new(z)).unwrap();
            }
            prop_assert!(kf.state().iter().all(|v| v.is_finite()));
            prop_assert!(finite_pd(kf.covariance()));
        }
    }
}

/// Predict-only steps do not keep a filter alive for ever: more than `max_dt_s` after the last
/// measurement it used, it restarts and waits for the next measurement, whatever the steps
/// in between. A track the gate keeps rejecting restarts the same way.
#[test]
fn no_measurement_for_max_dt_restarts_even_through_predict_only_steps() {
    let mut f = cv1(None); // max_dt_s 10
    let u = SVector::<f64, 0>::zeros();
    f.step(0.0, &u, Some(&Vector1::new(1.0))).unwrap();
    let mut var = f.filter().covariance()[(0, 0)];
    for k in 1..=100 {
        f.step(k as f64 * 0.1, &u, None).unwrap();
        assert!(f.is_initialised());
        let v = f.position_variance(0).unwrap();
        assert!(v > var, "variance grows while predicting");
        var = v;
    }
    assert_eq!(f.restarts(), 0);
    f.step(10.1, &u, None).unwrap();
    assert!(!f.is_initialised());
    assert_eq!(f.restarts(), 1);
    f.step(10.2, &u, None).unwrap();
    assert_eq!(f.restarts(), 1, "one restart per gap");
    f.step(12.0, &u, Some(&Vector1::new(7.0))).unwrap();
    assert!(f.is_initialised());
    assert_eq!(f.position(0), Some(7.0));

    let mut g = cv1(Some(GateConfidence::P999));
    g.step(0.0, &u, Some(&Vector1::new(0.0))).unwrap();
    for k in 1..=20 {
        g.step(k as f64 * 0.1, &u, Some(&Vector1::new(0.0)))
            .unwrap();
    }
    // The target jumps by 1 km and stays there: rejected until max_dt_s has passed.
    let mut k = 21;
    loop {
        let out = g
            .step(k as f64 * 0.1, &u, Some(&Vector1::new(1000.0)))
            .unwrap();
        if g.restarts() > 0 {
            break;
        }
        assert!(
            matches!(out, Some(UpdateOutcome::Rejected { .. })),
            "step {k}"
        );
        k += 1;
    }
    assert_eq!(
        g.position(0),
        Some(1000.0),
        "re-initialised on the new track"
    );
    assert!(k as f64 * 0.1 > 12.0);
}
