//! Receipts: which input messages (e.g. MQTT QoS 1 publishes) have already been stored,
//! so that a message the broker delivers *again* after a crash (between "stored" and
//! "acknowledged to the broker") is not stored twice.
//!
//! Each source (a namespace, e.g. one MQTT device) keeps a ring of the fingerprints of its
//! last `capacity` stored messages; the ring must be larger than the source's in-flight
//! window (messages delivered but not yet acknowledged). Slots are aux keys of the outbox,
//! written in the same atomic batch as the samples they vouch for
//! ([`Outbox::append_with`](super::Outbox::append_with)):
//!
//! | key | value |
//! |---|---|
//! | `FE 01 <ns u64 BE> <slot u32 BE>` | fingerprint u64 BE |
//! | `FE 01 <ns u64 BE> FF FF FF FF` | next write position u64 BE |

use std::collections::HashMap;

use super::outbox::AUX_PREFIX;

const TAG: u8 = 0x01;
const NEXT_SLOT: u32 = u32::MAX;

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
struct Ring {
    slots: HashMap<u32, u64>,
    counts: HashMap<u64, u32>,
    next: u64,
}

/// Fingerprints of recently stored messages, per namespace.
#[derive(Debug, Clone)]
pub struct Receipts {
    capacity: u32,
    rings: HashMap<u64, Ring>,
}

fn slot_key(ns: u64, slot: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(14);
    k.extend_from_slice(&[AUX_PREFIX, TAG]);
    k.extend_from_slice(&ns.to_be_bytes());
    k.extend_from_slice(&slot.to_be_bytes());
    k
}

impl Receipts {
    /// An empty set keeping `capacity` (≥ 1) fingerprints per namespace.
    pub fn new(capacity: u32) -> Receipts {
        Receipts {
            capacity: capacity.clamp(1, NEXT_SLOT - 1),
            rings: HashMap::new(),
        }
    }

    /// Rebuilds the set from aux pairs (as visited by `Outbox::aux_scan`); pairs that are
    /// not receipts are ignored, malformed ones are skipped.
    pub fn load<'a>(
        capacity: u32,
        pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Receipts {
        let mut r = Receipts::new(capacity);
        for (k, v) in pairs {
            if k.len() != 14 || k[0] != AUX_PREFIX || k[1] != TAG {
                continue;
            }
            let (Ok(ns), Ok(slot), Ok(val)) = (
                <[u8; 8]>::try_from(&k[2..10]),
                <[u8; 4]>::try_from(&k[10..14]),
                <[u8; 8]>::try_from(v),
            ) else {
                continue;
            };
            let (ns, slot, val) = (
                u64::from_be_bytes(ns),
                u32::from_be_bytes(slot),
                u64::from_be_bytes(val),
            );
            let ring = r.rings.entry(ns).or_default();
            if slot == NEXT_SLOT {
                ring.next = val;
            } else if slot < r.capacity {
                ring.slots.insert(slot, val);
                *ring.counts.entry(val).or_insert(0) += 1;
            }
        }
        r
    }

    /// Whether `fp` was stored for `ns` (among its last `capacity` messages).
    pub fn contains(&self, ns: u64, fp: u64) -> bool {
        self.rings
            .get(&ns)
            .is_some_and(|r| r.counts.contains_key(&fp))
    }

    /// The aux puts that record `fps` for `ns`, to be written with the samples. Call
    /// [`commit`](Self::commit) with the same arguments once that write succeeded.
    pub fn puts(&self, ns: u64, fps: &[u64]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let next = self.rings.get(&ns).map_or(0, |r| r.next);
        let cap = u64::from(self.capacity);
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = fps
            .iter()
            .enumerate()
            .map(|(i, fp)| {
                let slot = ((next + i as u64) % cap) as u32;
                (slot_key(ns, slot), fp.to_be_bytes().to_vec())
            })
            .collect();
        out.push((
            slot_key(ns, NEXT_SLOT),
            (next + fps.len() as u64).to_be_bytes().to_vec(),
        ));
        out
    }

    /// Records `fps` for `ns` in memory (after [`puts`](Self::puts) were written).
    pub fn commit(&mut self, ns: u64, fps: &[u64]) {
        let cap = u64::from(self.capacity);
        let ring = self.rings.entry(ns).or_default();
        for fp in fps {
            let slot = (ring.next % cap) as u32;
            if let Some(old) = ring.slots.insert(slot, *fp)
                && let Some(c) = ring.counts.get_mut(&old)
            {
                *c -= 1;
                if *c == 0 {
                    ring.counts.remove(&old);
                }
            }
            *ring.counts.entry(*fp).or_insert(0) += 1;
            ring.next += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_last_capacity_fingerprints_and_reloads() {
        let mut r = Receipts::new(3);
        let puts_a = r.puts(7, &[10, 11]);
        r.commit(7, &[10, 11]);
        let puts_b = r.puts(7, &[12, 13]);
        r.commit(7, &[12, 13]);
        assert!(!r.contains(7, 10), "evicted by the ring");
        assert!(r.contains(7, 11) && r.contains(7, 12) && r.contains(7, 13));
        assert!(!r.contains(8, 12), "namespaces are separate");
        // Replay the writes as a store would (later puts overwrite earlier keys).
        let mut store: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = Default::default();
        for (k, v) in puts_a.into_iter().chain(puts_b) {
            store.insert(k, v);
        }
        let back = Receipts::load(3, store.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        for fp in [11, 12, 13] {
            assert!(back.contains(7, fp));
        }
        assert!(!back.contains(7, 10));
        // Writing continues where it stopped.
        let mut back = back;
        back.commit(7, &[14]);
        assert!(!back.contains(7, 11) && back.contains(7, 12));
    }

    #[test]
    fn fingerprints_separate_parts() {
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
        assert_eq!(fingerprint(&[b"x"]), fingerprint(&[b"x"]));
    }

    #[test]
    fn load_ignores_foreign_and_malformed_pairs() {
        let pairs: Vec<(&[u8], &[u8])> =
            vec![(b"\xfe\x02abc", b"x"), (b"\xfe\x01short", b"12345678")];
        let r = Receipts::load(4, pairs);
        assert!(r.rings.is_empty());
    }
}
