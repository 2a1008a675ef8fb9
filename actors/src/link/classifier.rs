//! Link classifier: maps the estimator's [`Estimate`] to the five link classes,
//! with hysteresis, and the budget of active throughput probes.
//!
//! Rules (thresholds from the `[link]` config section):
//!
//! - **evidence**: outage, or loss ≥ `intermittent_loss` with no fresh delivery sample →
//!   intermittent; RTT ≥
//!   `satellite_min_rtt` or rate < `mobile_min` → satellite; rate < `broadband_min` →
//!   mobile; rate < `fiber_min` or RTT ≥ `fiber_max_rtt` → broadband (a busy link's base
//!   RTT: its own standing queue is not distance); else fiber. An unknown rate or RTT gives
//!   no evidence either way.
//! - **down-grade** as soon as the evidence (plain thresholds) is worse than the current
//!   class: the estimator's windowed maximum already needs a whole window of low samples.
//! - **up-grade** only when the evidence with *margins* (rates ×(1 + `up_margin`), RTTs
//!   ×(1 − `rtt_margin`), loss below half its threshold) has been better than the current
//!   class without a break for `upgrade_after`; the class reached is the best one the
//!   evidence has supported without a break for that long (one run per class, so a link
//!   ramping up after an outage climbs as soon as each class is proven). The margin band (a rate between `T` and
//!   `T·(1+m)` keeps the current class) is what stops a rate jittering ±30 % around a
//!   threshold from flapping: the windowed maximum of such a rate stays within
//!   `[mean, 1.3·mean]`, narrower than the band when `m ≥ 0.3`.
//! - **recovery**: intermittent is a condition, not a rate. Once the link has answered
//!   (no outage, loss below half its threshold) for `upgrade_after`, the class the spell
//!   interrupted is resumed — capped by whatever the evidence then shows — without waiting
//!   for a rate to be proven: store-and-forward must drain when the link returns, and the
//!   backlog it drains measures the link at once, so a wrong guess is down-graded within
//!   a rate window.
//! - **dwell**: no change at all within `min_dwell` of the previous one.
//!
//! Pure and clock-free: time comes in as arguments.

use std::time::{Duration, Instant};

use outpost_runtime::config::LinkSection;
use outpost_runtime::model::LinkClass;

use super::estimator::Estimate;

/// Thresholds and hysteresis of [`Classifier`]. Rates in bits per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassifierConfig {
    /// Fiber: at least this rate…
    pub fiber_min_bps: f64,
    /// …and an RTT below this.
    pub fiber_max_rtt: Duration,
    /// Broadband: at least this rate.
    pub broadband_min_bps: f64,
    /// Mobile: at least this rate (below: satellite).
    pub mobile_min_bps: f64,
    /// An RTT at or above this is satellite whatever the rate.
    pub satellite_min_rtt: Duration,
    /// Sustained evidence needed before an up-grade.
    pub upgrade_after: Duration,
    /// Least time in a class before another change.
    pub min_dwell: Duration,
    /// Up-grades need rates this fraction above the threshold (0.4 = 40 %).
    pub up_margin: f64,
    /// Up-grades need RTTs this fraction below the threshold.
    pub rtt_margin: f64,
    /// Loss rate at or above which the link is intermittent. High: a backlogged sender
    /// through a small tail-drop buffer at a low rate sees tens of percent of congestion
    /// loss on a link that still works.
    pub intermittent_loss: f64,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self::from_section(&LinkSection::default())
    }
}

impl ClassifierConfig {
    /// The thresholds and margins of a `[link]` config section.
    pub fn from_section(s: &LinkSection) -> Self {
        Self {
            fiber_min_bps: s.fiber_min_mbps * 1e6,
            fiber_max_rtt: s.fiber_max_rtt.get(),
            broadband_min_bps: s.broadband_min_mbps * 1e6,
            mobile_min_bps: s.mobile_min_mbps * 1e6,
            satellite_min_rtt: s.satellite_min_rtt.get(),
            upgrade_after: s.upgrade_after.get(),
            min_dwell: s.min_dwell.get(),
            up_margin: s.up_margin,
            rtt_margin: s.rtt_margin,
            intermittent_loss: s.intermittent_loss,
        }
    }

    /// The class `est` is evidence for; `strict` applies the up-grade margins. `None` when
    /// the estimate knows neither rate nor RTT (and shows no outage or loss).
    pub fn evidence(&self, est: &Estimate, strict: bool) -> Option<LinkClass> {
        let loss_limit = if strict {
            self.intermittent_loss / 2.0
        } else {
            self.intermittent_loss
        };
        // Loss alone makes a link intermittent only when nothing is being delivered: a
        // backlogged sender through a small buffer can see half its packets lost to
        // congestion on a link that works.
        if est.outage() || (est.loss >= loss_limit && !est.rate_fresh) {
            return Some(LinkClass::Intermittent);
        }
        let (rate_k, rtt_k) = if strict {
            (1.0 + self.up_margin, 1.0 - self.rtt_margin)
        } else {
            (1.0, 1.0)
        };
        // An app-limited rate is a lower bound: it can prove a class, not disprove one.
        let rate = est.rate_bps.filter(|_| strict || !est.rate_app_limited);
        let by_rate = rate.map(|r| {
            if r < self.mobile_min_bps * rate_k {
                LinkClass::Satellite
            } else if r < self.broadband_min_bps * rate_k {
                LinkClass::Mobile
            } else if r < self.fiber_min_bps * rate_k {
                LinkClass::Broadband
            } else {
                LinkClass::Fiber
            }
        });
        // Against fiber's RTT limit, a busy link's base RTT: its own standing queue is not
        // distance (see `Estimate::rtt_base`).
        let by_rtt = est.rtt_min.map(|rtt| {
            let path = est.rtt_base.map_or(rtt, |b| b.min(rtt));
            if rtt >= self.satellite_min_rtt.mul_f64(rtt_k) {
                LinkClass::Satellite
            } else if path >= self.fiber_max_rtt.mul_f64(rtt_k) {
                LinkClass::Broadband
            } else {
                LinkClass::Fiber
            }
        });
        match (by_rate, by_rtt) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (Some(a), None) => Some(a),
            // Without a rate, a good RTT proves nothing; a long one caps the class.
            (None, Some(LinkClass::Satellite)) => Some(LinkClass::Satellite),
            (None, _) => None,
        }
    }

    /// The rate an up-grade from `class` to the next better one must show (margin included);
    /// `None` for fiber.
    pub fn upgrade_rate_bps(&self, class: LinkClass) -> Option<f64> {
        let k = 1.0 + self.up_margin;
        match class {
            LinkClass::Fiber => None,
            LinkClass::Broadband => Some(self.fiber_min_bps * k),
            LinkClass::Mobile => Some(self.broadband_min_bps * k),
            LinkClass::Satellite | LinkClass::Intermittent => Some(self.mobile_min_bps * k),
        }
    }
}

/// Why a class changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeReason {
    /// The evidence fell below the current class.
    Downgrade,
    /// The evidence stayed above the current class for `upgrade_after`.
    Upgrade,
}

/// A class change decided by [`Classifier::update`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassChange {
    /// The class before.
    pub from: LinkClass,
    /// The class now.
    pub to: LinkClass,
    /// When it changed.
    pub at: Instant,
    /// Why.
    pub reason: ChangeReason,
}

/// The link classifier; see the module documentation.
#[derive(Debug, Clone)]
pub struct Classifier {
    cfg: ClassifierConfig,
    class: LinkClass,
    since: Instant,
    /// Per class (by index): since when the strict evidence has been at least as good as
    /// that class without a break.
    runs: [Option<Instant>; 5],
    /// The class an intermittent spell interrupted (resumed on recovery).
    resume: LinkClass,
    /// While intermittent: since when the link has answered without a break.
    answering_since: Option<Instant>,
}

impl Classifier {
    /// Starts in `initial` at `now` (a gateway that has not connected yet starts
    /// intermittent).
    pub fn new(cfg: ClassifierConfig, initial: LinkClass, now: Instant) -> Self {
        Self {
            cfg,
            class: initial,
            since: now,
            runs: [None; 5],
            resume: if initial == LinkClass::Intermittent {
                LinkClass::Broadband
            } else {
                initial
            },
            answering_since: None,
        }
    }

    /// The current class.
    pub fn class(&self) -> LinkClass {
        self.class
    }

    /// When the current class began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClassifierConfig {
        &self.cfg
    }

    /// Takes the estimate at `now` (call it often, e.g. every 50-100 ms) and returns the
    /// change it causes, if any.
    pub fn update(&mut self, now: Instant, est: &Estimate) -> Option<ClassChange> {
        let now = now.max(self.since);
        let dwell_over = now.saturating_duration_since(self.since) >= self.cfg.min_dwell;

        // Up-grade evidence, tracked even during the dwell time and across changes.
        let strict = self.cfg.evidence(est, true);
        for c in LinkClass::ALL {
            let run = &mut self.runs[c as usize];
            if strict.is_some_and(|e| e <= c) {
                run.get_or_insert(now);
            } else {
                *run = None;
            }
        }
        if self.class == LinkClass::Intermittent && strict != Some(LinkClass::Intermittent) {
            self.answering_since.get_or_insert(now);
        } else {
            self.answering_since = None;
        }

        if !dwell_over {
            return None;
        }
        if let Some(down) = self.cfg.evidence(est, false)
            && down > self.class
        {
            return Some(self.change(now, down, ChangeReason::Downgrade));
        }
        let proven = LinkClass::ALL.into_iter().find(|&c| {
            c < self.class
                && self.runs[c as usize].is_some_and(|start| {
                    now.saturating_duration_since(start) >= self.cfg.upgrade_after
                })
        });
        if let Some(target) = proven {
            return Some(self.change(now, target, ChangeReason::Upgrade));
        }
        let recovered = self
            .answering_since
            .is_some_and(|start| now.saturating_duration_since(start) >= self.cfg.upgrade_after);
        if recovered {
            // The interrupted class, unless the evidence now shows worse.
            let cap = self.cfg.evidence(est, false).unwrap_or(LinkClass::Fiber);
            let target = self.resume.max(cap);
            if target < self.class {
                return Some(self.change(now, target, ChangeReason::Upgrade));
            }
        }
        None
    }

    fn change(&mut self, now: Instant, to: LinkClass, reason: ChangeReason) -> ClassChange {
        let from = self.class;
        if to == LinkClass::Intermittent {
            self.resume = from;
        }
        self.answering_since = None;
        self.class = to;
        self.since = now;
        ClassChange {
            from,
            to,
            at: now,
            reason,
        }
    }
}

/// Why [`ProbeBudget::try_start`] refused a throughput probe.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum ProbeRefused {
    /// The uplink is carrying data: the probe would compete with it (and real traffic is
    /// measuring the link already).
    #[error("uplink busy")]
    Busy,
    /// Not enough budget left; enough will have accrued after `wait`.
    #[error("probe budget exhausted for {wait:?}")]
    OverBudget {
        /// Time until the budget allows this probe.
        wait: Duration,
    },
}

/// The byte budget of throughput probes: a token bucket refilled at `per_hour` bytes per
/// hour, holding at most a tenth of an hour's worth (so a day's unused budget cannot be
/// spent in one burst). Probes run only while the uplink is idle.
#[derive(Debug, Clone)]
pub struct ProbeBudget {
    per_hour: u64,
    capacity: f64,
    tokens: f64,
    last: Instant,
    spent: u64,
}

impl ProbeBudget {
    /// A budget of `per_hour` bytes per hour, starting full.
    pub fn new(per_hour: u64, now: Instant) -> Self {
        let capacity = per_hour as f64 / 10.0;
        Self {
            per_hour,
            capacity,
            tokens: capacity,
            last: now,
            spent: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.per_hour as f64 / 3_600.0).min(self.capacity);
    }

    /// Lets the bucket hold at least two probes of `bytes` (the largest the monitor asks
    /// for, with room for the smaller one that often comes before it), as far as the hourly
    /// budget goes: a tenth of the budget may be less than the probe that proves fiber
    /// (the default 100 Mbit/s for 200 ms is 3.5 MB, the default budget's tenth 2 MB), which
    /// then could never run. Starts full.
    pub fn holding(mut self, bytes: u64) -> Self {
        let want = bytes.saturating_mul(2).min(self.per_hour) as f64;
        if want > self.capacity {
            self.capacity = want;
            self.tokens = want;
        }
        self
    }

    /// Bytes a probe may use now.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.tokens.max(0.0) as u64
    }

    /// Total bytes charged so far.
    pub fn spent(&self) -> u64 {
        self.spent
    }

    /// Reserves `bytes` for a probe if the uplink is idle and the budget allows.
    pub fn try_start(
        &mut self,
        now: Instant,
        bytes: u64,
        uplink_idle: bool,
    ) -> Result<(), ProbeRefused> {
        if !uplink_idle {
            return Err(ProbeRefused::Busy);
        }
        self.refill(now);
        let need = bytes as f64;
        if need > self.tokens {
            let rate = self.per_hour as f64 / 3_600.0;
            let wait = if rate > 0.0 && need <= self.capacity {
                Duration::from_secs_f64((need - self.tokens) / rate)
            } else {
                Duration::MAX
            };
            return Err(ProbeRefused::OverBudget { wait });
        }
        self.tokens -= need;
        self.spent = self.spent.saturating_add(bytes);
        Ok(())
    }

    /// Gives back bytes reserved and not sent (a probe cut short).
    pub fn refund(&mut self, bytes: u64) {
        self.tokens = (self.tokens + bytes as f64).min(self.capacity);
        self.spent = self.spent.saturating_sub(bytes);
    }
}

/// Bytes a throughput probe needs to show that the link carries the up-grade rate of
/// `class` (see [`ClassifierConfig::upgrade_rate_bps`]) for `span`: what a probe sends.
/// `None` for fiber (nothing better to prove).
pub fn probe_bytes(cfg: &ClassifierConfig, class: LinkClass, span: Duration) -> Option<u64> {
    cfg.upgrade_rate_bps(class)
        .map(|bps| (bps / 8.0 * span.as_secs_f64()).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn cfg() -> ClassifierConfig {
        ClassifierConfig {
            upgrade_after: ms(5_000),
            min_dwell: ms(1_000),
            ..ClassifierConfig::default()
        }
    }

    fn est(rate_mbps: f64, rtt_ms: u64) -> Estimate {
        Estimate {
            rate_bps: Some(rate_mbps * 1e6),
            rate_fresh: true,
            rate_app_limited: false,
            rtt_min: Some(ms(rtt_ms)),
            rtt_base: None,
            loss: 0.0,
            outage_since: None,
        }
    }

    #[test]
    fn a_busy_fiber_links_own_queue_is_not_distance() {
        let c = cfg();
        // 200 Mbit/s, 10 ms path, 15 ms of its own standing queue.
        let busy = Estimate {
            rtt_min: Some(ms(25)),
            rtt_base: Some(ms(10)),
            ..est(200.0, 25)
        };
        assert_eq!(c.evidence(&busy, false), Some(LinkClass::Fiber));
        // A path that is 40 ms long is broadband, busy or not.
        let far = Estimate {
            rtt_min: Some(ms(60)),
            rtt_base: Some(ms(40)),
            ..est(200.0, 60)
        };
        assert_eq!(c.evidence(&far, false), Some(LinkClass::Broadband));
        // A satellite hop is judged by the current window, not the long one.
        let hop = Estimate {
            rtt_min: Some(ms(700)),
            rtt_base: Some(ms(80)),
            ..est(20.0, 700)
        };
        assert_eq!(c.evidence(&hop, false), Some(LinkClass::Satellite));
    }

    #[test]
    fn thresholds_follow_spec_section_2() {
        let c = cfg();
        let ev = |r, rtt| c.evidence(&est(r, rtt), false).unwrap();
        assert_eq!(ev(200.0, 5), LinkClass::Fiber);
        assert_eq!(ev(200.0, 30), LinkClass::Broadband);
        assert_eq!(ev(50.0, 5), LinkClass::Broadband);
        assert_eq!(ev(5.0, 5), LinkClass::Mobile);
        assert_eq!(ev(0.5, 5), LinkClass::Satellite);
        assert_eq!(ev(50.0, 700), LinkClass::Satellite);
        let mut down = est(50.0, 5);
        down.outage_since = Some(Instant::now());
        assert_eq!(c.evidence(&down, false), Some(LinkClass::Intermittent));
        let mut lossy = est(50.0, 5);
        lossy.loss = 0.9;
        assert_eq!(
            c.evidence(&lossy, false),
            Some(LinkClass::Broadband),
            "lossy but delivering"
        );
        lossy.rate_fresh = false;
        assert_eq!(c.evidence(&lossy, false), Some(LinkClass::Intermittent));
        let unknown = Estimate {
            rate_bps: None,
            rate_fresh: false,
            rate_app_limited: false,
            rtt_min: Some(ms(5)),
            rtt_base: None,
            loss: 0.0,
            outage_since: None,
        };
        assert_eq!(
            c.evidence(&unknown, false),
            None,
            "a fast ping proves no rate"
        );
    }

    #[test]
    fn margins_apply_to_upgrades_only() {
        let c = cfg();
        assert_eq!(c.evidence(&est(12.0, 5), false), Some(LinkClass::Broadband));
        assert_eq!(c.evidence(&est(12.0, 5), true), Some(LinkClass::Mobile));
        assert_eq!(c.evidence(&est(15.0, 5), true), Some(LinkClass::Broadband));
        assert_eq!(
            c.evidence(&est(500.0, 18), true),
            Some(LinkClass::Broadband)
        );
    }

    #[test]
    fn downgrade_is_immediate_after_dwell() {
        let t0 = Instant::now();
        let mut k = Classifier::new(cfg(), LinkClass::Broadband, t0);
        assert_eq!(k.update(t0 + ms(100), &est(3.0, 20)), None, "within dwell");
        let ch = k.update(t0 + ms(1_000), &est(3.0, 20)).unwrap();
        assert_eq!(
            (ch.from, ch.to, ch.reason),
            (
                LinkClass::Broadband,
                LinkClass::Mobile,
                ChangeReason::Downgrade
            )
        );
        assert_eq!(k.class(), LinkClass::Mobile);
    }

    #[test]
    fn downgrade_can_skip_classes() {
        let t0 = Instant::now();
        let mut k = Classifier::new(cfg(), LinkClass::Fiber, t0);
        let mut e = est(200.0, 5);
        e.outage_since = Some(t0);
        let ch = k.update(t0 + ms(2_000), &e).unwrap();
        assert_eq!(ch.to, LinkClass::Intermittent);
    }

    #[test]
    fn upgrade_needs_sustained_evidence() {
        let t0 = Instant::now();
        let mut k = Classifier::new(cfg(), LinkClass::Satellite, t0);
        let mut t = t0;
        // 4.9 s of good evidence, then one bad reading: the run restarts.
        while t < t0 + ms(4_900) {
            assert_eq!(k.update(t, &est(200.0, 5)), None);
            t += ms(100);
        }
        assert_eq!(k.update(t, &est(0.5, 5)), None);
        let restart = t + ms(100);
        t = restart;
        let mut changed = None;
        while changed.is_none() {
            changed = k.update(t, &est(200.0, 5));
            t += ms(100);
        }
        let ch = changed.unwrap();
        assert_eq!(ch.to, LinkClass::Fiber, "a multi-class upgrade in one step");
        assert_eq!(ch.reason, ChangeReason::Upgrade);
        assert_eq!(ch.at.duration_since(restart), ms(5_000));
    }

    #[test]
    fn a_ramping_link_climbs_class_by_class() {
        // After an outage: 2 Mbit/s (mobile) proven from t0, 200 Mbit/s from t0 + 2 s.
        let t0 = Instant::now();
        let mut k = Classifier::new(cfg(), LinkClass::Intermittent, t0);
        let mut got = Vec::new();
        for i in 0..200u64 {
            let t = t0 + ms(i * 100);
            let rate = if i < 20 { 2.0 } else { 200.0 };
            if let Some(ch) = k.update(t, &est(rate, 5)) {
                got.push((ch.at.duration_since(t0), ch.to));
            }
        }
        assert_eq!(
            got,
            vec![
                (ms(5_000), LinkClass::Mobile),
                (ms(7_000), LinkClass::Fiber)
            ]
        );
    }

    #[test]
    fn a_recurring_dip_limits_the_upgrade_to_what_is_always_supported() {
        let t0 = Instant::now();
        let mut k = Classifier::new(cfg(), LinkClass::Intermittent, t0);
        let mut t = t0;
        let mut changed = None;
        let mut i = 0;
        while changed.is_none() {
            let rate = if i % 10 == 5 { 5.0 } else { 200.0 };
            changed = k.update(t, &est(rate, 5));
            t += ms(100);
            i += 1;
        }
        assert_eq!(changed.unwrap().to, LinkClass::Mobile);
    }

    #[test]
    fn jitter_around_a_threshold_does_not_flap() {
        // 10 Mbit/s ±30 %, seen through a 1 s windowed maximum (4 samples of 250 ms).
        let t0 = Instant::now();
        for start in [LinkClass::Broadband, LinkClass::Mobile] {
            let mut k = Classifier::new(cfg(), start, t0);
            let mut rng = fastrand::Rng::with_seed(42);
            let mut recent = std::collections::VecDeque::new();
            let mut changes = 0;
            for i in 0..6_000u64 {
                let sample = 10.0 * (1.0 + rng.f64() * 0.6 - 0.3);
                recent.push_back(sample);
                if recent.len() > 4 {
                    recent.pop_front();
                }
                let max = recent.iter().copied().fold(0.0, f64::max);
                if k.update(t0 + ms(250 * i), &est(max, 5)).is_some() {
                    changes += 1;
                }
            }
            assert!(changes <= 1, "from {start:?}: {changes} changes");
        }
    }

    #[test]
    fn unknown_rate_holds_the_class() {
        let t0 = Instant::now();
        let mut k = Classifier::new(cfg(), LinkClass::Broadband, t0);
        let e = Estimate {
            rate_bps: None,
            rate_fresh: false,
            rate_app_limited: false,
            rtt_min: None,
            rtt_base: None,
            loss: 0.0,
            outage_since: None,
        };
        for i in 0..100 {
            assert_eq!(k.update(t0 + ms(i * 1_000), &e), None);
        }
    }

    #[test]
    fn the_link_answering_again_resumes_the_interrupted_class() {
        let t0 = Instant::now();
        let mut k = Classifier::new(cfg(), LinkClass::Broadband, t0);
        let silent = Estimate {
            rate_bps: None,
            rate_fresh: false,
            rate_app_limited: false,
            rtt_min: Some(ms(30)),
            rtt_base: None,
            loss: 0.0,
            outage_since: None,
        };
        let outage = Estimate {
            outage_since: Some(t0),
            ..silent
        };
        let ch = k.update(t0 + ms(2_000), &outage).unwrap();
        assert_eq!(
            (ch.to, ch.reason),
            (LinkClass::Intermittent, ChangeReason::Downgrade)
        );
        // Answering, but no rate known: store-and-forward holds for upgrade_after…
        let back = t0 + ms(3_000);
        for i in 0..50 {
            assert_eq!(k.update(back + ms(i * 100), &silent), None);
        }
        // …then the interrupted class comes back.
        let ch = k.update(back + ms(5_000), &silent).unwrap();
        assert_eq!(
            (ch.to, ch.reason),
            (LinkClass::Broadband, ChangeReason::Upgrade)
        );
        // An answer broken by another outage starts the wait again; evidence caps the
        // class resumed (a 700 ms RTT is satellite).
        let t1 = back + ms(7_000);
        assert_eq!(k.update(t1, &outage).unwrap().to, LinkClass::Intermittent);
        let far = Estimate {
            rtt_min: Some(ms(700)),
            rtt_base: None,
            ..silent
        };
        assert_eq!(k.update(t1 + ms(1_000), &far), None);
        assert_eq!(k.update(t1 + ms(4_000), &outage), None);
        assert_eq!(k.update(t1 + ms(5_000), &far), None);
        assert_eq!(k.update(t1 + ms(9_900), &far), None);
        let ch = k.update(t1 + ms(10_000), &far).unwrap();
        assert_eq!(ch.to, LinkClass::Satellite);
        // Loss still high (above half the threshold) is no answer.
        let t2 = t1 + ms(12_000);
        assert_eq!(k.update(t2, &outage).unwrap().to, LinkClass::Intermittent);
        let lossy = Estimate {
            loss: cfg().intermittent_loss * 0.6,
            ..silent
        };
        for i in 0..100 {
            assert_eq!(k.update(t2 + ms(1_000 + i * 100), &lossy), None);
        }
    }

    #[test]
    fn probe_budget_is_a_token_bucket_used_only_when_idle() {
        let t0 = Instant::now();
        let mut b = ProbeBudget::new(36_000_000, t0); // 10 kB/s, 3.6 MB burst
        assert_eq!(b.try_start(t0, 1_000, false), Err(ProbeRefused::Busy));
        assert_eq!(b.try_start(t0, 3_000_000, true), Ok(()));
        match b.try_start(t0, 1_000_000, true) {
            Err(ProbeRefused::OverBudget { wait }) => {
                assert!((wait.as_secs_f64() - 40.0).abs() < 0.01, "{wait:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.try_start(t0 + ms(40_000), 1_000_000, true), Ok(()));
        assert_eq!(b.spent(), 4_000_000);
        b.refund(500_000);
        assert_eq!(b.spent(), 3_500_000);
        assert_eq!(b.available(t0 + ms(40_000)), 500_000);
        // Larger than the bucket: never.
        assert_eq!(
            b.try_start(t0 + ms(40_000), 10_000_000, true),
            Err(ProbeRefused::OverBudget {
                wait: Duration::MAX
            })
        );
        // Bytes spent over an hour stay within the hourly budget plus one burst.
        let mut b = ProbeBudget::new(20_000_000, t0);
        let mut total = 0;
        for s in 0..3_600u64 {
            if b.try_start(t0 + ms(s * 1_000), 50_000, true).is_ok() {
                total += 50_000;
            }
        }
        assert!(total <= 22_000_000, "{total}");
        assert!(total >= 19_000_000, "{total}");
    }

    #[test]
    fn the_default_budget_affords_the_probe_that_proves_fiber() {
        let cfg = ClassifierConfig::default();
        let s = LinkSection::default();
        let fiber_probe = probe_bytes(&cfg, LinkClass::Broadband, ms(200)).unwrap();
        let t0 = Instant::now();
        let mut plain = ProbeBudget::new(s.probe_budget_per_hour.0, t0);
        assert!(
            plain.try_start(t0, fiber_probe, true).is_err(),
            "a tenth of the budget is less than the probe"
        );
        let mut b = ProbeBudget::new(s.probe_budget_per_hour.0, t0).holding(fiber_probe);
        assert_eq!(b.try_start(t0, fiber_probe, true), Ok(()));
        assert_eq!(b.try_start(t0, fiber_probe, true), Ok(()), "two of them");
        // …then one per refill: 3.5 MB of 20 MB an hour, one every 630 s.
        let again = t0 + Duration::from_secs(600);
        assert!(b.try_start(again, fiber_probe, true).is_err());
        assert_eq!(
            b.try_start(again + Duration::from_secs(40), fiber_probe, true),
            Ok(())
        );
        // A budget smaller than the probe still refuses it.
        let mut small = ProbeBudget::new(1_000_000, t0).holding(fiber_probe);
        assert!(small.try_start(t0, fiber_probe, true).is_err());
    }

    #[test]
    fn probe_size_proves_the_next_class() {
        let c = cfg();
        assert_eq!(probe_bytes(&c, LinkClass::Fiber, ms(250)), None);
        // Satellite → mobile: 1.4 Mbit/s for 250 ms = 43 750 bytes.
        assert_eq!(probe_bytes(&c, LinkClass::Satellite, ms(250)), Some(43_750));
    }

    fn arb_estimate() -> impl Strategy<Value = Estimate> {
        (
            prop::option::of(0.0f64..300e6),
            prop::option::of(0u64..2_000),
            0.0f64..0.6,
            any::<bool>(),
        )
            .prop_map(|(rate, rtt, loss, outage)| Estimate {
                rate_bps: rate,
                rate_fresh: rate.is_some(),
                rate_app_limited: false,
                rtt_min: rtt.map(Duration::from_millis),
                rtt_base: None,
                loss,
                outage_since: outage.then(Instant::now),
            })
    }

    proptest! {
        #[test]
        fn changes_are_never_closer_than_min_dwell(
            steps in prop::collection::vec((arb_estimate(), 1u64..800), 1..300),
        ) {
            let c = cfg();
            let t0 = Instant::now();
            let mut k = Classifier::new(c, LinkClass::Broadband, t0);
            let mut t = t0;
            let mut last: Option<Instant> = None;
            for (e, dt) in steps {
                t += ms(dt);
                if let Some(ch) = k.update(t, &e) {
                    prop_assert_ne!(ch.from, ch.to);
                    if let Some(l) = last {
                        prop_assert!(ch.at.duration_since(l) >= c.min_dwell);
                    }
                    if ch.reason == ChangeReason::Upgrade {
                        prop_assert!(ch.to < ch.from);
                    } else {
                        prop_assert!(ch.to > ch.from);
                    }
                    last = Some(ch.at);
                }
            }
        }

        #[test]
        fn steady_input_gives_a_steady_class(e in arb_estimate(), start in 0usize..5) {
            let c = cfg();
            let t0 = Instant::now();
            let mut k = Classifier::new(c, LinkClass::ALL[start], t0);
            let mut changes = 0;
            for i in 0..400u64 {
                if k.update(t0 + ms(i * 100), &e).is_some() {
                    changes += 1;
                }
            }
            // At most one down-grade and one up-grade... and then nothing: the class
            // settles within upgrade_after + dwell.
            prop_assert!(changes <= 2);
            let settled = k.class();
            for i in 400..600u64 {
                prop_assert!(k.update(t0 + ms(i * 100), &e).is_none());
            }
            prop_assert_eq!(k.class(), settled);
            // And it is consistent with the evidence.
            if let Some(down) = c.evidence(&e, false) {
                prop_assert!(settled >= down);
            }
        }
    }
}
