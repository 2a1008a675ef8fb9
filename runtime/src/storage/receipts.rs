//! Receipts: which input messages (e.g. MQTT QoS 1 publishes) have already been stored,
//! so that a message the broker delivers *again* after a crash (between "stored" and
//! "acknowledged to the broker") is not stored twice.
//!
//! Each source (a namespace, e.g. one MQTT device) keeps the fingerprints of at least its
//! last `capacity` stored messages (at most one block more). They are kept in blocks, one
//! per ingest batch, written as aux keys of the outbox in the same atomic batch as the
//! samples they vouch for ([`Outbox::append_with`](super::Outbox::append_with)); the oldest
//! blocks are removed in that same batch once a source holds more than `capacity`:
//!
//! | key | value |
//! |---|---|
//! | `FE 02 <ns u64 BE> <block u64 BE>` | fingerprints, u64 BE each |
//!
//! Two phases, so that nothing counts as stored before it is: [`Receipts::ops`] plans the
//! writes from the current state, [`Receipts::commit`] applies the same change in memory
//! once they succeeded.
//!
//! ## How many
//!
//! A message can be redelivered until the broker has read its acknowledgement, so its
//! receipt must outlive the *new* fingerprints stored after it until then. A source that
//! reads at most `W` messages ahead of the acknowledgements it has written, with at most
//! `W` written but not yet read by the broker, stores at most `2W` new messages after one
//! that is still unacknowledged; on the next connection the broker redelivers in order, so
//! what comes before it was stored already. A redelivery the source recognises is stored
//! again with its next samples, which *moves* its fingerprint to the newest block (each
//! fingerprint is held once): the count starts over with every redelivery, however many
//! crashes follow each other, and neither a refresh nor a redelivery that is not
//! recognised (a message never stored) pushes out a receipt still needed. The test
//! `redeliveries_are_always_recognised_across_crashes` simulates exactly that and fails
//! below `2W`; [`capacity_for_in_flight`] keeps twice as many, `4W`, plus
//! [`ACKS_IN_TRANSIT`] for acknowledgements written but still unread by the broker when
//! the gateway dies (lost with the connection, so their stored messages come again).
//!
//! A capacity lowered between two runs does not evict the previous run's receipts at once:
//! a source loaded with more keeps that many, less each batch by as many fingerprints as
//! the batch adds, until it is down to the new capacity — the previous run's redeliveries,
//! which come first, are recognised meanwhile.

use std::collections::{HashMap, HashSet, VecDeque};

use super::outbox::AUX_PREFIX;

const TAG: u8 = 0x02;
const KEY_LEN: usize = 18;

/// Acknowledgements that may have been written to the broker's socket, but not read by
/// the broker, when the gateway dies: they are lost with the connection (a socket closed
/// with unread data is reset), so their messages come again although they were stored.
/// Under overload the broker reads slowly and socket buffers hold tens of thousands of
/// 4-byte PUBACKs: a relay at 68k readings/s killed mid-stream got 5,145 such messages
/// again, which 4 × `max_in_flight` receipts did not cover.
pub const ACKS_IN_TRANSIT: usize = 65_536;

/// Receipts a source needs when it reads at most `max_in_flight` messages ahead of its
/// acknowledgements (see the module documentation): `4 × max_in_flight`, plus
/// [`ACKS_IN_TRANSIT`]. About 30 bytes of memory each.
pub const fn capacity_for_in_flight(max_in_flight: usize) -> usize {
    4 * (if max_in_flight == 0 { 1 } else { max_in_flight }) + ACKS_IN_TRANSIT
}

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
    /// Each fingerprint → the newest block holding it.
    index: HashMap<u64, u64>,
    /// Fingerprints in `blocks`.
    total: usize,
    next_block: u64,
    /// Kept at least this many (what a previous run left), shrinking by what each batch
    /// adds: a lowered capacity takes effect gradually.
    floor: usize,
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

fn block_value(fps: &[u64]) -> Vec<u8> {
    let mut value = Vec::with_capacity(fps.len() * 8);
    for fp in fps {
        value.extend_from_slice(&fp.to_be_bytes());
    }
    value
}

/// What recording one batch of fingerprints changes in a source: computed from the state
/// before, written by [`Receipts::ops`], applied by [`Receipts::commit`].
struct Plan {
    /// The new block: the batch's fingerprints, each once.
    block: Vec<u64>,
    /// Older blocks that lose fingerprints moving to the new block: (block, what is left).
    shrunk: Vec<(u64, Vec<u64>)>,
    /// Oldest blocks removed.
    evict: usize,
}

impl Source {
    fn plan(&self, fps: &[u64], capacity: usize) -> Plan {
        let mut seen = HashSet::with_capacity(fps.len());
        let block: Vec<u64> = fps.iter().copied().filter(|f| seen.insert(*f)).collect();
        // A fingerprint already held moves to the new block (a refreshed receipt), so
        // each is held once and refreshing never pushes another out.
        let mut moving: HashMap<u64, HashSet<u64>> = HashMap::new();
        for f in &block {
            if let Some(b) = self.index.get(f) {
                moving.entry(*b).or_default().insert(*f);
            }
        }
        let mut shrunk = Vec::new();
        let mut after: HashMap<u64, usize> = HashMap::new();
        let mut total = self.total + block.len();
        for (b, old) in &self.blocks {
            if let Some(gone) = moving.get(b) {
                let left: Vec<u64> = old.iter().copied().filter(|f| !gone.contains(f)).collect();
                total -= old.len() - left.len();
                after.insert(*b, left.len());
                shrunk.push((*b, left));
            }
        }
        let keep = capacity.max(self.floor.saturating_sub(block.len()));
        let mut evict = 0;
        // Never evict the block being added (it is not in `blocks` yet).
        for (b, old) in &self.blocks {
            let len = after.get(b).copied().unwrap_or(old.len());
            if total - len < keep {
                break;
            }
            total -= len;
            evict += 1;
        }
        Plan {
            block,
            shrunk,
            evict,
        }
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
            if fps.is_empty() {
                continue;
            }
            let s = r.sources.entry(ns).or_default();
            for fp in &fps {
                s.index.insert(*fp, block);
            }
            s.total += fps.len();
            s.floor = s.total;
            s.next_block = s.next_block.max(block + 1);
            s.blocks.push_back((block, fps));
        }
        r
    }

    /// Whether `fp` was stored for `ns` (among its last `capacity` messages at least).
    pub fn contains(&self, ns: u64, fp: u64) -> bool {
        self.sources
            .get(&ns)
            .is_some_and(|s| s.index.contains_key(&fp))
    }

    /// Fingerprints kept for `ns` now.
    pub fn len(&self, ns: u64) -> usize {
        self.sources.get(&ns).map_or(0, |s| s.total)
    }

    /// The capacity per source.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The aux writes that record `fps` for `ns` (one new block; fingerprints already held
    /// move into it; blocks beyond the capacity are removed), to be applied with the
    /// samples. Call [`commit`](Self::commit) with the same arguments once they were
    /// written.
    pub fn ops(&self, ns: u64, fps: &[u64]) -> Vec<AuxOp> {
        if fps.is_empty() {
            return Vec::new();
        }
        let empty = Source::default();
        let s = self.sources.get(&ns).unwrap_or(&empty);
        let plan = s.plan(fps, self.capacity);
        let mut out = vec![(block_key(ns, s.next_block), Some(block_value(&plan.block)))];
        let evicted: HashSet<u64> = s.blocks.iter().take(plan.evict).map(|(b, _)| *b).collect();
        out.extend(evicted.iter().map(|b| (block_key(ns, *b), None)));
        for (b, left) in &plan.shrunk {
            if evicted.contains(b) {
                continue;
            }
            out.push((
                block_key(ns, *b),
                (!left.is_empty()).then(|| block_value(left)),
            ));
        }
        out
    }

    /// Records `fps` for `ns` in memory, exactly as [`ops`](Self::ops) wrote them.
    pub fn commit(&mut self, ns: u64, fps: &[u64]) {
        if fps.is_empty() {
            return;
        }
        let capacity = self.capacity;
        let s = self.sources.entry(ns).or_default();
        let plan = s.plan(fps, capacity);
        for (b, left) in plan.shrunk {
            if let Some(slot) = s.blocks.iter_mut().find(|(x, _)| *x == b) {
                s.total -= slot.1.len() - left.len();
                slot.1 = left;
            }
        }
        for _ in 0..plan.evict {
            if let Some((b, old)) = s.blocks.pop_front() {
                s.total -= old.len();
                for fp in old {
                    if s.index.get(&fp) == Some(&b) {
                        s.index.remove(&fp);
                    }
                }
            }
        }
        s.blocks.retain(|(_, fps)| !fps.is_empty());
        let block = s.next_block;
        for fp in &plan.block {
            s.index.insert(*fp, block);
        }
        s.total += plan.block.len();
        s.floor = s.floor.saturating_sub(plan.block.len());
        s.blocks.push_back((block, plan.block));
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
    fn never_keeps_fewer_than_capacity() {
        let mut r = Receipts::new(4);
        for batch in [&[1u64, 2][..], &[3, 4], &[5]] {
            let _ = r.ops(1, batch);
            r.commit(1, batch);
        }
        // The block [1, 2] cannot go without leaving 3 < 4 behind.
        for fp in 2..=5 {
            assert!(r.contains(1, fp), "{fp}");
        }
        r.commit(1, &[6]);
        assert!(!r.contains(1, 1) && !r.contains(1, 2) && r.contains(1, 3));
        assert_eq!(r.len(1), 4);
    }

    #[test]
    fn a_refresh_moves_the_fingerprint_and_pushes_nothing_out() {
        let mut r = Receipts::new(4);
        let mut store = BTreeMap::new();
        for batch in [&[1u64, 2][..], &[3, 4], &[1]] {
            apply(&mut store, r.ops(9, batch));
            r.commit(9, batch);
        }
        assert_eq!(r.len(9), 4, "1 moved, not copied");
        for fp in 1..=4 {
            assert!(r.contains(9, fp));
        }
        // 1 now sits in the newest block: a new fingerprint pushes out 2's block, not 1.
        apply(&mut store, r.ops(9, &[5, 5]));
        r.commit(9, &[5, 5]);
        assert!(r.contains(9, 1) && !r.contains(9, 2) && r.contains(9, 5));
        let back = Receipts::load(4, store.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        for fp in [1, 3, 4, 5] {
            assert!(back.contains(9, fp), "{fp}");
        }
        assert_eq!(back.len(9), r.len(9));
    }

    #[test]
    fn capacity_covers_twice_the_window_with_margin() {
        assert_eq!(capacity_for_in_flight(1024), 4096 + ACKS_IN_TRANSIT);
        assert_eq!(capacity_for_in_flight(0), 4 + ACKS_IN_TRANSIT);
    }

    #[test]
    fn a_lowered_capacity_keeps_the_previous_runs_newest_receipts_first() {
        let mut r = Receipts::new(100);
        let mut store = BTreeMap::new();
        for fp in 1..=100u64 {
            apply(&mut store, r.ops(1, &[fp]));
            r.commit(1, &[fp]);
        }
        let pairs = || store.iter().map(|(k, v)| (k.as_slice(), v.as_slice()));
        let mut low = Receipts::load(10, pairs());
        assert_eq!(low.len(1), 100);
        // The newest 50 (the window a previous run could still see redelivered) outlive
        // the first 25 fingerprints added now.
        for fp in 1000..1025u64 {
            low.commit(1, &[fp]);
        }
        for fp in 51..=100 {
            assert!(low.contains(1, fp), "{fp}");
        }
        // ...and the set shrinks to the new capacity as new receipts come.
        for fp in 2000..2100u64 {
            low.commit(1, &[fp]);
        }
        assert_eq!(low.len(1), 10);
    }

    /// A broker with a persistent session, a source that holds at most `w` messages
    /// before writing their acks (and `w` acks in transit), random crashes that lose what
    /// was held or in transit, and receipts of `capacity_for_in_flight(w)`: no message is
    /// ever stored twice, whatever the broker overruns (it sends without limit here).
    #[test]
    fn redeliveries_are_always_recognised_across_crashes() {
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let w = rng.usize(1..8);
            let mut r = Receipts::new(capacity_for_in_flight(w));
            let n = 400u64;
            let fp = |m: u64| m.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut stored = vec![0u32; n as usize];
            // Broker: messages sent and not acknowledged, in order; next new message.
            let mut in_flight: std::collections::VecDeque<u64> = Default::default();
            let mut next = 0u64;
            // Connection: what the broker still sends on it (redeliveries first).
            let mut to_send: std::collections::VecDeque<(u64, bool)> = Default::default();
            // Source: read and not yet stored; stored and ack not yet written; acks in
            // transit.
            let mut read: Vec<(u64, bool)> = Vec::new();
            let mut held: Vec<u64> = Vec::new();
            let mut transit: std::collections::VecDeque<u64> = Default::default();
            let mut steps = 0;
            while (next < n || !in_flight.is_empty()) && steps < 200_000 {
                steps += 1;
                match rng.u8(0..100) {
                    // The broker sends (overrunning any quota); the source reads while it
                    // holds fewer than `w`.
                    0..=39 => {
                        if to_send.is_empty() && next < n {
                            in_flight.push_back(next);
                            to_send.push_back((next, false));
                            next += 1;
                        }
                        if read.len() + held.len() < w
                            && let Some(m) = to_send.pop_front()
                        {
                            read.push(m);
                        }
                    }
                    // A batch is stored: new messages with their receipts, recognised
                    // redeliveries only refresh theirs.
                    40..=54 => {
                        let mut fps = Vec::new();
                        for (m, dup) in read.drain(..) {
                            let f = fp(m);
                            if !(dup && r.contains(1, f)) {
                                stored[m as usize] += 1;
                            }
                            fps.push(f);
                            held.push(m);
                        }
                        r.commit(1, &fps);
                    }
                    // Acks written (at most `w` in transit).
                    55..=69 => {
                        while !held.is_empty() && transit.len() < w {
                            transit.push_back(held.remove(0));
                        }
                    }
                    // The broker reads acks.
                    70..=94 => {
                        if let Some(m) = transit.pop_front() {
                            in_flight.retain(|x| *x != m);
                        }
                    }
                    // Crash: what was read, held or in transit is lost; the broker
                    // redelivers everything unacknowledged, in order, flagged DUP.
                    _ => {
                        read.clear();
                        held.clear();
                        transit.clear();
                        to_send = in_flight.iter().map(|m| (*m, true)).collect();
                    }
                }
            }
            assert!(
                next == n && in_flight.is_empty(),
                "seed {seed}: did not finish"
            );
            for (m, c) in stored.iter().enumerate() {
                assert_eq!(*c, 1, "seed {seed}, w {w}: message {m} stored {c} times");
            }
        }
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
