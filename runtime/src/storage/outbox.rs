//! The durable outbox: every record that leaves the gateway is appended here first, shipped
//! from here, and removed only once the hub has acknowledged it.
//!
//! # Layout
//!
//! Records are ordered by (priority class, sequence number) and stored in *segments*
//! ([`super::segment`]): one append of one class is one segment, under the key
//! `[priority u8][first seq u64 big-endian]`, holding records with consecutive sequence
//! numbers. A reading costs a small share of one storage operation instead of an insert, a
//! lookup and a delete of its own. Other keyspaces, by first byte:
//!
//! | first byte | what |
//! |---|---|
//! | `0x00..=0x03` | segments, by class |
//! | `0xFD` | ack masks: `[FD][class][first seq BE]` → acknowledged offsets of a segment |
//! | `0xFE` | aux keys of other components (message receipts), see [`Outbox::append_with`] |
//! | `0xFF` | meta: format version, sequence mark, per-class counters |
//!
//! A segment is deleted once all its records are acknowledged. Until then, the hub's
//! acknowledgements of some of its records are kept in its ack mask, written in the same
//! atomic batch as the counters, so after a restart the acknowledged part is never read (or
//! sent) again.
//!
//! One sequence counter per outbox, shared by all classes, only ever grows: its high-water
//! mark is persisted in the same atomic batch as the records it numbers, so a sequence
//! number is never handed out twice for durable data, even after the outbox was emptied and
//! reopened. The hub de-duplicates on (gateway, stream, seq), so this matters.
//!
//! Per-class byte counts (segment key + value bytes) and record counts (records not yet
//! acknowledged) are persisted in the same batches, so reopening does not need a full scan;
//! they are rebuilt by a scan when missing or inconsistent. An outbox of format 1 (one
//! record per key) is converted in place on open.
//!
//! Durability: every append is one atomic batch; [`Outbox::durable`] is the durable point —
//! everything appended before the call is on disk when it returns. Callers await it before
//! they acknowledge anything to anyone. Concurrent callers share one flush (group commit).
//! Scans only return records that are durable, so nothing is shipped that a crash could
//! take back (and whose sequence number could be reused).
//!
//! The byte quota is enforced with the pure policy of [`super::quota`]: whole segments,
//! oldest first, are evicted in the same atomic batch as the insert.

use std::collections::{BTreeMap, HashMap};
use std::ops::{Bound, ControlFlow, Range};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::quota::{self, PerClass, QuotaError};
use super::segment::{self, AckMask, Segment, SegmentBuf};
use super::{Direction, KvEngine, StorageError, WriteBatch};
use crate::metrics::Metrics;
use crate::model::Priority;

/// A record's sequence number: unique per outbox, strictly increasing in append order
/// within a class.
pub type Seq = u64;

/// Bytes of a segment key; a segment costs `KEY_LEN + value.len()` bytes of quota.
pub const KEY_LEN: usize = 9;

const META: u8 = 0xFF;
/// First byte of every aux key (see [`Outbox::append_with`]).
pub const AUX_PREFIX: u8 = 0xFE;
/// First byte of every ack-mask key.
const MASK_PREFIX: u8 = 0xFD;
const META_VERSION: [u8; 2] = [META, 0x00];
const META_NEXT_SEQ: [u8; 2] = [META, 0x01];
const META_CLASS: u8 = 0x02;
/// 1: one record per key. 2: segments.
const FORMAT_VERSION: u8 = 2;

fn record_key(p: Priority, seq: Seq) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[0] = p as u8;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn mask_key(p: Priority, first: Seq) -> [u8; KEY_LEN + 1] {
    let mut k = [0u8; KEY_LEN + 1];
    k[0] = MASK_PREFIX;
    k[1] = p as u8;
    k[2..].copy_from_slice(&first.to_be_bytes());
    k
}

fn parse_record_key(k: &[u8]) -> Result<(Priority, Seq), StorageError> {
    let bad = || StorageError::Corrupt(format!("malformed outbox segment key {k:02x?}"));
    if k.len() != KEY_LEN {
        return Err(bad());
    }
    let p = Priority::from_u8(k[0]).ok_or_else(bad)?;
    let mut s = [0u8; 8];
    s.copy_from_slice(&k[1..]);
    Ok((p, Seq::from_be_bytes(s)))
}

fn parse_mask_key(k: &[u8]) -> Option<Seq> {
    if k.len() != KEY_LEN + 1 || k[0] != MASK_PREFIX {
        return None;
    }
    Some(Seq::from_be_bytes(k[2..].try_into().ok()?))
}

fn class_meta_key(p: Priority) -> [u8; 3] {
    [META, META_CLASS, p as u8]
}

fn class_meta_value(bytes: u64, records: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&bytes.to_be_bytes());
    v[8..].copy_from_slice(&records.to_be_bytes());
    v
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

fn parse_class_meta(v: &[u8]) -> Option<(u64, u64)> {
    if v.len() != 16 {
        return None;
    }
    Some((parse_u64(&v[..8])?, parse_u64(&v[8..])?))
}

fn class_start(p: Priority) -> [u8; 1] {
    [p as u8]
}

fn class_end(p: Priority) -> [u8; 1] {
    // Priorities are 0..=3, so p + 1 ≤ 4 < MASK_PREFIX.
    [p as u8 + 1]
}

fn corrupt_segment(p: Priority, first: Seq, e: segment::SegmentError) -> StorageError {
    StorageError::Corrupt(format!("outbox segment {} #{first}: {e}", p.as_str()))
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its priority class.
    pub priority: Priority,
    /// Its sequence number.
    pub seq: Seq,
    /// The payload as appended.
    pub value: Vec<u8>,
}

/// What a [`Outbox::scan_each`] went through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanEnd {
    /// The highest sequence the scan went past (acknowledged records it skipped included);
    /// `None` when it found nothing. The next scan starts after it.
    pub last: Option<Seq>,
    /// Records visited.
    pub records: usize,
    /// Segments that cannot be read (torn or corrupt), by first sequence: drop them with
    /// [`Outbox::drop_segments`].
    pub corrupt: Vec<Seq>,
}

/// Settings of an [`Outbox`].
#[derive(Clone, Default)]
pub struct OutboxConfig {
    /// Byte quota over key + value bytes of all segments.
    pub quota_bytes: u64,
    /// Where to report `outpost_outbox_*` metrics, if anywhere.
    pub metrics: Option<Metrics>,
}

/// A snapshot of the outbox's figures. Arrays are indexed by `Priority as usize`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStats {
    /// Stored bytes (segment key + value) per class.
    pub bytes: PerClass,
    /// Stored records not yet acknowledged, per class.
    pub records: PerClass,
    /// The quota in bytes.
    pub quota_bytes: u64,
    /// Records evicted per class since this outbox was opened.
    pub evicted_records: PerClass,
    /// Bytes evicted per class since this outbox was opened.
    pub evicted_bytes: PerClass,
    /// Batches refused with back-pressure since open, per incoming class.
    pub backpressure: PerClass,
    /// The next sequence number to be handed out.
    pub next_seq: Seq,
    /// Records with a sequence number below this are durable (and visible to `scan`).
    pub durable_seq: Seq,
}

impl OutboxStats {
    /// Stored bytes over all classes.
    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }
}

struct State {
    next_seq: Seq,
    bytes: PerClass,
    records: PerClass,
    evicted_records: PerClass,
    evicted_bytes: PerClass,
    backpressure: PerClass,
    /// Bumped after every write applied to the engine.
    generation: u64,
}

struct OutboxMetrics {
    bytes: [Gauge; 4],
    records: [Gauge; 4],
    evicted: [Counter; 4],
    backpressure: [Counter; 4],
}

impl OutboxMetrics {
    fn new(m: &Metrics) -> OutboxMetrics {
        let per = |f: &dyn Fn(&'static str) -> Gauge| Priority::ALL.map(|p| f(p.as_str()));
        let per_c = |f: &dyn Fn(&'static str) -> Counter| Priority::ALL.map(|p| f(p.as_str()));
        OutboxMetrics {
            bytes: per(&|c| {
                m.gauge(
                    "outpost_outbox_bytes",
                    "Bytes stored in the outbox per priority class",
                    &[("class", c)],
                )
            }),
            records: per(&|c| {
                m.gauge(
                    "outpost_outbox_records",
                    "Records stored in the outbox and not yet acknowledged, per priority class",
                    &[("class", c)],
                )
            }),
            evicted: per_c(&|c| {
                m.counter(
                    "outpost_outbox_evicted",
                    "Records evicted from the outbox to stay within its quota",
                    &[("class", c)],
                )
            }),
            backpressure: per_c(&|c| {
                m.counter(
                    "outpost_outbox_backpressure",
                    "Appends refused because the outbox quota was exhausted",
                    &[("class", c)],
                )
            }),
        }
    }

    fn set_usage(&self, st: &State) {
        for i in 0..4 {
            self.bytes[i].set(i64::try_from(st.bytes[i]).unwrap_or(i64::MAX));
            self.records[i].set(i64::try_from(st.records[i]).unwrap_or(i64::MAX));
        }
    }
}

/// Segments visited by one step of a scan, most.
const SCAN_CHUNK_SEGMENTS: usize = 16;
/// Segment bytes visited by one step of a scan, most (beyond the first segment).
const SCAN_CHUNK_BYTES: usize = 1 << 20;
/// Records converted per batch when an outbox of format 1 is opened.
const CONVERT_BATCH: usize = 4_096;

/// The durable outbox over a [`KvEngine`]. Share it behind an `Arc`.
pub struct Outbox<E: KvEngine> {
    engine: Arc<E>,
    quota: u64,
    state: Mutex<State>,
    /// Highest generation known to be flushed.
    flushed_gen: AtomicU64,
    /// Records with seq below this are durable.
    durable_seq: AtomicU64,
    flush_lock: tokio::sync::Mutex<()>,
    metrics: Option<OutboxMetrics>,
}

/// A segment's place: first sequence, record count, stored value length.
#[derive(Debug, Clone, Copy)]
struct SegInfo {
    first: Seq,
    count: u32,
    len: usize,
}

impl SegInfo {
    fn end(&self) -> Seq {
        self.first + u64::from(self.count)
    }
}

impl<E: KvEngine> Outbox<E> {
    /// Opens the outbox stored in `engine`: converts an outbox of format 1, reads the
    /// sequence high-water mark and the per-class counters, checks them cheaply against the
    /// stored segments, and rebuilds them by a scan when they are missing or inconsistent.
    ///
    /// Everything found on open counts as durable.
    pub fn open(engine: E, config: OutboxConfig) -> Result<Outbox<E>, StorageError> {
        let engine = Arc::new(engine);
        let (fresh, convert) = match engine.get(&META_VERSION)? {
            None => (true, false),
            Some(v) if v.as_slice() == [FORMAT_VERSION] => (false, false),
            Some(v) if v.as_slice() == [1] => (false, true),
            Some(v) => {
                return Err(StorageError::Corrupt(format!(
                    "unknown outbox format version {v:02x?} (this build reads 1 and {FORMAT_VERSION})"
                )));
            }
        };
        if convert {
            convert_format_1(&*engine)?;
        }
        let meta_seq = match engine.get(&META_NEXT_SEQ)? {
            None => None,
            Some(v) => Some(parse_u64(&v).ok_or_else(|| {
                StorageError::Corrupt(format!("malformed outbox sequence mark {v:02x?}"))
            })?),
        };
        let mut next_seq = meta_seq.unwrap_or(0);
        let mut bytes = [0u64; 4];
        let mut records = [0u64; 4];
        let mut repaired = meta_seq.is_none() || convert;
        for p in Priority::ALL {
            let i = p as usize;
            let last = last_seq(&*engine, p)?;
            if let Some(last) = last {
                let needed = last.checked_add(1).ok_or(StorageError::SeqExhausted)?;
                if needed > next_seq {
                    tracing::warn!(
                        class = p.as_str(),
                        mark = next_seq,
                        last,
                        "outbox sequence mark behind stored records; raising it"
                    );
                    next_seq = needed;
                    repaired = true;
                }
            }
            let meta = engine.get(&class_meta_key(p))?;
            let counted = if convert {
                None
            } else {
                meta.as_deref().and_then(parse_class_meta)
            };
            match counted {
                Some((b, r)) if (r == 0) == last.is_none() && (b == 0) == last.is_none() => {
                    bytes[i] = b;
                    records[i] = r;
                }
                _ => {
                    let (b, r) = scan_class_totals(&*engine, p)?;
                    if !convert && (!fresh || r > 0) {
                        tracing::warn!(
                            class = p.as_str(),
                            bytes = b,
                            records = r,
                            "outbox class counters missing or inconsistent; rebuilt by a scan"
                        );
                    }
                    bytes[i] = b;
                    records[i] = r;
                    repaired = true;
                }
            }
        }
        if repaired {
            let mut batch = WriteBatch::new();
            batch.put(META_VERSION.to_vec(), vec![FORMAT_VERSION]);
            batch.put(META_NEXT_SEQ.to_vec(), next_seq.to_be_bytes().to_vec());
            for p in Priority::ALL {
                let i = p as usize;
                batch.put(
                    class_meta_key(p).to_vec(),
                    class_meta_value(bytes[i], records[i]).to_vec(),
                );
            }
            engine.apply(batch)?;
        }
        let metrics = config.metrics.as_ref().map(OutboxMetrics::new);
        let state = State {
            next_seq,
            bytes,
            records,
            evicted_records: [0; 4],
            evicted_bytes: [0; 4],
            backpressure: [0; 4],
            generation: 0,
        };
        if let Some(m) = &metrics {
            m.set_usage(&state);
        }
        Ok(Outbox {
            engine,
            quota: config.quota_bytes,
            state: Mutex::new(state),
            flushed_gen: AtomicU64::new(0),
            durable_seq: AtomicU64::new(next_seq),
            flush_lock: tokio::sync::Mutex::new(()),
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine underneath (for size figures and tests).
    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// Appends `items` as one atomic batch and returns their sequence numbers, in order.
    /// The items of each class become one segment, numbered consecutively (classes in the
    /// order they first appear).
    ///
    /// If the batch does not fit in the quota, older segments are evicted (bulk first, then
    /// normal, oldest first) in the same batch; if it still does not fit, nothing is written
    /// and [`StorageError::Backpressure`] is returned. The records become durable (and
    /// visible to [`scan`](Self::scan)) at the next completed [`durable`](Self::durable).
    pub fn append(&self, items: &[(Priority, &[u8])]) -> Result<Vec<Seq>, StorageError> {
        self.append_with(items, &[])
    }

    /// [`append`](Self::append), plus `aux` operations (a put, or a removal when the value
    /// is `None`) applied in the same atomic batch. Aux keys live in their own keyspace
    /// (they must start with [`AUX_PREFIX`]); they are not records, are not counted against
    /// the quota, and are read back with [`aux_scan`](Self::aux_scan). Used for facts that
    /// must become durable together with the records they describe (e.g. which MQTT
    /// messages were stored).
    pub fn append_with(
        &self,
        items: &[(Priority, &[u8])],
        aux: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<Vec<Seq>, StorageError> {
        let mut groups: Vec<(Priority, SegmentBuf, Vec<usize>)> = Vec::new();
        for (k, (p, v)) in items.iter().enumerate() {
            let g = match groups.iter().position(|g| g.0 == *p) {
                Some(g) => g,
                None => {
                    groups.push((*p, SegmentBuf::new(), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[g].1.push(v);
            groups[g].2.push(k);
        }
        let values: Vec<(Priority, Vec<u8>)> = groups
            .iter_mut()
            .map(|(p, seg, _)| (*p, seg.finish()))
            .collect();
        let refs: Vec<(Priority, &[u8])> = values.iter().map(|(p, v)| (*p, v.as_slice())).collect();
        let firsts = self.append_segments_with(&refs, aux)?;
        let mut seqs = vec![0; items.len()];
        for ((_, _, idx), first) in groups.iter().zip(firsts) {
            for (j, k) in idx.iter().enumerate() {
                seqs[*k] = first.start + j as u64;
            }
        }
        Ok(seqs)
    }

    /// Appends finished segments ([`SegmentBuf::finish`]) and `aux` operations as one
    /// atomic batch; returns the sequence numbers of each segment's records. The way for a
    /// writer that encodes its records straight into a segment. Quota and back-pressure as
    /// for [`append`](Self::append).
    pub fn append_segments_with(
        &self,
        segments: &[(Priority, &[u8])],
        aux: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<Vec<Range<Seq>>, StorageError> {
        if let Some((k, _)) = aux.iter().find(|(k, _)| k.first() != Some(&AUX_PREFIX)) {
            return Err(StorageError::Corrupt(format!(
                "aux key {k:02x?} outside the aux keyspace"
            )));
        }
        let mut counts = Vec::with_capacity(segments.len());
        let mut incoming = [0u64; 4];
        for (p, v) in segments {
            let n = segment::peek_count(v).map_err(|e| {
                StorageError::Corrupt(format!("appending a malformed segment: {e}"))
            })?;
            counts.push(u64::from(n));
            let i = *p as usize;
            incoming[i] = incoming[i].saturating_add((KEY_LEN + v.len()) as u64);
        }
        let mut st = self.lock();
        if segments.is_empty() {
            if !aux.is_empty() {
                let mut batch = WriteBatch::new();
                push_aux(&mut batch, aux);
                self.engine.apply(batch)?;
                st.generation += 1;
            }
            return Ok(Vec::new());
        }
        let plan = match quota::plan(self.quota, &st.bytes, &incoming) {
            Ok(plan) => plan,
            Err(QuotaError::TooLarge { bytes, quota }) => {
                return Err(StorageError::TooLarge { bytes, quota });
            }
            Err(QuotaError::Backpressure {
                class,
                needed,
                evictable,
            }) => {
                st.backpressure[class as usize] += 1;
                if let Some(m) = &self.metrics {
                    m.backpressure[class as usize].inc();
                }
                tracing::warn!(
                    class = class.as_str(),
                    needed,
                    evictable,
                    quota = self.quota,
                    "outbox full: refusing records (back-pressure)"
                );
                return Err(StorageError::Backpressure {
                    class,
                    needed,
                    evictable,
                    quota: self.quota,
                });
            }
        };
        let total: u64 = counts.iter().sum();
        let first = st.next_seq;
        let next = first.checked_add(total).ok_or(StorageError::SeqExhausted)?;

        let mut batch = WriteBatch::new();
        batch
            .ops
            .reserve(segments.len() + aux.len() + 2 + Priority::ALL.len());
        let mut bytes = st.bytes;
        let mut records = st.records;
        let mut evicted = [(0u64, 0u64, 0u64, 0u64); 4]; // (records, bytes, first seq, last seq)
        for p in Priority::ALL {
            let i = p as usize;
            let target = plan.evict[i];
            if target == 0 {
                continue;
            }
            let (cnt, freed, lo, hi) = self.collect_oldest(p, target, &mut batch)?;
            if freed < target {
                return Err(StorageError::Corrupt(format!(
                    "outbox counters say {} bytes of {} records, but only {freed} were found",
                    bytes[i],
                    p.as_str()
                )));
            }
            bytes[i] -= freed.min(bytes[i]);
            records[i] -= cnt.min(records[i]);
            evicted[i] = (cnt, freed, lo, hi);
        }
        let mut ranges = Vec::with_capacity(segments.len());
        let mut seq = first;
        for ((p, v), n) in segments.iter().zip(&counts) {
            batch.put(record_key(*p, seq).to_vec(), v.to_vec());
            bytes[*p as usize] += (KEY_LEN + v.len()) as u64;
            records[*p as usize] += n;
            ranges.push(seq..seq + n);
            seq += n;
        }
        batch.put(META_NEXT_SEQ.to_vec(), next.to_be_bytes().to_vec());
        for p in Priority::ALL {
            let i = p as usize;
            if bytes[i] != st.bytes[i] || records[i] != st.records[i] {
                batch.put(
                    class_meta_key(p).to_vec(),
                    class_meta_value(bytes[i], records[i]).to_vec(),
                );
            }
        }
        push_aux(&mut batch, aux);
        self.engine.apply(batch)?;

        st.next_seq = next;
        st.bytes = bytes;
        st.records = records;
        st.generation += 1;
        for p in Priority::ALL {
            let i = p as usize;
            let (cnt, freed, lo, hi) = evicted[i];
            if freed == 0 {
                continue;
            }
            st.evicted_records[i] += cnt;
            st.evicted_bytes[i] += freed;
            if let Some(m) = &self.metrics {
                m.evicted[i].inc_by(cnt);
            }
            tracing::warn!(
                class = p.as_str(),
                records = cnt,
                bytes = freed,
                first_seq = lo,
                last_seq = hi,
                quota = self.quota,
                "outbox quota reached: evicted oldest records"
            );
        }
        if let Some(m) = &self.metrics {
            m.set_usage(&st);
        }
        Ok(ranges)
    }

    /// Visits every aux key/value pair (keys start with [`AUX_PREFIX`]) in key order.
    pub fn aux_scan(&self, visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), StorageError> {
        self.engine.scan(
            Bound::Included(&[AUX_PREFIX][..]),
            Bound::Excluded(&[AUX_PREFIX + 1][..]),
            Direction::Forward,
            &mut |k, v| {
                visit(k, v);
                std::ops::ControlFlow::Continue(())
            },
        )
    }

    /// The ack masks of class `p` for segments starting in `lo..=hi`.
    fn masks_in(
        &self,
        p: Priority,
        lo: Seq,
        hi: Seq,
    ) -> Result<HashMap<Seq, AckMask>, StorageError> {
        masks_in(&*self.engine, p, lo, hi)
    }

    /// Adds removals of the oldest segments of `p` totalling at least `target` bytes to
    /// `batch`; returns (unacknowledged records, bytes, first seq, last seq).
    fn collect_oldest(
        &self,
        p: Priority,
        target: u64,
        batch: &mut WriteBatch,
    ) -> Result<(u64, u64, Seq, Seq), StorageError> {
        let mut segs: Vec<SegInfo> = Vec::new();
        let mut freed = 0u64;
        let mut err = None;
        self.engine.scan(
            Bound::Included(&class_start(p)),
            Bound::Excluded(&class_end(p)),
            Direction::Forward,
            &mut |k, v| {
                match parse_record_key(k) {
                    Ok((_, first)) => segs.push(SegInfo {
                        first,
                        // An unreadable header counts as one record: it is evicted anyway.
                        count: segment::peek_count(v).unwrap_or(1),
                        len: v.len(),
                    }),
                    Err(e) => {
                        err = Some(e);
                        return ControlFlow::Break(());
                    }
                }
                freed += (KEY_LEN + v.len()) as u64;
                if freed >= target {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )?;
        if let Some(e) = err {
            return Err(e);
        }
        let (Some(lo), Some(hi)) = (segs.first(), segs.last()) else {
            return Ok((0, 0, 0, 0));
        };
        let masks = self.masks_in(p, lo.first, hi.first)?;
        let mut cnt = 0u64;
        for s in &segs {
            batch.remove(record_key(p, s.first).to_vec());
            let acked = match masks.get(&s.first) {
                Some(m) => {
                    batch.remove(mask_key(p, s.first).to_vec());
                    m.acked()
                }
                None => 0,
            };
            cnt += u64::from(s.count).saturating_sub(acked);
        }
        Ok((cnt, freed, lo.first, hi.end() - 1))
    }

    /// The durable point: returns once everything appended (or removed) before the call is
    /// on disk. Concurrent callers share one flush. Needs a tokio runtime (the flush runs on
    /// the blocking pool).
    pub async fn durable(&self) -> Result<(), StorageError> {
        let target = self.lock().generation;
        if self.flushed_gen.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _guard = self.flush_lock.lock().await;
        if self.flushed_gen.load(Ordering::Acquire) >= target {
            // Another caller's flush covered our writes while we waited.
            return Ok(());
        }
        // Flush everything applied so far, not just up to `target`: later writers waiting on
        // the lock will find themselves covered.
        let (generation, seq) = {
            let st = self.lock();
            (st.generation, st.next_seq)
        };
        let engine = Arc::clone(&self.engine);
        tokio::task::spawn_blocking(move || engine.flush())
            .await
            .map_err(|e| StorageError::Task(e.to_string()))??;
        self.flushed_gen.fetch_max(generation, Ordering::AcqRel);
        self.durable_seq.fetch_max(seq, Ordering::AcqRel);
        Ok(())
    }

    /// [`durable`](Self::durable) for a caller outside any async runtime: flushes on the
    /// calling thread.
    pub fn durable_blocking(&self) -> Result<(), StorageError> {
        let (generation, seq) = {
            let st = self.lock();
            (st.generation, st.next_seq)
        };
        if self.flushed_gen.load(Ordering::Acquire) >= generation {
            return Ok(());
        }
        self.engine.flush()?;
        self.flushed_gen.fetch_max(generation, Ordering::AcqRel);
        self.durable_seq.fetch_max(seq, Ordering::AcqRel);
        Ok(())
    }

    /// The segment of class `p` that holds `seq`, if any.
    fn segment_at(&self, p: Priority, seq: Seq) -> Result<Option<SegInfo>, StorageError> {
        let mut found: Option<Result<SegInfo, StorageError>> = None;
        self.engine.scan(
            Bound::Included(&class_start(p)),
            Bound::Included(&record_key(p, seq)),
            Direction::Reverse,
            &mut |k, v| {
                found = Some(parse_record_key(k).map(|(_, first)| SegInfo {
                    first,
                    count: segment::peek_count(v).unwrap_or(1),
                    len: v.len(),
                }));
                ControlFlow::Break(())
            },
        )?;
        match found.transpose()? {
            Some(s) if s.end() > seq => Ok(Some(s)),
            _ => Ok(None),
        }
    }

    /// Visits up to `max_records` durable, unacknowledged records of class `priority` with a
    /// sequence number after `after` (from the oldest when `None`), in sequence order,
    /// stopping before the values exceed `max_bytes` in total — but always visiting at least
    /// one record when there is one, so a record larger than `max_bytes` cannot block the
    /// queue. Segments that cannot be read are skipped and reported in the result.
    pub fn scan_each(
        &self,
        priority: Priority,
        after: Option<Seq>,
        max_records: usize,
        max_bytes: usize,
        visit: &mut dyn FnMut(Seq, &[u8]),
    ) -> Result<ScanEnd, StorageError> {
        let mut end = ScanEnd::default();
        let mut from = match after {
            None => 0,
            Some(s) => match s.checked_add(1) {
                Some(s) => s,
                None => return Ok(end),
            },
        };
        let upto = self.durable_seq.load(Ordering::Acquire);
        if from >= upto || max_records == 0 {
            return Ok(end);
        }
        // A class with no record left costs no storage operation (the sync loop asks for
        // every class on every wake-up; sequence numbers are shared, so the range check
        // above does not tell).
        if self.lock().records[priority as usize] == 0 {
            return Ok(end);
        }
        let mut total = 0usize;
        // The segment holding `from` starts before it.
        let mut start = match self.segment_at(priority, from)? {
            Some(s) => s.first,
            None => from,
        };
        let hi = record_key(priority, upto);
        loop {
            // One chunk of segments (values copied: the engine is not called re-entrantly).
            let mut chunk: Vec<(Seq, Vec<u8>)> = Vec::new();
            let mut chunk_bytes = 0usize;
            let mut err = None;
            self.engine.scan(
                Bound::Included(&record_key(priority, start)),
                Bound::Excluded(&hi),
                Direction::Forward,
                &mut |k, v| {
                    match parse_record_key(k) {
                        Ok((_, first)) => chunk.push((first, v.to_vec())),
                        Err(e) => {
                            err = Some(e);
                            return ControlFlow::Break(());
                        }
                    }
                    chunk_bytes += v.len();
                    if chunk.len() >= SCAN_CHUNK_SEGMENTS || chunk_bytes >= SCAN_CHUNK_BYTES {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            )?;
            if let Some(e) = err {
                return Err(e);
            }
            let (Some(lo), Some(last)) = (chunk.first(), chunk.last()) else {
                return Ok(end);
            };
            let masks = self.masks_in(priority, lo.0, last.0)?;
            let next_start = last.0 + 1;
            for (first, value) in &chunk {
                let seg = match Segment::parse(value) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(class = priority.as_str(), first, error = %e,
                            "outbox segment cannot be read");
                        end.corrupt.push(*first);
                        continue;
                    }
                };
                let mask = masks.get(first);
                for r in seg.records() {
                    let (i, bytes) = match r {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(class = priority.as_str(), first, error = %e,
                                "outbox segment cannot be read");
                            end.corrupt.push(*first);
                            break;
                        }
                    };
                    let seq = first + u64::from(i);
                    if seq < from {
                        continue;
                    }
                    if seq >= upto {
                        return Ok(end);
                    }
                    if mask.is_some_and(|m| m.contains(i)) {
                        end.last = Some(seq);
                        continue;
                    }
                    if end.records > 0 && total.saturating_add(bytes.len()) > max_bytes {
                        return Ok(end);
                    }
                    total = total.saturating_add(bytes.len());
                    visit(seq, bytes);
                    end.records += 1;
                    end.last = Some(seq);
                    if end.records >= max_records {
                        return Ok(end);
                    }
                }
                // A corrupt segment is passed over too.
                end.last = end.last.max(Some(first + u64::from(seg.count()) - 1));
                from = from.max(first + u64::from(seg.count()));
            }
            start = next_start;
        }
    }

    /// Up to `max_records` durable records of class `priority` with a sequence number after
    /// `after`, as [`scan_each`](Self::scan_each) visits them, copied. An unreadable segment
    /// is an error here.
    pub fn scan(
        &self,
        priority: Priority,
        after: Option<Seq>,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, StorageError> {
        let mut out: Vec<Record> = Vec::with_capacity(max_records.min(1024));
        let end = self.scan_each(priority, after, max_records, max_bytes, &mut |seq, v| {
            out.push(Record {
                priority,
                seq,
                value: v.to_vec(),
            })
        })?;
        if let Some(first) = end.corrupt.first() {
            return Err(StorageError::Corrupt(format!(
                "outbox segment {} #{first} cannot be read",
                priority.as_str()
            )));
        }
        Ok(out)
    }

    /// Removes acknowledged records (one atomic batch). Ids that are absent (already
    /// removed, evicted, or never written) are ignored, so acks are idempotent. Returns how
    /// many records were removed. A segment goes once all its records are acknowledged;
    /// until then its ack mask says which are. The removal is made durable by the next
    /// [`durable`](Self::durable) (or sled's periodic flush); losing it in a crash only
    /// means the records are sent again, which the hub de-duplicates.
    pub fn remove(&self, ids: &[(Priority, Seq)]) -> Result<usize, StorageError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut st = self.lock();
        let mut batch = WriteBatch::new();
        let mut bytes = st.bytes;
        let mut records = st.records;
        let mut removed = 0u64;
        let mut k = 0;
        while k < ids.len() {
            let (p, s) = ids[k];
            let Some(seg) = self.segment_at(p, s)? else {
                k += 1;
                continue;
            };
            let end = seg.end();
            let old = self
                .engine
                .get(&mask_key(p, seg.first))?
                .and_then(|v| AckMask::decode(&v));
            let had_mask = old.is_some();
            let mut mask = old.unwrap_or_default();
            let mut new = 0u64;
            while k < ids.len() && ids[k].0 == p && ids[k].1 < end {
                let a = ids[k].1;
                let mut b = a + 1;
                k += 1;
                while k < ids.len() && ids[k].0 == p && ids[k].1 == b && b < end {
                    b += 1;
                    k += 1;
                }
                new += mask.insert((a - seg.first) as u32, (b - seg.first) as u32);
            }
            if new == 0 {
                continue;
            }
            let i = p as usize;
            records[i] = records[i].saturating_sub(new);
            removed += new;
            if mask.covers(seg.count) {
                batch.remove(record_key(p, seg.first).to_vec());
                if had_mask {
                    batch.remove(mask_key(p, seg.first).to_vec());
                }
                bytes[i] = bytes[i].saturating_sub((KEY_LEN + seg.len) as u64);
            } else {
                batch.put(mask_key(p, seg.first).to_vec(), mask.encode());
            }
        }
        if removed == 0 {
            return Ok(0);
        }
        for p in Priority::ALL {
            let i = p as usize;
            if bytes[i] != st.bytes[i] || records[i] != st.records[i] {
                batch.put(
                    class_meta_key(p).to_vec(),
                    class_meta_value(bytes[i], records[i]).to_vec(),
                );
            }
        }
        self.engine.apply(batch)?;
        st.bytes = bytes;
        st.records = records;
        st.generation += 1;
        if let Some(m) = &self.metrics {
            m.set_usage(&st);
        }
        Ok(removed as usize)
    }

    /// Drops segments of class `p` that cannot be read (reported by
    /// [`scan_each`](Self::scan_each)), with their ack masks. Returns the records dropped
    /// as far as the segments' headers tell.
    pub fn drop_segments(&self, p: Priority, firsts: &[Seq]) -> Result<u64, StorageError> {
        let mut st = self.lock();
        let mut batch = WriteBatch::new();
        let i = p as usize;
        let mut bytes = st.bytes;
        let mut records = st.records;
        let mut dropped = 0u64;
        for first in firsts {
            let Some(v) = self.engine.get(&record_key(p, *first))? else {
                continue;
            };
            let count = u64::from(segment::peek_count(&v).unwrap_or(1));
            let acked = self
                .engine
                .get(&mask_key(p, *first))?
                .and_then(|m| AckMask::decode(&m))
                .map_or(0, |m| m.acked());
            let n = count.saturating_sub(acked);
            records[i] = records[i].saturating_sub(n);
            bytes[i] = bytes[i].saturating_sub((KEY_LEN + v.len()) as u64);
            dropped += n;
            batch.remove(record_key(p, *first).to_vec());
            batch.remove(mask_key(p, *first).to_vec());
        }
        if batch.is_empty() {
            return Ok(0);
        }
        batch.put(
            class_meta_key(p).to_vec(),
            class_meta_value(bytes[i], records[i]).to_vec(),
        );
        self.engine.apply(batch)?;
        st.bytes = bytes;
        st.records = records;
        st.generation += 1;
        if let Some(m) = &self.metrics {
            m.set_usage(&st);
        }
        Ok(dropped)
    }

    /// A snapshot of the outbox's figures.
    pub fn stats(&self) -> OutboxStats {
        let st = self.lock();
        OutboxStats {
            bytes: st.bytes,
            records: st.records,
            quota_bytes: self.quota,
            evicted_records: st.evicted_records,
            evicted_bytes: st.evicted_bytes,
            backpressure: st.backpressure,
            next_seq: st.next_seq,
            durable_seq: self.durable_seq.load(Ordering::Acquire),
        }
    }

    /// Full consistency check (a scan of every segment): keys well-formed, segments
    /// readable, per-class counters equal to what is stored, no record at or above the
    /// sequence mark, no ack mask without its segment. For tests and operator tools;
    /// O(records).
    pub fn verify(&self) -> Result<(), StorageError> {
        let st = self.lock();
        for p in Priority::ALL {
            let i = p as usize;
            let (b, r) = scan_class_totals(&*self.engine, p)?;
            if (b, r) != (st.bytes[i], st.records[i]) {
                return Err(StorageError::Corrupt(format!(
                    "{} counters say {} bytes / {} records, the segments hold {b} / {r}",
                    p.as_str(),
                    st.bytes[i],
                    st.records[i]
                )));
            }
            let mut bad = None;
            self.engine.scan(
                Bound::Included(&class_start(p)),
                Bound::Excluded(&class_end(p)),
                Direction::Forward,
                &mut |k, v| {
                    let first = parse_record_key(k).map(|(_, f)| f).unwrap_or(0);
                    let checked =
                        Segment::parse(v).and_then(|s| s.records().try_for_each(|r| r.map(|_| ())));
                    if let Err(e) = checked {
                        bad = Some(corrupt_segment(p, first, e));
                        return ControlFlow::Break(());
                    }
                    ControlFlow::Continue(())
                },
            )?;
            if let Some(e) = bad {
                return Err(e);
            }
            if let Some(last) = last_seq(&*self.engine, p)?
                && last >= st.next_seq
            {
                return Err(StorageError::Corrupt(format!(
                    "{} record seq {last} at or above the sequence mark {}",
                    p.as_str(),
                    st.next_seq
                )));
            }
            for first in masks_in(&*self.engine, p, 0, Seq::MAX)?.keys() {
                if self.engine.get(&record_key(p, *first))?.is_none() {
                    return Err(StorageError::Corrupt(format!(
                        "{} ack mask for segment #{first}, which is gone",
                        p.as_str()
                    )));
                }
            }
        }
        let stored = self.engine.get(&META_NEXT_SEQ)?.and_then(|v| parse_u64(&v));
        if stored.unwrap_or(0) != st.next_seq {
            return Err(StorageError::Corrupt(format!(
                "stored sequence mark {stored:?} differs from {}",
                st.next_seq
            )));
        }
        Ok(())
    }
}

fn push_aux(batch: &mut WriteBatch, aux: &[(Vec<u8>, Option<Vec<u8>>)]) {
    for (k, v) in aux {
        match v {
            Some(v) => batch.put(k.clone(), v.clone()),
            None => batch.remove(k.clone()),
        }
    }
}

/// The ack masks of class `p` for segments starting in `lo..=hi` (malformed masks are
/// ignored: their records are sent again, and the hub de-duplicates).
fn masks_in<E: KvEngine + ?Sized>(
    engine: &E,
    p: Priority,
    lo: Seq,
    hi: Seq,
) -> Result<HashMap<Seq, AckMask>, StorageError> {
    let mut out = HashMap::new();
    engine.scan(
        Bound::Included(&mask_key(p, lo)),
        Bound::Included(&mask_key(p, hi)),
        Direction::Forward,
        &mut |k, v| {
            if let (Some(first), Some(m)) = (parse_mask_key(k), AckMask::decode(v)) {
                out.insert(first, m);
            }
            ControlFlow::Continue(())
        },
    )?;
    Ok(out)
}

/// Converts an outbox of format 1 (one record per key) in place: each record becomes a
/// segment of one record under the same key. Safe to interrupt and run again (a value that
/// is already a segment is left alone).
fn convert_format_1<E: KvEngine + ?Sized>(engine: &E) -> Result<(), StorageError> {
    let mut converted = 0u64;
    for p in Priority::ALL {
        let mut from: Seq = 0;
        loop {
            let mut batch = WriteBatch::new();
            let mut last = None;
            let mut n = 0;
            engine.scan(
                Bound::Included(&record_key(p, from)),
                Bound::Excluded(&class_end(p)),
                Direction::Forward,
                &mut |k, v| {
                    if let Ok((_, seq)) = parse_record_key(k) {
                        last = Some(seq);
                        if !segment::is_segment(v) {
                            let mut seg = SegmentBuf::with_capacity(v.len() + 2);
                            seg.push(v);
                            batch.put(k.to_vec(), seg.finish());
                        }
                    }
                    n += 1;
                    if n >= CONVERT_BATCH {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            )?;
            converted += batch.ops.len() as u64;
            if !batch.is_empty() {
                engine.apply(batch)?;
            }
            match last {
                Some(s) if n >= CONVERT_BATCH => from = s + 1,
                _ => break,
            }
        }
    }
    engine.flush()?;
    tracing::info!(
        records = converted,
        "outbox of format 1 converted to segments (format {FORMAT_VERSION})"
    );
    Ok(())
}

/// The highest sequence number stored in class `p`.
fn last_seq<E: KvEngine + ?Sized>(engine: &E, p: Priority) -> Result<Option<Seq>, StorageError> {
    let mut last = None;
    engine.scan(
        Bound::Included(&class_start(p)),
        Bound::Excluded(&class_end(p)),
        Direction::Reverse,
        &mut |k, v| {
            last = Some(parse_record_key(k).map(|(_, first)| {
                // An unreadable header: the sequence mark persisted with it still covers it.
                first + u64::from(segment::peek_count(v).unwrap_or(1)) - 1
            }));
            ControlFlow::Break(())
        },
    )?;
    last.transpose()
}

/// Bytes and unacknowledged records stored in class `p`, by a full scan of the class.
fn scan_class_totals<E: KvEngine + ?Sized>(
    engine: &E,
    p: Priority,
) -> Result<(u64, u64), StorageError> {
    let (mut bytes, mut records) = (0u64, 0u64);
    let mut counts: BTreeMap<Seq, u32> = BTreeMap::new();
    let mut err = None;
    engine.scan(
        Bound::Included(&class_start(p)),
        Bound::Excluded(&class_end(p)),
        Direction::Forward,
        &mut |k, v| {
            match parse_record_key(k) {
                Ok((_, first)) => {
                    let n = segment::peek_count(v).unwrap_or(1);
                    counts.insert(first, n);
                    records += u64::from(n);
                }
                Err(e) => {
                    err = Some(e);
                    return ControlFlow::Break(());
                }
            }
            bytes += (KEY_LEN + v.len()) as u64;
            ControlFlow::Continue(())
        },
    )?;
    if let Some(e) = err {
        return Err(e);
    }
    for (first, m) in masks_in(engine, p, 0, Seq::MAX)? {
        if let Some(n) = counts.get(&first) {
            records -= m.acked().min(u64::from(*n));
        }
    }
    Ok((bytes, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{SledEngine, SledOptions, Visitor};
    use std::time::Duration;

    fn engine(dir: &std::path::Path) -> SledEngine {
        SledEngine::open(dir, &SledOptions::default()).unwrap()
    }

    fn open(dir: &std::path::Path, quota: u64) -> Outbox<SledEngine> {
        Outbox::open(
            engine(dir),
            OutboxConfig {
                quota_bytes: quota,
                metrics: None,
            },
        )
        .unwrap()
    }

    fn all(ob: &Outbox<SledEngine>, p: Priority) -> Vec<Record> {
        ob.scan(p, None, usize::MAX, usize::MAX).unwrap()
    }

    /// Quota bytes of one segment holding records of these lengths (each under 128 bytes).
    fn seg(lens: &[usize]) -> u64 {
        (KEY_LEN + segment::HEADER_LEN + lens.iter().map(|l| 1 + l).sum::<usize>()) as u64
    }

    fn values(recs: &[Record]) -> Vec<Vec<u8>> {
        recs.iter().map(|r| r.value.clone()).collect()
    }

    #[tokio::test]
    async fn orders_by_class_then_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let ob = open(dir.path(), 1 << 20);
        let s1 = ob
            .append(&[
                (Priority::Bulk, b"b0"),
                (Priority::Critical, b"c0"),
                (Priority::Normal, b"n0"),
            ])
            .unwrap();
        let s2 = ob
            .append(&[(Priority::Normal, b"n1"), (Priority::Bulk, b"b1")])
            .unwrap();
        assert_eq!(s1, vec![0, 1, 2]);
        assert_eq!(s2, vec![3, 4]);
        ob.durable().await.unwrap();
        let n = all(&ob, Priority::Normal);
        assert_eq!(values(&n), vec![b"n0".to_vec(), b"n1".to_vec()]);
        assert_eq!(n.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert!(n.iter().all(|r| r.priority == Priority::Normal));
        assert_eq!(
            values(&all(&ob, Priority::Bulk)),
            vec![b"b0".to_vec(), b"b1".to_vec()]
        );
        assert_eq!(values(&all(&ob, Priority::Critical)), vec![b"c0".to_vec()]);
        assert!(all(&ob, Priority::Control).is_empty());
        let st = ob.stats();
        assert_eq!(st.records, [0, 1, 2, 2]);
        assert_eq!(st.bytes[Priority::Normal as usize], 2 * seg(&[2]));
        ob.verify().unwrap();
    }

    #[tokio::test]
    async fn scan_sees_only_durable_records() {
        let dir = tempfile::tempdir().unwrap();
        let ob = open(dir.path(), 1 << 20);
        ob.append(&[(Priority::Normal, b"a")]).unwrap();
        assert!(all(&ob, Priority::Normal).is_empty());
        ob.durable().await.unwrap();
        assert_eq!(all(&ob, Priority::Normal).len(), 1);
        ob.append(&[(Priority::Normal, b"b")]).unwrap();
        assert_eq!(all(&ob, Priority::Normal).len(), 1);
        ob.durable().await.unwrap();
        assert_eq!(all(&ob, Priority::Normal).len(), 2);
    }

    #[tokio::test]
    async fn sequence_survives_reopen_even_when_emptied() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ob = open(dir.path(), 1 << 20);
            let s = ob
                .append(&[(Priority::Normal, b"x"), (Priority::Bulk, b"y")])
                .unwrap();
            ob.durable().await.unwrap();
            assert_eq!(s, vec![0, 1]);
        }
        {
            let ob = open(dir.path(), 1 << 20);
            assert_eq!(ob.stats().records, [0, 0, 1, 1]);
            // Records present at open are durable and visible.
            assert_eq!(all(&ob, Priority::Normal)[0].seq, 0);
            let s = ob.append(&[(Priority::Critical, b"z")]).unwrap();
            assert_eq!(s, vec![2]);
            ob.durable().await.unwrap();
            let n = ob
                .remove(&[
                    (Priority::Normal, 0),
                    (Priority::Bulk, 1),
                    (Priority::Critical, 2),
                ])
                .unwrap();
            assert_eq!(n, 3);
            ob.durable().await.unwrap();
            assert_eq!(ob.stats().records, [0; 4]);
            assert_eq!(ob.stats().bytes, [0; 4]);
        }
        {
            let ob = open(dir.path(), 1 << 20);
            assert_eq!(ob.stats().records, [0; 4]);
            assert_eq!(ob.stats().next_seq, 3);
            assert_eq!(ob.append(&[(Priority::Normal, b"w")]).unwrap(), vec![3]);
            ob.verify().unwrap();
        }
    }

    #[tokio::test]
    async fn counters_rebuilt_when_meta_missing() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let ob = open(dir.path(), 1 << 20);
            ob.append(&[(Priority::Normal, b"abc"), (Priority::Bulk, b"de")])
                .unwrap();
            ob.durable().await.unwrap();
            let mut b = WriteBatch::new();
            b.remove(class_meta_key(Priority::Normal).to_vec());
            b.remove(META_NEXT_SEQ.to_vec());
            ob.engine().apply(b).unwrap();
            ob.engine().flush().unwrap();
            ob.stats()
        };
        let ob = open(dir.path(), 1 << 20);
        let after = ob.stats();
        assert_eq!(after.bytes, before.bytes);
        assert_eq!(after.records, before.records);
        // The mark is recovered from the stored records: no seq is handed out twice.
        assert_eq!(after.next_seq, 2);
        ob.verify().unwrap();
    }

    #[tokio::test]
    async fn quota_evicts_bulk_then_normal_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new();
        let rec = seg(&[1]); // one one-byte record per append: one segment each
        let ob = Outbox::open(
            engine(dir.path()),
            OutboxConfig {
                quota_bytes: 6 * rec,
                metrics: Some(m.clone()),
            },
        )
        .unwrap();
        for (p, v) in [
            (Priority::Bulk, b"1"),
            (Priority::Normal, b"2"),
            (Priority::Bulk, b"3"),
            (Priority::Normal, b"4"),
            (Priority::Critical, b"5"),
            (Priority::Control, b"6"),
        ] {
            ob.append(&[(p, &v[..])]).unwrap();
        }
        // Full. A normal record evicts the oldest bulk.
        ob.append(&[(Priority::Normal, b"7")]).unwrap();
        ob.durable().await.unwrap();
        assert_eq!(values(&all(&ob, Priority::Bulk)), vec![b"3".to_vec()]);
        // An incoming bulk may evict only older bulk.
        ob.append(&[(Priority::Bulk, b"8")]).unwrap();
        ob.durable().await.unwrap();
        assert_eq!(values(&all(&ob, Priority::Bulk)), vec![b"8".to_vec()]);
        // Critical evicts bulk, then the oldest normal.
        ob.append(&[(Priority::Critical, b"9")]).unwrap();
        ob.append(&[(Priority::Critical, b"a")]).unwrap();
        ob.durable().await.unwrap();
        assert!(all(&ob, Priority::Bulk).is_empty());
        assert_eq!(
            values(&all(&ob, Priority::Normal)),
            vec![b"4".to_vec(), b"7".to_vec()]
        );
        let st = ob.stats();
        assert_eq!(st.evicted_records, [0, 0, 1, 3]);
        assert_eq!(st.evicted_bytes, [0, 0, rec, 3 * rec]);
        assert_eq!(st.total_bytes(), 6 * rec);
        assert_eq!(
            m.counter_value("outpost_outbox_evicted", &[("class", "bulk")]),
            3
        );
        assert_eq!(
            m.counter_value("outpost_outbox_evicted", &[("class", "normal")]),
            1
        );
        assert!(m.encode().contains(&format!(
            "outpost_outbox_bytes{{class=\"critical\"}} {}",
            3 * rec
        )));
        ob.verify().unwrap();
    }

    #[tokio::test]
    async fn critical_gets_backpressure_not_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new();
        let rec = seg(&[1]);
        let ob = Outbox::open(
            engine(dir.path()),
            OutboxConfig {
                quota_bytes: 3 * rec,
                metrics: Some(m.clone()),
            },
        )
        .unwrap();
        ob.append(&[(Priority::Critical, b"1")]).unwrap();
        ob.append(&[(Priority::Control, b"2")]).unwrap();
        ob.append(&[(Priority::Normal, b"3")]).unwrap();
        ob.append(&[(Priority::Critical, b"4")]).unwrap(); // evicts the normal
        let before = ob.stats();
        let err = ob.append(&[(Priority::Critical, b"5")]).unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::Backpressure {
                    class: Priority::Critical,
                    evictable: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(matches!(err, StorageError::Backpressure { needed, .. } if needed == rec));
        let err = ob.append(&[(Priority::Bulk, b"6")]).unwrap_err();
        assert!(matches!(
            err,
            StorageError::Backpressure {
                class: Priority::Bulk,
                ..
            }
        ));
        let after = ob.stats();
        assert_eq!(
            after.next_seq, before.next_seq,
            "a refused batch uses no seq"
        );
        assert_eq!(after.bytes, before.bytes);
        assert_eq!(after.backpressure, [0, 1, 0, 1]);
        assert_eq!(
            m.counter_value("outpost_outbox_backpressure", &[("class", "critical")]),
            1
        );
        ob.durable().await.unwrap();
        assert_eq!(
            values(&all(&ob, Priority::Critical)),
            vec![b"1".to_vec(), b"4".to_vec()]
        );
        // Acking frees room again.
        ob.remove(&[(Priority::Critical, 0)]).unwrap();
        assert_eq!(ob.append(&[(Priority::Critical, b"5")]).unwrap(), vec![4]);
    }

    #[test]
    fn too_large_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let ob = open(dir.path(), 100);
        let big = vec![0u8; 100];
        let err = ob.append(&[(Priority::Bulk, &big)]).unwrap_err();
        assert!(matches!(
            err,
            StorageError::TooLarge {
                bytes: 120,
                quota: 100
            }
        ));
        assert_eq!(ob.stats().next_seq, 0);
    }

    #[tokio::test]
    async fn remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let ob = open(dir.path(), 1 << 20);
        let s = ob
            .append(&[(Priority::Normal, b"a"), (Priority::Normal, b"bb")])
            .unwrap();
        ob.durable().await.unwrap();
        let id = (Priority::Normal, s[0]);
        assert_eq!(ob.remove(&[id, id]).unwrap(), 1);
        assert_eq!(ob.remove(&[id]).unwrap(), 0);
        // Wrong class or never-issued seq: nothing happens.
        assert_eq!(
            ob.remove(&[(Priority::Bulk, s[1]), (Priority::Normal, 999)])
                .unwrap(),
            0
        );
        assert_eq!(ob.stats().records, [0, 0, 1, 0]);
        // The segment stays until its last record is acknowledged.
        assert_eq!(ob.stats().bytes, [0, 0, seg(&[1, 2]), 0]);
        assert_eq!(all(&ob, Priority::Normal)[0].value, b"bb".to_vec());
        ob.verify().unwrap();
    }

    #[tokio::test]
    async fn scan_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let ob = open(dir.path(), 1 << 20);
        let items: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 10]).collect();
        let batch: Vec<(Priority, &[u8])> = items
            .iter()
            .map(|v| (Priority::Normal, v.as_slice()))
            .collect();
        ob.append(&batch).unwrap();
        ob.append(&[(Priority::Normal, &[7u8; 100][..])]).unwrap();
        ob.durable().await.unwrap();
        let seqs = |r: Vec<Record>| r.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(ob.scan(Priority::Normal, None, 3, usize::MAX).unwrap()),
            vec![0, 1, 2]
        );
        assert_eq!(
            seqs(ob.scan(Priority::Normal, Some(2), 2, usize::MAX).unwrap()),
            vec![3, 4]
        );
        // max_bytes: 25 bytes allow two 10-byte values.
        assert_eq!(
            seqs(ob.scan(Priority::Normal, Some(4), 100, 25).unwrap()),
            vec![5, 6]
        );
        // A value larger than max_bytes still comes out alone.
        assert_eq!(
            seqs(ob.scan(Priority::Normal, Some(9), 100, 5).unwrap()),
            vec![10]
        );
        assert!(
            ob.scan(Priority::Normal, Some(10), 100, 100)
                .unwrap()
                .is_empty()
        );
        assert!(
            ob.scan(Priority::Normal, Some(u64::MAX), 100, 100)
                .unwrap()
                .is_empty()
        );
        assert!(ob.scan(Priority::Normal, None, 0, 100).unwrap().is_empty());
        assert!(ob.scan(Priority::Bulk, None, 100, 100).unwrap().is_empty());
    }

    fn seqs(r: &[Record]) -> Vec<Seq> {
        r.iter().map(|r| r.seq).collect()
    }

    #[tokio::test]
    async fn partial_acks_survive_reopen_and_the_segment_goes_with_its_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let items: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 5]).collect();
        let batch: Vec<(Priority, &[u8])> = items
            .iter()
            .map(|v| (Priority::Normal, v.as_slice()))
            .collect();
        {
            let ob = open(dir.path(), 1 << 20);
            assert_eq!(ob.append(&batch).unwrap(), (0..10).collect::<Vec<_>>());
            ob.durable().await.unwrap();
            let ids: Vec<(Priority, Seq)> = (3..7).map(|s| (Priority::Normal, s)).collect();
            assert_eq!(ob.remove(&ids).unwrap(), 4);
            assert_eq!(ob.stats().records[Priority::Normal as usize], 6);
            ob.durable().await.unwrap();
            ob.verify().unwrap();
        }
        let ob = open(dir.path(), 1 << 20);
        assert_eq!(ob.stats().records[Priority::Normal as usize], 6);
        // The acknowledged part is never read again.
        assert_eq!(seqs(&all(&ob, Priority::Normal)), vec![0, 1, 2, 7, 8, 9]);
        assert_eq!(
            seqs(&ob.scan(Priority::Normal, Some(2), 2, usize::MAX).unwrap()),
            vec![7, 8]
        );
        assert_eq!(
            seqs(&ob.scan(Priority::Normal, Some(4), 10, usize::MAX).unwrap()),
            vec![7, 8, 9]
        );
        let rest: Vec<(Priority, Seq)> = [0, 1, 2, 7, 8, 9, 4]
            .iter()
            .map(|s| (Priority::Normal, *s))
            .collect();
        assert_eq!(ob.remove(&rest).unwrap(), 6);
        assert_eq!(ob.stats().records, [0; 4]);
        assert_eq!(ob.stats().bytes, [0; 4]);
        ob.verify().unwrap();
        assert!(all(&ob, Priority::Normal).is_empty());
    }

    #[tokio::test]
    async fn a_scan_passes_over_acknowledged_segments_and_reports_how_far_it_went() {
        let dir = tempfile::tempdir().unwrap();
        let ob = open(dir.path(), 1 << 24);
        // 40 segments of 3 records; all but the last acknowledged except one record each of
        // a few.
        for i in 0..40u8 {
            ob.append(&[
                (Priority::Bulk, &[i, 0][..]),
                (Priority::Bulk, &[i, 1][..]),
                (Priority::Bulk, &[i, 2][..]),
            ])
            .unwrap();
        }
        ob.durable().await.unwrap();
        let acked: Vec<(Priority, Seq)> = (0..117).map(|s| (Priority::Bulk, s)).collect();
        assert_eq!(ob.remove(&acked).unwrap(), 117);
        let mut got = Vec::new();
        let end = ob
            .scan_each(Priority::Bulk, None, 100, usize::MAX, &mut |s, v| {
                got.push((s, v.to_vec()))
            })
            .unwrap();
        assert_eq!(
            got,
            vec![(117, vec![39, 0]), (118, vec![39, 1]), (119, vec![39, 2])]
        );
        assert_eq!(end.last, Some(119));
        assert_eq!(end.records, 3);
        // Everything acknowledged: nothing visited, but the scan says how far it went.
        ob.remove(&[(Priority::Bulk, 117), (Priority::Bulk, 118)])
            .unwrap();
        let end = ob
            .scan_each(Priority::Bulk, Some(116), 100, usize::MAX, &mut |_, _| {})
            .unwrap();
        assert_eq!(end.records, 1);
        ob.verify().unwrap();
    }

    #[tokio::test]
    async fn records_are_visible_only_once_durable_and_seqs_follow_classes() {
        let dir = tempfile::tempdir().unwrap();
        let ob = open(dir.path(), 1 << 20);
        let s = ob
            .append(&[
                (Priority::Normal, b"n0"),
                (Priority::Bulk, b"b0"),
                (Priority::Normal, b"n1"),
            ])
            .unwrap();
        // One segment per class: a class's records are numbered consecutively.
        assert_eq!(s, vec![0, 2, 1]);
        assert!(all(&ob, Priority::Normal).is_empty());
        ob.durable_blocking().unwrap();
        assert_eq!(seqs(&all(&ob, Priority::Normal)), vec![0, 1]);
        assert_eq!(seqs(&all(&ob, Priority::Bulk)), vec![2]);
    }

    #[tokio::test]
    async fn eviction_counts_only_unacknowledged_records() {
        let dir = tempfile::tempdir().unwrap();
        let three = seg(&[1, 1, 1]);
        let ob = open(dir.path(), 2 * three);
        ob.append(&[
            (Priority::Normal, b"a"),
            (Priority::Normal, b"b"),
            (Priority::Normal, b"c"),
        ])
        .unwrap();
        ob.append(&[
            (Priority::Normal, b"d"),
            (Priority::Normal, b"e"),
            (Priority::Normal, b"f"),
        ])
        .unwrap();
        ob.remove(&[(Priority::Normal, 1)]).unwrap();
        ob.append(&[
            (Priority::Normal, b"g"),
            (Priority::Normal, b"h"),
            (Priority::Normal, b"i"),
        ])
        .unwrap();
        let st = ob.stats();
        assert_eq!(st.evicted_records[Priority::Normal as usize], 2);
        assert_eq!(st.evicted_bytes[Priority::Normal as usize], three);
        assert_eq!(st.records[Priority::Normal as usize], 6);
        ob.durable().await.unwrap();
        assert_eq!(seqs(&all(&ob, Priority::Normal)), vec![3, 4, 5, 6, 7, 8]);
        ob.verify().unwrap();
    }

    #[tokio::test]
    async fn a_corrupt_segment_is_reported_and_can_be_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let ob = open(dir.path(), 1 << 20);
        ob.append(&[(Priority::Normal, b"a"), (Priority::Normal, b"b")])
            .unwrap();
        ob.append(&[(Priority::Normal, b"c")]).unwrap();
        ob.durable().await.unwrap();
        // Damage the first segment's last byte (a torn or corrupt write; truncations are
        // covered by the segment codec's tests).
        let key = record_key(Priority::Normal, 0);
        let mut v = ob.engine().get(&key).unwrap().unwrap();
        let n = v.len();
        v[n - 1] ^= 0xff;
        let mut b = WriteBatch::new();
        b.put(key.to_vec(), v);
        ob.engine().apply(b).unwrap();
        let mut got = Vec::new();
        let end = ob
            .scan_each(Priority::Normal, None, 10, usize::MAX, &mut |s, _| {
                got.push(s)
            })
            .unwrap();
        assert_eq!(got, vec![2]);
        assert_eq!(end.corrupt, vec![0]);
        assert!(ob.scan(Priority::Normal, None, 10, usize::MAX).is_err());
        assert_eq!(ob.drop_segments(Priority::Normal, &end.corrupt).unwrap(), 2);
        assert_eq!(seqs(&all(&ob, Priority::Normal)), vec![2]);
        assert_eq!(ob.stats().records[Priority::Normal as usize], 1);
        ob.verify().unwrap();
    }

    #[tokio::test]
    async fn an_outbox_of_format_1_is_converted_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Format 1: one record per key, the value the record itself.
            let e = engine(dir.path());
            let mut b = WriteBatch::new();
            b.put(META_VERSION.to_vec(), vec![1]);
            b.put(META_NEXT_SEQ.to_vec(), 7u64.to_be_bytes().to_vec());
            b.put(record_key(Priority::Normal, 3).to_vec(), b"three".to_vec());
            b.put(record_key(Priority::Normal, 5).to_vec(), b"five".to_vec());
            b.put(record_key(Priority::Critical, 6).to_vec(), b"six".to_vec());
            b.put(
                class_meta_key(Priority::Normal).to_vec(),
                class_meta_value(23, 2).to_vec(),
            );
            e.apply(b).unwrap();
            e.flush().unwrap();
        }
        let ob = open(dir.path(), 1 << 20);
        assert_eq!(
            values(&all(&ob, Priority::Normal)),
            vec![b"three".to_vec(), b"five".to_vec()]
        );
        assert_eq!(seqs(&all(&ob, Priority::Normal)), vec![3, 5]);
        assert_eq!(ob.stats().records, [0, 1, 2, 0]);
        assert_eq!(ob.stats().next_seq, 7);
        ob.verify().unwrap();
        assert_eq!(ob.remove(&[(Priority::Normal, 5)]).unwrap(), 1);
        drop(ob);
        let ob = open(dir.path(), 1 << 20);
        assert_eq!(seqs(&all(&ob, Priority::Normal)), vec![3]);
        ob.verify().unwrap();
    }

    /// Counts flushes and makes them slow enough for callers to overlap.
    struct CountingEngine {
        inner: SledEngine,
        flushes: Arc<AtomicU64>,
    }

    impl KvEngine for CountingEngine {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
            self.inner.get(key)
        }
        fn apply(&self, batch: WriteBatch) -> Result<(), StorageError> {
            self.inner.apply(batch)
        }
        fn scan(
            &self,
            lo: Bound<&[u8]>,
            hi: Bound<&[u8]>,
            dir: Direction,
            visit: &mut Visitor<'_>,
        ) -> Result<(), StorageError> {
            self.inner.scan(lo, hi, dir, visit)
        }
        fn flush(&self) -> Result<(), StorageError> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
            self.inner.flush()
        }
        fn size_on_disk(&self) -> Result<u64, StorageError> {
            self.inner.size_on_disk()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn group_commit_with_concurrent_appenders() {
        let dir = tempfile::tempdir().unwrap();
        let flushes = Arc::new(AtomicU64::new(0));
        let ob = Arc::new(
            Outbox::open(
                CountingEngine {
                    inner: engine(dir.path()),
                    flushes: flushes.clone(),
                },
                OutboxConfig {
                    quota_bytes: 1 << 30,
                    metrics: None,
                },
            )
            .unwrap(),
        );
        const TASKS: u64 = 8;
        const ROUNDS: u64 = 25;
        let mut handles = Vec::new();
        for t in 0..TASKS {
            let ob = ob.clone();
            handles.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for r in 0..ROUNDS {
                    let v = [t.to_be_bytes(), r.to_be_bytes()].concat();
                    let seqs = ob.append(&[(Priority::Normal, &v)]).unwrap();
                    ob.durable().await.unwrap();
                    // Durable point reached: my record is covered and visible.
                    assert!(ob.stats().durable_seq > seqs[0]);
                    let got = ob
                        .scan(Priority::Normal, seqs[0].checked_sub(1), 1, usize::MAX)
                        .unwrap();
                    assert_eq!(got[0].seq, seqs[0]);
                    assert_eq!(got[0].value, v);
                    mine.push(seqs[0]);
                }
                mine
            }));
        }
        let mut seqs = Vec::new();
        for h in handles {
            let mine = h.await.unwrap();
            assert!(mine.windows(2).all(|w| w[0] < w[1]));
            seqs.extend(mine);
        }
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len() as u64, TASKS * ROUNDS, "no seq handed out twice");
        let n = flushes.load(Ordering::SeqCst);
        assert!(
            n < TASKS * ROUNDS,
            "{n} flushes for {} durable calls: callers did not share flushes",
            TASKS * ROUNDS
        );
        // A durable call with nothing new to flush does not flush.
        ob.durable().await.unwrap();
        let before = flushes.load(Ordering::SeqCst);
        ob.durable().await.unwrap();
        assert_eq!(flushes.load(Ordering::SeqCst), before);
        ob.verify().unwrap();
    }
}
