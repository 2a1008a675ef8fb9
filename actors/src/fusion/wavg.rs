//! Inverse-variance weighted average of redundant sensors, with median/MAD outlier rejection and
//! optional online estimation of each sensor's variance from its residuals.
//!
//! Per frame: the present readings are screened — with at least three present, reading `i`
//! is excluded when farther than `k · max(σ̂, σᵢ)` from their median, where `σ̂ = max(1.4826 ·
//! MAD, smallest sensor standard deviation)` (the floor keeps quantised sensors with MAD = 0
//! from all being rejected) and `σᵢ` the sensor's own standard deviation (a sensor is not an
//! outlier for being as noisy as it is known to be) — then fused as `x̂ = Σ wᵢ xᵢ / Σ wᵢ`
//! with `wᵢ = 1 / σᵢ²`, fused variance `1 / Σ wᵢ`.
//!
//! Adaptive mode: after each frame every included sensor's variance is updated as an
//! exponentially weighted mean of `(xᵢ − x̂)² + var(x̂)`. The `var(x̂)` term undoes the bias of
//! measuring residuals against a fused value that contains `xᵢ` itself
//! (`Var(xᵢ − x̂) = σᵢ² − var(x̂)` for inverse-variance weights).
//!
//! Lasting faults: one exclusion says little, but a sensor excluded in more than half of its
//! last `fault_window` screened frames (frames with it and at least two other healthy sensors
//! present) is flagged **faulty**, reported once as an alarm (as voting does), and left out
//! of the screening and the average from then on — a sensor stuck at a wrong value is not let
//! back in every time the true signal passes near it. It is used again only once it has
//! agreed with the healthy sensors present (within `outlier_k · σ̂` of their median) for
//! `recover_frames` frames in a row; a frame without it, or without a healthy sensor to
//! compare with, neither counts nor breaks the run.

use std::collections::VecDeque;

pub use crate::fusion::voting::FaultAlarm;
pub use outpost_runtime::config::{FusionConfigError, WeightedAverageConfig};

/// Errors of the weighted average and its configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WavgError {
    /// Invalid configuration value.
    #[error("invalid weighted-average configuration: {0}")]
    Config(String),
    /// The number of readings differs from the configured group size.
    #[error("expected {expected} readings, got {got}")]
    WrongCount { expected: usize, got: usize },
    /// No usable reading in this frame.
    #[error("no usable reading")]
    NoReadings,
    /// Readings only from sensors flagged faulty.
    #[error("only sensors flagged faulty have a reading")]
    OnlyFaulty,
}

impl From<FusionConfigError> for WavgError {
    fn from(e: FusionConfigError) -> Self {
        WavgError::Config(e.message)
    }
}

/// The result of one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct WavgOutcome {
    /// Fused value.
    pub value: f64,
    /// Its variance, `1 / Σ wᵢ`.
    pub variance: f64,
    /// Sensors excluded as outliers in this frame (not counting those flagged faulty).
    pub excluded: Vec<usize>,
    /// Normalised weight of every sensor in this frame (0 when missing, excluded or faulty).
    pub weights: Vec<f64>,
    /// Sensors flagged faulty in this frame: raise a critical alarm for each (`frames`: the
    /// exclusions in its window).
    pub alarms: Vec<FaultAlarm>,
    /// Sensors no longer faulty from this frame on (they agreed `recover_frames` in a row).
    pub recovered: Vec<usize>,
}

/// Smallest variance kept, relative to nothing: guards 1/σ² against overflow.
const MIN_VARIANCE: f64 = 1e-18;

/// Per-sensor fault state.
#[derive(Debug, Clone, Default)]
struct Health {
    /// Outcome of the last screened frames (true = excluded), at most `fault_window`.
    window: VecDeque<bool>,
    /// Exclusions in `window`.
    excluded: u32,
    faulty: bool,
    /// Frames in a row a faulty sensor agreed with the healthy ones.
    agreed: u32,
}

/// The weighted average of one group.
#[derive(Debug, Clone)]
pub struct WeightedAverage {
    cfg: WeightedAverageConfig,
    var: Vec<f64>,
    health: Vec<Health>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

impl WeightedAverage {
    /// A fuser for `cfg` (validated here).
    pub fn new(cfg: WeightedAverageConfig) -> Result<Self, WavgError> {
        cfg.validate()?;
        let var = (0..cfg.sensors)
            .map(|i| match cfg.variances.as_slice() {
                [v] => *v,
                vs => vs[i],
            })
            .collect();
        let health = vec![Health::default(); cfg.sensors];
        Ok(WeightedAverage { cfg, var, health })
    }

    /// Current variance of each sensor (static, or the online estimate).
    pub fn variances(&self) -> &[f64] {
        &self.var
    }

    /// The fault window, frames.
    pub fn fault_window(&self) -> u32 {
        self.cfg.fault_window
    }

    /// Agreeing frames in a row after which a faulty sensor is used again.
    pub fn recover_frames(&self) -> u32 {
        self.cfg.recover_frames
    }

    /// Which sensors are flagged faulty.
    pub fn faulty(&self) -> Vec<bool> {
        self.health.iter().map(|h| h.faulty).collect()
    }

    /// Median of the readings of `idx` and the robust standard deviation around it,
    /// `max(1.4826 · MAD, smallest standard deviation among them)`.
    fn centre(&self, idx: &[usize], x: impl Fn(usize) -> f64) -> (f64, f64) {
        let mut vals: Vec<f64> = idx.iter().map(|&i| x(i)).collect();
        let med = median(&mut vals);
        let mut dev: Vec<f64> = idx.iter().map(|&i| (x(i) - med).abs()).collect();
        let mad = median(&mut dev);
        let floor = idx
            .iter()
            .map(|&i| self.var[i].sqrt())
            .fold(f64::INFINITY, f64::min);
        (med, (1.4826 * mad).max(floor))
    }

    /// Fuses one frame (`None` or non-finite = missing), and learns from it: fault windows,
    /// flags and (adaptive) variances.
    pub fn fuse(&mut self, readings: &[Option<f64>]) -> Result<WavgOutcome, WavgError> {
        self.fuse_frame(readings, true)
    }

    /// Fuses a frame again (a correction of one fused before) with what is known now, without
    /// learning from it a second time: no window, flag or variance changes, no alarms.
    pub fn fuse_again(&mut self, readings: &[Option<f64>]) -> Result<WavgOutcome, WavgError> {
        self.fuse_frame(readings, false)
    }

    fn fuse_frame(
        &mut self,
        readings: &[Option<f64>],
        learn: bool,
    ) -> Result<WavgOutcome, WavgError> {
        if readings.len() != self.cfg.sensors {
            return Err(WavgError::WrongCount {
                expected: self.cfg.sensors,
                got: readings.len(),
            });
        }
        let present: Vec<usize> = (0..readings.len())
            .filter(|&i| readings[i].is_some_and(f64::is_finite))
            .collect();
        if present.is_empty() {
            return Err(WavgError::NoReadings);
        }
        let x = |i: usize| readings[i].unwrap_or(0.0);
        let healthy: Vec<usize> = present
            .iter()
            .copied()
            .filter(|&i| !self.health[i].faulty)
            .collect();
        if healthy.is_empty() {
            return Err(WavgError::OnlyFaulty);
        }
        let k = self.cfg.outlier_k;
        let mut excluded = Vec::new();
        let mut alarms = Vec::new();
        let mut recovered = Vec::new();
        if self.cfg.reject_outliers {
            let (med, sigma) = self.centre(&healthy, x);
            if healthy.len() >= 3 {
                excluded = healthy
                    .iter()
                    .copied()
                    .filter(|&i| (x(i) - med).abs() > k * sigma.max(self.var[i].sqrt()))
                    .collect();
                let window = self.cfg.fault_window as usize;
                for &i in healthy.iter().filter(|_| learn) {
                    let h = &mut self.health[i];
                    let out = excluded.contains(&i);
                    if h.window.len() == window && h.window.pop_front() == Some(true) {
                        h.excluded -= 1;
                    }
                    h.window.push_back(out);
                    h.excluded += u32::from(out);
                    if 2 * h.excluded as usize > window {
                        alarms.push(FaultAlarm {
                            sensor: i,
                            frames: h.excluded,
                        });
                        *h = Health {
                            faulty: true,
                            ..Health::default()
                        };
                    }
                }
            }
            // Faulty sensors: do they agree with the healthy ones (before this frame's flags)?
            for &i in present.iter().filter(|i| learn && !healthy.contains(i)) {
                let h = &mut self.health[i];
                if (x(i) - med).abs() <= k * sigma.max(self.var[i].sqrt()) {
                    h.agreed += 1;
                    if h.agreed >= self.cfg.recover_frames {
                        *h = Health::default();
                        recovered.push(i);
                    }
                } else {
                    h.agreed = 0;
                }
            }
        }
        // This frame: the healthy sensors that were not excluded (a sensor let back in
        // counts from the next frame, one flagged now is already out).
        let used: Vec<usize> = healthy
            .iter()
            .copied()
            .filter(|i| !excluded.contains(i))
            .collect();
        let wsum: f64 = used.iter().map(|&i| 1.0 / self.var[i]).sum();
        let value = used.iter().map(|&i| x(i) / self.var[i]).sum::<f64>() / wsum;
        let variance = 1.0 / wsum;
        if !(value.is_finite() && variance.is_finite()) {
            return Err(WavgError::NoReadings);
        }
        let mut weights = vec![0.0; readings.len()];
        for &i in &used {
            weights[i] = (1.0 / self.var[i]) / wsum;
        }
        if learn && self.cfg.adaptive && used.len() >= 2 {
            let a = self.cfg.alpha;
            for &i in &used {
                let r = x(i) - value;
                let sample = r * r + variance;
                let v = (1.0 - a) * self.var[i] + a * sample;
                if v.is_finite() {
                    self.var[i] = v.max(MIN_VARIANCE);
                }
            }
        }
        Ok(WavgOutcome {
            value,
            variance,
            excluded,
            weights,
            alarms,
            recovered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusion::sim::{Noise, rms};
    use proptest::prelude::*;

    fn cfg(variances: Vec<f64>, adaptive: bool) -> WeightedAverageConfig {
        WeightedAverageConfig {
            sensors: 4,
            variances,
            adaptive,
            alpha: 0.02,
            outlier_k: 3.0,
            reject_outliers: true,
            fault_window: 20,
            recover_frames: 60,
        }
    }

    #[test]
    fn static_weights_by_hand() {
        let mut w = WeightedAverage::new(cfg(vec![1.0, 1.0, 4.0, 4.0], false)).unwrap();
        let out = w.fuse(&[Some(1.0), Some(1.0), Some(2.0), None]).unwrap();
        // weights 1, 1, 0.25 → (1 + 1 + 0.5) / 2.25
        assert!((out.value - 2.5 / 2.25).abs() < 1e-12);
        assert!((out.variance - 1.0 / 2.25).abs() < 1e-12);
        assert_eq!(out.weights[3], 0.0);
        assert!(out.excluded.is_empty());
        assert_eq!(
            w.fuse(&[None, None, None, None]),
            Err(WavgError::NoReadings)
        );
        assert!(matches!(
            w.fuse(&[Some(1.0)]),
            Err(WavgError::WrongCount { .. })
        ));
    }

    #[test]
    fn outlier_excluded_and_reported() {
        let mut w = WeightedAverage::new(cfg(vec![0.01], false)).unwrap();
        let out = w
            .fuse(&[Some(10.0), Some(10.1), Some(9.9), Some(55.0)])
            .unwrap();
        assert_eq!(out.excluded, vec![3]);
        assert!((out.value - 10.0).abs() < 1e-9);
        // Identical quantised readings (MAD = 0) are not all rejected: the floor is the
        // sensors' own standard deviation.
        let out = w
            .fuse(&[Some(1.0), Some(1.0), Some(1.0), Some(1.2)])
            .unwrap();
        assert!(out.excluded.is_empty(), "{out:?}");
    }

    #[test]
    fn validate_rejects_bad_values() {
        assert!(cfg(vec![1.0, 2.0], false).validate().is_err());
        assert!(cfg(vec![0.0], false).validate().is_err());
        let mut c = cfg(vec![1.0], true);
        c.alpha = 0.0;
        assert!(c.validate().is_err());
        c.alpha = 0.5;
        c.outlier_k = f64::NAN;
        assert!(c.validate().is_err());
    }

    /// Generator (seed 0x3a7e): constant truth 5.0; four sensors with noise σ = 0.1, 0.2, 0.5,
    /// 1.0; sensor 3 also spikes by +20 in 2 % of frames. 5000 frames.
    /// Static weights with the true variances reach the optimal RMSE `1/sqrt(Σ 1/σ²)` ≈ 0.088;
    /// adaptive weights starting from all-equal variances converge to within 15 % of it (counted
    /// over the last 4000 frames); the equal-weight mean would be ≈ 0.285. Spikes are excluded.
    #[test]
    fn adaptive_weights_converge_to_inverse_variance() {
        let sd = [0.1, 0.2, 0.5, 1.0];
        let optimal = 1.0 / sd.iter().map(|s| 1.0 / (s * s)).sum::<f64>().sqrt();
        let mut stat =
            WeightedAverage::new(cfg(sd.iter().map(|s| s * s).collect(), false)).unwrap();
        let mut adap = WeightedAverage::new(cfg(vec![1.0], true)).unwrap();
        let mut n = Noise::new(0x3a7e);
        let (mut es, mut ea) = (Vec::new(), Vec::new());
        let mut spikes = 0;
        for k in 0..5000 {
            let mut r: Vec<Option<f64>> = sd.iter().map(|s| Some(5.0 + n.normal(*s))).collect();
            let spike = n.uniform() < 0.02;
            if spike {
                r[3] = r[3].map(|v| v + 20.0);
                spikes += 1;
            }
            let (s, a) = (stat.fuse(&r).unwrap(), adap.fuse(&r).unwrap());
            if spike {
                assert!(
                    s.excluded.contains(&3) && a.excluded.contains(&3),
                    "frame {k}"
                );
            }
            if k >= 1000 {
                es.push(s.value - 5.0);
                ea.push(a.value - 5.0);
            }
        }
        let (rs, ra) = (rms(&es), rms(&ea));
        eprintln!(
            "wavg: optimal {optimal:.4}, static {rs:.4}, adaptive {ra:.4}, {spikes} spikes; \
             learned variances {:?}",
            adap.variances()
        );
        assert!(rs < optimal * 1.1);
        assert!(ra < optimal * 1.15);
        // The noisiest sensor is honest: never flagged faulty.
        assert_eq!(stat.faulty(), vec![false; 4]);
        assert_eq!(adap.faulty(), vec![false; 4]);
        let v = adap.variances();
        assert!(v[0] < v[1] && v[1] < v[2] && v[2] < v[3], "{v:?}");
    }

    /// A sensor stuck at 20.0 from frame 100 to 649 among four (truth
    /// `20 + 10 sin(2π k / 200)`, noise σ = 0.1 on every working sensor, seed 0x57c4). It is
    /// flagged once (excluded in 11 of its 20 last frames) and stays out, even on the frames
    /// where the truth passes near 20 and it would pass the outlier test; repaired at frame
    /// 650, it is used again after 60 agreeing frames in a row.
    #[test]
    fn a_stuck_sensor_is_not_let_back_in_when_the_signal_passes_it() {
        let mut w = WeightedAverage::new(cfg(vec![0.01], false)).unwrap();
        let mut n = Noise::new(0x57c4);
        let (mut readmitted, mut alarms, mut recovered) = (Vec::new(), Vec::new(), Vec::new());
        for k in 0..1_000 {
            let truth = 20.0 + 10.0 * (std::f64::consts::TAU * k as f64 / 200.0).sin();
            let mut r: Vec<Option<f64>> = (0..4).map(|_| Some(truth + n.normal(0.1))).collect();
            if (100..650).contains(&k) {
                r[3] = Some(20.0);
            }
            let out = w.fuse(&r).unwrap();
            alarms.extend(out.alarms.iter().map(|a| (k, *a)));
            recovered.extend(out.recovered.iter().map(|i| (k, *i)));
            let flagged = alarms.first().map_or(i32::MAX, |(k, _)| *k);
            let back = recovered.first().map_or(i32::MAX, |(k, _)| *k);
            if k > flagged && k <= back && out.weights[3] > 0.0 {
                readmitted.push(k);
            }
            // Used again on the frame after it is let back in.
            if k > back {
                assert!(
                    out.weights[3] > 0.0 || out.excluded.contains(&3),
                    "frame {k}"
                );
            }
        }
        eprintln!("wavg stuck sensor: alarms {alarms:?}, recovered {recovered:?}");
        assert!(
            readmitted.is_empty(),
            "stuck sensor used again on frames {readmitted:?}"
        );
        assert_eq!(alarms.len(), 1, "{alarms:?}");
        let (k, a) = alarms[0];
        assert_eq!((a.sensor, a.frames), (3, 11));
        assert!((110..=140).contains(&k), "flagged at frame {k}");
        assert_eq!(recovered.len(), 1, "{recovered:?}");
        assert!((709..=1_000).contains(&recovered[0].0), "{recovered:?}");
        assert_eq!(w.faulty(), vec![false; 4]);
    }

    /// With only flagged sensors reporting, there is nothing to fuse; a correction frame is
    /// fused with the current flags but learns nothing.
    #[test]
    fn only_faulty_readings_and_corrections() {
        let mut c = cfg(vec![0.01], false);
        c.fault_window = 2;
        let mut w = WeightedAverage::new(c).unwrap();
        let r = [Some(10.0), Some(10.1), Some(9.9), Some(55.0)];
        assert!(w.fuse(&r).unwrap().alarms.is_empty());
        assert_eq!(w.fuse(&r).unwrap().alarms.len(), 1);
        assert_eq!(w.faulty(), vec![false, false, false, true]);
        assert_eq!(
            w.fuse(&[None, None, None, Some(55.0)]),
            Err(WavgError::OnlyFaulty)
        );
        // A correction where sensor 0 is the odd one out: excluded, not counted against it.
        let before = w.clone();
        let again = w
            .fuse_again(&[Some(30.0), Some(10.1), Some(9.9), Some(10.0)])
            .unwrap();
        assert_eq!((again.excluded.clone(), again.alarms.len()), (vec![0], 0));
        assert_eq!(again.weights[3], 0.0, "the faulty sensor stays out");
        assert_eq!(format!("{:?}", w.health), format!("{:?}", before.health));
        let c = cfg(vec![0.01], false);
        assert!(
            WeightedAverageConfig {
                fault_window: 0,
                ..c.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            WeightedAverageConfig {
                recover_frames: 0,
                ..c
            }
            .validate()
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn finite_in_finite_out(
            vals in proptest::collection::vec(proptest::option::of(-1e12f64..1e12), 4),
            adaptive in any::<bool>(),
            steps in 1usize..20,
        ) {
            let mut w = WeightedAverage::new(cfg(vec![1e-3, 1.0, 10.0, 1e4], adaptive)).unwrap();
            for _ in 0..steps {
                match w.fuse(&vals) {
                    Ok(o) => {
                        prop_assert!(o.value.is_finite() && o.variance.is_finite() && o.variance > 0.0);
                        prop_assert!(o.weights.iter().all(|x| x.is_finite()));
                    }
                    Err(e) => prop_assert_eq!(e, WavgError::NoReadings),
                }
                prop_assert!(w.variances().iter().all(|v| v.is_finite() && *v > 0.0));
            }
        }
    }
}
