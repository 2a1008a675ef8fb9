//! The hub's durable state and the exactly-once write path.
//!
//! For each data frame: samples whose (gateway, sequence) the hub has already written are
//! dropped as duplicates; the rest are appended to the gateway's sink file and fsynced;
//! then, in one atomic engine batch, the gateway's seen-sequence set and the sink file's
//! committed length are recorded and flushed. Only then is the frame acknowledged. A crash
//! anywhere in between leaves the sink truncated back to its committed length on restart
//! ([`JsonlSink::open`]) and the frame unacknowledged, so the gateway sends it again and it
//! is written exactly once.
//!
//! Sequence numbers are unique per gateway (the gateway's outbox sequence), so the
//! de-duplication key (gateway, stream, sequence) reduces to (gateway, sequence).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use outpost_protocols::frame::DataFrame;
use outpost_runtime::model::TimestampNs;
use outpost_runtime::rangeset::RangeSet;
use outpost_runtime::storage::{
    DefaultEngine, Direction, KvEngine, StorageError, WriteBatch, open_default_engine,
};

use super::sink::{JsonlSink, SinkError, SinkRecord, file_name};

const SEEN: &[u8] = b"seen/";
const SINK: &[u8] = b"sink/";
/// Most ranges a gateway's seen-set may have when loaded (gaps come from evicted data).
const MAX_RANGES: usize = 4_000_000;

/// Hub storage failures.
#[derive(Debug, thiserror::Error)]
pub enum HubStoreError {
    #[error("hub state: {0}")]
    Storage(#[from] StorageError),
    #[error("hub state is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// What a commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// Samples written to the sink.
    pub written: usize,
    /// Samples dropped as already written.
    pub duplicates: usize,
    /// Indices (into the frame's samples) of the samples written.
    pub written_idx: Vec<usize>,
}

struct Inner {
    sink: JsonlSink,
    seen: HashMap<String, RangeSet>,
}

/// De-duplication state + sink, behind one lock (commits are serialized).
pub struct HubStore {
    engine: DefaultEngine,
    inner: Mutex<Inner>,
}

impl HubStore {
    /// Opens the state in `state_dir` and the sink in `sink_dir`, repairing the sink files
    /// to their committed lengths.
    pub fn open(state_dir: &Path, sink_dir: &Path) -> Result<HubStore, HubStoreError> {
        let engine = open_default_engine(state_dir, "hub")?;
        let mut seen = HashMap::new();
        let mut committed = HashMap::new();
        let mut bad: Option<String> = None;
        engine.scan(
            std::ops::Bound::Unbounded,
            std::ops::Bound::Unbounded,
            Direction::Forward,
            &mut |k, v| {
                if let Some(gw) = k.strip_prefix(SEEN) {
                    let gw = String::from_utf8_lossy(gw).into_owned();
                    match RangeSet::from_bytes(v, MAX_RANGES) {
                        Ok(set) => {
                            seen.insert(gw, set);
                        }
                        Err(e) => bad = Some(format!("seen-set of {gw}: {e}")),
                    }
                } else if let Some(file) = k.strip_prefix(SINK) {
                    match <[u8; 8]>::try_from(v) {
                        Ok(b) => {
                            committed.insert(
                                String::from_utf8_lossy(file).into_owned(),
                                u64::from_be_bytes(b),
                            );
                        }
                        Err(_) => bad = Some("malformed sink length".into()),
                    }
                }
                std::ops::ControlFlow::Continue(())
            },
        )?;
        if let Some(b) = bad {
            return Err(HubStoreError::Corrupt(b));
        }
        let sink = JsonlSink::open(sink_dir, &committed)?;
        Ok(HubStore {
            engine,
            inner: Mutex::new(Inner { sink, seen }),
        })
    }

    /// Writes the new samples of `frame` (from the authenticated `gateway`) exactly once and
    /// makes that durable. Blocking: call it from `spawn_blocking`.
    pub fn commit(
        &self,
        gateway: &str,
        frame: &DataFrame,
        arrival_ns: TimestampNs,
    ) -> Result<Committed, HubStoreError> {
        let mut v = self.commit_many(gateway, std::slice::from_ref(frame), arrival_ns)?;
        Ok(v.pop().unwrap_or_default())
    }

    /// [`commit`](Self::commit) for several frames with one sink fsync and one state flush
    /// (group commit: under load, the frames a gateway has queued share the cost).
    pub fn commit_many(
        &self,
        gateway: &str,
        frames: &[DataFrame],
        arrival_ns: TimestampNs,
    ) -> Result<Vec<Committed>, HubStoreError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        let seen = inner.seen.entry(gateway.to_owned()).or_default();
        let mut fresh = RangeSet::new();
        let mut records = Vec::new();
        let mut out = Vec::with_capacity(frames.len());
        for frame in frames {
            let mut done = Committed::default();
            for (i, s) in frame.samples.iter().enumerate() {
                if seen.contains(s.seq) || !fresh.insert(s.seq) {
                    done.duplicates += 1;
                    continue;
                }
                done.written_idx.push(i);
                records.push(SinkRecord {
                    gateway,
                    stream: frame.stream_name(s),
                    seq: s.seq,
                    ts_ns: s.ts_ns,
                    value: &s.value,
                    quality: s.quality,
                    received_ns: arrival_ns,
                });
            }
            done.written = done.written_idx.len();
            out.push(done);
        }
        if records.is_empty() {
            return Ok(out);
        }
        let file = file_name(gateway, arrival_ns);
        let len = inner.sink.append(&file, &records)?;
        for (a, b) in fresh.iter() {
            seen.insert_range(a, b);
        }
        let mut batch = WriteBatch::new();
        batch.put([SEEN, gateway.as_bytes()].concat(), seen.to_bytes());
        batch.put([SINK, file.as_bytes()].concat(), len.to_be_bytes().to_vec());
        self.engine.apply(batch)?;
        self.engine.flush()?;
        Ok(out)
    }

    /// Sequences already written for `gateway` (for tests and reports).
    pub fn seen(&self, gateway: &str) -> RangeSet {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.seen.get(gateway).cloned().unwrap_or_default()
    }

    /// The sink folder.
    pub fn sink_dir(&self) -> std::path::PathBuf {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.sink.dir().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocols::frame::Encoding;
    use outpost_runtime::model::{Priority, Sample, StreamId, Value};

    fn frame(seqs: &[u64]) -> DataFrame {
        let s = StreamId::intern("hub/t").unwrap();
        let samples: Vec<Sample> = seqs
            .iter()
            .map(|q| Sample::new(s, *q as i64, Value::I64(*q as i64)))
            .collect();
        DataFrame::from_samples(
            "gw",
            Priority::Normal,
            Encoding::Raw,
            seqs.iter().copied().zip(samples.iter()),
        )
    }

    fn lines(dir: &Path) -> Vec<u64> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir.join("gw")).unwrap() {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                out.push(v["seq"].as_u64().unwrap());
            }
        }
        out.sort();
        out
    }

    #[test]
    fn duplicates_are_dropped_across_frames_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
        let store = HubStore::open(&state, &sink).unwrap();
        assert_eq!(
            store.commit("gw", &frame(&[1, 2, 3]), 0).unwrap().written,
            3
        );
        let c = store.commit("gw", &frame(&[3, 4, 4]), 0).unwrap();
        assert_eq!((c.written, c.duplicates, c.written_idx), (1, 2, vec![1]));
        drop(store);
        let store = HubStore::open(&state, &sink).unwrap();
        let c = store.commit("gw", &frame(&[1, 5]), 0).unwrap();
        assert_eq!((c.written, c.duplicates, c.written_idx), (1, 1, vec![1]));
        assert_eq!(lines(&sink), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_crash_between_sink_write_and_commit_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
        let store = HubStore::open(&state, &sink).unwrap();
        store.commit("gw", &frame(&[1, 2]), 0).unwrap();
        drop(store);
        // Simulate a crash after the sink append of seq 3 but before its commit.
        let f = sink.join(file_name("gw", 0));
        let mut text = std::fs::read_to_string(&f).unwrap();
        text.push_str("{\"gateway\":\"gw\",\"stream\":\"hub/t\",\"seq\":3,\"ts_ns\":3,\"value\":3,\"quality\":\"good\",\"received_ns\":3}\n");
        std::fs::write(&f, text).unwrap();
        let store = HubStore::open(&state, &sink).unwrap();
        assert_eq!(lines(&sink), vec![1, 2]);
        store.commit("gw", &frame(&[3]), 0).unwrap();
        assert_eq!(lines(&sink), vec![1, 2, 3]);
    }
}
