//! Linear Kalman filter over nalgebra static matrices, with the built-in kinematic models the
//! fusion actors use (constant velocity / constant acceleration in 1–3 axes, GPS position with
//! IMU acceleration as control input).
//!
//! Numerics: the gain is computed with a Cholesky solve of the innovation covariance (no explicit
//! inverse), the covariance update uses the Joseph form, and after every step the covariance is
//! symmetrised and checked positive definite by a Cholesky factorisation. When that check fails
//! the filter resets its covariance to the initial one, counts the recovery and returns
//! [`KalmanError::CovarianceNotPositiveDefinite`] so the caller can log it.
//!
//! Gating: an update whose normalised innovation squared (the squared Mahalanobis distance)
//! exceeds the chi-square threshold for the measurement's degrees of freedom is rejected and
//! counted; the state is left at the prediction.

use nalgebra::{SMatrix, SVector};
pub use outpost_runtime::config::{
    FusionConfigError, GateConfidence, KinematicConfig, MotionModel,
};
use serde::Deserialize;

/// Errors of the Kalman filter and of its configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KalmanError {
    /// A matrix or vector handed in contains NaN or an infinity.
    #[error("{0} contains a non-finite value")]
    NonFinite(&'static str),
    /// A matrix that must be symmetric positive (semi-)definite is not.
    #[error("{0} is not symmetric positive {1}definite")]
    NotPositiveDefinite(&'static str, &'static str),
    /// The innovation covariance H P Hᵀ + R could not be factorised.
    #[error("innovation covariance is not positive definite")]
    InnovationNotPositiveDefinite,
    /// After a step the state covariance failed its Cholesky check; it was reset to the initial
    /// covariance (counted in [`KalmanStats::covariance_resets`]).
    #[error("state covariance lost positive definiteness; reset to the initial covariance")]
    CovarianceNotPositiveDefinite,
    /// A time step that is negative, non-finite or above the configured maximum.
    #[error("time step {0} s is not in [0, {1}] s")]
    BadDt(f64, f64),
    /// Matrix dimensions in a configuration do not match the filter's sizes.
    #[error("{what}: expected {expected_rows}x{expected_cols}, got {rows}x{cols}")]
    Dimension {
        what: &'static str,
        expected_rows: usize,
        expected_cols: usize,
        rows: usize,
        cols: usize,
    },
    /// Any other invalid configuration value.
    #[error("invalid Kalman configuration: {0}")]
    Config(String),
}

impl From<FusionConfigError> for KalmanError {
    fn from(e: FusionConfigError) -> Self {
        KalmanError::Config(e.message)
    }
}

/// Chi-square quantiles for 1–6 degrees of freedom at 0.95, 0.99, 0.999.
const CHI2: [[f64; 6]; 3] = [
    [3.841, 5.991, 7.815, 9.488, 11.070, 12.592],
    [6.635, 9.210, 11.345, 13.277, 15.086, 16.812],
    [10.828, 13.816, 16.266, 18.467, 20.515, 22.458],
];

/// The chi-square threshold for `dof` degrees of freedom (1–6) at `conf`; `None` outside 1–6.
pub fn chi2_threshold(dof: usize, conf: GateConfidence) -> Option<f64> {
    let row = match conf {
        GateConfidence::P95 => 0,
        GateConfidence::P99 => 1,
        GateConfidence::P999 => 2,
    };
    CHI2[row].get(dof.checked_sub(1)?).copied()
}

/// Counters a filter keeps; the actor exports them as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KalmanStats {
    /// Predict steps taken.
    pub predicts: u64,
    /// Measurements accepted.
    pub updates: u64,
    /// Measurements rejected by the Mahalanobis gate.
    pub rejections: u64,
    /// Times the covariance failed its positive-definiteness check and was reset.
    pub covariance_resets: u64,
}

/// What [`KalmanFilter::update`] did with a measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpdateOutcome {
    /// Fused; `nis` is the normalised innovation squared.
    Accepted { nis: f64 },
    /// Rejected by the gate; the state is the prediction.
    Rejected { nis: f64, threshold: f64 },
}

/// Symmetric `m` (lower triangle read) checked positive definite with a Cholesky
/// factorisation: every pivot must be finite and > 0. Hand-rolled on a stack copy because it runs
/// after every step and nalgebra's `Cholesky::new` costs noticeably more for small sizes.
#[allow(clippy::needless_range_loop)] // triangular index arithmetic reads best as loops
pub fn is_positive_definite<const N: usize>(m: &SMatrix<f64, N, N>) -> bool {
    let mut l = [[0.0f64; N]; N];
    for j in 0..N {
        let mut d = m[(j, j)];
        for k in 0..j {
            d -= l[j][k] * l[j][k];
        }
        if !(d > 0.0 && d.is_finite()) {
            return false;
        }
        let d = d.sqrt();
        l[j][j] = d;
        for i in j + 1..N {
            let mut v = m[(i, j)];
            for k in 0..j {
                v -= l[i][k] * l[j][k];
            }
            let v = v / d;
            if !v.is_finite() {
                return false;
            }
            l[i][j] = v;
        }
    }
    true
}

/// Symmetric `m` checked positive semi-definite: Cholesky of `m + ε·I` with `ε` scaled by the
/// trace (a zero matrix counts as semi-definite).
pub fn is_positive_semidefinite<const N: usize>(m: &SMatrix<f64, N, N>) -> bool {
    if !m.iter().all(|v| v.is_finite()) || (m - m.transpose()).amax() > 1e-9 * m.amax().max(1.0) {
        return false;
    }
    let eps = 1e-12 * m.trace().abs().max(1e-300) + 1e-300;
    (m + SMatrix::<f64, N, N>::identity() * eps)
        .cholesky()
        .is_some()
}

fn check_finite<const R: usize, const C: usize>(
    m: &SMatrix<f64, R, C>,
    what: &'static str,
) -> Result<(), KalmanError> {
    if m.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(KalmanError::NonFinite(what))
    }
}

/// A linear Kalman filter with `N` states, `M` measurements and `U` control inputs:
/// `x' = F x + B u + w`, `w ~ N(0, Q)`; `z = H x + v`, `v ~ N(0, R)`.
#[derive(Debug, Clone)]
pub struct KalmanFilter<const N: usize, const M: usize, const U: usize> {
    x: SVector<f64, N>,
    p: SMatrix<f64, N, N>,
    x0: SVector<f64, N>,
    p0: SMatrix<f64, N, N>,
    f: SMatrix<f64, N, N>,
    b: SMatrix<f64, N, U>,
    q: SMatrix<f64, N, N>,
    h: SMatrix<f64, M, N>,
    r: SMatrix<f64, M, M>,
    gate: Option<f64>,
    stats: KalmanStats,
}

impl<const N: usize, const M: usize, const U: usize> KalmanFilter<N, M, U> {
    /// A filter starting at `x0` with covariance `p0` (must be positive definite), with
    /// transition `f`, control matrix `b`, process noise `q` (symmetric positive semi-definite),
    /// measurement matrix `h` and measurement noise `r` (positive definite). No gate.
    pub fn new(
        x0: SVector<f64, N>,
        p0: SMatrix<f64, N, N>,
        f: SMatrix<f64, N, N>,
        b: SMatrix<f64, N, U>,
        q: SMatrix<f64, N, N>,
        h: SMatrix<f64, M, N>,
        r: SMatrix<f64, M, M>,
    ) -> Result<Self, KalmanError> {
        check_finite(&x0, "x0")?;
        check_finite(&f, "F")?;
        check_finite(&b, "B")?;
        check_finite(&h, "H")?;
        check_finite(&p0, "P0")?;
        check_finite(&q, "Q")?;
        check_finite(&r, "R")?;
        if !is_positive_definite(&p0) || (p0 - p0.transpose()).amax() > 1e-12 * p0.amax() {
            return Err(KalmanError::NotPositiveDefinite("P0", ""));
        }
        if !is_positive_semidefinite(&q) {
            return Err(KalmanError::NotPositiveDefinite("Q", "semi-"));
        }
        if !is_positive_definite(&r) || (r - r.transpose()).amax() > 1e-12 * r.amax() {
            return Err(KalmanError::NotPositiveDefinite("R", ""));
        }
        Ok(KalmanFilter {
            x: x0,
            p: p0,
            x0,
            p0,
            f,
            b,
            q,
            h,
            r,
            gate: None,
            stats: KalmanStats::default(),
        })
    }

    /// Enables Mahalanobis gating at `confidence` for `M` degrees of freedom (`M` in 1–6), or
    /// disables it with `None`.
    pub fn set_gate(&mut self, confidence: Option<GateConfidence>) -> Result<(), KalmanError> {
        self.gate = match confidence {
            None => None,
            Some(c) => Some(chi2_threshold(M, c).ok_or_else(|| {
                KalmanError::Config(format!("gating supports 1-6 measurement dims, not {M}"))
            })?),
        };
        Ok(())
    }

    /// Sets an explicit gate threshold on the normalised innovation squared (`None`: no gate).
    pub fn set_gate_threshold(&mut self, threshold: Option<f64>) -> Result<(), KalmanError> {
        if let Some(t) = threshold
            && !(t.is_finite() && t > 0.0)
        {
            return Err(KalmanError::Config(format!(
                "gate threshold {t} must be > 0"
            )));
        }
        self.gate = threshold;
        Ok(())
    }

    /// The state estimate.
    pub fn state(&self) -> &SVector<f64, N> {
        &self.x
    }

    /// The state covariance.
    pub fn covariance(&self) -> &SMatrix<f64, N, N> {
        &self.p
    }

    /// The counters.
    pub fn stats(&self) -> KalmanStats {
        self.stats
    }

    /// Overwrites the state and covariance (e.g. to initialise from a first measurement).
    pub fn set_state(
        &mut self,
        x: SVector<f64, N>,
        p: SMatrix<f64, N, N>,
    ) -> Result<(), KalmanError> {
        check_finite(&x, "x")?;
        if !is_positive_definite(&p) {
            return Err(KalmanError::NotPositiveDefinite("P", ""));
        }
        self.x = x;
        self.p = p.symmetric_part();
        Ok(())
    }

    /// Resets state and covariance to their initial values.
    pub fn reset(&mut self) {
        self.x = self.x0;
        self.p = self.p0;
    }

    /// Replaces the transition matrices used by [`Self::predict`] (`q` symmetric PSD).
    pub fn set_transition(
        &mut self,
        f: SMatrix<f64, N, N>,
        b: SMatrix<f64, N, U>,
        q: SMatrix<f64, N, N>,
    ) -> Result<(), KalmanError> {
        check_finite(&f, "F")?;
        check_finite(&b, "B")?;
        if !is_positive_semidefinite(&q) {
            return Err(KalmanError::NotPositiveDefinite("Q", "semi-"));
        }
        self.f = f;
        self.b = b;
        self.q = q;
        Ok(())
    }

    /// Predicts one step with the stored F, B, Q and control input `u`.
    pub fn predict(&mut self, u: &SVector<f64, U>) -> Result<(), KalmanError> {
        check_finite(u, "u")?;
        self.x = self.f * self.x + self.b * u;
        self.p = self.f * self.p * self.f.transpose() + self.q;
        self.stats.predicts += 1;
        self.finish_step()
    }

    /// Fuses measurement `z` with the stored H and R.
    pub fn update(&mut self, z: &SVector<f64, M>) -> Result<UpdateOutcome, KalmanError> {
        check_finite(z, "z")?;
        let (h, r) = (self.h, self.r); // validated when stored
        let y = z - h * self.x;
        self.update_innovation(y, &h, &r)
    }

    /// Fuses measurement `z` with measurement matrix `h` and noise `r` for this step only
    /// (e.g. a receiver-reported accuracy). `r` must be positive definite.
    pub fn update_with(
        &mut self,
        z: &SVector<f64, M>,
        h: &SMatrix<f64, M, N>,
        r: &SMatrix<f64, M, M>,
    ) -> Result<UpdateOutcome, KalmanError> {
        check_finite(z, "z")?;
        check_finite(h, "H")?;
        check_finite(r, "R")?;
        let y = z - h * self.x;
        self.update_innovation(y, h, r)
    }

    /// The update given an innovation `y` and (linearised) measurement matrix `h`: shared by the
    /// linear filter and the EKF.
    pub(crate) fn update_innovation(
        &mut self,
        y: SVector<f64, M>,
        h: &SMatrix<f64, M, N>,
        r: &SMatrix<f64, M, M>,
    ) -> Result<UpdateOutcome, KalmanError> {
        check_finite(&y, "innovation")?;
        let hp = h * self.p; // M x N
        let s = hp * h.transpose() + r;
        // nalgebra's Cholesky reads only the lower triangle, so S needs no symmetrising.
        let chol = s
            .cholesky()
            .ok_or(KalmanError::InnovationNotPositiveDefinite)?;
        let nis = y.dot(&chol.solve(&y));
        if let Some(threshold) = self.gate
            && (nis > threshold || nis.is_nan())
        {
            self.stats.rejections += 1;
            return Ok(UpdateOutcome::Rejected { nis, threshold });
        }
        // K = P Hᵀ S⁻¹  ⇔  Kᵀ = S⁻¹ (H P)  (S and P symmetric).
        let k: SMatrix<f64, N, M> = chol.solve(&hp).transpose();
        self.x += k * y;
        // Joseph form (I − KH) P (I − KH)ᵀ + K R Kᵀ, evaluated as A − (A Hᵀ) Kᵀ + (K R) Kᵀ with
        // A = (I − KH) P = P − K (H P): the same products, reassociated to reuse H P.
        let a = self.p - k * hp;
        self.p = a - (a * h.transpose()) * k.transpose() + (k * r) * k.transpose();
        self.stats.updates += 1;
        self.finish_step()?;
        Ok(UpdateOutcome::Accepted { nis })
    }

    /// Symmetrises P and checks it (and x) are finite and positive definite; on failure resets
    /// the covariance (and a non-finite state) and reports it.
    fn finish_step(&mut self) -> Result<(), KalmanError> {
        self.p = self.p.symmetric_part();
        let state_ok = self.x.iter().all(|v| v.is_finite());
        if state_ok && is_positive_definite(&self.p) {
            return Ok(());
        }
        if !state_ok {
            self.x = self.x0;
        }
        self.p = self.p0;
        self.stats.covariance_resets += 1;
        Err(KalmanError::CovarianceNotPositiveDefinite)
    }
}

/// F, B, Q of a built-in model with `axes` axes for a step of `dt` seconds. The state is laid
/// out axis by axis (`[p_x, v_x, p_y, v_y, …]`); `N` must be `order · axes`, `U` must be `axes`
/// for [`MotionModel::GpsImu`] (B is zero otherwise, any `U`).
///
/// Q is the continuous white-noise (Wiener) model integrated over dt for the first two models
/// (Bar-Shalom et al., *Estimation with Applications to Tracking*, §6.2), and `B σ² Bᵀ` for the
/// control-input model.
#[allow(clippy::type_complexity)]
pub fn kinematic_matrices<const N: usize, const U: usize>(
    model: MotionModel,
    axes: usize,
    dt: f64,
    process_noise: f64,
) -> Result<(SMatrix<f64, N, N>, SMatrix<f64, N, U>, SMatrix<f64, N, N>), KalmanError> {
    let k = model.order();
    if !(1..=3).contains(&axes) || k * axes != N {
        return Err(KalmanError::Config(format!(
            "{model:?} with {axes} axes needs {} states, the filter has {N}",
            k * axes
        )));
    }
    if model == MotionModel::GpsImu && U != axes {
        return Err(KalmanError::Config(format!(
            "gps_imu with {axes} axes needs {axes} control inputs, the filter has {U}"
        )));
    }
    if !(dt.is_finite() && dt >= 0.0) {
        return Err(KalmanError::BadDt(dt, f64::INFINITY));
    }
    let mut f = SMatrix::<f64, N, N>::identity();
    let mut b = SMatrix::<f64, N, U>::zeros();
    let mut q = SMatrix::<f64, N, N>::zeros();
    let (d2, d3, d4, d5) = (dt * dt, dt * dt * dt, dt.powi(4), dt.powi(5));
    for a in 0..axes {
        let o = a * k;
        f[(o, o + 1)] = dt;
        match model {
            MotionModel::ConstantVelocity => {
                let s = process_noise;
                q[(o, o)] = s * d3 / 3.0;
                q[(o, o + 1)] = s * d2 / 2.0;
                q[(o + 1, o)] = s * d2 / 2.0;
                q[(o + 1, o + 1)] = s * dt;
            }
            MotionModel::ConstantAcceleration => {
                let s = process_noise;
                f[(o, o + 2)] = d2 / 2.0;
                f[(o + 1, o + 2)] = dt;
                let blk = [
                    [d5 / 20.0, d4 / 8.0, d3 / 6.0],
                    [d4 / 8.0, d3 / 3.0, d2 / 2.0],
                    [d3 / 6.0, d2 / 2.0, dt],
                ];
                for (i, row) in blk.iter().enumerate() {
                    for (j, v) in row.iter().enumerate() {
                        q[(o + i, o + j)] = s * v;
                    }
                }
            }
            MotionModel::GpsImu => {
                let s2 = process_noise * process_noise;
                b[(o, a)] = d2 / 2.0;
                b[(o + 1, a)] = dt;
                q[(o, o)] = s2 * d4 / 4.0;
                q[(o, o + 1)] = s2 * d3 / 2.0;
                q[(o + 1, o)] = s2 * d3 / 2.0;
                q[(o + 1, o + 1)] = s2 * d2;
            }
        }
    }
    Ok((f, b, q))
}

/// A kinematic filter driven by timestamps: builds F, B and Q from the real dt of each step.
/// `N = order · axes`, `M = axes` (position measurement per axis), `U = axes` for GPS+IMU.
///
/// Restarts: once more than `max_dt_s` has passed since the last measurement it initialised
/// from or accepted (a dropout, or a track the gate keeps rejecting), the filter forgets its
/// state and waits for the next measurement to initialise it again. Until then, steps without
/// a measurement are predict-only and the covariance grows.
#[derive(Debug, Clone)]
pub struct KinematicFilter<const N: usize, const M: usize, const U: usize> {
    kf: KalmanFilter<N, M, U>,
    cfg: KinematicConfig,
    last_t: Option<f64>,
    /// Time of the last measurement used (initialisation or accepted update).
    last_meas_t: f64,
    restarts: u64,
}

impl<const N: usize, const M: usize, const U: usize> KinematicFilter<N, M, U> {
    /// A filter for `cfg` (validated here; sizes checked against `N`, `M`, `U`).
    pub fn new(cfg: KinematicConfig) -> Result<Self, KalmanError> {
        cfg.validate()?;
        if M != cfg.axes {
            return Err(KalmanError::Config(format!(
                "{} axes need {} measurements, the filter has {M}",
                cfg.axes, cfg.axes
            )));
        }
        let (f, b, q) = kinematic_matrices::<N, U>(cfg.model, cfg.axes, 0.0, cfg.process_noise)?;
        let k = cfg.model.order();
        let mut h = SMatrix::<f64, M, N>::zeros();
        for a in 0..cfg.axes {
            h[(a, a * k)] = 1.0;
        }
        let r = SMatrix::<f64, M, M>::identity() * cfg.measurement_std.powi(2);
        let p0 = SMatrix::<f64, N, N>::identity() * cfg.initial_std.powi(2);
        let mut kf = KalmanFilter::new(SVector::zeros(), p0, f, b, q, h, r)?;
        kf.set_gate(cfg.gate)?;
        Ok(KinematicFilter {
            kf,
            cfg,
            last_t: None,
            last_meas_t: 0.0,
            restarts: 0,
        })
    }

    /// The inner filter (state, covariance, counters).
    pub fn filter(&self) -> &KalmanFilter<N, M, U> {
        &self.kf
    }

    /// Whether the filter has a state (initialised from a measurement, not restarted since).
    pub fn is_initialised(&self) -> bool {
        self.last_t.is_some()
    }

    /// Times the filter restarted because no measurement came for more than `max_dt_s`.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Position of axis `a` (0-based), if it exists.
    pub fn position(&self, a: usize) -> Option<f64> {
        (a < self.cfg.axes).then(|| self.kf.x[a * self.cfg.model.order()])
    }

    /// Variance of the position of axis `a` (0-based), if it exists.
    pub fn position_variance(&self, a: usize) -> Option<f64> {
        let i = a * self.cfg.model.order();
        (a < self.cfg.axes).then(|| self.kf.p[(i, i)])
    }

    /// Advances to time `t_s` (seconds, any epoch) with control input `u` (zero if the model has
    /// none) and fuses `z` if present (a missing measurement is a predict-only step). The first
    /// call with a measurement initialises the positions from it. More than `max_dt_s` since
    /// the last measurement used (or since the last step) restarts the filter: this step
    /// re-initialises from `z`, or leaves it uninitialised without one. A step backwards is an
    /// error and changes nothing.
    pub fn step(
        &mut self,
        t_s: f64,
        u: &SVector<f64, U>,
        z: Option<&SVector<f64, M>>,
    ) -> Result<Option<UpdateOutcome>, KalmanError> {
        if !t_s.is_finite() {
            return Err(KalmanError::NonFinite("t"));
        }
        let k = self.cfg.model.order();
        match self.last_t {
            None => {
                let Some(z) = z else { return Ok(None) };
                check_finite(z, "z")?;
                let mut x = SVector::<f64, N>::zeros();
                let mut p = self.kf.p0;
                for a in 0..self.cfg.axes {
                    x[a * k] = z[a];
                    p[(a * k, a * k)] = self.cfg.measurement_std.powi(2);
                }
                self.kf.set_state(x, p)?;
                self.last_t = Some(t_s);
                self.last_meas_t = t_s;
                return Ok(None);
            }
            Some(last) => {
                let dt = t_s - last;
                if dt < 0.0 {
                    return Err(KalmanError::BadDt(dt, self.cfg.max_dt_s));
                }
                if dt > self.cfg.max_dt_s || t_s - self.last_meas_t > self.cfg.max_dt_s {
                    self.kf.reset();
                    self.last_t = None;
                    self.restarts += 1;
                    return self.step(t_s, u, z);
                }
                let (f, b, q) = kinematic_matrices::<N, U>(
                    self.cfg.model,
                    self.cfg.axes,
                    dt,
                    self.cfg.process_noise,
                )?;
                self.kf.set_transition(f, b, q)?;
                self.kf.predict(u)?;
                self.last_t = Some(t_s);
            }
        }
        match z {
            Some(z) => {
                let out = self.kf.update(z)?;
                if matches!(out, UpdateOutcome::Accepted { .. }) {
                    self.last_meas_t = t_s;
                }
                Ok(Some(out))
            }
            None => Ok(None),
        }
    }
}

/// A fully specified linear model from the configuration (row-major nested arrays). Sizes are
/// checked against the filter's `N`, `M`, `U` by [`LinearModelConfig::build`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearModelConfig {
    /// Transition matrix F (N×N).
    pub f: Vec<Vec<f64>>,
    /// Measurement matrix H (M×N).
    pub h: Vec<Vec<f64>>,
    /// Process noise Q (N×N, symmetric positive semi-definite).
    pub q: Vec<Vec<f64>>,
    /// Measurement noise R (M×M, symmetric positive definite).
    pub r: Vec<Vec<f64>>,
    /// Control matrix B (N×U); absent means no control input.
    #[serde(default)]
    pub b: Option<Vec<Vec<f64>>>,
    /// Initial state (N); default zeros.
    #[serde(default)]
    pub x0: Option<Vec<f64>>,
    /// Initial covariance P0 (N×N, positive definite).
    pub p0: Vec<Vec<f64>>,
    /// Mahalanobis gate confidence; absent: no gating.
    #[serde(default)]
    pub gate: Option<GateConfidence>,
}

fn to_matrix<const R: usize, const C: usize>(
    rows: &[Vec<f64>],
    what: &'static str,
) -> Result<SMatrix<f64, R, C>, KalmanError> {
    let cols = rows.first().map_or(0, Vec::len);
    if rows.len() != R || rows.iter().any(|r| r.len() != C) {
        return Err(KalmanError::Dimension {
            what,
            expected_rows: R,
            expected_cols: C,
            rows: rows.len(),
            cols,
        });
    }
    let m = SMatrix::<f64, R, C>::from_fn(|i, j| rows[i][j]);
    check_finite(&m, what)?;
    Ok(m)
}

impl LinearModelConfig {
    /// Checks dimensions against `(n, m, u)` without building: the loader calls this to report
    /// errors before choosing a monomorphised filter.
    pub fn validate_dims(&self, n: usize, m: usize, u: usize) -> Result<(), KalmanError> {
        let chk = |rows: &[Vec<f64>], what, r: usize, c: usize| {
            if rows.len() != r || rows.iter().any(|row| row.len() != c) {
                Err(KalmanError::Dimension {
                    what,
                    expected_rows: r,
                    expected_cols: c,
                    rows: rows.len(),
                    cols: rows.first().map_or(0, Vec::len),
                })
            } else {
                Ok(())
            }
        };
        chk(&self.f, "F", n, n)?;
        chk(&self.h, "H", m, n)?;
        chk(&self.q, "Q", n, n)?;
        chk(&self.r, "R", m, m)?;
        chk(&self.p0, "P0", n, n)?;
        if let Some(b) = &self.b {
            chk(b, "B", n, u)?;
        }
        if let Some(x0) = &self.x0
            && x0.len() != n
        {
            return Err(KalmanError::Dimension {
                what: "x0",
                expected_rows: n,
                expected_cols: 1,
                rows: x0.len(),
                cols: 1,
            });
        }
        Ok(())
    }

    /// Builds the filter, checking dimensions, finiteness and definiteness of P0, Q, R.
    pub fn build<const N: usize, const M: usize, const U: usize>(
        &self,
    ) -> Result<KalmanFilter<N, M, U>, KalmanError> {
        self.validate_dims(N, M, U)?;
        let b = match &self.b {
            Some(b) => to_matrix::<N, U>(b, "B")?,
            None => SMatrix::zeros(),
        };
        let x0 = match &self.x0 {
            Some(x) => SVector::<f64, N>::from_fn(|i, _| x[i]),
            None => SVector::zeros(),
        };
        let mut kf = KalmanFilter::new(
            x0,
            to_matrix(&self.p0, "P0")?,
            to_matrix(&self.f, "F")?,
            b,
            to_matrix(&self.q, "Q")?,
            to_matrix(&self.h, "H")?,
            to_matrix(&self.r, "R")?,
        )?;
        kf.set_gate(self.gate)?;
        Ok(kf)
    }
}

#[cfg(test)]
#[path = "kalman_tests.rs"]
mod tests;
