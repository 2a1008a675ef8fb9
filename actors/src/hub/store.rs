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
//!
//! # Window summaries
//!
//! Summary-encoded frames also carry per-window aggregates. They are written to the
//! gateway's summaries file ([`summary_file_name`]) in the same commit as the frame's raw
//! samples: appended and fsynced with them, their file's committed length recorded in the
//! same engine batch, truncated back on restart like the samples file. They are
//! best-effort — the gateway never resends a summary, the raw samples follow by backfill —
//! but a summary is not written twice for one (gateway, stream, window start, first
//! sequence):
//! - within a run of the hub, a bounded set of the [`RECENT_SUMMARIES`] most recently
//!   written keys catches a frame delivered twice (a lost ack);
//! - across a restart, a frame delivered again carries raw samples the hub already has (a
//!   summary-only frame is never resent): its summaries are skipped when it has raw samples
//!   and none of them is new.
//!
//! # New files
//!
//! Before the first append to a file the store has no committed length for (a new day, a new
//! gateway), its current length is committed on its own. So every file the sink ever
//! appends to has a committed length, and a crash before the first commit truncates it too.
//! If an append or the commit fails, the appended bytes are cut off again before the error
//! is returned, so a later commit cannot commit them by accident.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::Mutex;

use outpost_protocols::frame::DataFrame;
use outpost_runtime::model::TimestampNs;
use outpost_runtime::rangeset::RangeSet;
use outpost_runtime::storage::{
    DefaultEngine, Direction, KvEngine, StorageError, WriteBatch, open_default_engine,
};

use super::sink::{JsonlSink, SinkError, SinkRecord, SummaryRecord, file_name, summary_file_name};

const SEEN: &[u8] = b"seen/";
const SINK: &[u8] = b"sink/";
/// Most ranges a gateway's seen-set may have when loaded (gaps come from evicted data).
const MAX_RANGES: usize = 4_000_000;
/// How many recently written summary keys the store remembers to drop a summary delivered
/// twice (16 bytes each, twice: about 2 MiB).
pub const RECENT_SUMMARIES: usize = 65_536;

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
    /// Window summaries written to the summaries file.
    pub summaries_written: usize,
    /// Window summaries dropped as already written.
    pub summary_duplicates: usize,
}

struct Inner {
    sink: JsonlSink,
    seen: HashMap<String, RangeSet>,
    /// Committed length of every sink file, as recorded in the engine.
    committed: HashMap<String, u64>,
    recent: RecentSummaries,
    /// Set when a failed commit could not be undone in the sink: no commit is safe until a
    /// restart truncates the files to their committed lengths.
    broken: Option<String>,
}

/// A bounded set of recently written summary keys (hashed with a per-process random key, so
/// a peer cannot aim collisions), oldest evicted first.
struct RecentSummaries {
    hasher: RandomState,
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl RecentSummaries {
    fn new() -> Self {
        RecentSummaries {
            hasher: RandomState::new(),
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    fn key(&self, gateway: &str, stream: &str, window_start_ns: i64, first_seq: u64) -> u64 {
        self.hasher
            .hash_one((gateway, stream, window_start_ns, first_seq))
    }

    fn contains(&self, key: u64) -> bool {
        self.set.contains(&key)
    }

    fn insert(&mut self, key: u64) {
        if self.set.insert(key) {
            self.order.push_back(key);
            while self.order.len() > RECENT_SUMMARIES {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
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
            inner: Mutex::new(Inner {
                sink,
                seen,
                committed,
                recent: RecentSummaries::new(),
                broken: None,
            }),
        })
    }

    /// Writes the new samples of `frame` (from the authenticated `gateway`) exactly once, and
    /// its window summaries (see the module docs), and makes that durable. Blocking: call it
    /// from `spawn_blocking`.
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
        if let Some(why) = &inner.broken {
            return Err(HubStoreError::Corrupt(why.clone()));
        }
        let seen = inner.seen.entry(gateway.to_owned()).or_default();
        let mut fresh = RangeSet::new();
        let mut fresh_keys = HashSet::new();
        let mut records = Vec::new();
        let mut summaries = Vec::new();
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
            // A frame whose raw samples are all known was delivered before (module docs).
            let resent = !frame.samples.is_empty() && done.written == 0;
            for fs in &frame.summaries {
                let stream = frame
                    .streams
                    .get(fs.stream as usize)
                    .map_or("", String::as_str);
                let w = &fs.summary;
                let key = inner
                    .recent
                    .key(gateway, stream, w.window_start_ns, w.first_seq);
                if resent || inner.recent.contains(key) || !fresh_keys.insert(key) {
                    done.summary_duplicates += 1;
                    continue;
                }
                summaries.push(SummaryRecord::new(gateway, stream, w, arrival_ns));
                done.summaries_written += 1;
            }
            out.push(done);
        }
        if records.is_empty() && summaries.is_empty() {
            return Ok(out);
        }
        let sample_file = file_name(gateway, arrival_ns);
        let summary_file = summary_file_name(gateway, arrival_ns);
        let mut used = Vec::new();
        if !records.is_empty() {
            used.push(sample_file.as_str());
        }
        if !summaries.is_empty() {
            used.push(summary_file.as_str());
        }
        // Give every file about to grow a committed length first (module docs).
        let mut register = WriteBatch::new();
        let mut new_files = Vec::new();
        for file in &used {
            if !inner.committed.contains_key(*file) {
                let len = inner.sink.len(file)?;
                register.put([SINK, file.as_bytes()].concat(), len.to_be_bytes().to_vec());
                new_files.push((file.to_string(), len));
            }
        }
        if !new_files.is_empty() {
            self.engine.apply(register)?;
            self.engine.flush()?;
            inner.committed.extend(new_files);
        }
        let mut lens = Vec::new();
        let sink = &mut inner.sink;
        let written = (|| -> Result<(), HubStoreError> {
            let mut batch = WriteBatch::new();
            if !records.is_empty() {
                lens.push((sample_file.clone(), sink.append(&sample_file, &records)?));
            }
            if !summaries.is_empty() {
                lens.push((
                    summary_file.clone(),
                    sink.append(&summary_file, &summaries)?,
                ));
            }
            for (file, len) in &lens {
                batch.put([SINK, file.as_bytes()].concat(), len.to_be_bytes().to_vec());
            }
            // Updated only once durable: a failed commit must not mark its samples as seen.
            let seen_after = (!fresh.is_empty()).then(|| {
                let mut after = seen.clone();
                for (a, b) in fresh.iter() {
                    after.insert_range(a, b);
                }
                batch.put([SEEN, gateway.as_bytes()].concat(), after.to_bytes());
                after
            });
            self.engine.apply(batch)?;
            self.engine.flush()?;
            if let Some(after) = seen_after {
                *seen = after;
            }
            Ok(())
        })();
        if let Err(e) = written {
            // Undo the appends, so that the next commit does not make them committed.
            for file in used {
                let len = inner.committed.get(file).copied().unwrap_or(0);
                if let Err(t) = inner.sink.truncate(file, len) {
                    tracing::error!(file, error = %t, "hub sink: cannot undo a failed commit; refusing further commits until restart");
                    inner.broken = Some(format!(
                        "sink file {file} could not be cut back after a failed commit ({t}); restart the hub"
                    ));
                }
            }
            return Err(e);
        }
        inner.committed.extend(lens);
        for k in fresh_keys {
            inner.recent.insert(k);
        }
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
            &"gw".parse().unwrap(),
            Priority::Normal,
            Encoding::Raw,
            seqs.iter().copied().zip(samples.iter()),
        )
    }

    /// Sequences in the samples files of gateway `gw`.
    fn lines(dir: &Path) -> Vec<u64> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir.join("gw")).unwrap() {
            let path = e.unwrap().path();
            if path.to_string_lossy().ends_with(".summary.jsonl") {
                continue;
            }
            let text = std::fs::read_to_string(path).unwrap();
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

    /// Lines of the summaries file of gateway `gw` for arrival day 0.
    fn summary_lines(dir: &Path) -> Vec<serde_json::Value> {
        let Ok(text) = std::fs::read_to_string(dir.join(summary_file_name("gw", 0))) else {
            return Vec::new();
        };
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A summary frame from an aggregator fed 10 s windows of a numeric and a boolean
    /// stream (sequences 100..=139), plus one raw pass-through sample (seq 140); encoded and
    /// decoded, as the hub receives it.
    fn summary_frame() -> DataFrame {
        use outpost_protocols::encoding::summary::{SummaryAggregator, SummaryConfig};
        use outpost_protocols::frame::{self, FrameSample, Message};
        use outpost_runtime::model::Quality;
        let temp = StreamId::intern("hub/sum/temp").unwrap();
        let run = StreamId::intern("hub/sum/run").unwrap();
        let mut agg = SummaryAggregator::new(&SummaryConfig { window_ms: 10_000 }).unwrap();
        let mut seq = 100;
        for i in 0..20i64 {
            let ts = i * 1_000_000_000; // two windows: [0, 10 s) and [10 s, 20 s)
            assert!(
                agg.push(seq, &Sample::new(temp, ts, Value::F64(i as f64)))
                    .is_none()
            );
            assert!(
                agg.push(seq + 1, &Sample::new(run, ts, Value::Bool(i % 2 == 0)))
                    .is_none()
            );
            seq += 2;
        }
        let mut d =
            DataFrame::from_summaries(&"gw".parse().unwrap(), Priority::Normal, &agg.flush());
        assert_eq!(d.summaries.len(), 4);
        d.last_seq = 140;
        d.samples.push(FrameSample {
            stream: 0,
            seq: 140,
            ts_ns: 20_000_000_000,
            quality: Quality::Good,
            value: Value::F64(99.5),
        });
        let bytes = frame::encode(&Message::Data(d)).unwrap();
        let Message::Data(d) = frame::decode(&bytes).unwrap() else {
            unreachable!()
        };
        d
    }

    #[test]
    fn summaries_go_to_the_summary_file_and_raw_samples_to_the_samples_file() {
        let dir = tempfile::tempdir().unwrap();
        let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
        let store = HubStore::open(&state, &sink).unwrap();
        let f = summary_frame();
        let c = store.commit("gw", &f, 0).unwrap();
        assert_eq!(
            (c.written, c.summaries_written, c.summary_duplicates),
            (1, 4, 0)
        );
        assert_eq!(lines(&sink), vec![140]);
        let sums = summary_lines(&sink);
        assert_eq!(sums.len(), 4);
        let find = |stream: &str, start: i64| {
            sums.iter()
                .find(|v| v["stream"] == stream && v["window_start_ns"] == start)
                .unwrap_or_else(|| panic!("{stream} {start}: {sums:?}"))
                .clone()
        };
        let t = find("hub/sum/temp", 10_000_000_000);
        assert_eq!(t["gateway"], "gw");
        assert_eq!(t["window_ns"], 10_000_000_000u64);
        assert_eq!(
            (t["first_ts_ns"].as_i64(), t["last_ts_ns"].as_i64()),
            (Some(10_000_000_000), Some(19_000_000_000))
        );
        assert_eq!(
            (t["first_seq"].as_u64(), t["last_seq"].as_u64()),
            (Some(120), Some(138))
        );
        assert_eq!(
            (t["count"].as_u64(), t["numeric_count"].as_u64()),
            (Some(10), Some(10))
        );
        assert_eq!(
            (t["min"].as_f64(), t["max"].as_f64()),
            (Some(10.0), Some(19.0))
        );
        assert_eq!(t["mean"].as_f64(), Some(14.5));
        // Population stddev of 10 consecutive integers: sqrt(99 / 12).
        assert!((t["stddev"].as_f64().unwrap() - (99.0f64 / 12.0).sqrt()).abs() < 1e-12);
        assert_eq!(t["last"].as_f64(), Some(19.0));
        assert_eq!(t["last_quality"], "good");
        assert_eq!(t["received_ns"], 0);
        // A boolean stream has counts and a last value, no statistics.
        let r = find("hub/sum/run", 0);
        assert_eq!(
            (r["count"].as_u64(), r["numeric_count"].as_u64()),
            (Some(10), Some(0))
        );
        assert!(r["min"].is_null() && r["mean"].is_null() && r["stddev"].is_null());
        assert_eq!(r["last"], false);

        // The same frame again (a lost ack): neither samples nor summaries are written twice.
        let c = store.commit("gw", &f, 0).unwrap();
        assert_eq!((c.written, c.duplicates), (0, 1));
        assert_eq!((c.summaries_written, c.summary_duplicates), (0, 4));
        // ... nor after a restart (the recent set is gone; the raw samples say it is a resend).
        drop(store);
        let store = HubStore::open(&state, &sink).unwrap();
        let c = store.commit("gw", &f, 0).unwrap();
        assert_eq!(
            (c.written, c.summaries_written, c.summary_duplicates),
            (0, 0, 4)
        );
        // A summary-only frame delivered twice in one run, and twice within one commit.
        let mut only = f.clone();
        only.samples.clear();
        only.summaries.truncate(1);
        only.summaries[0].summary.first_seq = 1_000; // a later part of that window
        let c = store
            .commit_many("gw", &[only.clone(), only.clone()], 0)
            .unwrap();
        assert_eq!(c[0].summaries_written + c[1].summaries_written, 1);
        assert_eq!(c[1].summary_duplicates, 1);
        assert_eq!(store.commit("gw", &only, 0).unwrap().summary_duplicates, 1);
        assert_eq!(summary_lines(&sink).len(), 5);
        // The backfill of the summarized samples is written exactly once, as always.
        let backfill: Vec<u64> = (100..140).collect();
        assert_eq!(
            store.commit("gw", &frame(&backfill), 0).unwrap().written,
            40
        );
        assert_eq!(lines(&sink), (100..=140).collect::<Vec<_>>());
    }

    #[test]
    fn restart_truncates_both_files_to_their_committed_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
        let store = HubStore::open(&state, &sink).unwrap();
        store.commit("gw", &summary_frame(), 0).unwrap();
        drop(store);
        // A crash in the middle of the next commit: whole and half lines in both files.
        for (file, junk) in [
            (
                file_name("gw", 0),
                "{\"gateway\":\"gw\",\"stream\":\"hub/t\",\"seq\":7,\"ts_ns\":7,\"value\":7,\"quality\":\"good\",\"received_ns\":0}\n{\"gateway\":\"g",
            ),
            (
                summary_file_name("gw", 0),
                "{\"gateway\":\"gw\",\"stream\":\"hub/sum/te",
            ),
        ] {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(sink.join(file))
                .unwrap();
            std::io::Write::write_all(&mut f, junk.as_bytes()).unwrap();
        }
        let store = HubStore::open(&state, &sink).unwrap();
        assert_eq!(lines(&sink), vec![140]);
        assert_eq!(summary_lines(&sink).len(), 4);
        // Writing carries on from there.
        let mut more = summary_frame();
        more.samples[0].seq = 139;
        more.summaries.truncate(1);
        more.summaries[0].summary.window_start_ns = 20_000_000_000;
        let c = store.commit("gw", &more, 0).unwrap();
        assert_eq!((c.written, c.summaries_written), (1, 1));
        assert_eq!(lines(&sink), vec![139, 140]);
        assert_eq!(summary_lines(&sink).len(), 5);
    }

    #[test]
    fn a_crash_during_the_first_write_of_a_file_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
        let store = HubStore::open(&state, &sink).unwrap();
        store.commit("gw", &frame(&[1]), 0).unwrap();
        // Every file written so far has a committed length in the engine.
        let day2 = 86_400 * 1_000_000_000;
        store.commit("gw", &summary_frame(), day2).unwrap();
        for file in [file_name("gw", day2), summary_file_name("gw", day2)] {
            let key = [SINK, file.as_bytes()].concat();
            let mut found = None;
            store
                .engine
                .scan(
                    std::ops::Bound::Included(key.as_slice()),
                    std::ops::Bound::Included(key.as_slice()),
                    Direction::Forward,
                    &mut |_, v| {
                        found = Some(v.to_vec());
                        std::ops::ControlFlow::Break(())
                    },
                )
                .unwrap();
            let len = std::fs::metadata(sink.join(&file)).unwrap().len();
            assert_eq!(found, Some(len.to_be_bytes().to_vec()), "{file}");
        }
        // A crash after a new day's file was registered (length 0) and written, before the
        // commit: the new file is cut back to nothing on restart.
        let day3 = 2 * day2;
        let new_file = file_name("gw", day3);
        let mut b = WriteBatch::new();
        b.put(
            [SINK, new_file.as_bytes()].concat(),
            0u64.to_be_bytes().to_vec(),
        );
        store.engine.apply(b).unwrap();
        store.engine.flush().unwrap();
        drop(store);
        std::fs::write(sink.join(&new_file), "{\"seq\":2}\n").unwrap();
        let store = HubStore::open(&state, &sink).unwrap();
        assert_eq!(std::fs::metadata(sink.join(&new_file)).unwrap().len(), 0);
        store.commit("gw", &frame(&[2]), day3).unwrap();
        let text = std::fs::read_to_string(sink.join(&new_file)).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.contains("\"seq\":2"));
    }
}
