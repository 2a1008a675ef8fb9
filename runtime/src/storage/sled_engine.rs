//! [`KvEngine`] over sled 0.34: one named tree inside a sled database (so the outbox, local
//! history and model state can share one database and one write-ahead log).
//!
//! sled's `apply_batch` is crash-atomic (the batch is sealed in the log and recovered all or
//! nothing). sled's own `flush` on Linux ends in `sync_file_range(2)`, which writes the data
//! pages but neither the file's metadata (the log file grows by appends) nor the drive's
//! write cache: enough against a killed process, not against a power cut. So by default
//! [`KvEngine::flush`] follows it with an `fdatasync` of sled's log file
//! ([`SledOptions::fdatasync`]). Known sled issues (corrupted reads after forced kills,
//! space amplification) are what the `outbox_crash` test and the `outbox_space` benchmark
//! watch.

use std::fs::File;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use super::{Direction, KvEngine, StorageError, Visitor, WriteBatch};

/// Tuning for [`SledEngine::open`].
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// Page cache size in bytes (sled's default is 1 GiB, far too much for a gateway).
    pub cache_capacity: u64,
    /// Background fsync period; `None` disables it (durability then only comes from
    /// explicit flushes).
    pub flush_every_ms: Option<u64>,
    /// Name of the tree the engine works on.
    pub tree: String,
    /// After sled's flush, `fdatasync` its log file so the durable point also survives a
    /// power cut (sled alone only issues `sync_file_range` on Linux).
    pub fdatasync: bool,
}

impl Default for SledOptions {
    fn default() -> SledOptions {
        SledOptions {
            // Segments are written, read back by the sync loop within moments, and
            // deleted: a small cache holds that working set. sled's own memory use (nodes in
            // use, its write buffers) comes on top.
            cache_capacity: 16 * 1024 * 1024,
            flush_every_ms: Some(500),
            tree: "outbox".to_owned(),
            fdatasync: true,
        }
    }
}

/// A [`KvEngine`] on one sled tree.
#[derive(Clone)]
pub struct SledEngine {
    db: sled::Db,
    tree: sled::Tree,
    /// sled's log file, for `fdatasync` after a flush (None when disabled).
    log: Option<Arc<File>>,
}

fn map_err(e: sled::Error) -> StorageError {
    match e {
        sled::Error::Corruption { at, .. } => {
            StorageError::Corrupt(format!("sled reports corruption at {at:?}"))
        }
        other => StorageError::Engine(Box::new(other)),
    }
}

fn sled_bound(b: Bound<&[u8]>) -> Bound<sled::IVec> {
    match b {
        Bound::Included(k) => Bound::Included(sled::IVec::from(k)),
        Bound::Excluded(k) => Bound::Excluded(sled::IVec::from(k)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl SledEngine {
    /// Opens (or creates) the sled database in directory `path` and the tree `opts.tree`.
    pub fn open(path: impl AsRef<Path>, opts: &SledOptions) -> Result<SledEngine, StorageError> {
        let path = path.as_ref();
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(opts.cache_capacity)
            .flush_every_ms(opts.flush_every_ms)
            .open()
            .map_err(map_err)?;
        let log = if opts.fdatasync {
            // sled keeps its log in `<path>/db` (sled 0.34 `Config::db_path`).
            let f = File::open(path.join("db")).map_err(|e| StorageError::Engine(Box::new(e)))?;
            Some(Arc::new(f))
        } else {
            None
        };
        let tree = db.open_tree(&opts.tree).map_err(map_err)?;
        Ok(SledEngine { db, tree, log })
    }

    /// Another tree of the same database (same log, same flushes), for local history or
    /// model state next to the outbox.
    pub fn sibling(&self, tree: &str) -> Result<SledEngine, StorageError> {
        let t = self.db.open_tree(tree).map_err(map_err)?;
        Ok(SledEngine {
            db: self.db.clone(),
            tree: t,
            log: self.log.clone(),
        })
    }

    /// The underlying database (for sharing it with other trees).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

impl KvEngine for SledEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.tree.get(key).map_err(map_err)?.map(|v| v.to_vec()))
    }

    fn apply(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut b = sled::Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        self.tree.apply_batch(b).map_err(map_err)
    }

    fn scan(
        &self,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
        dir: Direction,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StorageError> {
        let iter = self
            .tree
            .range::<sled::IVec, _>((sled_bound(lo), sled_bound(hi)));
        let mut step =
            |item: sled::Result<(sled::IVec, sled::IVec)>| -> Result<bool, StorageError> {
                let (k, v) = item.map_err(map_err)?;
                Ok(visit(&k, &v).is_break())
            };
        match dir {
            Direction::Forward => {
                for item in iter {
                    if step(item)? {
                        break;
                    }
                }
            }
            Direction::Reverse => {
                for item in iter.rev() {
                    if step(item)? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.tree.flush().map_err(map_err)?;
        if let Some(log) = &self.log {
            log.sync_data()
                .map_err(|e| StorageError::Engine(Box::new(e)))?;
        }
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        self.db.size_on_disk().map_err(map_err)
    }
}
