//! Pure core of the MQTT source: which subscription a publish matches, which streams its
//! payload feeds, and the samples it yields. No I/O: the driver hands it (topic, payload,
//! arrival time) and gets samples or a counted, named error back.

use std::collections::HashMap;

use outpost_runtime::config::{MqttSubscriptionConfig, PayloadFormat};
use outpost_runtime::model::{Quality, Sample, StreamId, TimestampNs, Value};

/// Default largest payload parsed as JSON or a number; bigger ones are rejected (and
/// counted).
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Why a publish produced no (or fewer) samples.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MappingError {
    #[error("no subscription matches topic {0:?}")]
    NoMatch(String),
    #[error("payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("payload is not UTF-8 text")]
    NotText,
    #[error("payload is not a number: {0:?}")]
    NotANumber(String),
    #[error("payload is not valid JSON: {0}")]
    BadJson(String),
    #[error("JSON pointer {0:?} not found in payload")]
    MissingField(String),
    #[error("value at {0:?} is not a number, boolean or string")]
    BadValue(String),
    #[error("invalid stream name {name:?}: {reason}")]
    BadStream { name: String, reason: String },
    #[error("timestamp at {0:?} is not a number or RFC 3339 text")]
    BadTimestamp(String),
    #[error("stream {0:?} would exceed this device's limit of distinct streams")]
    StreamLimit(String),
}

impl MappingError {
    /// Short label for the `outpost_stream_errors{kind}` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            MappingError::NoMatch(_) => "no_match",
            MappingError::TooLarge { .. } => "too_large",
            MappingError::NotText => "not_text",
            MappingError::NotANumber(_) => "not_a_number",
            MappingError::BadJson(_) => "bad_json",
            MappingError::MissingField(_) => "missing_field",
            MappingError::BadValue(_) => "bad_value",
            MappingError::BadStream { .. } => "bad_stream",
            MappingError::BadTimestamp(_) => "bad_timestamp",
            MappingError::StreamLimit(_) => "stream_limit",
        }
    }
}

/// Does `topic` match the filter? Returns the levels matched by each `+`, in order.
pub fn match_topic<'t>(filter: &str, topic: &'t str) -> Option<Vec<&'t str>> {
    let mut captures = Vec::new();
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => {
                // `#` also matches the parent level itself ("a/#" matches "a").
                // Topics starting with `$` are not matched by a leading wildcard.
                if captures.is_empty() && filter.starts_with('#') && topic.starts_with('$') {
                    return None;
                }
                return Some(captures);
            }
            "+" => {
                let level = t.next()?;
                if captures.is_empty() && filter.starts_with('+') && level.starts_with('$') {
                    return None;
                }
                captures.push(level);
            }
            lit => {
                if t.next()? != lit {
                    return None;
                }
            }
        }
    }
    t.next().is_none().then_some(captures)
}

/// Replaces `{1}`, `{2}`... by the captured levels.
pub fn expand(template: &str, captures: &[&str]) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    expand_into(template, captures, &mut out);
    out
}

/// [`expand`] into `out` (cleared first), reusing its allocation.
pub fn expand_into(template: &str, captures: &[&str], out: &mut String) {
    out.clear();
    if !template.contains('{') {
        out.push_str(template);
        return;
    }
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => {
                match after[..end].parse::<usize>() {
                    Ok(n) if n >= 1 && n <= captures.len() => out.push_str(captures[n - 1]),
                    _ => out.push_str(&rest[start..start + end + 2]),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
}

/// A JSON pointer (RFC 6901) parsed once, so that a lookup allocates nothing
/// (`serde_json::Value::pointer` unescapes every token into new strings on every call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPointer {
    tokens: Vec<String>,
}

impl JsonPointer {
    /// Parses `p` ("" is the whole document; otherwise it starts with '/'); `None` when
    /// malformed (the lookup then finds nothing, as `Value::pointer` would).
    pub fn parse(p: &str) -> Option<JsonPointer> {
        if p.is_empty() {
            return Some(JsonPointer { tokens: Vec::new() });
        }
        let rest = p.strip_prefix('/')?;
        Some(JsonPointer {
            tokens: rest
                .split('/')
                .map(|t| t.replace("~1", "/").replace("~0", "~"))
                .collect(),
        })
    }

    /// The value the pointer names in `doc`.
    pub fn get<'a>(&self, doc: &'a serde_json::Value) -> Option<&'a serde_json::Value> {
        let mut v = doc;
        for t in &self.tokens {
            v = match v {
                serde_json::Value::Object(m) => m.get(t.as_str())?,
                serde_json::Value::Array(a) => {
                    if t.len() > 1 && t.starts_with('0') || t.starts_with('+') {
                        return None;
                    }
                    a.get(t.parse::<usize>().ok()?)?
                }
                _ => return None,
            };
        }
        Some(v)
    }
}

/// The pointers of one subscription, parsed once: its timestamp pointer and one per field.
#[derive(Debug, Clone)]
struct Pointers {
    timestamp: Option<Option<JsonPointer>>,
    fields: Vec<Option<JsonPointer>>,
}

/// Default bound on the distinct streams one MQTT device may create. Streams are named
/// from topic levels, which the broker (or any publisher) controls: without a bound, a
/// flood of distinct topics would fill the process-wide stream table.
pub const MAX_STREAMS_PER_DEVICE: usize = 10_000;

/// Default time after which a silent stream gives its slot back: one hour.
pub const STREAM_IDLE_NS: i64 = 3_600_000_000_000;

/// Silent streams are looked for at most this often (arrival time), so a flood of new
/// names at the limit costs one pass over the table per second, not one per message.
const SWEEP_EVERY_NS: i64 = 1_000_000_000;

/// Bounds of one device's mapping.
#[derive(Debug, Clone, Copy)]
pub struct MapperLimits {
    /// Largest payload parsed.
    pub max_payload: usize,
    /// Distinct streams named at once.
    pub max_streams: usize,
    /// A stream silent this long (ns of arrival time) gives its slot back when a new one
    /// needs it. Its name stays interned: its samples stay valid in the outbox and at the
    /// hub, and it takes a slot again when it speaks again.
    pub stream_idle_ns: i64,
}

impl Default for MapperLimits {
    fn default() -> Self {
        MapperLimits {
            max_payload: MAX_PAYLOAD,
            max_streams: MAX_STREAMS_PER_DEVICE,
            stream_idle_ns: STREAM_IDLE_NS,
        }
    }
}

/// The mapping of one MQTT device: its subscriptions, in config order (first match wins),
/// and the streams it has named recently (at most `max_streams`, with the arrival time of
/// their last sample).
#[derive(Debug, Clone)]
pub struct Mapper {
    subs: Vec<MqttSubscriptionConfig>,
    pointers: Vec<Pointers>,
    streams: HashMap<String, (StreamId, TimestampNs)>,
    limits: MapperLimits,
    last_sweep: Option<TimestampNs>,
    refused: u64,
}

/// Result of mapping one publish: the samples, and the fields that failed.
#[derive(Debug, Default)]
pub struct Mapped {
    pub samples: Vec<Sample>,
    pub errors: Vec<MappingError>,
}

impl Mapper {
    /// A mapper with the default limits ([`MapperLimits::default`]).
    pub fn new(subs: Vec<MqttSubscriptionConfig>) -> Mapper {
        Mapper::with_limits(subs, MapperLimits::default())
    }

    /// A mapper that names at most `max_streams` distinct streams (other limits default);
    /// samples for further names are rejected with [`MappingError::StreamLimit`].
    pub fn with_stream_limit(subs: Vec<MqttSubscriptionConfig>, max_streams: usize) -> Mapper {
        Mapper::with_limits(
            subs,
            MapperLimits {
                max_streams,
                ..MapperLimits::default()
            },
        )
    }

    pub fn with_limits(subs: Vec<MqttSubscriptionConfig>, limits: MapperLimits) -> Mapper {
        let pointers = subs
            .iter()
            .map(|s| Pointers {
                timestamp: s.timestamp_pointer.as_deref().map(JsonPointer::parse),
                fields: s
                    .fields
                    .iter()
                    .map(|f| JsonPointer::parse(&f.pointer))
                    .collect(),
            })
            .collect();
        Mapper {
            subs,
            pointers,
            streams: HashMap::new(),
            limits,
            last_sweep: None,
            refused: 0,
        }
    }

    /// Streams named now.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// Samples refused so far because the device was at its stream limit.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Frees the slots of streams silent for `stream_idle_ns` at `now` (at most once per
    /// second of arrival time).
    fn sweep(&mut self, now: TimestampNs) {
        if self
            .last_sweep
            .is_some_and(|t| now.abs_diff(t) < SWEEP_EVERY_NS as u64)
        {
            return;
        }
        self.last_sweep = Some(now);
        let idle = self.limits.stream_idle_ns;
        self.streams
            .retain(|_, (_, last)| now.saturating_sub(*last) < idle);
    }

    /// The stream named `name`, interned once per mapper; `now` is its sample's arrival.
    fn stream_id(&mut self, name: &str, now: TimestampNs) -> Result<StreamId, MappingError> {
        if let Some((id, last)) = self.streams.get_mut(name) {
            *last = (*last).max(now);
            return Ok(*id);
        }
        if self.streams.len() >= self.limits.max_streams {
            self.sweep(now);
            if self.streams.len() >= self.limits.max_streams {
                self.refused += 1;
                return Err(MappingError::StreamLimit(truncate(name)));
            }
        }
        let id = StreamId::intern(name).map_err(|e| MappingError::BadStream {
            name: truncate(name),
            reason: e.to_string(),
        })?;
        self.streams.insert(name.to_owned(), (id, now));
        Ok(id)
    }

    pub fn subscriptions(&self) -> &[MqttSubscriptionConfig] {
        &self.subs
    }

    /// Maps one publish received at `arrival_ns`.
    pub fn map(&mut self, topic: &str, payload: &[u8], arrival_ns: TimestampNs) -> Mapped {
        let mut out = Mapped::default();
        let Some((index, caps)) = self
            .subs
            .iter()
            .enumerate()
            .find_map(|(i, s)| match_topic(&s.topic, topic).map(|c| (i, c)))
        else {
            out.errors.push(MappingError::NoMatch(truncate(topic)));
            return out;
        };
        if payload.len() > self.limits.max_payload {
            out.errors.push(MappingError::TooLarge {
                len: payload.len(),
                max: self.limits.max_payload,
            });
            return out;
        }
        let sub = &self.subs[index];
        let format = sub.format;
        match format {
            PayloadFormat::Number | PayloadFormat::Raw => {
                let name = expand(sub.stream.as_deref().unwrap_or("{1}"), &caps);
                let id = match self.stream_id(&name, arrival_ns) {
                    Ok(id) => id,
                    Err(e) => {
                        out.errors.push(e);
                        return out;
                    }
                };
                let Ok(text) = std::str::from_utf8(payload) else {
                    out.errors.push(MappingError::NotText);
                    return out;
                };
                let value = if format == PayloadFormat::Raw {
                    Value::text(text)
                } else {
                    match parse_number(text.trim()) {
                        Some(v) => v,
                        None => {
                            out.errors.push(MappingError::NotANumber(truncate(text)));
                            return out;
                        }
                    }
                };
                out.samples.push(Sample {
                    stream: id,
                    ts_ns: arrival_ns,
                    value,
                    quality: Quality::Good,
                });
            }
            PayloadFormat::Json => {
                let doc: serde_json::Value = match serde_json::from_slice(payload) {
                    Ok(d) => d,
                    Err(e) => {
                        out.errors.push(MappingError::BadJson(e.to_string()));
                        return out;
                    }
                };
                let ts = match &self.pointers[index].timestamp {
                    None => arrival_ns,
                    Some(p) => match p
                        .as_ref()
                        .and_then(|p| p.get(&doc))
                        .and_then(json_timestamp)
                    {
                        Some(ts) => ts,
                        None => {
                            out.errors.push(MappingError::BadTimestamp(
                                self.subs[index]
                                    .timestamp_pointer
                                    .clone()
                                    .unwrap_or_default(),
                            ));
                            arrival_ns
                        }
                    },
                };
                let mut name = String::new();
                for fi in 0..self.subs[index].fields.len() {
                    expand_into(&self.subs[index].fields[fi].stream, &caps, &mut name);
                    let id = match self.stream_id(&name, arrival_ns) {
                        Ok(id) => id,
                        Err(e) => {
                            out.errors.push(e);
                            continue;
                        }
                    };
                    let f = &self.subs[index].fields[fi];
                    let Some(v) = self.pointers[index].fields[fi]
                        .as_ref()
                        .and_then(|p| p.get(&doc))
                    else {
                        out.errors
                            .push(MappingError::MissingField(f.pointer.clone()));
                        continue;
                    };
                    let value = match v {
                        serde_json::Value::Number(n) => {
                            if f.scale == 1.0 && f.offset == 0.0 {
                                match n.as_i64() {
                                    Some(i) => Value::I64(i),
                                    None => Value::F64(n.as_f64().unwrap_or(f64::NAN)),
                                }
                            } else {
                                Value::F64(n.as_f64().unwrap_or(f64::NAN) * f.scale + f.offset)
                            }
                        }
                        serde_json::Value::Bool(b) => Value::Bool(*b),
                        serde_json::Value::String(s) => Value::text(s),
                        _ => {
                            out.errors.push(MappingError::BadValue(f.pointer.clone()));
                            continue;
                        }
                    };
                    if matches!(value, Value::F64(x) if !x.is_finite()) {
                        out.errors.push(MappingError::BadValue(f.pointer.clone()));
                        continue;
                    }
                    out.samples.push(Sample {
                        stream: id,
                        ts_ns: ts,
                        value,
                        quality: Quality::Good,
                    });
                }
            }
        }
        out
    }
}

fn truncate(s: &str) -> String {
    match Value::text(&s[..s.len().min(64)]) {
        Value::Str(t) => t.into(),
        _ => String::new(),
    }
}

fn parse_number(s: &str) -> Option<Value> {
    if let Ok(i) = s.parse::<i64>() {
        return Some(Value::I64(i));
    }
    match s {
        "true" => return Some(Value::Bool(true)),
        "false" => return Some(Value::Bool(false)),
        _ => {}
    }
    s.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(Value::F64)
}

/// A JSON timestamp: a number of s, ms, µs or ns since the epoch (by magnitude), or RFC 3339.
fn json_timestamp(v: &serde_json::Value) -> Option<TimestampNs> {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                // Integers exactly (f64 would lose ns precision).
                return match i {
                    i if i < 0 => None,
                    i if i < 100_000_000_000 => i.checked_mul(1_000_000_000),
                    i if i < 100_000_000_000_000 => i.checked_mul(1_000_000),
                    i if i < 100_000_000_000_000_000 => i.checked_mul(1_000),
                    i => Some(i),
                };
            }
            let x = n.as_f64()?;
            if !x.is_finite() || x < 0.0 {
                return None;
            }
            let ns = if x < 1e11 {
                x * 1e9 // seconds
            } else if x < 1e14 {
                x * 1e6 // milliseconds
            } else if x < 1e17 {
                x * 1e3 // microseconds
            } else {
                x
            };
            (ns < 9.2e18).then_some(ns as i64)
        }
        serde_json::Value::String(s) => parse_rfc3339(s),
        _ => None,
    }
}

/// RFC 3339 (`2026-11-21T08:59:00.123Z`, `+01:00` offsets; `T`, `t` or a space between
/// date and time) to ns since the epoch. Impossible dates and times (`2023-02-31`, `24:00`)
/// are refused: the calendar is the `time` crate's.
fn parse_rfc3339(s: &str) -> Option<TimestampNs> {
    use time::format_description::well_known::Rfc3339;
    // The time crate takes any byte between date and time; RFC 3339 allows these.
    if !matches!(s.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    let t = time::OffsetDateTime::parse(s, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos()).ok()
}

#[cfg(test)]
mod pointer_tests {
    use super::*;

    #[test]
    fn parsed_pointers_find_what_serde_json_finds() {
        let doc: serde_json::Value =
            serde_json::from_str(r#"{"a":{"b/c":[10,{"~d":true}],"":1},"x":[0,1,2],"01":5}"#)
                .unwrap();
        for p in [
            "",
            "/a",
            "/a/b~1c",
            "/a/b~1c/0",
            "/a/b~1c/1/~0d",
            "/a/",
            "/x/2",
            "/x/02",
            "/x/+1",
            "/x/3",
            "/x/-",
            "/01",
            "/nope",
            "a",
            "/a/b~1c/1/~0d/deeper",
        ] {
            let ours = JsonPointer::parse(p).and_then(|jp| jp.get(&doc).cloned());
            assert_eq!(ours, doc.pointer(p).cloned(), "pointer {p:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_runtime::config::{Bounded, JsonFieldConfig};

    fn sub(topic: &str, format: PayloadFormat, stream: Option<&str>) -> MqttSubscriptionConfig {
        MqttSubscriptionConfig {
            topic: topic.into(),
            qos: Bounded(1),
            format,
            stream: stream.map(Into::into),
            fields: vec![],
            timestamp_pointer: None,
        }
    }

    #[test]
    fn topic_matching_follows_mqtt_rules() {
        assert_eq!(match_topic("a/+/c", "a/b/c"), Some(vec!["b"]));
        assert_eq!(match_topic("a/+/c", "a/b/d"), None);
        assert_eq!(match_topic("a/#", "a/b/c"), Some(vec![]));
        assert_eq!(match_topic("a/#", "a"), Some(vec![]));
        assert_eq!(match_topic("+/+", "x/y"), Some(vec!["x", "y"]));
        assert_eq!(match_topic("a/b", "a/b/c"), None);
        assert_eq!(match_topic("a/b/c", "a/b"), None);
        assert_eq!(match_topic("#", "$SYS/x"), None);
        assert_eq!(match_topic("+/x", "$SYS/x"), None);
        assert_eq!(match_topic("a/+", "a/"), Some(vec![""]));
    }

    #[test]
    fn templates_expand() {
        assert_eq!(expand("plant/{1}/t", &["m7"]), "plant/m7/t");
        assert_eq!(expand("{2}-{1}", &["a", "b"]), "b-a");
        assert_eq!(expand("x/{3}", &["a"]), "x/{3}");
        assert_eq!(expand("x/{", &["a"]), "x/{");
    }

    #[test]
    fn json_fields_become_samples() {
        let mut s = sub("plant/+/sensors", PayloadFormat::Json, None);
        s.timestamp_pointer = Some("/ts".into());
        s.fields = vec![
            JsonFieldConfig {
                pointer: "/temp".into(),
                stream: "plant/{1}/temp".into(),
                scale: 1.0,
                offset: 0.0,
            },
            JsonFieldConfig {
                pointer: "/p".into(),
                stream: "plant/{1}/p".into(),
                scale: 0.5,
                offset: 1.0,
            },
            JsonFieldConfig {
                pointer: "/on".into(),
                stream: "plant/{1}/on".into(),
                scale: 1.0,
                offset: 0.0,
            },
            JsonFieldConfig {
                pointer: "/missing".into(),
                stream: "plant/{1}/m".into(),
                scale: 1.0,
                offset: 0.0,
            },
        ];
        let mut m = Mapper::new(vec![s]);
        let out = m.map(
            "plant/m7/sensors",
            br#"{"temp": 21, "p": 4.0, "on": true, "ts": 1700000000123}"#,
            5,
        );
        assert_eq!(out.samples.len(), 3);
        assert_eq!(&*out.samples[0].stream.name(), "plant/m7/temp");
        assert_eq!(out.samples[0].value, Value::I64(21));
        assert_eq!(out.samples[1].value, Value::F64(3.0));
        assert_eq!(out.samples[2].value, Value::Bool(true));
        assert_eq!(out.samples[0].ts_ns, 1_700_000_000_123_000_000);
        assert_eq!(
            out.errors,
            vec![MappingError::MissingField("/missing".into())]
        );
    }

    #[test]
    fn numbers_raw_and_garbage() {
        let mut m = Mapper::new(vec![
            sub("n/+", PayloadFormat::Number, Some("num/{1}")),
            sub("r/#", PayloadFormat::Raw, Some("raw")),
        ]);
        assert_eq!(
            m.map("n/a", b" 21.5\n", 1).samples[0].value,
            Value::F64(21.5)
        );
        assert_eq!(m.map("n/a", b"-3", 1).samples[0].value, Value::I64(-3));
        assert_eq!(m.map("n/a", b"NaN", 1).errors[0].kind(), "not_a_number");
        assert_eq!(m.map("n/a", &[0xff, 0xfe], 1).errors[0].kind(), "not_text");
        assert_eq!(
            m.map("r/x/y", b"hello", 1).samples[0].value,
            Value::text("hello")
        );
        assert_eq!(m.map("zzz", b"1", 1).errors[0].kind(), "no_match");
        let big = vec![b'1'; MAX_PAYLOAD + 1];
        assert_eq!(m.map("n/a", &big, 1).errors[0].kind(), "too_large");
    }

    #[test]
    fn hostile_topic_levels_cannot_make_bad_streams() {
        let mut m = Mapper::new(vec![sub("n/+", PayloadFormat::Number, Some("num/{1}"))]);
        let long = format!("n/{}", "x".repeat(400));
        assert_eq!(m.map(&long, b"1", 1).errors[0].kind(), "bad_stream");
        assert_eq!(m.map("n/a\u{7}b", b"1", 1).errors[0].kind(), "bad_stream");
    }

    #[test]
    fn a_device_names_a_bounded_number_of_streams() {
        let mut m = Mapper::with_stream_limit(
            vec![sub("n/+", PayloadFormat::Number, Some("limit-test/{1}"))],
            2,
        );
        assert!(m.map("n/a", b"1", 1).errors.is_empty());
        assert!(m.map("n/b", b"1", 1).errors.is_empty());
        assert!(m.map("n/a", b"2", 1).errors.is_empty());
        let out = m.map("n/c", b"1", 1);
        assert!(out.samples.is_empty());
        assert_eq!(out.errors[0].kind(), "stream_limit");
    }

    /// A flood of distinct topics used to hold the device's stream slots until restart.
    #[test]
    fn a_silent_stream_gives_its_slot_back() {
        let h = 3_600_000_000_000i64;
        let mut m = Mapper::with_stream_limit(
            vec![sub("n/+", PayloadFormat::Number, Some("idle-test/{1}"))],
            2,
        );
        let a = m.map("n/a", b"1", 0).samples[0].stream;
        assert!(m.map("n/b", b"1", 0).errors.is_empty());
        // Nobody silent for an hour yet: refused.
        assert_eq!(m.map("n/c", b"1", h / 2).errors[0].kind(), "stream_limit");
        // b keeps talking, a stays silent past the hour: its slot goes to c.
        assert!(m.map("n/b", b"2", h).errors.is_empty());
        let c = m.map("n/c", b"1", h + h / 2);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        assert_eq!(
            m.map("n/a", b"1", h + h / 2 + 1).errors[0].kind(),
            "stream_limit"
        );
        // Once others fall silent, a speaks again under the same (still valid) name.
        let again = m.map("n/a", b"3", 4 * h);
        assert_eq!(again.samples[0].stream, a);
    }

    #[test]
    fn refusals_are_counted_and_limits_are_the_configured_ones() {
        let mut m = Mapper::with_limits(
            vec![sub("n/+", PayloadFormat::Number, Some("limits-test/{1}"))],
            MapperLimits {
                max_payload: 4,
                max_streams: 1,
                stream_idle_ns: 10,
            },
        );
        assert!(m.map("n/a", b"1", 0).errors.is_empty());
        assert_eq!(m.map("n/b", b"1", 5).errors[0].kind(), "stream_limit");
        assert_eq!(m.map("n/c", b"1", 6).errors[0].kind(), "stream_limit");
        assert_eq!(m.refused(), 2);
        assert_eq!(
            m.map("n/a", b"12345", 7).errors[0],
            MappingError::TooLarge { len: 5, max: 4 }
        );
        // A sweep runs at most once a second of arrival time.
        assert_eq!(m.map("n/b", b"1", 20).errors[0].kind(), "stream_limit");
        assert!(m.map("n/b", b"1", 2_000_000_000).errors.is_empty());
        assert_eq!(m.streams(), 1);
    }

    #[test]
    fn rfc3339_timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.5Z"),
            Some(1_700_000_000_500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20+01:00"),
            Some(1_700_000_000_000_000_000)
        );
        assert_eq!(parse_rfc3339("2023-13-14T23:13:20Z"), None);
        assert_eq!(parse_rfc3339("garbage"), None);
        assert_eq!(parse_rfc3339("2023-11-14T23:13:20.Z"), None);
    }

    #[test]
    fn impossible_dates_are_refused() {
        for bad in [
            "2023-02-31T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2023-04-31T12:00:00Z",
            "1900-02-29T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "2023-11-14T23:60:00Z",
            "2023-11-14T23:13:20+24:00",
            "2023-11-14X23:13:20Z",
            "2023-11-14T23:13:20Zjunk",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        // Leap days that exist, the other separators RFC 3339 allows, and offsets.
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00Z"),
            Some(1_709_164_800_000_000_000)
        );
        assert_eq!(
            parse_rfc3339("2000-02-29t00:00:00z"),
            Some(951_782_400_000_000_000)
        );
        assert_eq!(
            parse_rfc3339("2023-11-14 22:13:20.123456789Z"),
            Some(1_700_000_000_123_456_789)
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T17:43:20-04:30"),
            Some(1_700_000_000_000_000_000)
        );
        // Before the epoch: negative, as the numbers count.
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Some(-1_000_000_000));
        // The payload path: an impossible date is a timestamp error (the sample keeps its
        // arrival time, as for any unreadable timestamp), never a date in March.
        let mut s = sub("d/t", PayloadFormat::Json, None);
        s.timestamp_pointer = Some("/t".into());
        s.fields = vec![JsonFieldConfig {
            pointer: "/v".into(),
            stream: "rfc3339/v".into(),
            scale: 1.0,
            offset: 0.0,
        }];
        let mut m = Mapper::new(vec![s]);
        let out = m.map("d/t", br#"{"v": 1, "t": "2023-02-31T00:00:00Z"}"#, 5);
        assert_eq!(out.errors, vec![MappingError::BadTimestamp("/t".into())]);
        assert_eq!(out.samples[0].ts_ns, 5);
    }
}
