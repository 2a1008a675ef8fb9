//! Receipts: which input messages (e.g. MQTT QoS 1 publishes) have already been stored,
//! so that a message the broker delivers *again* after a crash (between "stored" and
//! "acknowledged to the broker") is not stored twice.
//!
//! Each source (a namespace, e.g. one MQTT device) keeps the fingerprints of its last
//! `capacity` (or a little more) stored messages, which must exceed the source's in-flight
//! window (messages delivered but not yet acknowledged). They are kept in blocks, one per
//! ingest batch, written as aux keys of the outbox in the same atomic batch as the samples
//! they vouch for ([`Outbox::append_with`](super::Outbox::append_with)); the oldest blocks
//! are removed in that same batch once a source holds more than `capacity`:
//!
//! | key | value |
//! |---|---|
//! | `FE 02 <ns u64 BE> <block u64 BE>` | fingerprints, u64 BE each |
//!
//! Two phases, so that nothing counts as stored before it is: [`Receipts::ops`] plans the
//! writes from the current state, [`Receipts::commit`] applies the same change in memory
//! once they succeeded.

use std::collections::{HashMap, VecDeque};

use super::outbox::AUX_PREFIX;

const TAG: u8 = 0x02;
const KEY_LEN: usize = 18;

/// 64-bit FNV-1a over the parts, with a separator between them (stable across processes,
/// unlike `std`'s hasher).
pub fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0xff;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[derive(Debug, Default, Clone)]
struct Source {
    /// (block number, fingerprints), oldest first.
    blocks: VecDeque<(u64, Vec<u64>)>,
    counts: HashMap<u64, u32>,
    total: usize,
    next_block: u64,
}

/// An aux write: a put, or a removal (`None`).
pub type AuxOp = (Vec<u8>, Option<Vec<u8>>);

/// Fingerprints of recently stored messages, per namespace.
#[derive(Debug, Clone)]
pub struct Receipts {
    capacity: usize,
    sources: HashMap<u64, Source>,
}

fn block_key(ns: u64, block: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(KEY_LEN);
    k.extend_from_slice(&[AUX_PREFIX, TAG]);
    k.extend_from_slice(&ns.to_be_bytes());
    k.extend_from_slice(&block.to_be_bytes());
    k
}

impl Source {
    /// How many of the oldest blocks go once `adding` more fingerprints are in.
    fn evictions(&self, adding: usize, capacity: usize) -> usize {
        let mut total = self.total + adding;
        let mut n = 0;
        // Never evict the block being added (it is not in `blocks` yet).
        for (_, fps) in &self.blocks {
            if total <= capacity {
                break;
            }
            total -= fps.len();
            n += 1;
        }
        n
    }
}

impl Receipts {
    /// An empty set keeping at least the last `capacity` (≥ 1) fingerprints per namespace.
    pub fn new(capacity: usize) -> Receipts {
        Receipts {
            capacity: capacity.max(1),
            sources: HashMap::new(),
        }
    }

    /// Rebuilds the set from aux pairs (as visited by `Outbox::aux_scan`, in key order);
    /// pairs that are not receipt blocks are ignored, malformed ones skipped.
    pub fn load<'a>(
        capacity: usize,
        pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Receipts {
        let mut r = Receipts::new(capacity);
        for (k, v) in pairs {
            if k.len() != KEY_LEN || k[0] != AUX_PREFIX || k[1] != TAG || v.len() % 8 != 0 {
                continue;
            }
            let (Ok(ns), Ok(block)) = (
                <[u8; 8]>::try_from(&k[2..10]),
                <[u8; 8]>::try_from(&k[10..18]),
            ) else {
                continue;
            };
            let (ns, block) = (u64::from_be_bytes(ns), u64::from_be_bytes(block));
            let fps: Vec<u64> = v
                .chunks_exact(8)
                .filter_map(|c| <[u8; 8]>::try_from(c).ok().map(u64::from_be_bytes))
                .collect();
            let s = r.sources.entry(ns).or_default();
            for fp in &fps {
                *s.counts.entry(*fp).or_insert(0) += 1;
            }
            s.total += fps.len();
            s.next_block = s.next_block.max(block + 1);
            s.blocks.push_back((block, fps));
        }
        r
    }

    /// Whether `fp` was stored for `ns` (among its last `capacity` messages at least).
    pub fn contains(&self, ns: u64, fp: u64) -> bool {
        self.sources
            .get(&ns)
            .is_some_and(|s| s.counts.contains_key(&fp))
    }

    /// The aux writes that record `fps` for `ns` (one new block, and the removal of blocks
    /// beyond the capacity), to be applied with the samples. Call [`commit`](Self::commit)
    /// with the same arguments once they were written.
    pub fn ops(&self, ns: u64, fps: &[u64]) -> Vec<AuxOp> {
        if fps.is_empty() {
            return Vec::new();
        }
        let empty = Source::default();
        let s = self.sources.get(&ns).unwrap_or(&empty);
        let mut value = Vec::with_capacity(fps.len() * 8);
        for fp in fps {
            value.extend_from_slice(&fp.to_be_bytes());
        }
        let mut out = vec![(block_key(ns, s.next_block), Some(value))];
        let evict = s.evictions(fps.len(), self.capacity);
        out.extend(
            s.blocks
                .iter()
                .take(evict)
                .map(|(b, _)| (block_key(ns, *b), None)),
        );
        out
    }

    /// Records `fps` for `ns` in memory, exactly as [`ops`](Self::ops) wrote them.
    pub fn commit(&mut self, ns: u64, fps: &[u64]) {
        if fps.is_empty() {
            return;
        }
        let capacity = self.capacity;
        let s = self.sources.entry(ns).or_default();
        let evict = s.evictions(fps.len(), capacity);
        for _ in 0..evict {
            if let Some((_, old)) = s.blocks.pop_front() {
                s.total -= old.len();
                for fp in old {
                    if let Some(c) = s.counts.get_mut(&fp) {
                        *c -= 1;
                        if *c == 0 {
                            s.counts.remove(&fp);
                        }
                    }
                }
            }
        }
        for fp in fps {
            *s.counts.entry(*fp).or_insert(0) += 1;
        }
        s.total += fps.len();
        s.blocks.push_back((s.next_block, fps.to_vec()));
        s.next_block += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn apply(store: &mut BTreeMap<Vec<u8>, Vec<u8>>, ops: Vec<AuxOp>) {
        for (k, v) in ops {
            match v {
                Some(v) => {
                    store.insert(k, v);
                }
                None => {
                    store.remove(&k);
                }
            }
        }
    }

    #[test]
    fn keeps_at_least_capacity_and_reloads_the_same() {
        let mut r = Receipts::new(4);
        let mut store = BTreeMap::new();
        for batch in [[10u64, 11], [12, 13], [14, 15]] {
            apply(&mut store, r.ops(7, &batch));
            r.commit(7, &batch);
        }
        assert!(
            !r.contains(7, 10) && !r.contains(7, 11),
            "oldest block evicted"
        );
        for fp in 12..16 {
            assert!(r.contains(7, fp));
        }
        assert!(!r.contains(8, 12), "namespaces are separate");
        assert_eq!(store.len(), 2, "evicted blocks are removed from the store");
        let mut back = Receipts::load(4, store.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        for fp in 12..16 {
            assert!(back.contains(7, fp));
        }
        // Writing continues after the last block.
        apply(&mut store, back.ops(7, &[16]));
        back.commit(7, &[16]);
        let again = Receipts::load(4, store.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        assert!(again.contains(7, 16) && again.contains(7, 14));
    }

    #[test]
    fn ops_do_not_change_memory_before_commit() {
        let r = Receipts::new(10);
        let _ = r.ops(1, &[5]);
        assert!(!r.contains(1, 5));
        assert!(r.ops(1, &[]).is_empty());
    }

    #[test]
    fn fingerprints_separate_parts() {
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
        assert_eq!(fingerprint(&[b"x"]), fingerprint(&[b"x"]));
    }

    #[test]
    fn load_ignores_foreign_and_malformed_pairs() {
        let long = [0xfe, 0x02, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"\xfe\x01abc", b"x"), (&long, b"1234567")];
        let r = Receipts::load(4, pairs);
        assert!(r.sources.is_empty());
    }
}
