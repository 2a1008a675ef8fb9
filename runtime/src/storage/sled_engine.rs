//! [`KvEngine`] over sled 0.34: one named tree inside a sled database (so the outbox, local
//! history and model state can share one database and one write-ahead log).
//!
//! sled's `apply_batch` is crash-atomic (the batch is sealed in the log and recovered all or
//! nothing); `flush` fsyncs the log. Known sled issues (corrupted reads after forced kills,
//! space amplification) are what the `outbox_crash` test and the `outbox_space` benchmark
//! watch.

use std::ops::Bound;
use std::path::Path;

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
}

impl Default for SledOptions {
    fn default() -> SledOptions {
        SledOptions {
            cache_capacity: 64 * 1024 * 1024,
            flush_every_ms: Some(500),
            tree: "outbox".to_owned(),
        }
    }
}

/// A [`KvEngine`] on one sled tree.
#[derive(Clone)]
pub struct SledEngine {
    db: sled::Db,
    tree: sled::Tree,
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
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(opts.cache_capacity)
            .flush_every_ms(opts.flush_every_ms)
            .open()
            .map_err(map_err)?;
        SledEngine::with_db(db, &opts.tree)
    }

    /// Uses tree `tree` of an already open database.
    pub fn with_db(db: sled::Db, tree: &str) -> Result<SledEngine, StorageError> {
        let tree = db.open_tree(tree).map_err(map_err)?;
        Ok(SledEngine { db, tree })
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
        self.tree.flush().map(|_| ()).map_err(map_err)
    }

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        self.db.size_on_disk().map_err(map_err)
    }
}
