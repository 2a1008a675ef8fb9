//! Fusion groups at run time: one supervised actor per `[[fusion]]` group, under a `fusion`
//! supervisor (one-for-one) under the root.
//!
//! Each actor subscribes to its group's input streams on the [`Bus`], feeds every sample to
//! the group's [`Aligner`] with its arrival time, and on a timer (the group's tick, clamped to
//! 10 ms–1 s) tells the aligner the time (so a group whose inputs all fell silent still moves
//! on: its ticks are emitted with the inputs held, then missing), polls it for final frames,
//! runs the group's method on each frame and submits the results to [`Ingest`] as samples of
//! the output streams, stamped with the frame's tick: priority normal for fused values,
//! priority **critical** for fault alarms (voting, weighted average). Fused
//! outputs are thus stored, shipped and published on the bus like any device's samples, so a
//! later group can take them as inputs.
//!
//! **One actor per group, owning both the aligner and the method** — not an aligner actor
//! plus a fusion actor, as a first sketch had it. Both are pure, in-process and stateful in
//! lock-step (a Kalman or attitude filter's state is a function of the frames it was given):
//! a fault in either must restart both, a second actor would only add a per-frame message
//! hop and a mailbox to bound, and the supervision granularity that matters — one group's
//! fault never reaches another group — is kept. The pure part is [`FusionGroup`] (no I/O,
//! tested without actors); the actor is a thin loop around it.
//!
//! Per method, with the inputs in the order of `inputs` (see `config/reference.toml`):
//! - `kalman`: positions per axis (then, for `gps_imu`, accelerations per axis as control
//!   input; a missing acceleration counts as zero and marks the output uncertain). A value the
//!   aligner only *held* past an input's last sample is no measurement: it counts as missing.
//!   A frame without every position is a predict-only step (output uncertain, its standard
//!   deviation growing). More than `max_dt_s` without a measurement used restarts the filter:
//!   no output until the next measurement initialises it. Output: the fused position per
//!   axis, from the first measurement on, and with `std_outputs` its standard deviation per
//!   axis. Gate rejections are counted.
//! - `complementary`, `madgwick`: gyro x, y, z (rad/s), accel x, y, z; frames missing any of
//!   them, or holding any of them past its last sample, are skipped; a gap longer than
//!   `max_dt_s` restarts the filter. Outputs: roll and pitch in **degrees**. Accelerometer
//!   corrections the complementary filter skips (magnitude off 1 g by more than
//!   `accel_rejection`) count as rejections; a long streak of them is logged once.
//! - `weighted_average`: the fused value; outlier exclusions are counted as rejections. A
//!   sensor excluded in most of its last `fault_window` frames is flagged faulty, with the
//!   same alarm as voting (below), and used again only after `recover_frames` agreeing frames.
//! - `voting`: the voted value (majority: an integer; the inputs are held, not interpolated).
//!   A sensor flagged faulty (by voting or by the weighted average) produces an `ALARM:` log
//!   line and one sample on the group's alarm stream
//!   (`<group>/alarm` unless `alarm` names another) whose value is the faulty input's
//!   stream name, submitted with [`Priority::Critical`].
//!
//! Output quality: good when every input used was good, uncertain otherwise. Re-emitted
//! (correction) frames are fused again by `weighted_average` only; the stateful methods
//! (Kalman, attitude, voting streaks) cannot step back in time and skip them.
//!
//! Metrics (label `group`): `outpost_fusion_frames`, `outpost_fusion_rejections`,
//! `outpost_fusion_errors` (frames the method could not fuse: no agreement, too few sensors,
//! a filter that rejected its input), `outpost_fusion_restarts` (Kalman and attitude filters
//! restarted after a gap), `outpost_fusion_faulty_sensors` (gauge),
//! `outpost_aligner_late` (late samples, dropped or re-emitted), `outpost_aligner_stale`
//! (gauge: inputs stale in the newest frame).

use std::time::Duration;

use nalgebra::{SVector, Vector3};
use outpost_runtime::config::{FusionGroupConfig, FusionMethod, MotionModel, VotingMethod};
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Priority, Quality, Sample, StreamId, TimestampNs, Value, now_ns};
use outpost_runtime::supervisor::{ChildSpec, Restart, Strategy, SupervisorSpec};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

use crate::aligner::{Aligner, AlignerError, Frame};
use crate::fusion::complementary::{Attitude, AttitudeError, Complementary, Madgwick};
use crate::fusion::kalman::{KalmanError, KinematicConfig, KinematicFilter, UpdateOutcome};
use crate::fusion::voting::{FaultAlarm, VoteError, Voter};
use crate::fusion::wavg::{WavgError, WeightedAverage};
use crate::ingest::Ingest;

/// Why a fusion group cannot be set up (the config loader normally catches these first).
#[derive(Debug, thiserror::Error)]
pub enum FusionSetupError {
    #[error("fusion group {group:?}: {message}")]
    Group { group: String, message: String },
}

fn setup_err(group: &str, message: impl ToString) -> FusionSetupError {
    FusionSetupError::Group {
        group: group.to_owned(),
        message: message.to_string(),
    }
}

/// Bus buffer per group: samples beyond it are dropped by the bus (and counted there).
const BUS_CAPACITY: usize = 4_096;

// ----------------------------------------------------------------------------------------
// The pure part
// ----------------------------------------------------------------------------------------

/// Counters of a group (cumulative); the actor exports them as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Frames fused (new frames and corrections).
    pub frames: u64,
    /// Kalman gate rejections, weighted-average outlier exclusions, complementary
    /// accelerometer corrections skipped.
    pub rejections: u64,
    /// Frames the method could not fuse.
    pub errors: u64,
    /// Sensors currently flagged faulty (voting).
    pub faulty: u64,
    /// Late samples (dropped or re-emitted).
    pub late: u64,
    /// Inputs stale in the newest frame.
    pub stale: u64,
    /// Kalman or attitude filters restarted after a gap longer than `max_dt_s`.
    pub restarts: u64,
}

/// What one poll produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GroupOutput {
    /// Fused values (priority normal).
    pub samples: Vec<Sample>,
    /// Alarms (priority critical).
    pub alarms: Vec<Sample>,
}

/// A Kalman filter of one of the built-in sizes (state N = order · axes, M = axes
/// measurements, U = axes controls for `gps_imu`); boxed, the sizes differ a lot.
#[derive(Debug, Clone)]
enum Kalman {
    Cv1(Box<KinematicFilter<2, 1, 0>>),
    Cv2(Box<KinematicFilter<4, 2, 0>>),
    Cv3(Box<KinematicFilter<6, 3, 0>>),
    Ca1(Box<KinematicFilter<3, 1, 0>>),
    Ca2(Box<KinematicFilter<6, 2, 0>>),
    Ca3(Box<KinematicFilter<9, 3, 0>>),
    Gi1(Box<KinematicFilter<2, 1, 1>>),
    Gi2(Box<KinematicFilter<4, 2, 2>>),
    Gi3(Box<KinematicFilter<6, 3, 3>>),
}

impl Kalman {
    fn new(c: &KinematicConfig) -> Result<Kalman, KalmanError> {
        use MotionModel::*;
        let c = c.clone();
        Ok(match (c.model, c.axes) {
            (ConstantVelocity, 1) => Kalman::Cv1(Box::new(KinematicFilter::new(c)?)),
            (ConstantVelocity, 2) => Kalman::Cv2(Box::new(KinematicFilter::new(c)?)),
            (ConstantVelocity, 3) => Kalman::Cv3(Box::new(KinematicFilter::new(c)?)),
            (ConstantAcceleration, 1) => Kalman::Ca1(Box::new(KinematicFilter::new(c)?)),
            (ConstantAcceleration, 2) => Kalman::Ca2(Box::new(KinematicFilter::new(c)?)),
            (ConstantAcceleration, 3) => Kalman::Ca3(Box::new(KinematicFilter::new(c)?)),
            (GpsImu, 1) => Kalman::Gi1(Box::new(KinematicFilter::new(c)?)),
            (GpsImu, 2) => Kalman::Gi2(Box::new(KinematicFilter::new(c)?)),
            (GpsImu, 3) => Kalman::Gi3(Box::new(KinematicFilter::new(c)?)),
            (_, a) => {
                return Err(KalmanError::Config(format!("axes = {a} must be 1, 2 or 3")));
            }
        })
    }

    /// One step at `t_s` with the frame's values (positions, then accelerations; `None` =
    /// missing). `None` while the filter has no state (before its first measurement, after a
    /// restart), else the step's result.
    fn step(&mut self, t_s: f64, vals: &[Option<f64>]) -> Result<Option<KalmanStep>, KalmanError> {
        fn go<const N: usize, const M: usize, const U: usize>(
            f: &mut KinematicFilter<N, M, U>,
            t_s: f64,
            vals: &[Option<f64>],
        ) -> Result<Option<KalmanStep>, KalmanError> {
            let pos: Option<Vec<f64>> = (0..M).map(|a| vals.get(a).copied().flatten()).collect();
            let z = pos.map(|p| SVector::<f64, M>::from_fn(|i, _| p[i]));
            let u = SVector::<f64, U>::from_fn(|i, _| {
                vals.get(M + i).copied().flatten().unwrap_or(0.0)
            });
            let outcome = f.step(t_s, &u, z.as_ref())?;
            if !f.is_initialised() {
                return Ok(None);
            }
            Ok(Some(KalmanStep {
                positions: (0..M).map(|a| f.position(a).unwrap_or(f64::NAN)).collect(),
                stds: (0..M)
                    .map(|a| f.position_variance(a).map_or(f64::NAN, f64::sqrt))
                    .collect(),
                rejected: matches!(outcome, Some(UpdateOutcome::Rejected { .. })),
                restarts: f.restarts(),
            }))
        }
        match self {
            Kalman::Cv1(f) => go(f, t_s, vals),
            Kalman::Cv2(f) => go(f, t_s, vals),
            Kalman::Cv3(f) => go(f, t_s, vals),
            Kalman::Ca1(f) => go(f, t_s, vals),
            Kalman::Ca2(f) => go(f, t_s, vals),
            Kalman::Ca3(f) => go(f, t_s, vals),
            Kalman::Gi1(f) => go(f, t_s, vals),
            Kalman::Gi2(f) => go(f, t_s, vals),
            Kalman::Gi3(f) => go(f, t_s, vals),
        }
    }

    /// Restarts so far (no measurement for more than `max_dt_s`).
    fn restarts(&self) -> u64 {
        match self {
            Kalman::Cv1(f) => f.restarts(),
            Kalman::Cv2(f) => f.restarts(),
            Kalman::Cv3(f) => f.restarts(),
            Kalman::Ca1(f) => f.restarts(),
            Kalman::Ca2(f) => f.restarts(),
            Kalman::Ca3(f) => f.restarts(),
            Kalman::Gi1(f) => f.restarts(),
            Kalman::Gi2(f) => f.restarts(),
            Kalman::Gi3(f) => f.restarts(),
        }
    }
}

/// What one Kalman step gives the group.
#[derive(Debug, Clone, PartialEq)]
struct KalmanStep {
    /// Fused position per axis.
    positions: Vec<f64>,
    /// Its standard deviation per axis (√ of the covariance's diagonal).
    stds: Vec<f64>,
    /// The measurement was rejected by the gate.
    rejected: bool,
    /// Restarts so far.
    restarts: u64,
}

/// Roll/pitch filter of either kind.
#[derive(Debug, Clone)]
enum AttitudeFilter {
    Complementary(Complementary),
    Madgwick(Madgwick),
}

impl AttitudeFilter {
    fn update(
        &mut self,
        g: &Vector3<f64>,
        a: &Vector3<f64>,
        dt: f64,
    ) -> Result<Option<Attitude>, AttitudeError> {
        match self {
            AttitudeFilter::Complementary(f) => f.update(g, a, dt),
            AttitudeFilter::Madgwick(f) => f.update(g, a, dt),
        }
    }

    /// Accelerometer corrections skipped so far, and in a row (complementary only).
    fn accel_rejections(&self) -> (u64, u64) {
        match self {
            AttitudeFilter::Complementary(f) => (f.accel_rejections(), f.rejection_streak()),
            AttitudeFilter::Madgwick(_) => (0, 0),
        }
    }
}

/// Accelerometer corrections skipped in a row after which the group warns (once per streak)
/// that `gravity` may not be 1 g in the accelerometer's unit.
const REJECTION_STREAK_WARN: u64 = 1_000;

#[derive(Debug, Clone)]
enum MethodState {
    Kalman {
        filter: Kalman,
        cfg: KinematicConfig,
        /// Time origin (first frame), so step times keep full f64 precision.
        t0: Option<TimestampNs>,
        /// Restarts already counted in the group's stats.
        restarts: u64,
    },
    Attitude {
        filter: AttitudeFilter,
        /// A fresh filter, for restarts after a gap.
        fresh: AttitudeFilter,
        max_dt_s: f64,
        last: Option<TimestampNs>,
        /// The current streak of skipped corrections was logged.
        warned: bool,
    },
    Wavg(WeightedAverage),
    Voting {
        voter: Voter,
        discrete: bool,
    },
}

/// One fusion group: aligner plus method, no I/O.
#[derive(Debug, Clone)]
pub struct FusionGroup {
    name: String,
    inputs: Vec<StreamId>,
    outputs: Vec<StreamId>,
    /// Kalman only: the standard deviation of each fused position.
    std_outputs: Vec<StreamId>,
    alarm: Option<StreamId>,
    aligner: Aligner,
    method: MethodState,
    stats: GroupStats,
    frames: Vec<Frame>,
}

fn intern(group: &str, name: &str) -> Result<StreamId, FusionSetupError> {
    StreamId::intern(name).map_err(|e| setup_err(group, format!("stream {name:?}: {e}")))
}

impl FusionGroup {
    /// Builds the group from its config (checks sizes the loader also checks).
    pub fn new(cfg: &FusionGroupConfig) -> Result<FusionGroup, FusionSetupError> {
        let name = cfg.name.as_str();
        let method = cfg
            .method()
            .ok_or_else(|| setup_err(name, "expected exactly one method section"))?;
        let outputs = cfg
            .output_streams()
            .iter()
            .map(|s| intern(name, s))
            .collect::<Result<Vec<_>, _>>()?;
        if outputs.len() != method.outputs() {
            return Err(setup_err(
                name,
                format!(
                    "{} needs {} output streams, got {}",
                    method.key(),
                    method.outputs(),
                    outputs.len()
                ),
            ));
        }
        if let Some(n) = method.inputs()
            && n != cfg.inputs.len()
        {
            return Err(setup_err(
                name,
                format!(
                    "{} needs {n} inputs, got {}",
                    method.key(),
                    cfg.inputs.len()
                ),
            ));
        }
        let std_outputs = cfg
            .std_outputs
            .iter()
            .map(|s| intern(name, s))
            .collect::<Result<Vec<_>, _>>()?;
        if !std_outputs.is_empty() {
            match &method {
                FusionMethod::Kalman(k) if k.axes == std_outputs.len() => {}
                FusionMethod::Kalman(k) => {
                    return Err(setup_err(
                        name,
                        format!(
                            "std_outputs needs {} streams (one per axis), got {}",
                            k.axes,
                            std_outputs.len()
                        ),
                    ));
                }
                m => {
                    return Err(setup_err(
                        name,
                        format!("std_outputs is for kalman groups, not {}", m.key()),
                    ));
                }
            }
        }
        let alarm = cfg.alarm_stream().map(|s| intern(name, &s)).transpose()?;
        let aligner =
            Aligner::new(&cfg.aligner_config()).map_err(|e: AlignerError| setup_err(name, e))?;
        let inputs = cfg
            .inputs
            .iter()
            .map(|s| intern(name, s))
            .collect::<Result<Vec<_>, _>>()?;
        let method = match method {
            FusionMethod::Kalman(k) => MethodState::Kalman {
                filter: Kalman::new(&k).map_err(|e| setup_err(name, e))?,
                cfg: k,
                t0: None,
                restarts: 0,
            },
            FusionMethod::Complementary(c) => {
                let max_dt_s = c.max_dt_s;
                let f = AttitudeFilter::Complementary(
                    Complementary::new(c).map_err(|e| setup_err(name, e))?,
                );
                MethodState::Attitude {
                    fresh: f.clone(),
                    filter: f,
                    max_dt_s,
                    last: None,
                    warned: false,
                }
            }
            FusionMethod::Madgwick(c) => {
                let max_dt_s = c.max_dt_s;
                let f = AttitudeFilter::Madgwick(Madgwick::new(c).map_err(|e| setup_err(name, e))?);
                MethodState::Attitude {
                    fresh: f.clone(),
                    filter: f,
                    max_dt_s,
                    last: None,
                    warned: false,
                }
            }
            FusionMethod::WeightedAverage(c) => {
                MethodState::Wavg(WeightedAverage::new(c).map_err(|e| setup_err(name, e))?)
            }
            FusionMethod::Voting(c) => MethodState::Voting {
                discrete: c.method == VotingMethod::Majority,
                voter: Voter::new(c).map_err(|e| setup_err(name, e))?,
            },
        };
        Ok(FusionGroup {
            name: cfg.name.clone(),
            inputs,
            outputs,
            std_outputs,
            alarm,
            aligner,
            method,
            stats: GroupStats::default(),
            frames: Vec::new(),
        })
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The input streams (to subscribe to).
    pub fn inputs(&self) -> &[StreamId] {
        &self.inputs
    }

    /// The counters.
    pub fn stats(&self) -> GroupStats {
        let a = self.aligner.stats();
        GroupStats {
            late: a.late_dropped + a.late_reemitted,
            ..self.stats
        }
    }

    /// Offers a sample that arrived at `arrival_ns`.
    pub fn push(&mut self, sample: &Sample, arrival_ns: TimestampNs) {
        self.aligner.push(sample, arrival_ns);
    }

    /// Fuses every frame that became final by `now` (the gateway's clock: a group whose
    /// inputs are all silent moves on with it, see [`Aligner::advance`]); returns the output
    /// samples and alarms.
    pub fn poll(&mut self, now: TimestampNs) -> GroupOutput {
        let mut frames = std::mem::take(&mut self.frames);
        self.aligner.advance(now);
        self.aligner.poll(&mut frames);
        let mut out = GroupOutput::default();
        for f in frames.drain(..) {
            if !f.correction {
                self.stats.stale = f.values.iter().filter(|v| v.value.is_none()).count() as u64;
            }
            self.fuse(&f, &mut out);
        }
        self.frames = frames;
        out
    }

    fn fuse(&mut self, f: &Frame, out: &mut GroupOutput) {
        let vals: Vec<Option<f64>> = f.values.iter().map(|v| v.value).collect();
        // For the dynamic filters a held value (carried into a silence) is no measurement.
        let measured: Vec<Option<f64>> = f
            .values
            .iter()
            .map(|v| if v.held { None } else { v.value })
            .collect();
        let all_good = f.values.iter().all(|v| v.quality == Quality::Good);
        let emit = |out: &mut GroupOutput, stream: StreamId, value: Value, good: bool| {
            out.samples.push(Sample {
                stream,
                ts_ns: f.ts_ns,
                value,
                quality: if good {
                    Quality::Good
                } else {
                    Quality::Uncertain
                },
            });
        };
        // The weighted average fuses a correction again with what it knows now (without
        // learning from it twice); the others cannot step back in time.
        let stateful = !matches!(self.method, MethodState::Wavg(_));
        if f.correction && stateful {
            return;
        }
        self.stats.frames += 1;
        match &mut self.method {
            MethodState::Kalman {
                filter,
                cfg,
                t0,
                restarts,
            } => {
                let axes = cfg.axes;
                let have_z = measured[..axes].iter().all(Option::is_some);
                let origin = *t0.get_or_insert(f.ts_ns);
                let res = filter.step(span_s(origin, f.ts_ns), &measured);
                let now_restarts = filter.restarts();
                if now_restarts > *restarts {
                    self.stats.restarts += now_restarts - *restarts;
                    *restarts = now_restarts;
                    tracing::info!(
                        group = %self.name,
                        max_dt_s = cfg.max_dt_s,
                        "kalman filter restarted: no measurement used for longer than max_dt_s"
                    );
                }
                match res {
                    Ok(None) => {} // no state yet: nothing to say
                    Ok(Some(step)) => {
                        if step.rejected {
                            self.stats.rejections += 1;
                        }
                        let good = all_good && have_z && !step.rejected;
                        for (a, p) in step.positions.iter().enumerate() {
                            if p.is_finite() {
                                emit(out, self.outputs[a], Value::F64(*p), good);
                            }
                        }
                        for (id, sd) in self.std_outputs.iter().zip(&step.stds) {
                            if sd.is_finite() {
                                emit(out, *id, Value::F64(*sd), good);
                            }
                        }
                    }
                    Err(e) => {
                        self.stats.errors += 1;
                        tracing::debug!(group = %self.name, error = %e, "kalman step failed");
                    }
                }
            }
            MethodState::Attitude {
                filter,
                fresh,
                max_dt_s,
                last,
                warned,
            } => {
                let Some(v) = measured.iter().copied().collect::<Option<Vec<f64>>>() else {
                    return;
                };
                let g = Vector3::new(v[0], v[1], v[2]);
                let a = Vector3::new(v[3], v[4], v[5]);
                let mut dt = last.map_or(0.0, |l| span_s(l, f.ts_ns));
                if dt > *max_dt_s {
                    *filter = fresh.clone();
                    dt = 0.0;
                    self.stats.restarts += 1;
                    tracing::info!(
                        group = %self.name,
                        max_dt_s = *max_dt_s,
                        "attitude filter restarted after a gap longer than max_dt_s"
                    );
                }
                let (skipped_before, _) = filter.accel_rejections();
                let res = filter.update(&g, &a, dt);
                let (skipped, streak) = filter.accel_rejections();
                self.stats.rejections += skipped.saturating_sub(skipped_before);
                if streak == 0 {
                    *warned = false;
                } else if streak >= REJECTION_STREAK_WARN && !*warned {
                    *warned = true;
                    tracing::warn!(
                        group = %self.name,
                        frames = streak,
                        accel_magnitude = a.norm(),
                        "accelerometer corrections skipped {streak} frames in a row: its magnitude is \
                         far from `gravity` (1 g in the accelerometer's unit: 9.80665 for m/s², \
                         1.0 for g); the attitude follows the gyroscope alone"
                    );
                }
                match res {
                    Ok(Some(att)) => {
                        *last = Some(f.ts_ns);
                        emit(
                            out,
                            self.outputs[0],
                            Value::F64(att.roll.to_degrees()),
                            all_good,
                        );
                        emit(
                            out,
                            self.outputs[1],
                            Value::F64(att.pitch.to_degrees()),
                            all_good,
                        );
                    }
                    Ok(None) => *last = Some(f.ts_ns),
                    Err(e) => {
                        self.stats.errors += 1;
                        tracing::debug!(group = %self.name, error = %e, "attitude step failed");
                    }
                }
            }
            MethodState::Wavg(w) => {
                let res = if f.correction {
                    w.fuse_again(&vals)
                } else {
                    w.fuse(&vals)
                };
                match res {
                    Ok(r) => {
                        if !f.correction {
                            self.stats.rejections += r.excluded.len() as u64;
                        }
                        let good = r
                            .weights
                            .iter()
                            .zip(&f.values)
                            .all(|(w, v)| *w == 0.0 || v.quality == Quality::Good);
                        emit(out, self.outputs[0], Value::F64(r.value), good);
                        for a in r.alarms {
                            let msg = format!(
                                "excluded as an outlier in {} of its last {} frames",
                                a.frames,
                                w.fault_window()
                            );
                            raise_alarm(
                                &self.name,
                                &self.inputs,
                                self.alarm,
                                f.ts_ns,
                                a,
                                &msg,
                                out,
                            );
                        }
                        for i in r.recovered {
                            let stream = self.inputs.get(i).map(|s| s.name());
                            tracing::warn!(
                                group = %self.name,
                                sensor = i,
                                stream = stream.as_deref().unwrap_or("?"),
                                frames = w.recover_frames(),
                                "sensor agreed with the others {} frames in a row: no longer faulty, used again",
                                w.recover_frames()
                            );
                        }
                    }
                    Err(WavgError::NoReadings) => {}
                    Err(e) => {
                        self.stats.errors += 1;
                        tracing::debug!(group = %self.name, error = %e, "weighted average failed");
                    }
                }
                self.stats.faulty = w.faulty().iter().filter(|f| **f).count() as u64;
            }
            // No reading at all (every input stale): nothing to vote on, not a failed vote.
            MethodState::Voting { .. } if vals.iter().all(Option::is_none) => {}
            MethodState::Voting { voter, discrete } => {
                let res = if *discrete {
                    let ints: Vec<Option<i64>> = vals
                        .iter()
                        .map(|v| {
                            v.filter(|x| x.is_finite() && x.abs() < 9.0e18)
                                .map(|x| x.round() as i64)
                        })
                        .collect();
                    voter
                        .vote_discrete(&ints)
                        .map(|o| (Value::I64(o.value), o.alarms))
                } else {
                    voter.vote(&vals).map(|o| (Value::F64(o.value), o.alarms))
                };
                match res {
                    Ok((value, alarms)) => {
                        emit(out, self.outputs[0], value, all_good);
                        for a in alarms {
                            let msg = format!("out-voted {} frames in a row", a.frames);
                            raise_alarm(
                                &self.name,
                                &self.inputs,
                                self.alarm,
                                f.ts_ns,
                                a,
                                &msg,
                                out,
                            );
                        }
                    }
                    Err(e @ (VoteError::TooFewSensors { .. } | VoteError::NoAgreement)) => {
                        self.stats.errors += 1;
                        tracing::debug!(group = %self.name, error = %e, "no vote");
                    }
                    Err(e) => {
                        self.stats.errors += 1;
                        tracing::debug!(group = %self.name, error = %e, "vote failed");
                    }
                }
                self.stats.faulty = voter.faulty().iter().filter(|f| **f).count() as u64;
            }
        }
    }
}

/// A sensor flagged faulty (`why`: what the method saw): the log line, and one critical
/// sample on the group's alarm stream whose value is the faulty input's stream name.
fn raise_alarm(
    group: &str,
    inputs: &[StreamId],
    alarm: Option<StreamId>,
    ts_ns: TimestampNs,
    a: FaultAlarm,
    why: &str,
    out: &mut GroupOutput,
) {
    let faulty = inputs.get(a.sensor).map(|s| s.name());
    tracing::warn!(
        group = %group,
        sensor = a.sensor,
        stream = faulty.as_deref().unwrap_or("?"),
        frames = a.frames,
        "ALARM: sensor {why}, flagged faulty and excluded"
    );
    if let (Some(alarm), Some(faulty)) = (alarm, faulty) {
        out.alarms
            .push(Sample::new(alarm, ts_ns, Value::text(&faulty)));
    }
}

/// `b − a` in seconds.
fn span_s(a: TimestampNs, b: TimestampNs) -> f64 {
    (i128::from(b) - i128::from(a)) as f64 / 1e9
}

// ----------------------------------------------------------------------------------------
// The actor
// ----------------------------------------------------------------------------------------

/// The actor of one group.
pub struct FusionActor;

/// Messages (only from the actor's own task).
pub enum FusionMsg {
    /// The group's task ended (it only ends on an error: the ingest path closed).
    Exited(String),
}

pub struct FusionState {
    task: tokio::task::JoinHandle<()>,
}

struct GroupMetrics {
    frames: Counter,
    rejections: Counter,
    errors: Counter,
    late: Counter,
    restarts: Counter,
    faulty: Gauge,
    stale: Gauge,
    exported: GroupStats,
}

impl GroupMetrics {
    fn new(m: &Metrics, group: &str) -> GroupMetrics {
        let l = [("group", group)];
        GroupMetrics {
            frames: m.counter("outpost_fusion_frames", "Aligned frames fused by a fusion group", &l),
            rejections: m.counter(
                "outpost_fusion_rejections",
                "Inputs a fusion group rejected: Kalman gate rejections, weighted-average outlier exclusions, complementary accelerometer corrections skipped",
                &l,
            ),
            errors: m.counter(
                "outpost_fusion_errors",
                "Frames a fusion group could not fuse (no agreement, too few sensors, bad input)",
                &l,
            ),
            late: m.counter(
                "outpost_aligner_late",
                "Samples that arrived behind a fusion group's watermark (dropped or re-emitted)",
                &l,
            ),
            restarts: m.counter(
                "outpost_fusion_restarts",
                "Kalman or attitude filters of a fusion group restarted: no measurement for longer than max_dt_s",
                &l,
            ),
            faulty: m.gauge(
                "outpost_fusion_faulty_sensors",
                "Sensors a voting or weighted-average group has flagged faulty and excludes",
                &l,
            ),
            stale: m.gauge(
                "outpost_aligner_stale",
                "Inputs of a fusion group that were stale (silent too long) in its newest frame",
                &l,
            ),
            // Restarted actors start counting from zero again; the counters only grow.
            exported: GroupStats::default(),
        }
    }

    fn export(&mut self, s: GroupStats) {
        let e = self.exported;
        self.frames.inc_by(s.frames.saturating_sub(e.frames));
        self.rejections
            .inc_by(s.rejections.saturating_sub(e.rejections));
        self.errors.inc_by(s.errors.saturating_sub(e.errors));
        self.late.inc_by(s.late.saturating_sub(e.late));
        self.restarts.inc_by(s.restarts.saturating_sub(e.restarts));
        self.faulty.set(i64::try_from(s.faulty).unwrap_or(i64::MAX));
        self.stale.set(i64::try_from(s.stale).unwrap_or(i64::MAX));
        self.exported = s;
    }
}

/// How often a group polls its aligner: its tick, clamped to 10 ms–1 s.
fn poll_interval(cfg: &FusionGroupConfig) -> Duration {
    cfg.tick
        .get()
        .clamp(Duration::from_millis(10), Duration::from_secs(1))
}

async fn run(
    mut group: FusionGroup,
    mut rx: mpsc::Receiver<Sample>,
    ingest: Ingest,
    mut metrics: GroupMetrics,
    every: Duration,
) -> String {
    let mut timer = tokio::time::interval(every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            s = rx.recv() => {
                let Some(s) = s else { return "the sample bus closed".into() };
                let now = now_ns();
                group.push(&s, now);
                // Take what is queued in one go (bounded by the channel's capacity).
                while let Ok(s) = rx.try_recv() {
                    group.push(&s, now);
                }
            }
            _ = timer.tick() => {
                let out = group.poll(now_ns());
                metrics.export(group.stats());
                if !out.alarms.is_empty()
                    && let Err(e) = ingest.submit(Priority::Critical, out.alarms).await
                {
                    return format!("cannot submit alarms: {e}");
                }
                if !out.samples.is_empty()
                    && let Err(e) = ingest.submit(Priority::Normal, out.samples).await
                {
                    return format!("cannot submit fused samples: {e}");
                }
            }
        }
    }
}

impl Actor for FusionActor {
    type Msg = FusionMsg;
    type State = FusionState;
    type Arguments = (FusionGroupConfig, Ingest, Metrics);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (cfg, ingest, metrics): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let group = FusionGroup::new(&cfg)?;
        let rx = ingest.bus().subscribe(group.inputs(), BUS_CAPACITY);
        let gm = GroupMetrics::new(&metrics, &cfg.name);
        let every = poll_interval(&cfg);
        let task = tokio::spawn(async move {
            let why = run(group, rx, ingest, gm, every).await;
            let _ = myself.cast(FusionMsg::Exited(why));
        });
        Ok(FusionState { task })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FusionMsg::Exited(why) => Err(why.into()),
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.task.abort();
        Ok(())
    }
}

/// The `fusion` supervisor (one-for-one) with one child `fusion:<name>` per group. Every
/// group is built once here, so a group that cannot start is reported before anything runs.
pub fn supervisor_spec(
    groups: &[FusionGroupConfig],
    ingest: &Ingest,
    metrics: &Metrics,
) -> Result<SupervisorSpec, FusionSetupError> {
    let mut spec = SupervisorSpec::new("fusion", Strategy::OneForOne, metrics.clone());
    for g in groups {
        FusionGroup::new(g)?;
        let args = (g.clone(), ingest.clone(), metrics.clone());
        spec = spec.child(ChildSpec::actor(
            format!("fusion:{}", g.name),
            Restart::Permanent,
            move || (FusionActor, args.clone()),
        ));
    }
    Ok(spec)
}

#[cfg(test)]
#[path = "fusion_actor_tests.rs"]
mod tests;
