//! The hub's JSON-lines sink: one file per gateway per (UTC, arrival) day, one sample per
//! line. Writes are made durable (fsync) before the caller records them as committed; on
//! restart each file is truncated back to its last committed length, so a crash between
//! "written" and "committed" never leaves a line that the gateway will send again.
//!
//! Line format:
//! `{"gateway":…,"stream":…,"seq":…,"ts_ns":…,"value":…,"quality":…,"received_ns":…}`;
//! `ts_ns` is the source timestamp, `received_ns` when the hub received the frame (both ns
//! since the Unix epoch, UTC); `value` is a JSON number, boolean or string (non-finite
//! floats are `null`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// Relative path of a sink file: `<gateway>/<YYYY-MM-DD>.jsonl`.
pub fn file_name(gateway: &str, arrival_ns: TimestampNs) -> String {
    let days = arrival_ns.div_euclid(86_400 * 1_000_000_000);
    let (y, m, d) = civil_from_days(days);
    format!("{gateway}/{y:04}-{m:02}-{d:02}.jsonl")
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Appends sample lines to per-gateway daily files.
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

    /// Appends `records` to `file` (a [`file_name`]) and makes them durable. Returns the
    /// file's new length, to be recorded as committed.
    pub fn append(&mut self, file: &str, records: &[SinkRecord<'_>]) -> Result<u64, SinkError> {
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
            // Keep the number of open files bounded: one per gateway per day, and only the
            // most recent ones matter.
            if self.open.len() >= 256 {
                self.open.clear();
            }
            self.open.insert(file.to_owned(), (f, len));
        }
        let Some((f, len)) = self.open.get_mut(file) else {
            return Err(io(std::io::Error::other("sink file vanished")));
        };
        if buf.is_empty() {
            return Ok(*len);
        }
        f.write_all(&buf).map_err(io)?;
        f.sync_data().map_err(io)?;
        *len += buf.len() as u64;
        Ok(*len)
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
