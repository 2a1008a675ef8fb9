//! Fault-tolerant voting over a group of redundant sensors, with fault detection: a sensor
//! out-voted for `fault_frames` consecutive frames is flagged faulty, excluded from later votes,
//! and reported once as an alarm (the fusion actor turns it into a critical alarm sample).
//!
//! Methods and the number `f` of faulty sensors they tolerate among `n`:
//! - **majority** (discrete values): the value held by more than half of the sensors present;
//!   needs `n ≥ 2f + 1`.
//! - **median** (continuous): the median of the present values; needs `n ≥ 2f + 1`.
//! - **marzullo** (continuous, intervals `value ± uncertainty`): the smallest interval holding
//!   every point covered by at least `n − f` sensor intervals; point = its midpoint. Needs
//!   `n ≥ 3f + 1` for the result to be bounded by correct sensors (Marzullo 1990).
//! - **brooks_iyengar** (continuous, intervals): over the regions covered by at least `n − f`
//!   intervals, the point is the mean of region midpoints weighted by their coverage and the
//!   interval spans those regions (Brooks & Iyengar 1996). Needs `n ≥ 3f + 1`.
//!
//! Out-voted means: for majority, a value other than the winner; for median, an interval
//! `value ± uncertainty` that does not contain the median; for marzullo and brooks_iyengar, an
//! interval that does not meet the fused interval. A missing reading neither counts as
//! out-voted nor resets the count. Every flagged sensor lowers the remaining tolerance by one.

pub use outpost_runtime::config::{FusionConfigError, VotingConfig, VotingMethod};

/// Errors of voting and its configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VoteError {
    /// Invalid configuration (e.g. `f` too large for the group size).
    #[error("invalid voting configuration: {0}")]
    Config(String),
    /// The number of readings differs from the configured group size.
    #[error("expected {expected} readings, got {got}")]
    WrongCount { expected: usize, got: usize },
    /// Too few sensors present (or not flagged faulty) to out-vote the faults still tolerated.
    #[error("only {present} usable sensors, {needed} needed")]
    TooFewSensors { present: usize, needed: usize },
    /// No value or region reached the required agreement.
    #[error("no agreement among the sensors")]
    NoAgreement,
    /// The method does not apply to this kind of value.
    #[error("{0:?} does not vote on this kind of value")]
    WrongKind(VotingMethod),
}

impl From<FusionConfigError> for VoteError {
    fn from(e: FusionConfigError) -> Self {
        VoteError::Config(e.message)
    }
}

/// An alarm: `sensor` (index in the group) was out-voted `frames` frames in a row and is now
/// excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultAlarm {
    pub sensor: usize,
    pub frames: u32,
}

/// The result of one vote.
#[derive(Debug, Clone, PartialEq)]
pub struct VoteOutcome<T> {
    /// The voted value (point estimate for the continuous methods).
    pub value: T,
    /// The fused interval (marzullo, brooks_iyengar; `None` otherwise).
    pub interval: Option<(f64, f64)>,
    /// Sensors out-voted in this frame.
    pub outvoted: Vec<usize>,
    /// Sensors flagged faulty in this frame: raise a critical alarm for each.
    pub alarms: Vec<FaultAlarm>,
}

/// A voter for one group: the method plus the per-sensor fault state.
#[derive(Debug, Clone)]
pub struct Voter {
    cfg: VotingConfig,
    streak: Vec<u32>,
    faulty: Vec<bool>,
}

impl Voter {
    /// A voter for `cfg` (validated here).
    pub fn new(cfg: VotingConfig) -> Result<Voter, VoteError> {
        cfg.validate()?;
        let n = cfg.sensors;
        Ok(Voter {
            cfg,
            streak: vec![0; n],
            faulty: vec![false; n],
        })
    }

    /// Which sensors are flagged faulty.
    pub fn faulty(&self) -> &[bool] {
        &self.faulty
    }

    /// Clears the fault flag of `sensor` (operator action after repair).
    pub fn clear_fault(&mut self, sensor: usize) {
        if let Some(f) = self.faulty.get_mut(sensor) {
            *f = false;
        }
        if let Some(s) = self.streak.get_mut(sensor) {
            *s = 0;
        }
    }

    fn uncertainty(&self, i: usize) -> f64 {
        match self.cfg.uncertainty.as_slice() {
            [u] => *u,
            us => us.get(i).copied().unwrap_or(1.0),
        }
    }

    /// Faults still tolerated after excluding the flagged ones.
    fn remaining_faults(&self) -> usize {
        self.cfg
            .faults
            .saturating_sub(self.faulty.iter().filter(|f| **f).count())
    }

    fn check_count(&self, got: usize) -> Result<(), VoteError> {
        if got == self.cfg.sensors {
            Ok(())
        } else {
            Err(VoteError::WrongCount {
                expected: self.cfg.sensors,
                got,
            })
        }
    }

    /// Updates the streaks from this frame's out-voted set and flags sensors that reach K.
    #[allow(clippy::needless_range_loop)] // three parallel per-sensor arrays
    fn account(&mut self, present: &[bool], outvoted: &[usize]) -> Vec<FaultAlarm> {
        let mut alarms = Vec::new();
        for i in 0..self.cfg.sensors {
            if self.faulty[i] || !present[i] {
                continue;
            }
            if outvoted.contains(&i) {
                self.streak[i] = self.streak[i].saturating_add(1);
                if self.streak[i] >= self.cfg.fault_frames {
                    self.faulty[i] = true;
                    alarms.push(FaultAlarm {
                        sensor: i,
                        frames: self.streak[i],
                    });
                }
            } else {
                self.streak[i] = 0;
            }
        }
        alarms
    }

    /// Majority vote over discrete readings (`None` = missing).
    pub fn vote_discrete(
        &mut self,
        readings: &[Option<i64>],
    ) -> Result<VoteOutcome<i64>, VoteError> {
        if self.cfg.method != VotingMethod::Majority {
            return Err(VoteError::WrongKind(self.cfg.method));
        }
        self.check_count(readings.len())?;
        let present: Vec<bool> = readings
            .iter()
            .zip(&self.faulty)
            .map(|(r, f)| r.is_some() && !f)
            .collect();
        let vals: Vec<i64> = readings
            .iter()
            .zip(&present)
            .filter_map(|(r, p)| if *p { *r } else { None })
            .collect();
        let needed = 2 * self.remaining_faults() + 1;
        if vals.len() < needed {
            return Err(VoteError::TooFewSensors {
                present: vals.len(),
                needed,
            });
        }
        let mut sorted = vals.clone();
        sorted.sort_unstable();
        let (mut best, mut best_n, mut i) = (sorted[0], 0usize, 0usize);
        while i < sorted.len() {
            let j = sorted[i..].partition_point(|v| *v == sorted[i]) + i;
            if j - i > best_n {
                best = sorted[i];
                best_n = j - i;
            }
            i = j;
        }
        if 2 * best_n <= vals.len() {
            return Err(VoteError::NoAgreement);
        }
        let outvoted: Vec<usize> = (0..readings.len())
            .filter(|&i| present[i] && readings[i] != Some(best))
            .collect();
        let alarms = self.account(&present, &outvoted);
        Ok(VoteOutcome {
            value: best,
            interval: None,
            outvoted,
            alarms,
        })
    }

    /// Vote over continuous readings (`None` or non-finite = missing) with median, marzullo or
    /// brooks_iyengar.
    pub fn vote(&mut self, readings: &[Option<f64>]) -> Result<VoteOutcome<f64>, VoteError> {
        self.check_count(readings.len())?;
        let present: Vec<bool> = readings
            .iter()
            .zip(&self.faulty)
            .map(|(r, f)| r.is_some_and(f64::is_finite) && !f)
            .collect();
        let f = self.remaining_faults();
        let idx: Vec<usize> = (0..readings.len()).filter(|&i| present[i]).collect();
        let needed = self.cfg.method.min_sensors(f);
        if idx.len() < needed {
            return Err(VoteError::TooFewSensors {
                present: idx.len(),
                needed,
            });
        }
        let val = |i: usize| readings[i].unwrap_or(0.0);
        let (value, interval) = match self.cfg.method {
            VotingMethod::Majority => return Err(VoteError::WrongKind(VotingMethod::Majority)),
            VotingMethod::Median => {
                let mut v: Vec<f64> = idx.iter().map(|&i| val(i)).collect();
                v.sort_by(f64::total_cmp);
                let m = v.len();
                let med = if m % 2 == 1 {
                    v[m / 2]
                } else {
                    0.5 * (v[m / 2 - 1] + v[m / 2])
                };
                (med, None)
            }
            VotingMethod::Marzullo | VotingMethod::BrooksIyengar => {
                let ivs: Vec<(f64, f64)> = idx
                    .iter()
                    .map(|&i| (val(i) - self.uncertainty(i), val(i) + self.uncertainty(i)))
                    .collect();
                let regions = covered_regions(&ivs, idx.len() - f);
                let (Some(first), Some(last)) = (regions.first(), regions.last()) else {
                    return Err(VoteError::NoAgreement);
                };
                let iv = (first.0, last.1);
                let point = if self.cfg.method == VotingMethod::Marzullo {
                    0.5 * (iv.0 + iv.1)
                } else {
                    let (mut num, mut den) = (0.0, 0.0);
                    for &(lo, hi, c) in &regions {
                        num += c as f64 * 0.5 * (lo + hi);
                        den += c as f64;
                    }
                    num / den
                };
                (point, Some(iv))
            }
        };
        let outvoted: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|&i| {
                let (lo, hi) = (val(i) - self.uncertainty(i), val(i) + self.uncertainty(i));
                match interval {
                    Some((a, b)) => hi < a || lo > b,
                    None => value < lo || value > hi,
                }
            })
            .collect();
        let alarms = self.account(&present, &outvoted);
        Ok(VoteOutcome {
            value,
            interval,
            outvoted,
            alarms,
        })
    }
}

/// Regions `(lo, hi, coverage)` covered by at least `min_cover` of `ivs`, in increasing order
/// (sweep over sorted end points; touching intervals overlap).
fn covered_regions(ivs: &[(f64, f64)], min_cover: usize) -> Vec<(f64, f64, usize)> {
    let mut ev: Vec<(f64, i32)> = Vec::with_capacity(ivs.len() * 2);
    for &(lo, hi) in ivs {
        ev.push((lo, 1));
        ev.push((hi, -1));
    }
    // Starts before ends at equal coordinates, so touching intervals count as overlapping.
    ev.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut out: Vec<(f64, f64, usize)> = Vec::new();
    let mut count = 0i32;
    for w in 0..ev.len() {
        count += ev[w].1;
        if let Some(next) = ev.get(w + 1)
            && count >= min_cover.max(1) as i32
        {
            out.push((ev[w].0, next.0, count as usize));
        }
    }
    out
}

#[cfg(test)]
#[path = "voting_tests.rs"]
mod tests;
