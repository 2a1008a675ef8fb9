//! The data model every layer speaks: samples, interned stream ids, priority classes,
//! link classes and sync modes (ARCHITECTURE.md explains what each class and mode means).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

use serde::{Deserialize, Serialize};

/// Longest string value a sample may carry, in bytes. Longer device strings are truncated
/// at a character boundary by [`Value::text`].
pub const MAX_STR_LEN: usize = 255;

/// Most distinct stream names one process interns. Stream names can come from the network
/// (an MQTT topic segment), so the interner is bounded.
pub const MAX_STREAMS: usize = 1 << 20;

/// Nanoseconds since the Unix epoch, UTC.
pub type TimestampNs = i64;

/// Current wall-clock time in ns since the Unix epoch (UTC).
pub fn now_ns() -> TimestampNs {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// An interned stream name: cheap to copy, compare and hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(u32);

/// Raised when the interner is full or a name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamNameError {
    #[error("stream name is empty")]
    Empty,
    #[error("stream name is {0} bytes long; at most {MAX_STR_LEN} are allowed")]
    TooLong(usize),
    #[error("stream name contains a control character")]
    ControlChar,
    #[error("too many distinct streams (limit {MAX_STREAMS})")]
    Full,
}

#[derive(Default)]
struct Interner {
    by_name: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

fn interner() -> &'static RwLock<Interner> {
    static INTERNER: OnceLock<RwLock<Interner>> = OnceLock::new();
    INTERNER.get_or_init(Default::default)
}

impl StreamId {
    /// Interns `name` (validated: non-empty, ≤ 255 bytes, no control characters).
    pub fn intern(name: &str) -> Result<StreamId, StreamNameError> {
        if name.is_empty() {
            return Err(StreamNameError::Empty);
        }
        if name.len() > MAX_STR_LEN {
            return Err(StreamNameError::TooLong(name.len()));
        }
        if name.chars().any(char::is_control) {
            return Err(StreamNameError::ControlChar);
        }
        let lock = interner();
        if let Some(id) = lock
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_name
            .get(name)
        {
            return Ok(StreamId(*id));
        }
        let mut w = lock.write().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = w.by_name.get(name) {
            return Ok(StreamId(*id));
        }
        if w.names.len() >= MAX_STREAMS {
            return Err(StreamNameError::Full);
        }
        let id = w.names.len() as u32;
        let arc: Arc<str> = Arc::from(name);
        w.names.push(arc.clone());
        w.by_name.insert(arc, id);
        Ok(StreamId(id))
    }

    /// The stream's name.
    pub fn name(self) -> Arc<str> {
        let r = interner().read().unwrap_or_else(|e| e.into_inner());
        // An id only exists if it was handed out by `intern`, so the index is in range.
        r.names
            .get(self.0 as usize)
            .cloned()
            .unwrap_or_else(|| Arc::from("<unknown>"))
    }

    /// The process-local index (not stable across processes; never put it on the wire).
    pub fn index(self) -> u32 {
        self.0
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({:?})", &*self.name())
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A sample's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    F64(f64),
    I64(i64),
    Bool(bool),
    /// At most [`MAX_STR_LEN`] bytes; build it with [`Value::text`].
    Str(Box<str>),
}

impl Value {
    /// A string value, truncated to [`MAX_STR_LEN`] bytes at a character boundary.
    pub fn text(s: &str) -> Value {
        let mut end = s.len().min(MAX_STR_LEN);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        Value::Str(s[..end].into())
    }

    /// The value as f64 where it is numeric (bool maps to 0/1); `None` for strings.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::I64(v) => Some(*v as f64),
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Str(_) => None,
        }
    }
}

/// Quality of a reading, as OPC-UA status codes map to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Quality {
    Good = 0,
    Uncertain = 1,
    Bad = 2,
}

impl Quality {
    /// Maps an OPC-UA status code (severity in the two top bits) to a quality.
    pub fn from_opcua_status(code: u32) -> Quality {
        match code >> 30 {
            0 => Quality::Good,
            1 => Quality::Uncertain,
            _ => Quality::Bad,
        }
    }

    pub fn from_u8(v: u8) -> Option<Quality> {
        match v {
            0 => Some(Quality::Good),
            1 => Some(Quality::Uncertain),
            2 => Some(Quality::Bad),
            _ => None,
        }
    }
}

/// One reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub stream: StreamId,
    /// Source timestamp, ns since the Unix epoch (UTC).
    pub ts_ns: TimestampNs,
    pub value: Value,
    pub quality: Quality,
}

impl Sample {
    pub fn new(stream: StreamId, ts_ns: TimestampNs, value: Value) -> Sample {
        Sample {
            stream,
            ts_ns,
            value,
            quality: Quality::Good,
        }
    }
}

/// Priority classes, highest first. The discriminant is the on-disk and on-wire code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Priority {
    /// Config, model rounds. Never evicted.
    Control = 0,
    /// Alarms. Never evicted.
    Critical = 1,
    /// Telemetry. Evicted oldest-first after bulk.
    Normal = 2,
    /// Analytics, backfill. Evicted first.
    Bulk = 3,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Control,
        Priority::Critical,
        Priority::Normal,
        Priority::Bulk,
    ];

    pub fn from_u8(v: u8) -> Option<Priority> {
        Priority::ALL.get(v as usize).copied()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Control => "control",
            Priority::Critical => "critical",
            Priority::Normal => "normal",
            Priority::Bulk => "bulk",
        }
    }

    /// Whether the outbox may evict records of this class to stay within its quota.
    pub fn evictable(self) -> bool {
        matches!(self, Priority::Normal | Priority::Bulk)
    }
}

/// Uplink classes, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum LinkClass {
    Fiber = 0,
    Broadband = 1,
    Mobile = 2,
    Satellite = 3,
    Intermittent = 4,
}

impl LinkClass {
    pub const ALL: [LinkClass; 5] = [
        LinkClass::Fiber,
        LinkClass::Broadband,
        LinkClass::Mobile,
        LinkClass::Satellite,
        LinkClass::Intermittent,
    ];

    /// The sync mode that suits this class (what `[sync] mode = "auto"` follows).
    pub fn sync_mode(self) -> SyncMode {
        match self {
            LinkClass::Fiber => SyncMode::Full,
            LinkClass::Broadband => SyncMode::FullZstd,
            LinkClass::Mobile => SyncMode::Delta,
            LinkClass::Satellite => SyncMode::Summary,
            LinkClass::Intermittent => SyncMode::StoreAndForward,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LinkClass::Fiber => "fiber",
            LinkClass::Broadband => "broadband",
            LinkClass::Mobile => "mobile",
            LinkClass::Satellite => "satellite",
            LinkClass::Intermittent => "intermittent",
        }
    }
}

/// How the sync actor ships data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum SyncMode {
    Full = 0,
    FullZstd = 1,
    Delta = 2,
    Summary = 3,
    StoreAndForward = 4,
}

impl SyncMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::FullZstd => "full_zstd",
            SyncMode::Delta => "delta",
            SyncMode::Summary => "summary",
            SyncMode::StoreAndForward => "store_and_forward",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_is_stable_and_validated() {
        let a = StreamId::intern("plant/a/temp").unwrap();
        let b = StreamId::intern("plant/a/temp").unwrap();
        assert_eq!(a, b);
        assert_eq!(&*a.name(), "plant/a/temp");
        assert_eq!(StreamId::intern(""), Err(StreamNameError::Empty));
        assert_eq!(
            StreamId::intern(&"x".repeat(300)),
            Err(StreamNameError::TooLong(300))
        );
        assert_eq!(StreamId::intern("a\nb"), Err(StreamNameError::ControlChar));
    }

    #[test]
    fn text_values_are_truncated_on_char_boundaries() {
        let s = "é".repeat(200); // 400 bytes
        match Value::text(&s) {
            Value::Str(t) => {
                assert!(t.len() <= MAX_STR_LEN);
                assert_eq!(t.len() % 2, 0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn opcua_status_maps_to_quality() {
        assert_eq!(Quality::from_opcua_status(0), Quality::Good);
        assert_eq!(Quality::from_opcua_status(0x4000_0000), Quality::Uncertain);
        assert_eq!(Quality::from_opcua_status(0x8000_0000), Quality::Bad);
        assert_eq!(Quality::from_opcua_status(0xC000_0000), Quality::Bad);
    }

    #[test]
    fn classes_map_to_modes_and_codes_round_trip() {
        assert_eq!(LinkClass::Mobile.sync_mode(), SyncMode::Delta);
        assert_eq!(
            LinkClass::Intermittent.sync_mode(),
            SyncMode::StoreAndForward
        );
        for p in Priority::ALL {
            assert_eq!(Priority::from_u8(p as u8), Some(p));
        }
        assert!(Priority::Control < Priority::Bulk);
        assert!(!Priority::Critical.evictable() && Priority::Bulk.evictable());
    }
}
