//! The hub's JSON-lines sink: per gateway and (UTC, arrival) day, one file of samples, one
//! sample per line, and one file of window summaries, one summary per line. Writes are made
//! durable (fsync) before the caller records them as committed; on restart each file is
//! truncated back to its last committed length, so a crash between "written" and
//! "committed" never leaves a line (or half of one) that the gateway will send again.
//!
//! # Samples: `<gateway>/<YYYY-MM-DD>.jsonl` ([`file_name`])
//!
//! `{"gateway":…,"stream":…,"seq":…,"ts_ns":…,"value":…,"quality":…,"received_ns":…}`;
//! `ts_ns` is the source timestamp, `received_ns` when the hub received the frame (both ns
//! since the Unix epoch, UTC); `value` is a JSON number, boolean or string (non-finite
//! floats are `null`). Every sample of a gateway appears exactly once.
//!
//! # Summaries: `<gateway>/<YYYY-MM-DD>.summary.jsonl` ([`summary_file_name`])
//!
//! One line per window summary of a summary-encoded frame (sync mode `summary`):
//!
//! ```text
//! {"gateway":…,"stream":…,"window_start_ns":…,"window_ns":…,"first_ts_ns":…,"last_ts_ns":…,
//!  "first_seq":…,"last_seq":…,"count":…,"numeric_count":…,"min":…,"max":…,"mean":…,
//!  "stddev":…,"last":…,"last_quality":…,"received_ns":…}
//! ```
//!
//! (on one line). The window is `[window_start_ns, window_start_ns + window_ns)` of source
//! time; `first_ts_ns`/`last_ts_ns` the earliest and latest sample in it;
//! `first_seq ..= last_seq` bounds the sequences summarized (other streams interleave);
//! `count` samples were summarized, `numeric_count` of them numeric (finite floats and
//! integers); `min`, `max`, `mean` and (population) `stddev` are over those, `null` when
//! `numeric_count` is 0; `last` and `last_quality` are the latest sample's value and quality
//! (as in the samples file); `received_ns` as there. A window summarized in two parts (late
//! samples) gives two lines with different `first_seq`. Summaries are best-effort: the raw
//! samples they summarize arrive later, exactly once, in the samples file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use outpost_protocols::encoding::summary::WindowSummary;
use outpost_runtime::model::{Quality, TimestampNs, Value};
use serde::Serialize;

/// One sample as the hub writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SinkRecord<'a> {
    pub gateway: &'a str,
    pub stream: &'a str,
    pub seq: u64,
    pub ts_ns: TimestampNs,
    pub value: &'a Value,
    pub quality: Quality,
    /// When the hub received the sample.
    pub received_ns: TimestampNs,
}

/// One window summary as the hub writes it (see the module docs for the fields).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SummaryRecord<'a> {
    pub gateway: &'a str,
    pub stream: &'a str,
    pub window_start_ns: i64,
    pub window_ns: u64,
    pub first_ts_ns: i64,
    pub last_ts_ns: i64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub count: u64,
    pub numeric_count: u64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
    pub stddev: Option<f64>,
    pub last: &'a Value,
    pub last_quality: Quality,
    /// When the hub received the summary.
    pub received_ns: TimestampNs,
}

impl<'a> SummaryRecord<'a> {
    /// The line for summary `w` of `stream` from `gateway`, received at `received_ns`.
    pub fn new(
        gateway: &'a str,
        stream: &'a str,
        w: &'a WindowSummary,
        received_ns: TimestampNs,
    ) -> SummaryRecord<'a> {
        let n = w.numeric.as_ref();
        SummaryRecord {
            gateway,
            stream,
            window_start_ns: w.window_start_ns,
            window_ns: w.window_ns,
            first_ts_ns: w.first_ts_ns,
            last_ts_ns: w.last_ts_ns,
            first_seq: w.first_seq,
            last_seq: w.last_seq,
            count: w.count,
            numeric_count: n.map_or(0, |n| n.n),
            min: n.map(|n| n.min),
            max: n.map(|n| n.max),
            mean: n.map(|n| n.mean),
            stddev: n.map(|n| n.stddev),
            last: &w.last,
            last_quality: w.last_quality,
            received_ns,
        }
    }
}

/// Sink failures.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode a sample as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Relative path of a samples file: `<gateway>/<YYYY-MM-DD>.jsonl`.
pub fn file_name(gateway: &str, arrival_ns: TimestampNs) -> String {
    format!("{gateway}/{}.jsonl", day(arrival_ns))
}

/// Relative path of a summaries file: `<gateway>/<YYYY-MM-DD>.summary.jsonl`.
pub fn summary_file_name(gateway: &str, arrival_ns: TimestampNs) -> String {
    format!("{gateway}/{}.summary.jsonl", day(arrival_ns))
}

/// `YYYY-MM-DD` of a UTC timestamp.
fn day(ns: TimestampNs) -> String {
    // Every i64 of ns is within the years time handles (1677-2262).
    let d = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Appends JSON lines (samples or summaries) to per-gateway daily files.
pub struct JsonlSink {
    dir: PathBuf,
    open: HashMap<String, (File, u64)>,
}

impl JsonlSink {
    /// Opens the sink in `dir`, truncating every file named in `committed` back to its
    /// committed length (the lines after it were never acknowledged).
    pub fn open(dir: &Path, committed: &HashMap<String, u64>) -> Result<JsonlSink, SinkError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SinkError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for (name, len) in committed {
            let path = dir.join(name);
            if let Ok(meta) = std::fs::metadata(&path)
                && meta.len() > *len
            {
                tracing::warn!(
                    file = %path.display(),
                    committed = len,
                    found = meta.len(),
                    "sink: dropping lines written but never committed (a crash happened between write and commit)"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io(&path))?;
                f.set_len(*len).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
            }
        }
        Ok(JsonlSink {
            dir: dir.to_owned(),
            open: HashMap::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current length of `file` (a [`file_name`] or [`summary_file_name`]), creating it
    /// empty if it does not exist.
    pub fn len(&mut self, file: &str) -> Result<u64, SinkError> {
        Ok(self.handle(file)?.1)
    }

    /// Appends `records` (one JSON line each: [`SinkRecord`]s or [`SummaryRecord`]s) to
    /// `file` (a [`file_name`] or [`summary_file_name`]) and makes them durable. Returns the
    /// file's new length, to be recorded as committed.
    pub fn append<T: Serialize>(&mut self, file: &str, records: &[T]) -> Result<u64, SinkError> {
        let mut buf = Vec::with_capacity(records.len() * 120);
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        let path = self.dir.join(file);
        let io = |source| SinkError::Io {
            path: path.clone(),
            source,
        };
        let (f, len) = self.handle(file)?;
        if buf.is_empty() {
            return Ok(*len);
        }
        f.write_all(&buf).map_err(io)?;
        f.sync_data().map_err(io)?;
        *len += buf.len() as u64;
        Ok(*len)
    }

    /// Cuts `file` back to `len` bytes (durably): undoes appends that could not be
    /// committed, so that the next commit does not commit them by accident.
    pub fn truncate(&mut self, file: &str, len: u64) -> Result<(), SinkError> {
        let path = self.dir.join(file);
        let io = |source| SinkError::Io {
            path: path.clone(),
            source,
        };
        let (f, cur) = self.handle(file)?;
        if *cur > len {
            f.set_len(len).map_err(io)?;
            f.sync_all().map_err(io)?;
            *cur = len;
        }
        Ok(())
    }

    /// The open handle of `file` and its length, opening (creating) it if needed.
    fn handle(&mut self, file: &str) -> Result<&mut (File, u64), SinkError> {
        let path = self.dir.join(file);
        let io = |source| SinkError::Io {
            path: path.clone(),
            source,
        };
        if !self.open.contains_key(file) {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io)?;
            let len = f.metadata().map_err(io)?.len();
            if len == 0 {
                // A new file (or one never written): make its directory entries durable, or a
                // crash could lose a file whose length is already committed.
                for d in path.parent().into_iter().chain([self.dir.as_path()]) {
                    File::open(d).and_then(|d| d.sync_all()).map_err(io)?;
                }
            }
            // Keep the number of open files bounded: one per gateway per day, and only the
            // most recent ones matter.
            if self.open.len() >= 256 {
                self.open.clear();
            }
            self.open.insert(file.to_owned(), (f, len));
        }
        self.open
            .get_mut(file)
            .ok_or_else(|| io(std::io::Error::other("sink file vanished")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_utc_days() {
        assert_eq!(file_name("gw", 0), "gw/1970-01-01.jsonl");
        assert_eq!(
            file_name("gw", 1_700_000_000_000_000_000),
            "gw/2023-11-14.jsonl"
        );
        assert_eq!(
            file_name("gw", 951_782_400_000_000_000),
            "gw/2000-02-29.jsonl"
        );
        assert_eq!(file_name("gw", -1), "gw/1969-12-31.jsonl");
        assert_eq!(file_name("gw", i64::MIN), "gw/1677-09-21.jsonl");
        assert_eq!(file_name("gw", i64::MAX), "gw/2262-04-11.jsonl");
        assert_eq!(
            summary_file_name("gw", 1_700_000_000_000_000_000),
            "gw/2023-11-14.summary.jsonl"
        );
    }

    #[test]
    fn summary_lines_have_the_documented_fields() {
        use outpost_protocols::encoding::summary::NumericStats;
        let mut w = WindowSummary {
            window_start_ns: 20_000_000_000,
            window_ns: 10_000_000_000,
            first_ts_ns: 20_000_000_005,
            last_ts_ns: 29_000_000_000,
            first_seq: 7,
            last_seq: 90,
            count: 12,
            last: Value::F64(2.5),
            last_quality: Quality::Uncertain,
            numeric: Some(NumericStats {
                n: 11,
                min: -1.0,
                max: f64::INFINITY, // hostile, but must still give valid JSON
                mean: 0.25,
                stddev: 0.5,
            }),
        };
        let line = serde_json::to_string(&SummaryRecord::new("gw", "s/t", &w, 99)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = vec![
            "gateway",
            "stream",
            "window_start_ns",
            "window_ns",
            "first_ts_ns",
            "last_ts_ns",
            "first_seq",
            "last_seq",
            "count",
            "numeric_count",
            "min",
            "max",
            "mean",
            "stddev",
            "last",
            "last_quality",
            "received_ns",
        ];
        let mut got = keys.clone();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(v["stream"], "s/t");
        assert_eq!(v["first_ts_ns"], 20_000_000_005i64);
        assert_eq!(
            (v["count"].as_u64(), v["numeric_count"].as_u64()),
            (Some(12), Some(11))
        );
        assert_eq!(
            (v["min"].as_f64(), v["mean"].as_f64()),
            (Some(-1.0), Some(0.25))
        );
        assert!(v["max"].is_null());
        assert_eq!(v["last"], 2.5);
        assert_eq!(v["last_quality"], "uncertain");
        assert_eq!(v["received_ns"], 99);
        w.numeric = None;
        w.last = Value::text("stopped");
        let v = serde_json::to_value(SummaryRecord::new("gw", "s/t", &w, 99)).unwrap();
        assert_eq!(v["numeric_count"], 0);
        assert!(v["min"].is_null() && v["max"].is_null() && v["stddev"].is_null());
        assert_eq!(v["last"], "stopped");
    }

    #[test]
    fn truncate_undoes_appends_and_len_creates_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = JsonlSink::open(dir.path(), &HashMap::new()).unwrap();
        assert_eq!(sink.len("gw/new.summary.jsonl").unwrap(), 0);
        assert!(dir.path().join("gw/new.summary.jsonl").exists());
        let v = Value::I64(1);
        let rec = SinkRecord {
            gateway: "gw",
            stream: "s",
            seq: 1,
            ts_ns: 1,
            value: &v,
            quality: Quality::Good,
            received_ns: 1,
        };
        let one = sink
            .append("gw/d.jsonl", std::slice::from_ref(&rec))
            .unwrap();
        let two = sink
            .append("gw/d.jsonl", std::slice::from_ref(&rec))
            .unwrap();
        sink.truncate("gw/d.jsonl", one).unwrap();
        assert_eq!(sink.len("gw/d.jsonl").unwrap(), one);
        // Appends continue at the cut, not at the old end.
        assert_eq!(sink.append("gw/d.jsonl", &[rec]).unwrap(), two);
        let text = std::fs::read_to_string(dir.path().join("gw/d.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn uncommitted_tails_are_truncated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let v = Value::F64(1.5);
        let rec = |seq| SinkRecord {
            gateway: "gw",
            stream: "s",
            seq,
            ts_ns: 7,
            value: &v,
            quality: Quality::Good,
            received_ns: 9,
        };
        let mut sink = JsonlSink::open(dir.path(), &HashMap::new()).unwrap();
        let committed = sink.append("gw/d.jsonl", &[rec(1), rec(2)]).unwrap();
        let after = sink.append("gw/d.jsonl", &[rec(3)]).unwrap();
        assert!(after > committed);
        drop(sink);
        let map = HashMap::from([("gw/d.jsonl".to_owned(), committed)]);
        let mut sink = JsonlSink::open(dir.path(), &map).unwrap();
        let text = std::fs::read_to_string(dir.path().join("gw/d.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 2);
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["seq"], 1);
        assert_eq!(first["value"], 1.5);
        assert_eq!(first["quality"], "good");
        assert_eq!(sink.append("gw/d.jsonl", &[rec(3)]).unwrap(), after);
    }
}
