//! The ingest path: every sample the gateway produces (devices, fusion, alarms) enters the
//! outbox here. Producers submit batches through a bounded queue (so a full disk or a
//! stalled outbox slows them down instead of growing memory); one writer task appends what
//! has queued as one outbox segment per class (up to `max_batch` samples) and hands it to a
//! flusher task, which makes it durable and tells each producer — only then may a producer
//! acknowledge its samples to anyone (an MQTT broker, for instance). Appending and flushing
//! overlap, and there is no fixed wait: a batch is whatever queued while the previous one
//! was written (group commit), so it is small when traffic is light (low latency) and large
//! under load (little work per sample).

use std::sync::Arc;
use std::time::Duration;

use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Priority, Sample};
use outpost_runtime::record;
use std::collections::HashMap;
use std::sync::RwLock;

use outpost_runtime::storage::receipts::{Receipts, capacity_for_in_flight};
use outpost_runtime::storage::{GatewayOutbox, SegmentBuf, StorageError};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::bus::Bus;

/// Why samples could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error("the ingest writer has stopped (the gateway is shutting down)")]
    Closed,
    #[error("storage failed: {0}")]
    Storage(String),
}

/// Tuning of the writer.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Most samples in one durable batch.
    pub max_batch: usize,
    /// How long a batch waits for more submissions before it is appended. Zero: none —
    /// a batch is whatever queued while the previous one was written.
    pub commit_interval: Duration,
    /// Submissions queued before producers wait.
    pub queue: usize,
    /// Pause between attempts while the outbox refuses data for lack of space.
    pub backpressure_retry: Duration,
    /// Receipts (fingerprints of stored input messages) kept per source, for redelivery
    /// detection: [`capacity_for_in_flight`] of the largest in-flight limit among the
    /// sources (MQTT devices' `max_in_flight`).
    pub receipts_per_source: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_batch: 2_000,
            commit_interval: Duration::ZERO,
            queue: 1_024,
            backpressure_retry: Duration::from_millis(250),
            receipts_per_source: RECEIPTS_PER_SOURCE,
        }
    }
}

struct Submission {
    priority: Priority,
    samples: Vec<Sample>,
    /// Input messages the samples came from: `(source namespace, message fingerprints)`,
    /// recorded atomically with the samples (see `outpost_runtime::storage::receipts`).
    receipts: Option<(u64, Vec<u64>)>,
    done: Option<oneshot::Sender<Result<(), IngestError>>>,
}

/// Receipts kept per source by default: enough for an MQTT device with the default
/// `max_in_flight`.
pub const RECEIPTS_PER_SOURCE: usize =
    capacity_for_in_flight(outpost_runtime::config::DEFAULT_DEVICE_IN_FLIGHT as usize);

/// A promise that submitted samples become durable.
pub struct Durable(oneshot::Receiver<Result<(), IngestError>>);

impl Durable {
    /// Waits until the samples are durable in the outbox.
    pub async fn wait(self) -> Result<(), IngestError> {
        self.0.await.unwrap_or(Err(IngestError::Closed))
    }
}

/// Handle producers use; clone freely. The writer stops once every clone is dropped, after
/// writing what was queued.
#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Submission>,
    bus: Bus,
    receipts: Arc<RwLock<Receipts>>,
}

struct Counters {
    ingested: [Counter; 4],
    dropped_bulk: Counter,
    backpressure: Counter,
    batches: Counter,
}

impl Ingest {
    /// Starts the writer over `outbox`. `wake` is notified after every durable batch (the
    /// sync actor waits on it).
    pub fn start(
        outbox: Arc<GatewayOutbox>,
        config: IngestConfig,
        bus: Bus,
        metrics: &Metrics,
        wake: Arc<Notify>,
    ) -> (Ingest, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let c = Counters {
            ingested: Priority::ALL.map(|p| {
                metrics.counter(
                    "outpost_samples_ingested",
                    "Samples made durable in the outbox",
                    &[("class", p.as_str())],
                )
            }),
            dropped_bulk: metrics.counter(
                "outpost_ingest_dropped",
                "Samples dropped at ingest because the outbox quota was full of higher classes",
                &[("class", "bulk")],
            ),
            backpressure: metrics.counter(
                "outpost_ingest_backpressure",
                "Times intake paused because the outbox quota was full of data it may not evict",
                &[],
            ),
            batches: metrics.counter("outpost_ingest_batches", "Durable batches written", &[]),
        };
        // Read the stored receipts before anyone can ask (a redelivery right after a restart
        // must find them).
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if let Err(e) = outbox.aux_scan(&mut |k, v| pairs.push((k.to_vec(), v.to_vec()))) {
            tracing::error!(error = %e, "cannot read stored receipts: redeliveries may be stored twice");
        }
        let receipts = Arc::new(RwLock::new(Receipts::load(
            config.receipts_per_source,
            pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
        )));
        let task = tokio::spawn(writer(outbox, config, rx, c, wake, receipts.clone()));
        (Ingest { tx, bus, receipts }, task)
    }

    /// Queues `samples` (waiting while the queue is full) and publishes them on the bus.
    /// Returns a promise of durability.
    pub async fn submit(
        &self,
        priority: Priority,
        samples: Vec<Sample>,
    ) -> Result<Durable, IngestError> {
        self.submit_inner(priority, samples, None).await
    }

    /// Like [`submit`](Self::submit), for the samples of input messages that a transport
    /// may deliver again after a crash (MQTT QoS 1): their `fingerprints` are stored in the
    /// same atomic batch as the samples, so that [`already_stored`](Self::already_stored)
    /// recognises a redelivery even after a restart.
    pub async fn submit_with_receipts(
        &self,
        priority: Priority,
        samples: Vec<Sample>,
        namespace: u64,
        fingerprints: Vec<u64>,
    ) -> Result<Durable, IngestError> {
        self.submit_inner(priority, samples, Some((namespace, fingerprints)))
            .await
    }

    /// Whether a message with this fingerprint was stored (among the source's last
    /// [`IngestConfig::receipts_per_source`]). Only ask for redeliveries: a first delivery
    /// identical to an earlier message is new data.
    pub fn already_stored(&self, namespace: u64, fingerprint: u64) -> bool {
        self.receipts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(namespace, fingerprint)
    }

    async fn submit_inner(
        &self,
        priority: Priority,
        samples: Vec<Sample>,
        receipts: Option<(u64, Vec<u64>)>,
    ) -> Result<Durable, IngestError> {
        self.bus.publish(&samples);
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Submission {
                priority,
                samples,
                receipts,
                done: Some(done),
            })
            .await
            .map_err(|_| IngestError::Closed)?;
        Ok(Durable(rx))
    }

    /// Submits and waits for durability.
    pub async fn submit_durable(
        &self,
        priority: Priority,
        samples: Vec<Sample>,
    ) -> Result<(), IngestError> {
        self.submit(priority, samples).await?.wait().await
    }

    /// The bus samples are published on.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }
}

/// A batch appended to the outbox, waiting for the flush that makes it durable.
struct Appended {
    /// (class, samples) per submission, for the counters.
    counts: Vec<(Priority, usize)>,
    done: Vec<oneshot::Sender<Result<(), IngestError>>>,
}

/// Batches appended and waiting for their flush, most; then the writer waits (and with it,
/// the producers).
const FLUSH_QUEUE: usize = 16;

/// The writer: appends each group of queued submissions as soon as it can and hands it to
/// the flusher. Group commit without a fixed wait: while one flush runs, submissions queue
/// up and go in the next batch, so batches are small (low latency) when traffic is light
/// and large when it is heavy.
async fn writer(
    outbox: Arc<GatewayOutbox>,
    config: IngestConfig,
    mut rx: mpsc::Receiver<Submission>,
    c: Counters,
    wake: Arc<Notify>,
    receipts: Arc<RwLock<Receipts>>,
) {
    let max_batch = config.max_batch.max(1);
    let (flush_tx, flush_rx) = mpsc::channel::<Appended>(FLUSH_QUEUE);
    let flusher = tokio::spawn(flusher(
        outbox.clone(),
        flush_rx,
        wake,
        c.ingested.clone(),
        c.batches.clone(),
    ));
    let mut seg = [(); 4].map(|_| SegmentBuf::new());
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut count = batch[0].samples.len();
        // Whatever queued meanwhile joins this batch.
        while count < max_batch {
            match rx.try_recv() {
                Ok(m) => {
                    count += m.samples.len();
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        if !config.commit_interval.is_zero() && count < max_batch {
            let deadline = tokio::time::Instant::now() + config.commit_interval;
            while count < max_batch {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => { count += m.samples.len(); batch.push(m); }
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        let result = write_batch(&outbox, &config, &batch, &c, &receipts, &mut seg).await;
        let mut appended = Appended {
            counts: Vec::with_capacity(batch.len()),
            done: Vec::with_capacity(batch.len()),
        };
        for s in batch {
            appended.counts.push((s.priority, s.samples.len()));
            if let Some(d) = s.done {
                appended.done.push(d);
            }
        }
        match result {
            Ok(()) => {
                if flush_tx.send(appended).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, samples = count, "ingest: cannot make samples durable");
                for d in appended.done {
                    let _ = d.send(Err(e.clone()));
                }
            }
        }
    }
    drop(flush_tx);
    let _ = flusher.await;
    tracing::debug!("ingest writer stopped: all producers are gone");
}

/// Makes appended batches durable: one flush covers every batch appended before it began
/// (the outbox flushes everything applied so far), then their producers are told.
async fn flusher(
    outbox: Arc<GatewayOutbox>,
    mut rx: mpsc::Receiver<Appended>,
    wake: Arc<Notify>,
    ingested: [Counter; 4],
    batches: Counter,
) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while let Ok(a) = rx.try_recv() {
            group.push(a);
        }
        let result = outbox
            .durable()
            .await
            .map_err(|e| IngestError::Storage(e.to_string()));
        match &result {
            Ok(()) => {
                batches.inc_by(group.len() as u64);
                for a in &group {
                    for (p, n) in &a.counts {
                        ingested[*p as usize].inc_by(*n as u64);
                    }
                }
                wake.notify_one();
            }
            Err(e) => tracing::error!(error = %e, "ingest: cannot make samples durable"),
        }
        for a in group {
            for d in a.done {
                let _ = d.send(result.clone());
            }
        }
    }
}

/// Appends one group of submissions, one segment per class. Bulk samples the quota has no
/// room for are dropped (and counted); anything else waits for room (back-pressure).
async fn write_batch(
    outbox: &Arc<GatewayOutbox>,
    config: &IngestConfig,
    batch: &[Submission],
    c: &Counters,
    receipts: &RwLock<Receipts>,
    seg: &mut [SegmentBuf; 4],
) -> Result<(), IngestError> {
    // Encode once, straight into each class's segment; write per class so a refusal of one
    // class does not hold the others.
    let mut fps: [HashMap<u64, Vec<u64>>; 4] = Default::default();
    for s in batch {
        let i = s.priority as usize;
        if let Some((ns, v)) = &s.receipts {
            fps[i].entry(*ns).or_default().extend_from_slice(v);
        }
        for x in &s.samples {
            seg[i].push_with(|b| record::encode_into(x, b));
        }
    }
    for p in Priority::ALL {
        let i = p as usize;
        if seg[i].is_empty() {
            continue;
        }
        let samples = seg[i].len();
        let value = seg[i].finish();
        let fps = std::mem::take(&mut fps[i]);
        let aux: Vec<(Vec<u8>, Option<Vec<u8>>)> = {
            let r = receipts.read().unwrap_or_else(|e| e.into_inner());
            fps.iter().flat_map(|(ns, v)| r.ops(*ns, v)).collect()
        };
        let mut warned = false;
        loop {
            // On this task: one append of one segment is a few storage operations, cheaper
            // than a hop to a blocking thread (the flush, which waits for the disk, is the
            // flusher's).
            let res = outbox
                .append_segments_with(&[(p, value.as_slice())], &aux)
                .map(|_| ());
            match res {
                Ok(()) => {
                    let mut r = receipts.write().unwrap_or_else(|e| e.into_inner());
                    for (ns, v) in &fps {
                        r.commit(*ns, v);
                    }
                    break;
                }
                Err(StorageError::Backpressure { .. }) if p == Priority::Bulk => {
                    c.dropped_bulk.inc_by(samples as u64);
                    tracing::warn!(samples, "outbox full: bulk samples dropped");
                    break;
                }
                Err(StorageError::Backpressure {
                    class,
                    needed,
                    evictable,
                    quota,
                }) => {
                    c.backpressure.inc();
                    if !warned {
                        tracing::error!(
                            class = class.as_str(),
                            needed,
                            evictable,
                            quota,
                            "ALARM: outbox quota full of data that may not be evicted; intake paused until the uplink drains it"
                        );
                        warned = true;
                    }
                    tokio::time::sleep(config.backpressure_retry).await;
                }
                Err(e) => return Err(IngestError::Storage(e.to_string())),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_runtime::model::{StreamId, Value};
    use outpost_runtime::storage::open_gateway_outbox;

    fn open(dir: &std::path::Path, quota: u64) -> Arc<GatewayOutbox> {
        Arc::new(open_gateway_outbox(dir, quota, None).unwrap())
    }

    #[tokio::test]
    async fn submissions_become_durable_records_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let ob = open(dir.path(), 1 << 30);
        let m = Metrics::new();
        let wake = Arc::new(Notify::new());
        let (ingest, task) = Ingest::start(
            ob.clone(),
            IngestConfig::default(),
            Bus::new(&m),
            &m,
            wake.clone(),
        );
        let s = StreamId::intern("ingest/t").unwrap();
        let mut promises = Vec::new();
        for i in 0..50 {
            let samples = (0..10)
                .map(|j| Sample::new(s, i * 10 + j, Value::I64(i * 10 + j)))
                .collect();
            promises.push(ingest.submit(Priority::Normal, samples).await.unwrap());
        }
        for p in promises {
            p.wait().await.unwrap();
        }
        wake.notified().await;
        let recs = ob.scan(Priority::Normal, None, 1000, usize::MAX).unwrap();
        assert_eq!(recs.len(), 500);
        for (i, r) in recs.iter().enumerate() {
            let d = record::decode(&r.value).unwrap();
            assert_eq!(d.value, Value::I64(i as i64));
        }
        assert_eq!(
            m.counter_value("outpost_samples_ingested", &[("class", "normal")]),
            500
        );
        drop(ingest);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn bulk_is_dropped_when_the_quota_is_full_of_critical() {
        let dir = tempfile::tempdir().unwrap();
        // 80 critical samples take one segment of 2,339 bytes; 50 bulk ones would need 1,469
        // more.
        let ob = open(dir.path(), 3_000);
        let m = Metrics::new();
        let (ingest, _task) = Ingest::start(
            ob.clone(),
            IngestConfig::default(),
            Bus::new(&m),
            &m,
            Arc::new(Notify::new()),
        );
        let s = StreamId::intern("ingest/q").unwrap();
        let many = |n: i64| {
            (0..n)
                .map(|j| Sample::new(s, j, Value::I64(j)))
                .collect::<Vec<_>>()
        };
        ingest
            .submit_durable(Priority::Critical, many(80))
            .await
            .unwrap();
        ingest
            .submit_durable(Priority::Bulk, many(50))
            .await
            .unwrap();
        assert!(m.counter_value("outpost_ingest_dropped", &[("class", "bulk")]) > 0);
        assert_eq!(ob.stats().records[Priority::Critical as usize], 80);
    }
}

#[cfg(test)]
mod receipt_tests {
    use super::*;
    use outpost_runtime::model::{StreamId, Value};
    use outpost_runtime::storage::open_gateway_outbox;

    #[tokio::test]
    async fn stored_fingerprints_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = StreamId::intern("ingest/receipt").unwrap();
        for round in 0..2 {
            // sled's background flusher may hold the directory lock a moment after the
            // previous round dropped its outbox.
            let mut opened = open_gateway_outbox(dir.path(), 1 << 30, None);
            for _ in 0..100 {
                if opened.is_ok() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                opened = open_gateway_outbox(dir.path(), 1 << 30, None);
            }
            let ob = Arc::new(opened.unwrap());
            let m = Metrics::new();
            let (ingest, task) = Ingest::start(
                ob.clone(),
                IngestConfig::default(),
                Bus::new(&m),
                &m,
                Arc::new(Notify::new()),
            );
            if round == 0 {
                assert!(!ingest.already_stored(1, 100));
                ingest
                    .submit_with_receipts(
                        Priority::Normal,
                        vec![Sample::new(s, 1, Value::I64(1))],
                        1,
                        vec![100, 101],
                    )
                    .await
                    .unwrap()
                    .wait()
                    .await
                    .unwrap();
                assert!(ingest.already_stored(1, 100) && ingest.already_stored(1, 101));
            } else {
                // After a restart (think: a crash before the broker got its acks).
                assert!(ingest.already_stored(1, 100) && ingest.already_stored(1, 101));
                assert!(!ingest.already_stored(2, 100), "namespaces are separate");
                assert!(!ingest.already_stored(1, 102));
            }
            drop(ingest);
            task.await.unwrap();
            drop(ob);
        }
    }
}
