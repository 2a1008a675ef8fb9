//! Durable storage: a small ordered key-value engine trait ([`KvEngine`]), its sled
//! implementation ([`SledEngine`]), and the [`Outbox`] built on it — the durable queue every
//! record passes through before it leaves the gateway.
//!
//! The engine trait is deliberately small (atomic batch, ordered scan, get, flush, size) so
//! that a failed crash test can move the outbox to another engine (redb) without touching
//! the actors. The outbox's quota policy is a pure function in [`quota`].

use std::ops::{Bound, ControlFlow};

use crate::model::Priority;

pub mod outbox;
pub mod quota;
pub mod receipts;
pub mod segment;
pub mod sled_engine;

pub use outbox::{Outbox, OutboxConfig, OutboxStats, Record, ScanEnd, Seq};
pub use segment::SegmentBuf;
pub use sled_engine::{SledEngine, SledOptions};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The engine failed (I/O error, engine bug, ...).
    #[error("storage engine error: {0}")]
    Engine(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Data read back from the engine is not what we wrote (bad key layout, bad meta value,
    /// or the engine itself reports corruption).
    #[error("storage corrupt: {0}")]
    Corrupt(String),
    /// The records do not fit in the quota even after every eviction the policy allows for
    /// their class. Nothing was written. The caller must slow its intake and raise an alarm.
    #[error(
        "outbox full for {class:?} records: {needed} more bytes needed, only {evictable} evictable (quota {quota})"
    )]
    Backpressure {
        /// The incoming class that could not be placed.
        class: Priority,
        /// Bytes beyond the quota that would have to be freed.
        needed: u64,
        /// Bytes that this class is allowed to evict.
        evictable: u64,
        /// The quota in bytes.
        quota: u64,
    },
    /// A record (or a batch) is larger than the whole quota: it can never be stored.
    #[error("{bytes} bytes can never fit in an outbox quota of {quota} bytes")]
    TooLarge {
        /// Size of the record or batch (key + value bytes).
        bytes: u64,
        /// The quota in bytes.
        quota: u64,
    },
    /// The 64-bit sequence space is exhausted (never expected in practice).
    #[error("outbox sequence numbers exhausted")]
    SeqExhausted,
    /// A blocking storage task could not be run or panicked.
    #[error("storage task failed: {0}")]
    Task(String),
}

/// One atomic group of writes: applied all-or-nothing, also across a crash.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    /// `(key, Some(value))` inserts or overwrites; `(key, None)` removes. Applied in order.
    pub ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    /// Inserts or overwrites `key`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    /// Removes `key` (no-op if absent).
    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }

    /// Whether the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Scan direction of [`KvEngine::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Ascending key order.
    Forward,
    /// Descending key order.
    Reverse,
}

/// The visitor of [`KvEngine::scan`]: gets each key and value, breaks to stop the scan.
pub type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

/// An ordered byte-key → byte-value tree: the operations the outbox needs, and no more.
///
/// Implementations must make [`apply`](KvEngine::apply) atomic (all or nothing, for readers
/// and across a crash) and make everything applied before a [`flush`](KvEngine::flush)
/// call durable when it returns.
pub trait KvEngine: Send + Sync + 'static {
    /// The value stored under `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Applies `batch` atomically.
    fn apply(&self, batch: WriteBatch) -> Result<(), StorageError>;

    /// Visits the entries with keys in `(lo, hi)` in `dir` order until `visit` breaks or the
    /// range ends.
    fn scan(
        &self,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
        dir: Direction,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StorageError>;

    /// Blocks until everything applied before the call is durable on disk.
    fn flush(&self) -> Result<(), StorageError>;

    /// Bytes the engine occupies on disk.
    fn size_on_disk(&self) -> Result<u64, StorageError>;
}

/// The engine the gateway and the hub use. Changing storage engine (for example to redb,
/// should a crash test fail) is this one line plus the new engine's `KvEngine` impl.
pub type DefaultEngine = SledEngine;

/// The gateway's outbox type.
pub type GatewayOutbox = Outbox<DefaultEngine>;

/// Opens (or creates) the default engine in `dir`, on the tree `tree`.
pub fn open_default_engine(
    dir: &std::path::Path,
    tree: &str,
) -> Result<DefaultEngine, StorageError> {
    SledEngine::open(
        dir,
        &SledOptions {
            tree: tree.to_owned(),
            ..SledOptions::default()
        },
    )
}

/// Opens (or creates) the gateway's outbox in `dir` on the default engine.
pub fn open_gateway_outbox(
    dir: &std::path::Path,
    quota_bytes: u64,
    metrics: Option<crate::metrics::Metrics>,
) -> Result<GatewayOutbox, StorageError> {
    Outbox::open(
        open_default_engine(dir, "outbox")?,
        OutboxConfig {
            quota_bytes,
            metrics,
        },
    )
}
