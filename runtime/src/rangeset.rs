//! A set of u64 sequence numbers stored as disjoint, non-adjacent inclusive ranges. The hub
//! de-duplicates on it (sequences mostly arrive in order, so a gateway's whole history is
//! a handful of ranges); it serializes to a compact byte form for durable storage.

use std::collections::BTreeMap;

/// Disjoint inclusive ranges `start..=end`, keyed by start; adjacent ranges are merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
}

/// Why serialized range-set bytes were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeSetError {
    #[error("range set bytes truncated")]
    Truncated,
    #[error("range set bytes are not sorted, disjoint ranges")]
    Unordered,
    #[error("range set has more than {0} ranges")]
    TooMany(usize),
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// Number of disjoint ranges.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn contains(&self, x: u64) -> bool {
        self.ranges
            .range(..=x)
            .next_back()
            .is_some_and(|(_, &end)| x <= end)
    }

    /// Adds `x`; returns true if it was not there before.
    pub fn insert(&mut self, x: u64) -> bool {
        self.insert_range(x, x) > 0
    }

    /// Adds `start..=end`; returns how many numbers were new.
    pub fn insert_range(&mut self, start: u64, end: u64) -> u64 {
        if start > end {
            return 0;
        }
        let mut new_start = start;
        let mut new_end = end;
        let mut covered: u64 = 0;
        // Ranges that overlap or touch [start, end].
        let lo = start.saturating_sub(1);
        let first = self
            .ranges
            .range(..=lo)
            .next_back()
            .filter(|(_, e)| **e >= lo)
            .map(|(s, _)| *s);
        let from = first.unwrap_or(start);
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(from..=end.saturating_add(1))
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            if e.saturating_add(1) < start || s > end.saturating_add(1) {
                continue;
            }
            let os = s.max(start);
            let oe = e.min(end);
            if os <= oe {
                covered += oe - os + 1;
            }
            new_start = new_start.min(s);
            new_end = new_end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(new_start, new_end);
        (end - start + 1) - covered
    }

    /// The ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(s, e)| (*s, *e))
    }

    /// Serialized form: LEB128 varints, `start - prev_end`, `end - start` per range.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.ranges.len() * 4);
        let mut prev = 0u64;
        for (s, e) in self.iter() {
            put_varint(&mut out, s - prev);
            put_varint(&mut out, e - s);
            prev = e;
        }
        out
    }

    /// Parses [`RangeSet::to_bytes`] output; at most `max_ranges` ranges.
    pub fn from_bytes(mut b: &[u8], max_ranges: usize) -> Result<RangeSet, RangeSetError> {
        let mut set = RangeSet::new();
        let mut prev: Option<u64> = None;
        while !b.is_empty() {
            if set.ranges.len() >= max_ranges {
                return Err(RangeSetError::TooMany(max_ranges));
            }
            let gap = get_varint(&mut b)?;
            let len = get_varint(&mut b)?;
            let start = match prev {
                None => gap,
                Some(p) => {
                    if gap < 2 {
                        return Err(RangeSetError::Unordered);
                    }
                    p.checked_add(gap).ok_or(RangeSetError::Unordered)?
                }
            };
            let end = start.checked_add(len).ok_or(RangeSetError::Unordered)?;
            set.ranges.insert(start, end);
            prev = Some(end);
        }
        Ok(set)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &mut &[u8]) -> Result<u64, RangeSetError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let (&byte, rest) = b.split_first().ok_or(RangeSetError::Truncated)?;
        *b = rest;
        let part = u64::from(byte & 0x7f);
        if i == 9 && part > 1 {
            return Err(RangeSetError::Unordered);
        }
        v |= part << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(RangeSetError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn merges_adjacent_and_overlapping() {
        let mut s = RangeSet::new();
        assert!(s.insert(5));
        assert!(!s.insert(5));
        assert!(s.insert(6));
        assert!(s.insert(4));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(4, 6)]);
        assert_eq!(s.insert_range(10, 20), 11);
        assert_eq!(s.insert_range(0, 30), 31 - 3 - 11);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(0, 30)]);
        assert!(s.contains(0) && s.contains(30) && !s.contains(31));
        assert_eq!(s.insert_range(u64::MAX - 1, u64::MAX), 2);
        assert!(s.contains(u64::MAX));
    }

    #[test]
    fn bytes_reject_garbage() {
        assert!(RangeSet::from_bytes(&[0x80], 10).is_err());
        assert!(
            RangeSet::from_bytes(&[0, 0, 1, 0], 10).is_err(),
            "touching ranges"
        );
        assert!(
            RangeSet::from_bytes(&[0, 0, 5, 0, 5, 0], 2).is_err(),
            "too many"
        );
        assert!(RangeSet::from_bytes(&[0xff; 11], 10).is_err());
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((0u64..200, 0u64..8), 0..100)) {
            let mut s = RangeSet::new();
            let mut model = BTreeSet::new();
            for (a, len) in ops {
                let new = s.insert_range(a, a + len);
                let before = model.len();
                model.extend(a..=a + len);
                prop_assert_eq!(new as usize, model.len() - before);
            }
            for x in 0..210 {
                prop_assert_eq!(s.contains(x), model.contains(&x));
            }
            let back = RangeSet::from_bytes(&s.to_bytes(), 1000).unwrap();
            prop_assert_eq!(back, s.clone());
            // ranges are disjoint and non-adjacent
            let r: Vec<_> = s.iter().collect();
            for w in r.windows(2) {
                prop_assert!(w[0].1 + 1 < w[1].0);
            }
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = RangeSet::from_bytes(&b, 100);
        }
    }
}
