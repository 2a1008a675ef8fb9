//! The durable outbox: every record that leaves the gateway is appended here first, shipped
//! from here, and removed only once the hub has acknowledged it (SPEC §1 "Sync actor", §2).
//!
//! Records are ordered by (priority class, sequence number). The key of a record is
//! `[priority u8][seq u64 big-endian]`; meta keys start with `0xFF`, which no priority uses.
//! One sequence counter per outbox, shared by all classes, only ever grows: its high-water
//! mark is persisted in the same atomic batch as the records it numbers, so a sequence
//! number is never handed out twice for durable data, even after the outbox was emptied and
//! reopened. The hub de-duplicates on (gateway, stream, seq), so this matters.
//!
//! Per-class byte and record counts are persisted in the same batches, so reopening does not
//! need a full scan; they are rebuilt by a scan when missing or inconsistent.
//!
//! Durability: [`Outbox::append`] writes one atomic batch; [`Outbox::durable`] is the
//! durable point — everything appended before the call is on disk when it returns. Callers
//! await it before they acknowledge anything to anyone. Concurrent callers share one flush
//! (group commit). [`Outbox::scan`] only returns records that are durable, so nothing is
//! shipped that a crash could take back (and whose sequence number could be reused).
//!
//! The byte quota (key + value bytes) is enforced with the pure policy of
//! [`super::quota`]: evictions happen in the same atomic batch as the insert.

use std::collections::HashSet;
use std::ops::{Bound, ControlFlow};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::quota::{self, PerClass, QuotaError};
use super::{Direction, KvEngine, StorageError, WriteBatch};
use crate::metrics::Metrics;
use crate::model::Priority;

/// A record's sequence number: unique per outbox, strictly increasing in append order.
pub type Seq = u64;

/// Bytes of a record key; a record costs `KEY_LEN + value.len()` bytes of quota.
pub const KEY_LEN: usize = 9;

const META: u8 = 0xFF;
/// First byte of every aux key (see [`Outbox::append_with`]).
pub const AUX_PREFIX: u8 = 0xFE;
const META_VERSION: [u8; 2] = [META, 0x00];
const META_NEXT_SEQ: [u8; 2] = [META, 0x01];
const META_CLASS: u8 = 0x02;
const FORMAT_VERSION: u8 = 1;

fn record_key(p: Priority, seq: Seq) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[0] = p as u8;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn parse_record_key(k: &[u8]) -> Result<(Priority, Seq), StorageError> {
    let bad = || StorageError::Corrupt(format!("malformed outbox record key {k:02x?}"));
    if k.len() != KEY_LEN {
        return Err(bad());
    }
    let p = Priority::from_u8(k[0]).ok_or_else(bad)?;
    let mut s = [0u8; 8];
    s.copy_from_slice(&k[1..]);
    Ok((p, Seq::from_be_bytes(s)))
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
    // Priorities are 0..=3, so p + 1 ≤ 4 < META.
    [p as u8 + 1]
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

/// Settings of an [`Outbox`].
#[derive(Clone, Default)]
pub struct OutboxConfig {
    /// Byte quota over key + value bytes of all records.
    pub quota_bytes: u64,
    /// Where to report `outpost_outbox_*` metrics, if anywhere.
    pub metrics: Option<Metrics>,
}

/// A snapshot of the outbox's figures. Arrays are indexed by `Priority as usize`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStats {
    /// Stored bytes (key + value) per class.
    pub bytes: PerClass,
    /// Stored records per class.
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
                    "Records stored in the outbox per priority class",
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

impl<E: KvEngine> Outbox<E> {
    /// Opens the outbox stored in `engine`: reads the sequence high-water mark and the
    /// per-class counters, checks them cheaply against the stored records, and rebuilds them
    /// by a scan when they are missing or inconsistent.
    ///
    /// Everything found on open counts as durable.
    pub fn open(engine: E, config: OutboxConfig) -> Result<Outbox<E>, StorageError> {
        let engine = Arc::new(engine);
        let fresh = match engine.get(&META_VERSION)? {
            None => true,
            Some(v) if v.as_slice() == [FORMAT_VERSION] => false,
            Some(v) => {
                return Err(StorageError::Corrupt(format!(
                    "unknown outbox format version {v:02x?} (this build reads {FORMAT_VERSION})"
                )));
            }
        };
        let meta_seq = match engine.get(&META_NEXT_SEQ)? {
            None => None,
            Some(v) => Some(parse_u64(&v).ok_or_else(|| {
                StorageError::Corrupt(format!("malformed outbox sequence mark {v:02x?}"))
            })?),
        };
        let mut next_seq = meta_seq.unwrap_or(0);
        let mut bytes = [0u64; 4];
        let mut records = [0u64; 4];
        let mut repaired = meta_seq.is_none();
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
            let counted = meta.as_deref().and_then(parse_class_meta);
            match counted {
                Some((b, r))
                    if (r == 0) == last.is_none() && b >= r.saturating_mul(KEY_LEN as u64) =>
                {
                    bytes[i] = b;
                    records[i] = r;
                }
                _ => {
                    let (b, r) = scan_class_totals(&*engine, p)?;
                    if !fresh || r > 0 {
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
    ///
    /// If the batch does not fit in the quota, older records are evicted per SPEC §2 in the
    /// same batch; if it still does not fit, nothing is written and
    /// [`StorageError::Backpressure`] is returned. The records become durable (and visible
    /// to [`scan`](Self::scan)) at the next completed [`durable`](Self::durable).
    pub fn append(&self, items: &[(Priority, &[u8])]) -> Result<Vec<Seq>, StorageError> {
        self.append_with(items, &[])
    }

    /// [`append`](Self::append), plus `aux` operations (a put, or a removal when the value
    /// is `None`) applied in the same atomic batch. Aux keys live in their own keyspace (they must start with [`AUX_PREFIX`]);
    /// they are not records, are not counted against the quota, and are read back with
    /// [`aux_scan`](Self::aux_scan). Used for facts that must become durable together with
    /// the records they describe (e.g. which MQTT messages were stored).
    pub fn append_with(
        &self,
        items: &[(Priority, &[u8])],
        aux: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<Vec<Seq>, StorageError> {
        if let Some((k, _)) = aux.iter().find(|(k, _)| k.first() != Some(&AUX_PREFIX)) {
            return Err(StorageError::Corrupt(format!(
                "aux key {k:02x?} outside the aux keyspace"
            )));
        }
        if items.is_empty() {
            if !aux.is_empty() {
                let mut batch = WriteBatch::new();
                for (k, v) in aux {
                    match v {
                        Some(v) => batch.put(k.clone(), v.clone()),
                        None => batch.remove(k.clone()),
                    }
                }
                let mut st = self.lock();
                self.engine.apply(batch)?;
                st.generation += 1;
            }
            return Ok(Vec::new());
        }
        let mut incoming = [0u64; 4];
        for (p, v) in items {
            let i = *p as usize;
            incoming[i] = incoming[i].saturating_add((KEY_LEN + v.len()) as u64);
        }
        let mut st = self.lock();
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
        let n = items.len() as u64;
        let first = st.next_seq;
        let next = first.checked_add(n).ok_or(StorageError::SeqExhausted)?;

        let mut batch = WriteBatch::new();
        batch.ops.reserve(items.len() + 2 + Priority::ALL.len());
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
        let mut seqs = Vec::with_capacity(items.len());
        for (k, (p, v)) in items.iter().enumerate() {
            let seq = first + k as u64;
            batch.put(record_key(*p, seq).to_vec(), v.to_vec());
            bytes[*p as usize] += (KEY_LEN + v.len()) as u64;
            records[*p as usize] += 1;
            seqs.push(seq);
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
        for (k, v) in aux {
            match v {
                Some(v) => batch.put(k.clone(), v.clone()),
                None => batch.remove(k.clone()),
            }
        }
        self.engine.apply(batch)?;

        st.next_seq = next;
        st.bytes = bytes;
        st.records = records;
        st.generation += 1;
        for p in Priority::ALL {
            let i = p as usize;
            let (cnt, freed, lo, hi) = evicted[i];
            if cnt == 0 {
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
        Ok(seqs)
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

    /// Adds removals of the oldest records of `p` totalling at least `target` bytes to
    /// `batch`; returns (records, bytes, first seq, last seq).
    fn collect_oldest(
        &self,
        p: Priority,
        target: u64,
        batch: &mut WriteBatch,
    ) -> Result<(u64, u64, Seq, Seq), StorageError> {
        let (mut cnt, mut freed, mut lo, mut hi) = (0u64, 0u64, 0, 0);
        let mut err = None;
        self.engine.scan(
            Bound::Included(&class_start(p)),
            Bound::Excluded(&class_end(p)),
            Direction::Forward,
            &mut |k, v| {
                match parse_record_key(k) {
                    Ok((_, seq)) => {
                        if cnt == 0 {
                            lo = seq;
                        }
                        hi = seq;
                    }
                    Err(e) => {
                        err = Some(e);
                        return ControlFlow::Break(());
                    }
                }
                batch.remove(k.to_vec());
                cnt += 1;
                freed += (KEY_LEN + v.len()) as u64;
                if freed >= target {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )?;
        match err {
            Some(e) => Err(e),
            None => Ok((cnt, freed, lo, hi)),
        }
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

    /// Up to `max_records` durable records of class `priority` with a sequence number after
    /// `after` (from the oldest when `None`), in sequence order, stopping before the values
    /// exceed `max_bytes` in total — but always returning at least one record when there is
    /// one, so a record larger than `max_bytes` cannot block the queue.
    pub fn scan(
        &self,
        priority: Priority,
        after: Option<Seq>,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, StorageError> {
        let from = match after {
            None => 0,
            Some(s) => match s.checked_add(1) {
                Some(s) => s,
                None => return Ok(Vec::new()),
            },
        };
        let upto = self.durable_seq.load(Ordering::Acquire);
        if from >= upto || max_records == 0 {
            return Ok(Vec::new());
        }
        let lo = record_key(priority, from);
        let hi = record_key(priority, upto);
        let mut out: Vec<Record> = Vec::with_capacity(max_records.min(1024));
        let mut total = 0usize;
        let mut err = None;
        self.engine.scan(
            Bound::Included(&lo),
            Bound::Excluded(&hi),
            Direction::Forward,
            &mut |k, v| {
                let seq = match parse_record_key(k) {
                    Ok((_, seq)) => seq,
                    Err(e) => {
                        err = Some(e);
                        return ControlFlow::Break(());
                    }
                };
                if !out.is_empty() && total.saturating_add(v.len()) > max_bytes {
                    return ControlFlow::Break(());
                }
                total = total.saturating_add(v.len());
                out.push(Record {
                    priority,
                    seq,
                    value: v.to_vec(),
                });
                if out.len() >= max_records {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )?;
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Removes acknowledged records (one atomic batch). Ids that are absent (already
    /// removed, evicted, or never written) are ignored, so acks are idempotent. Returns how
    /// many records were removed. The removal is made durable by the next
    /// [`durable`](Self::durable) (or sled's periodic flush); losing it in a crash only
    /// means the records are sent again, which the hub de-duplicates.
    pub fn remove(&self, ids: &[(Priority, Seq)]) -> Result<usize, StorageError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut st = self.lock();
        let mut seen = HashSet::with_capacity(ids.len());
        let mut batch = WriteBatch::new();
        let mut bytes = st.bytes;
        let mut records = st.records;
        let mut removed = 0usize;
        for (p, seq) in ids {
            let key = record_key(*p, *seq);
            if !seen.insert(key) {
                continue;
            }
            if let Some(v) = self.engine.get(&key)? {
                let i = *p as usize;
                bytes[i] = bytes[i].saturating_sub((KEY_LEN + v.len()) as u64);
                records[i] = records[i].saturating_sub(1);
                batch.remove(key.to_vec());
                removed += 1;
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
        Ok(removed)
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

    /// Full consistency check (a scan of every record): keys well-formed, per-class counters
    /// equal to what is stored, no record at or above the sequence mark. For tests and
    /// operator tools; O(records).
    pub fn verify(&self) -> Result<(), StorageError> {
        let st = self.lock();
        for p in Priority::ALL {
            let i = p as usize;
            let (b, r) = scan_class_totals(&*self.engine, p)?;
            if (b, r) != (st.bytes[i], st.records[i]) {
                return Err(StorageError::Corrupt(format!(
                    "{} counters say {} bytes / {} records, the records hold {b} / {r}",
                    p.as_str(),
                    st.bytes[i],
                    st.records[i]
                )));
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

/// The highest sequence number stored in class `p`.
fn last_seq<E: KvEngine + ?Sized>(engine: &E, p: Priority) -> Result<Option<Seq>, StorageError> {
    let mut last = None;
    engine.scan(
        Bound::Included(&class_start(p)),
        Bound::Excluded(&class_end(p)),
        Direction::Reverse,
        &mut |k, _| {
            last = Some(parse_record_key(k));
            ControlFlow::Break(())
        },
    )?;
    last.transpose().map(|o| o.map(|(_, s)| s))
}

/// Bytes and records stored in class `p`, by a full scan of the class.
fn scan_class_totals<E: KvEngine + ?Sized>(
    engine: &E,
    p: Priority,
) -> Result<(u64, u64), StorageError> {
    let (mut bytes, mut records) = (0u64, 0u64);
    let mut err = None;
    engine.scan(
        Bound::Included(&class_start(p)),
        Bound::Excluded(&class_end(p)),
        Direction::Forward,
        &mut |k, v| {
            if let Err(e) = parse_record_key(k) {
                err = Some(e);
                return ControlFlow::Break(());
            }
            bytes += (KEY_LEN + v.len()) as u64;
            records += 1;
            ControlFlow::Continue(())
        },
    )?;
    match err {
        Some(e) => Err(e),
        None => Ok((bytes, records)),
    }
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
        assert_eq!(
            st.bytes[Priority::Normal as usize],
            2 * (KEY_LEN as u64 + 2)
        );
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
        let rec = (KEY_LEN + 1) as u64; // 10 bytes per one-byte record
        let ob = Outbox::open(
            engine(dir.path()),
            OutboxConfig {
                quota_bytes: 6 * rec,
                metrics: Some(m.clone()),
            },
        )
        .unwrap();
        ob.append(&[
            (Priority::Bulk, b"1"),
            (Priority::Normal, b"2"),
            (Priority::Bulk, b"3"),
            (Priority::Normal, b"4"),
            (Priority::Critical, b"5"),
            (Priority::Control, b"6"),
        ])
        .unwrap();
        // Full. A normal record evicts the oldest bulk.
        ob.append(&[(Priority::Normal, b"7")]).unwrap();
        ob.durable().await.unwrap();
        assert_eq!(values(&all(&ob, Priority::Bulk)), vec![b"3".to_vec()]);
        // An incoming bulk may evict only older bulk.
        ob.append(&[(Priority::Bulk, b"8")]).unwrap();
        ob.durable().await.unwrap();
        assert_eq!(values(&all(&ob, Priority::Bulk)), vec![b"8".to_vec()]);
        // Critical evicts bulk, then the oldest normal.
        ob.append(&[(Priority::Critical, b"9"), (Priority::Critical, b"a")])
            .unwrap();
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
        assert!(
            m.encode()
                .contains("outpost_outbox_bytes{class=\"critical\"} 30")
        );
        ob.verify().unwrap();
    }

    #[tokio::test]
    async fn critical_gets_backpressure_not_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new();
        let rec = (KEY_LEN + 1) as u64;
        let ob = Outbox::open(
            engine(dir.path()),
            OutboxConfig {
                quota_bytes: 3 * rec,
                metrics: Some(m.clone()),
            },
        )
        .unwrap();
        ob.append(&[
            (Priority::Critical, b"1"),
            (Priority::Control, b"2"),
            (Priority::Normal, b"3"),
        ])
        .unwrap();
        ob.append(&[(Priority::Critical, b"4")]).unwrap(); // evicts the normal
        let before = ob.stats();
        let err = ob.append(&[(Priority::Critical, b"5")]).unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::Backpressure {
                    class: Priority::Critical,
                    needed: 10,
                    evictable: 0,
                    ..
                }
            ),
            "{err:?}"
        );
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
                bytes: 109,
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
        assert_eq!(ob.stats().bytes, [0, 0, KEY_LEN as u64 + 2, 0]);
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
