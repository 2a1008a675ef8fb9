//! The outbox's byte-quota policy as a pure function: given what each priority
//! class holds and what a batch brings, decide how many bytes of which class to evict, or
//! refuse the batch.
//!
//! Rules: bulk is evicted first, then normal, oldest first; control and critical are never
//! evicted. An incoming bulk record may only evict (older) bulk; an incoming normal record
//! may evict bulk, then older normal; control and critical may evict bulk, then normal.
//! A batch that still does not fit is refused as a whole with back-pressure; a batch larger
//! than the whole quota can never fit.

use crate::model::Priority;

/// A byte figure per priority class, indexed by `Priority as usize`.
pub type PerClass = [u64; 4];

/// What the outbox must evict before it writes the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EvictionPlan {
    /// Bytes to evict per class (oldest first). Control and critical are always 0.
    pub evict: PerClass,
}

impl EvictionPlan {
    /// Whether nothing has to be evicted.
    pub fn is_empty(&self) -> bool {
        self.evict.iter().all(|b| *b == 0)
    }
}

/// Why a batch cannot be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaError {
    /// The batch is larger than the whole quota.
    TooLarge { bytes: u64, quota: u64 },
    /// Records of `class` do not fit even after every eviction they are allowed.
    Backpressure {
        class: Priority,
        needed: u64,
        evictable: u64,
    },
}

/// Classes an incoming record of `class` may evict, in eviction order.
pub fn may_evict(class: Priority) -> &'static [Priority] {
    match class {
        Priority::Bulk => &[Priority::Bulk],
        Priority::Normal | Priority::Critical | Priority::Control => {
            &[Priority::Bulk, Priority::Normal]
        }
    }
}

/// Decides how to admit a batch bringing `incoming[c]` bytes of each class `c` into an outbox
/// holding `usage[c]` bytes per class under a quota of `quota` bytes.
///
/// Incoming classes are placed highest priority first, so when a mixed batch overflows, the
/// higher classes get the evictable space first.
pub fn plan(quota: u64, usage: &PerClass, incoming: &PerClass) -> Result<EvictionPlan, QuotaError> {
    let in_total = incoming.iter().fold(0u64, |a, b| a.saturating_add(*b));
    if in_total > quota {
        return Err(QuotaError::TooLarge {
            bytes: in_total,
            quota,
        });
    }
    let mut evict = [0u64; 4];
    let mut used = usage.iter().fold(0u64, |a, b| a.saturating_add(*b));
    for class in Priority::ALL {
        let bytes = incoming[class as usize];
        if bytes == 0 {
            continue;
        }
        let overflow = used.saturating_add(bytes).saturating_sub(quota);
        if overflow > 0 {
            let pools = may_evict(class);
            let evictable = pools.iter().fold(0u64, |a, p| {
                a.saturating_add(usage[*p as usize] - evict[*p as usize])
            });
            if evictable < overflow {
                return Err(QuotaError::Backpressure {
                    class,
                    needed: overflow,
                    evictable,
                });
            }
            let mut left = overflow;
            for p in pools {
                let i = *p as usize;
                let take = left.min(usage[i] - evict[i]);
                evict[i] += take;
                left -= take;
            }
            used -= overflow;
        }
        used = used.saturating_add(bytes);
    }
    Ok(EvictionPlan { evict })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const C: usize = Priority::Control as usize;
    const K: usize = Priority::Critical as usize;
    const N: usize = Priority::Normal as usize;

    fn one(class: Priority, bytes: u64) -> PerClass {
        let mut p = [0; 4];
        p[class as usize] = bytes;
        p
    }

    #[test]
    fn fits_without_eviction() {
        let plan = plan(100, &[10, 10, 10, 10], &one(Priority::Normal, 60)).unwrap();
        assert!(plan.is_empty());
    }

    #[test]
    fn normal_evicts_bulk_before_normal() {
        let p = plan(100, &[0, 0, 50, 50], &one(Priority::Normal, 30)).unwrap();
        assert_eq!(p.evict, [0, 0, 0, 30]);
        let p = plan(100, &[0, 0, 80, 20], &one(Priority::Normal, 30)).unwrap();
        assert_eq!(p.evict, [0, 0, 10, 20]);
    }

    #[test]
    fn bulk_evicts_only_bulk() {
        let p = plan(100, &[0, 0, 80, 20], &one(Priority::Bulk, 15)).unwrap();
        assert_eq!(p.evict, [0, 0, 0, 15]);
        let e = plan(100, &[0, 0, 90, 10], &one(Priority::Bulk, 15)).unwrap_err();
        assert_eq!(
            e,
            QuotaError::Backpressure {
                class: Priority::Bulk,
                needed: 15,
                evictable: 10
            }
        );
    }

    #[test]
    fn critical_and_control_evict_bulk_then_normal_never_each_other() {
        for class in [Priority::Critical, Priority::Control] {
            let p = plan(100, &[20, 20, 40, 20], &one(class, 50)).unwrap();
            assert_eq!(p.evict, [0, 0, 30, 20]);
        }
        let e = plan(100, &[50, 40, 5, 5], &one(Priority::Critical, 30)).unwrap_err();
        assert_eq!(
            e,
            QuotaError::Backpressure {
                class: Priority::Critical,
                needed: 30,
                evictable: 10
            }
        );
        let e = plan(100, &[0, 100, 0, 0], &one(Priority::Control, 1)).unwrap_err();
        assert!(matches!(
            e,
            QuotaError::Backpressure {
                class: Priority::Control,
                needed: 1,
                evictable: 0
            }
        ));
    }

    #[test]
    fn too_large_for_quota() {
        assert_eq!(
            plan(100, &[0; 4], &one(Priority::Bulk, 101)).unwrap_err(),
            QuotaError::TooLarge {
                bytes: 101,
                quota: 100
            }
        );
        assert_eq!(
            plan(100, &[0; 4], &[50, 0, 51, 0]).unwrap_err(),
            QuotaError::TooLarge {
                bytes: 101,
                quota: 100
            }
        );
        // Exactly the quota fits (evicting everything evictable).
        let p = plan(100, &[0, 0, 60, 40], &one(Priority::Critical, 100)).unwrap();
        assert_eq!(p.evict, [0, 0, 60, 40]);
    }

    #[test]
    fn mixed_batch_places_higher_classes_first() {
        // 20 bytes free-able: bulk 10 + normal 10. Critical takes the bulk, normal then
        // evicts older normal, the incoming bulk finds no bulk left and is refused.
        let e = plan(100, &[0, 80, 10, 10], &[0, 10, 10, 1]).unwrap_err();
        assert_eq!(
            e,
            QuotaError::Backpressure {
                class: Priority::Bulk,
                needed: 1,
                evictable: 0
            }
        );
        let p = plan(100, &[0, 80, 10, 10], &[0, 10, 10, 0]).unwrap();
        assert_eq!(p.evict, [0, 0, 10, 10]);
    }

    proptest! {
        #[test]
        fn plan_invariants(
            quota in 0u64..10_000,
            usage in proptest::array::uniform4(0u64..3_000),
            incoming in proptest::array::uniform4(0u64..3_000),
        ) {
            match plan(quota, &usage, &incoming) {
                Ok(p) => {
                    prop_assert_eq!(p.evict[C], 0);
                    prop_assert_eq!(p.evict[K], 0);
                    for (e, u) in p.evict.iter().zip(usage.iter()) {
                        prop_assert!(e <= u);
                    }
                    let after: u64 = (0..4).map(|i| usage[i] - p.evict[i] + incoming[i]).sum();
                    let before: u64 = usage.iter().sum();
                    // An empty batch is a no-op even over quota (a quota lowered across a
                    // restart); any other admitted batch ends within the quota.
                    if incoming.iter().sum::<u64>() > 0 {
                        prop_assert!(after <= quota);
                    }
                    // Nothing is evicted when the batch fits as is.
                    if before + incoming.iter().sum::<u64>() <= quota {
                        prop_assert!(p.is_empty());
                    }
                    // Only bulk can be evicted by a pure-bulk batch.
                    if incoming[C] == 0 && incoming[K] == 0 && incoming[N] == 0 {
                        prop_assert_eq!(p.evict[N], 0);
                    }
                }
                Err(QuotaError::TooLarge { bytes, .. }) => {
                    prop_assert!(bytes > quota);
                }
                Err(QuotaError::Backpressure { needed, evictable, .. }) => {
                    prop_assert!(evictable < needed);
                }
            }
        }
    }
}
