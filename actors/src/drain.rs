//! Weighted draining of the outbox's priority classes: higher classes go first,
//! but a lower class still makes progress. Deficit round robin over the four classes: each
//! round, a class with data earns `weight` credits (in samples); the highest class with
//! credit and data is served and pays for what it sent. With the default weights
//! 64 : 16 : 4 : 1, bulk gets at least 1/85 of the uplink whenever all classes are busy, and
//! everything when it is alone.

use outpost_runtime::model::Priority;

/// Default weights: control, critical, normal, bulk.
pub const DEFAULT_WEIGHTS: [u32; 4] = [64, 16, 4, 1];

/// The scheduler (pure; no I/O).
#[derive(Debug, Clone)]
pub struct DrainScheduler {
    weights: [u32; 4],
    quantum: u32,
    credit: [i64; 4],
}

impl DrainScheduler {
    /// `quantum` samples per weight unit per round (e.g. the frame size / 4).
    pub fn new(weights: [u32; 4], quantum: u32) -> DrainScheduler {
        DrainScheduler {
            weights: weights.map(|w| w.max(1)),
            quantum: quantum.max(1),
            credit: [0; 4],
        }
    }

    /// Which class to serve next, given which classes have data waiting. `None` when
    /// nothing waits.
    pub fn next(&mut self, waiting: [bool; 4]) -> Option<Priority> {
        if !waiting.iter().any(|w| *w) {
            return None;
        }
        // A class with nothing waiting keeps no credit (no banking while idle).
        for (c, w) in self.credit.iter_mut().zip(waiting) {
            if !w {
                *c = 0;
            }
        }
        loop {
            if let Some(i) = (0..4).find(|&i| waiting[i] && self.credit[i] > 0) {
                return Priority::from_u8(i as u8);
            }
            for ((c, w), waits) in self.credit.iter_mut().zip(self.weights).zip(waiting) {
                if waits {
                    *c += i64::from(w) * i64::from(self.quantum);
                }
            }
        }
    }

    /// Charges `class` for `samples` sent.
    pub fn sent(&mut self, class: Priority, samples: usize) {
        let c = &mut self.credit[class as usize];
        *c -= i64::try_from(samples).unwrap_or(i64::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn alone_a_class_gets_everything_and_together_shares_follow_weights() {
        let mut d = DrainScheduler::new(DEFAULT_WEIGHTS, 10);
        assert_eq!(d.next([false, false, false, true]), Some(Priority::Bulk));
        let mut served = [0usize; 4];
        for _ in 0..10_000 {
            let p = d.next([true; 4]).unwrap();
            served[p as usize] += 10;
            d.sent(p, 10);
        }
        let total: usize = served.iter().sum();
        let share = |i: usize| served[i] as f64 / total as f64;
        assert!((share(0) - 64.0 / 85.0).abs() < 0.02, "{served:?}");
        assert!((share(3) - 1.0 / 85.0).abs() < 0.005, "{served:?}");
        assert_eq!(d.next([false; 4]), None);
    }

    proptest! {
        #[test]
        fn no_waiting_class_starves(
            seq in proptest::collection::vec((any::<[bool; 4]>(), 1usize..500), 1..400),
        ) {
            let mut d = DrainScheduler::new(DEFAULT_WEIGHTS, 50);
            // Bulk always waits: it must be served at least once every bounded number of turns.
            let mut since_bulk = 0;
            for (mut waiting, n) in seq {
                waiting[3] = true;
                let p = d.next(waiting).unwrap();
                prop_assert!(waiting[p as usize]);
                d.sent(p, n);
                since_bulk = if p == Priority::Bulk { 0 } else { since_bulk + 1 };
                // 85 weight units of 50 samples ≥ 1 sample each: bounded by the round length.
                prop_assert!(since_bulk <= 85 * 50);
            }
        }
    }
}
