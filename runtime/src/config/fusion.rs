//! Fusion groups in the gateway config: the `[[fusion]]` tables, and the settings
//! of the aligner and of every fusion method.
//!
//! The method settings live here, not beside their algorithms in `outpost-actors`, because the
//! config schema belongs to this crate (dependencies point runtime ← protocols ← actors). The
//! algorithms import these structs; each struct checks its own values with `validate()`, which
//! names the offending key so that [`super::validate`] can report it with file, line, column and
//! key path (`fusion[0].voting.faults`).
//!
//! A group: `inputs` (aligned on a common `tick`), exactly one method section
//! (`kalman`, `complementary`, `madgwick`, `weighted_average`, `voting`), and its outputs:
//! `output = "name"` for one output stream, or `outputs = [...]` where a method has several
//! (see [`FusionGroupConfig`] for the role of each input and output, per method).

use serde::{Deserialize, Serialize};

use super::types::Dur;

/// A problem in one fusion setting: `key` is the key inside its section (e.g. `faults`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct FusionConfigError {
    /// The key inside the section (`faults`, `axes`, `variances`...).
    pub key: &'static str,
    /// What is wrong and what was expected.
    pub message: String,
}

fn bad(key: &'static str, message: String) -> Result<(), FusionConfigError> {
    Err(FusionConfigError { key, message })
}

// ----------------------------------------------------------------------------------------
// Aligner
// ----------------------------------------------------------------------------------------

/// How a stream's value is computed between its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// Zero-order hold: the newest sample at or before the tick.
    #[serde(rename = "zero_order_hold", alias = "hold")]
    Hold,
    /// Linear between the samples either side of the tick.
    #[default]
    Linear,
    /// Cubic Hermite with Catmull-Rom (finite-difference) tangents over the four surrounding
    /// samples; one-sided tangents at the ends of the history.
    Cubic,
}

/// What happens to a sample older than the watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    /// Drop it and count it.
    #[default]
    Drop,
    /// Use it and re-emit the frames it changes, flagged as corrections.
    Reemit,
}

fn default_stale_ms() -> u64 {
    5_000
}
fn default_history() -> usize {
    256
}
fn default_clock_window() -> usize {
    64
}
fn default_clock_bucket_ms() -> u64 {
    1_000
}
fn default_lateness_ms() -> u64 {
    200
}
fn default_max_pending() -> usize {
    10_000
}
fn default_max_future_ms() -> u64 {
    60_000
}

/// One input stream of an aligner.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlignerStreamConfig {
    /// Stream name.
    pub stream: String,
    /// Interpolation (default linear).
    #[serde(default)]
    pub interpolation: Interpolation,
    /// Silence after which the stream is marked bad, ms (default 5000, > 0).
    #[serde(default = "default_stale_ms")]
    pub stale_after_ms: u64,
    /// Longest gap between two samples that interpolation bridges, ms (default: the
    /// stream's `stale_after_ms`; 1 to `stale_after_ms`). Ticks inside a longer gap are
    /// treated as after a silent stream's newest sample: held (uncertain, marked held) for
    /// up to `stale_after_ms`, then missing.
    #[serde(default)]
    pub max_gap_ms: Option<u64>,
    /// Map source timestamps to the arrival clock with the estimated offset and drift
    /// (default false; the estimate is kept either way).
    #[serde(default)]
    pub correct_clock: bool,
}

/// Aligner settings in the aligner's own units (ns, ms). The gateway config writes them as
/// the group keys of [`FusionGroupConfig`]; [`FusionGroupConfig::aligner_config`] converts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlignerConfig {
    /// Common tick period, ns (> 0). Frames are at multiples of it.
    pub period_ns: i64,
    /// Allowed lateness, ms (default 200): watermark = newest timestamp − this.
    #[serde(default = "default_lateness_ms")]
    pub allowed_lateness_ms: u64,
    /// Late-sample policy (default drop).
    #[serde(default)]
    pub late_policy: LatePolicy,
    /// Samples kept per stream (default 256, 4–65536).
    #[serde(default = "default_history")]
    pub history: usize,
    /// Clock-estimate buckets kept per stream (default 64, 2–4096): the fit spans
    /// `clock_window × clock_bucket_ms` of source time.
    #[serde(default = "default_clock_window")]
    pub clock_window: usize,
    /// Source time per clock bucket, ms (default 1000, > 0): each bucket keeps the pair with
    /// the smallest `arrival − source` (a min-filter on the one-way delay).
    #[serde(default = "default_clock_bucket_ms")]
    pub clock_bucket_ms: u64,
    /// Most ticks emitted per poll; older pending ticks are skipped (default 10000).
    #[serde(default = "default_max_pending")]
    pub max_pending_ticks: usize,
    /// A sample stamped more than this ahead of its arrival time (after correction) is
    /// rejected, ms (default 60000; 0 disables the check).
    #[serde(default = "default_max_future_ms")]
    pub max_future_ms: u64,
    /// When no sample has been accepted for this long (arrival clock), the watermark moves
    /// on with the arrival clock, so silent streams go stale and their ticks are emitted,
    /// ms (default: the largest `stale_after_ms` of the streams; 1 to 86400000).
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
    /// The streams (1–64, distinct).
    pub streams: Vec<AlignerStreamConfig>,
}

impl AlignerConfig {
    /// Checks ranges and distinct stream names.
    pub fn validate(&self) -> Result<(), FusionConfigError> {
        if self.period_ns <= 0 {
            return bad(
                "period_ns",
                format!("period_ns = {} must be > 0", self.period_ns),
            );
        }
        if self.streams.is_empty() || self.streams.len() > 64 {
            return bad(
                "streams",
                format!("a group needs 1-64 streams, not {}", self.streams.len()),
            );
        }
        if !(4..=65_536).contains(&self.history) {
            return bad(
                "history",
                format!("history = {} must be in 4-65536", self.history),
            );
        }
        if !(2..=4096).contains(&self.clock_window) {
            return bad(
                "clock_window",
                format!("clock_window = {} must be in 2-4096", self.clock_window),
            );
        }
        if self.clock_bucket_ms == 0 || self.clock_bucket_ms > 3_600_000 {
            return bad(
                "clock_bucket_ms",
                "clock_bucket_ms must be in 1-3600000".into(),
            );
        }
        if self.max_pending_ticks == 0 {
            return bad("max_pending_ticks", "max_pending_ticks must be > 0".into());
        }
        if self.allowed_lateness_ms > 86_400_000 {
            return bad(
                "allowed_lateness_ms",
                "allowed_lateness_ms must be at most one day".into(),
            );
        }
        if let Some(ms) = self.idle_timeout_ms
            && !(1..=86_400_000).contains(&ms)
        {
            return bad(
                "idle_timeout_ms",
                format!("idle_timeout_ms = {ms} must be in 1-86400000"),
            );
        }
        for (i, s) in self.streams.iter().enumerate() {
            if s.stale_after_ms == 0 || s.stale_after_ms > 86_400_000 {
                return bad(
                    "stale_after_ms",
                    format!(
                        "stream {:?}: stale_after_ms must be in 1-86400000",
                        s.stream
                    ),
                );
            }
            if let Some(gap) = s.max_gap_ms
                && !(1..=s.stale_after_ms).contains(&gap)
            {
                return bad(
                    "max_gap_ms",
                    format!(
                        "stream {:?}: max_gap_ms = {gap} must be in 1-{} (its stale_after_ms)",
                        s.stream, s.stale_after_ms
                    ),
                );
            }
            if self.streams[..i].iter().any(|o| o.stream == s.stream) {
                return bad("streams", format!("stream {:?} listed twice", s.stream));
            }
        }
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------
// Kalman (built-in kinematic models)
// ----------------------------------------------------------------------------------------

/// Confidence level of the Mahalanobis gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum GateConfidence {
    /// 95 %: about one good measurement in 20 is rejected.
    #[serde(rename = "0.95")]
    P95,
    /// 99 %.
    #[serde(rename = "0.99")]
    P99,
    /// 99.9 %.
    #[serde(rename = "0.999")]
    P999,
}

/// Which kinematic model a built-in filter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MotionModel {
    /// State per axis `[position, velocity]`; acceleration is continuous white noise with
    /// spectral density `process_noise` ((m/s²)²/Hz).
    ConstantVelocity,
    /// State per axis `[position, velocity, acceleration]`; jerk is continuous white noise
    /// with spectral density `process_noise` ((m/s³)²/Hz).
    ConstantAcceleration,
    /// State per axis `[position, velocity]`; the measured IMU acceleration is the control
    /// input and its white noise (standard deviation `process_noise`, m/s²) drives Q.
    GpsImu,
}

impl MotionModel {
    /// States per axis.
    pub fn order(self) -> usize {
        match self {
            MotionModel::ConstantVelocity | MotionModel::GpsImu => 2,
            MotionModel::ConstantAcceleration => 3,
        }
    }

    /// Input streams a group with this model and `axes` axes needs: one position per axis,
    /// plus one acceleration per axis for `gps_imu`.
    pub fn inputs(self, axes: usize) -> usize {
        match self {
            MotionModel::GpsImu => 2 * axes,
            _ => axes,
        }
    }
}

fn default_axes() -> usize {
    1
}
fn one() -> f64 {
    1.0
}
fn default_initial_std() -> f64 {
    100.0
}
fn default_kalman_max_dt() -> f64 {
    10.0
}

/// Configuration of a built-in kinematic Kalman filter (a `[fusion.kalman]` table).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KinematicConfig {
    /// The motion model.
    pub model: MotionModel,
    /// Number of spatial axes, 1–3 (default 1). Measurements are the positions of each axis.
    #[serde(default = "default_axes")]
    pub axes: usize,
    /// Process noise: spectral density for `constant_velocity` / `constant_acceleration`,
    /// accelerometer noise standard deviation (m/s²) for `gps_imu`. Must be > 0 (default 1).
    #[serde(default = "one")]
    pub process_noise: f64,
    /// Position measurement noise standard deviation, per axis (default 1). Must be > 0.
    #[serde(default = "one")]
    pub measurement_std: f64,
    /// Standard deviation of the initial state (each component; default 100). Must be > 0.
    #[serde(default = "default_initial_std")]
    pub initial_std: f64,
    /// Mahalanobis gate confidence ("0.95", "0.99", "0.999"); absent: no gating.
    #[serde(default)]
    pub gate: Option<GateConfidence>,
    /// Longest step accepted, seconds (default 10); a longer gap re-initialises the filter.
    #[serde(default = "default_kalman_max_dt")]
    pub max_dt_s: f64,
}

impl KinematicConfig {
    /// Checks the values (ranges, positivity).
    pub fn validate(&self) -> Result<(), FusionConfigError> {
        if !(1..=3).contains(&self.axes) {
            return bad("axes", format!("axes = {} must be 1, 2 or 3", self.axes));
        }
        for (name, v) in [
            ("process_noise", self.process_noise),
            ("measurement_std", self.measurement_std),
            ("initial_std", self.initial_std),
            ("max_dt_s", self.max_dt_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(name, format!("{name} = {v} must be > 0"));
            }
        }
        Ok(())
    }

    /// States this configuration needs (`order · axes`).
    pub fn state_dim(&self) -> usize {
        self.model.order() * self.axes
    }
}

// ----------------------------------------------------------------------------------------
// Attitude: complementary and Madgwick
// ----------------------------------------------------------------------------------------

fn default_attitude_max_dt() -> f64 {
    1.0
}
fn default_beta() -> f64 {
    0.1
}
/// Standard gravity, m/s².
pub const STANDARD_GRAVITY: f64 = 9.80665;
fn default_gravity() -> f64 {
    STANDARD_GRAVITY
}

/// Complementary filter settings (a `[fusion.complementary]` table).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ComplementaryConfig {
    /// Time constant τ, seconds (default 1, > 0): each step uses `α = τ / (τ + dt)`, so the
    /// blend is the same whatever the sample rate. Longer trusts the gyroscope more.
    #[serde(default = "one")]
    pub time_constant_s: f64,
    /// Skip the accelerometer correction when `| |a| / gravity − 1 |` exceeds this fraction
    /// (linear acceleration present). 0 disables (default).
    #[serde(default)]
    pub accel_rejection: f64,
    /// Magnitude of 1 g in the accelerometer's unit, the reference of `accel_rejection`
    /// (default 9.80665, m/s²; 1.0 for an accelerometer that reports g). > 0.
    #[serde(default = "default_gravity")]
    pub gravity: f64,
    /// Longest accepted time step, seconds (default 1).
    #[serde(default = "default_attitude_max_dt")]
    pub max_dt_s: f64,
}

impl ComplementaryConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), FusionConfigError> {
        if !(self.time_constant_s.is_finite() && self.time_constant_s > 0.0) {
            return bad(
                "time_constant_s",
                format!("time_constant_s = {} must be > 0", self.time_constant_s),
            );
        }
        if !(self.accel_rejection.is_finite() && self.accel_rejection >= 0.0) {
            return bad(
                "accel_rejection",
                format!("accel_rejection = {} must be >= 0", self.accel_rejection),
            );
        }
        if !(self.gravity.is_finite() && self.gravity > 0.0) {
            return bad("gravity", format!("gravity = {} must be > 0", self.gravity));
        }
        if !(self.max_dt_s.is_finite() && self.max_dt_s > 0.0) {
            return bad(
                "max_dt_s",
                format!("max_dt_s = {} must be > 0", self.max_dt_s),
            );
        }
        Ok(())
    }
}

/// Madgwick filter settings (a `[fusion.madgwick]` table).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MadgwickConfig {
    /// Gradient-descent gain β, rad/s (default 0.1; Madgwick: β = √(3/4) · gyro error).
    /// In [0, 10].
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Longest accepted time step, seconds (default 1).
    #[serde(default = "default_attitude_max_dt")]
    pub max_dt_s: f64,
}

impl MadgwickConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), FusionConfigError> {
        if !(self.beta.is_finite() && (0.0..=10.0).contains(&self.beta)) {
            return bad("beta", format!("beta = {} must be in [0, 10]", self.beta));
        }
        if !(self.max_dt_s.is_finite() && self.max_dt_s > 0.0) {
            return bad(
                "max_dt_s",
                format!("max_dt_s = {} must be > 0", self.max_dt_s),
            );
        }
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------
// Weighted average
// ----------------------------------------------------------------------------------------

fn default_alpha() -> f64 {
    0.02
}
fn default_k() -> f64 {
    3.0
}
fn yes() -> bool {
    true
}
fn default_wavg_fault_window() -> u32 {
    20
}
fn default_recover_frames() -> u32 {
    60
}

/// Weighted-average settings (a `[fusion.weighted_average]` table).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedAverageConfig {
    /// Number of sensors (1–64), in reading order. In a gateway config leave it out: it is
    /// the number of the group's inputs (0 = not set).
    #[serde(default)]
    pub sensors: usize,
    /// Variance of each sensor (one value for all, or one per sensor; > 0). In adaptive mode
    /// these are the starting values.
    pub variances: Vec<f64>,
    /// Estimate the variances online from residuals (default false: static weights).
    #[serde(default)]
    pub adaptive: bool,
    /// Weight of a new residual in the exponentially weighted variance, in (0, 1]
    /// (default 0.02, i.e. a memory of about 50 frames).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Outlier threshold k in robust standard deviations from the median (default 3; > 0).
    #[serde(default = "default_k")]
    pub outlier_k: f64,
    /// Reject outliers at all (default true).
    #[serde(default = "yes")]
    pub reject_outliers: bool,
    /// A sensor excluded as an outlier in more than half of its last `fault_window` screened
    /// frames is flagged faulty: excluded from then on and reported once as an alarm
    /// (default 20, 1–10000).
    #[serde(default = "default_wavg_fault_window")]
    pub fault_window: u32,
    /// A faulty sensor is used again only after it agreed with the healthy sensors (within
    /// `outlier_k` robust standard deviations of their median) this many frames in a row
    /// (default 60, 1–1000000).
    #[serde(default = "default_recover_frames")]
    pub recover_frames: u32,
}

impl WeightedAverageConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), FusionConfigError> {
        if !(1..=64).contains(&self.sensors) {
            return bad(
                "sensors",
                format!("sensors = {} must be in 1-64", self.sensors),
            );
        }
        if self.variances.len() != 1 && self.variances.len() != self.sensors {
            return bad(
                "variances",
                format!(
                    "variances needs 1 or {} values (one per sensor), got {}",
                    self.sensors,
                    self.variances.len()
                ),
            );
        }
        if let Some(v) = self
            .variances
            .iter()
            .find(|v| !(v.is_finite() && **v > 0.0))
        {
            return bad("variances", format!("variance {v} must be > 0"));
        }
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return bad("alpha", format!("alpha = {} must be in (0, 1]", self.alpha));
        }
        if !(self.outlier_k.is_finite() && self.outlier_k > 0.0) {
            return bad(
                "outlier_k",
                format!("outlier_k = {} must be > 0", self.outlier_k),
            );
        }
        if !(1..=10_000).contains(&self.fault_window) {
            return bad(
                "fault_window",
                format!("fault_window = {} must be in 1-10000", self.fault_window),
            );
        }
        if !(1..=1_000_000).contains(&self.recover_frames) {
            return bad(
                "recover_frames",
                format!(
                    "recover_frames = {} must be in 1-1000000",
                    self.recover_frames
                ),
            );
        }
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------
// Voting
// ----------------------------------------------------------------------------------------

/// The voting method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VotingMethod {
    /// Discrete values: the value held by more than half of the sensors.
    Majority,
    /// Continuous values: the median.
    Median,
    /// Continuous values with uncertainty: Marzullo's interval intersection.
    Marzullo,
    /// Continuous values with uncertainty: Brooks–Iyengar.
    BrooksIyengar,
}

impl VotingMethod {
    /// Smallest group that tolerates `f` faulty sensors with this method.
    pub fn min_sensors(self, f: usize) -> usize {
        match self {
            VotingMethod::Majority | VotingMethod::Median => 2 * f + 1,
            VotingMethod::Marzullo | VotingMethod::BrooksIyengar => 3 * f + 1,
        }
    }
}

fn default_fault_frames() -> u32 {
    5
}

/// Voting settings (a `[fusion.voting]` table).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VotingConfig {
    /// The method.
    pub method: VotingMethod,
    /// Number of sensors in the group (2–64), in the order the readings are given. In a
    /// gateway config leave it out: it is the number of the group's inputs (0 = not set).
    #[serde(default)]
    pub sensors: usize,
    /// Faulty sensors to tolerate; checked against `sensors` for the method.
    pub faults: usize,
    /// Consecutive out-voted frames after which a sensor is flagged faulty (default 5, ≥ 1).
    #[serde(default = "default_fault_frames")]
    pub fault_frames: u32,
    /// Per-sensor uncertainty (half-width of `value ± uncertainty`, > 0) for the continuous
    /// methods: one value for all sensors or one per sensor. Ignored by majority.
    #[serde(default)]
    pub uncertainty: Vec<f64>,
}

impl VotingConfig {
    /// Checks the group size against the method's fault bound and the other values.
    pub fn validate(&self) -> Result<(), FusionConfigError> {
        if !(2..=64).contains(&self.sensors) {
            return bad(
                "sensors",
                format!("sensors = {} must be in 2-64", self.sensors),
            );
        }
        let need = self.method.min_sensors(self.faults);
        if self.sensors < need {
            let rule = match self.method {
                VotingMethod::Majority | VotingMethod::Median => "n >= 2f + 1",
                _ => "n >= 3f + 1 (f < n/3)",
            };
            return bad(
                "faults",
                format!(
                    "{:?} tolerating {} faults needs {need} sensors ({rule}); the group has {}",
                    self.method, self.faults, self.sensors
                ),
            );
        }
        if self.fault_frames == 0 {
            return bad("fault_frames", "fault_frames must be >= 1".into());
        }
        if self.method != VotingMethod::Majority {
            if self.uncertainty.len() != 1 && self.uncertainty.len() != self.sensors {
                return bad(
                    "uncertainty",
                    format!(
                        "uncertainty needs 1 or {} values (one per sensor), got {}",
                        self.sensors,
                        self.uncertainty.len()
                    ),
                );
            }
            if let Some(u) = self
                .uncertainty
                .iter()
                .find(|u| !(u.is_finite() && **u > 0.0))
            {
                return bad("uncertainty", format!("uncertainty {u} must be > 0"));
            }
        }
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------
// The group
// ----------------------------------------------------------------------------------------

/// A fusion group: its input streams are aligned on a common tick, then fused by exactly one
/// method. Roles of the inputs and outputs, per method:
///
/// | method | inputs, in order | outputs |
/// |---|---|---|
/// | `kalman` (constant velocity/acceleration) | position of axis x[, y[, z]] | fused position per axis |
/// | `kalman` (`gps_imu`) | positions per axis, then accelerations per axis | fused position per axis |
/// | `complementary`, `madgwick` | gyro x, y, z (rad/s), accel x, y, z (any unit) | roll, pitch (degrees) |
/// | `weighted_average` | the redundant sensors | the fused value |
/// | `voting` | the redundant sensors | the voted value; faults on `alarm` |
///
/// `weighted_average` raises its faults on `alarm` too.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FusionGroupConfig {
    /// Unique name (metric label `group`).
    pub name: String,
    /// Input stream names (from devices or earlier fusion groups), in the method's order.
    pub inputs: Vec<String>,
    /// Name of the fused output stream, for methods with one output (short for
    /// `outputs = [name]`).
    pub output: Option<String>,
    /// Names of the output streams, for methods with several (attitude: roll, pitch; a
    /// Kalman filter with several axes: one position per axis).
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Kalman only: streams for the standard deviation of each fused position (one per
    /// axis, same unit), so the filter's uncertainty is visible downstream (it grows during
    /// predict-only steps). Optional.
    #[serde(default)]
    pub std_outputs: Vec<String>,
    /// Voting and weighted average: stream of the critical alarm samples raised when a sensor
    /// is flagged faulty (value: the faulty input's stream name). Default `<name>/alarm`.
    pub alarm: Option<String>,
    /// Common timeline step.
    pub tick: Dur<1, 3_600_000>,
    #[serde(default = "default_lateness")]
    pub allowed_lateness: Dur<0, 3_600_000>,
    #[serde(default)]
    pub late: LatePolicy,
    /// A stream silent longer than this is marked bad until it speaks again.
    #[serde(default = "default_stale")]
    pub stale_after: Dur<1, 86_400_000>,
    /// Longest gap between two samples of an input that interpolation bridges (default
    /// `stale_after`, at most `stale_after`).
    pub max_gap: Option<Dur<1, 86_400_000>>,
    /// With no input sample for this long, the group's time moves on with the gateway's
    /// clock (default `stale_after`).
    pub idle_timeout: Option<Dur<1, 86_400_000>>,
    #[serde(default)]
    pub interpolation: Interpolation,
    /// Correct each input's timestamps by its estimated clock offset and drift.
    #[serde(default)]
    pub correct_clock: bool,
    pub kalman: Option<KinematicConfig>,
    pub complementary: Option<ComplementaryConfig>,
    pub madgwick: Option<MadgwickConfig>,
    pub weighted_average: Option<WeightedAverageConfig>,
    pub voting: Option<VotingConfig>,
}

fn default_lateness() -> Dur<0, 3_600_000> {
    Dur::from_millis(200)
}
fn default_stale() -> Dur<1, 86_400_000> {
    Dur::from_millis(5_000)
}

/// The method of a group, with the sensor counts filled in from its inputs.
#[derive(Debug, Clone, PartialEq)]
pub enum FusionMethod {
    Kalman(KinematicConfig),
    Complementary(ComplementaryConfig),
    Madgwick(MadgwickConfig),
    WeightedAverage(WeightedAverageConfig),
    Voting(VotingConfig),
}

impl FusionMethod {
    /// The key of the method's section (`kalman`, `voting`...).
    pub fn key(&self) -> &'static str {
        match self {
            FusionMethod::Kalman(_) => "kalman",
            FusionMethod::Complementary(_) => "complementary",
            FusionMethod::Madgwick(_) => "madgwick",
            FusionMethod::WeightedAverage(_) => "weighted_average",
            FusionMethod::Voting(_) => "voting",
        }
    }

    /// Input streams the method needs (`None`: any number, the sensors of the group).
    pub fn inputs(&self) -> Option<usize> {
        match self {
            FusionMethod::Kalman(k) => Some(k.model.inputs(k.axes)),
            FusionMethod::Complementary(_) | FusionMethod::Madgwick(_) => Some(6),
            FusionMethod::WeightedAverage(_) | FusionMethod::Voting(_) => None,
        }
    }

    /// Output streams the method produces.
    pub fn outputs(&self) -> usize {
        match self {
            FusionMethod::Kalman(k) => k.axes,
            FusionMethod::Complementary(_) | FusionMethod::Madgwick(_) => 2,
            FusionMethod::WeightedAverage(_) | FusionMethod::Voting(_) => 1,
        }
    }

    /// Checks the method's own values.
    pub fn validate(&self) -> Result<(), FusionConfigError> {
        match self {
            FusionMethod::Kalman(c) => c.validate(),
            FusionMethod::Complementary(c) => c.validate(),
            FusionMethod::Madgwick(c) => c.validate(),
            FusionMethod::WeightedAverage(c) => c.validate(),
            FusionMethod::Voting(c) => c.validate(),
        }
    }
}

/// The method section keys, for messages.
pub const FUSION_METHODS: [&str; 5] = [
    "kalman",
    "complementary",
    "madgwick",
    "weighted_average",
    "voting",
];

impl FusionGroupConfig {
    /// The method sections present (a valid group has exactly one), sensor counts filled in
    /// from the inputs where the section leaves them out.
    pub fn methods(&self) -> Vec<FusionMethod> {
        let n = self.inputs.len();
        let mut out = Vec::new();
        if let Some(c) = &self.kalman {
            out.push(FusionMethod::Kalman(c.clone()));
        }
        if let Some(c) = &self.complementary {
            out.push(FusionMethod::Complementary(c.clone()));
        }
        if let Some(c) = &self.madgwick {
            out.push(FusionMethod::Madgwick(c.clone()));
        }
        if let Some(c) = &self.weighted_average {
            let mut c = c.clone();
            if c.sensors == 0 {
                c.sensors = n;
            }
            out.push(FusionMethod::WeightedAverage(c));
        }
        if let Some(c) = &self.voting {
            let mut c = c.clone();
            if c.sensors == 0 {
                c.sensors = n;
            }
            out.push(FusionMethod::Voting(c));
        }
        out
    }

    /// The method, if exactly one section is present.
    pub fn method(&self) -> Option<FusionMethod> {
        let mut m = self.methods();
        if m.len() == 1 { m.pop() } else { None }
    }

    /// The output streams: `output` or `outputs`.
    pub fn output_streams(&self) -> Vec<String> {
        let mut v: Vec<String> = self.output.iter().cloned().collect();
        v.extend(self.outputs.iter().cloned());
        v
    }

    /// The alarm stream (voting and weighted-average groups: the methods that flag sensors).
    pub fn alarm_stream(&self) -> Option<String> {
        (self.voting.is_some() || self.weighted_average.is_some()).then(|| {
            self.alarm
                .clone()
                .unwrap_or_else(|| format!("{}/alarm", self.name))
        })
    }

    /// The aligner settings of this group. Majority voting holds values (zero-order hold)
    /// whatever `interpolation` says: an interpolated discrete value means nothing.
    pub fn aligner_config(&self) -> AlignerConfig {
        let discrete = self
            .voting
            .as_ref()
            .is_some_and(|v| v.method == VotingMethod::Majority);
        let interpolation = if discrete {
            Interpolation::Hold
        } else {
            self.interpolation
        };
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        AlignerConfig {
            period_ns: i64::try_from(self.tick.get().as_nanos()).unwrap_or(i64::MAX),
            allowed_lateness_ms: ms(self.allowed_lateness.get()),
            late_policy: self.late,
            history: default_history(),
            clock_window: default_clock_window(),
            clock_bucket_ms: default_clock_bucket_ms(),
            max_pending_ticks: default_max_pending(),
            max_future_ms: default_max_future_ms(),
            idle_timeout_ms: self.idle_timeout.map(|d| ms(d.get())),
            streams: self
                .inputs
                .iter()
                .map(|s| AlignerStreamConfig {
                    stream: s.clone(),
                    interpolation,
                    stale_after_ms: ms(self.stale_after.get()),
                    max_gap_ms: self.max_gap.map(|d| ms(d.get())),
                    correct_clock: self.correct_clock,
                })
                .collect(),
        }
    }
}
