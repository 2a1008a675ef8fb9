//! What the long system tests watch: a gateway config with its Prometheus endpoint on an
//! ephemeral port, a scraper and parser for that endpoint, an in-process capture of the
//! `tracing` events (as the JSON lines `outpost run` would print with `[log] format =
//! "json"`), and a tally of identifiable readings found in the hub's sink.
//!
//! The tests only look at what an operator could see too: the hub's output, the metrics
//! endpoint and the logs. None of it depends on which sync mode the gateway chose.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_runtime::config::{self, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::SinkLine;

/// A gateway config from a TOML `body` (devices, `[storage]`...) and an `[uplink]` section,
/// with the metrics endpoint enabled on `127.0.0.1:0` (read the bound address from
/// `Gateway::metrics_addr`).
pub fn gateway_config_with_metrics(id: &str, data_dir: &Path, body: &str, uplink: &str) -> Config {
    let text = format!(
        r#"
[gateway]
id = "{id}"
data_dir = "{data}"
[metrics]
enabled = true
listen = "127.0.0.1:0"
[supervision]
max_restarts = 100
within = "60s"
backoff = {{ initial = "50ms", max = "1s" }}
{body}
{uplink}
"#,
        data = data_dir.display(),
    );
    config::parse(&text, Path::new("gateway.toml"), Path::new("/"))
        .unwrap_or_else(|e| panic!("gateway config: {e}\n{text}"))
        .strict()
        .unwrap_or_else(|e| panic!("gateway config environment: {e}"))
}

/// Why a scrape failed.
#[derive(Debug)]
pub enum ScrapeError {
    Io(std::io::Error),
    Timeout,
    /// Not a `200` answer.
    Status(String),
}

impl std::fmt::Display for ScrapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScrapeError::Io(e) => write!(f, "metrics endpoint: {e}"),
            ScrapeError::Timeout => write!(f, "metrics endpoint: no answer within 5 s"),
            ScrapeError::Status(s) => write!(f, "metrics endpoint answered {s:?}"),
        }
    }
}

/// `GET /metrics` from the endpoint at `addr` (HTTP/1.1, one connection per scrape);
/// returns the body, at most 16 MiB of it.
pub async fn scrape(addr: SocketAddr) -> Result<Metrics, ScrapeError> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(ScrapeError::Io)?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: outpost\r\nConnection: close\r\n\r\n")
            .await
            .map_err(ScrapeError::Io)?;
        let mut buf = Vec::new();
        (&mut s)
            .take(16 << 20)
            .read_to_end(&mut buf)
            .await
            .map_err(ScrapeError::Io)?;
        Ok::<_, ScrapeError>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| ScrapeError::Timeout)??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(ScrapeError::Status(status.to_owned()));
    }
    Ok(Metrics::parse(body))
}

/// One scrape of a Prometheus / OpenMetrics text page: samples by name and label set.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// `(name, labels sorted by key)` → value.
    samples: BTreeMap<(String, Vec<(String, String)>), f64>,
}

impl Metrics {
    /// Parses the text exposition format (comments skipped, malformed lines ignored).
    pub fn parse(text: &str) -> Metrics {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), Vec::new()),
                Some((name, rest)) => {
                    let Some(inner) = rest.strip_suffix('}') else {
                        continue;
                    };
                    (name.to_owned(), parse_labels(inner))
                }
            };
            samples.insert((name, labels), value);
        }
        Metrics { samples }
    }

    /// The sample `name` (as exposed, e.g. with its `_total` suffix) with exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.sort();
        self.samples.get(&(name.to_owned(), l)).copied()
    }

    /// [`get`](Self::get), 0 when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Sum over every label set of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| *v)
            .sum()
    }
}

fn parse_labels(inner: &str) -> Vec<(String, String)> {
    // Label values of our metrics hold no `"` or `,`; escapes are kept as written.
    let mut out: Vec<(String, String)> = inner
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let v = v.trim().strip_prefix('"')?.strip_suffix('"')?;
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect();
    out.sort();
    out
}

/// The process's `tracing` events as JSON lines, kept in memory.
#[derive(Clone)]
pub struct LogCapture {
    buf: Arc<Mutex<Vec<u8>>>,
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Installs the process-wide subscriber: events passing `filter` (an `EnvFilter`
    /// directive such as `warn`) formatted as `outpost run` does with `[log] format =
    /// "json"` (flattened: `message` and the event's fields at the top level). A test
    /// binary can install it once; panics if a subscriber is already installed.
    pub fn install(filter: &str) -> LogCapture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b2 = Arc::clone(&buf);
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .json()
            .flatten_event(true)
            .with_writer(move || CaptureWriter(Arc::clone(&b2)))
            .try_init()
            .expect("a tracing subscriber was already installed in this test binary");
        LogCapture { buf }
    }

    /// Every captured event, parsed (lines that are not JSON are skipped).
    pub fn events(&self) -> Vec<serde_json::Value> {
        let text = {
            let b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
            String::from_utf8_lossy(&b).into_owned()
        };
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Captured events whose message is `message`.
    pub fn with_message(&self, message: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["message"].as_str() == Some(message))
            .collect()
    }
}

/// How often each integer reading value of one stream appears in the hub's sink.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Reading value → occurrences.
    pub seen: BTreeMap<i64, u32>,
    /// Lines of the stream whose value is not an integer.
    pub not_integer: usize,
}

impl Tally {
    /// The readings of `stream` among `lines`.
    pub fn of(lines: &[SinkLine], stream: &str) -> Tally {
        let mut t = Tally::default();
        for l in lines.iter().filter(|l| l.stream == stream) {
            match l.value.as_i64().or_else(|| {
                l.value
                    .as_f64()
                    .filter(|v| v.fract() == 0.0)
                    .map(|v| v as i64)
            }) {
                Some(n) => *t.seen.entry(n).or_default() += 1,
                None => t.not_integer += 1,
            }
        }
        t
    }

    /// Distinct readings seen.
    pub fn distinct(&self) -> usize {
        self.seen.len()
    }

    /// Readings in `range` never seen.
    pub fn missing(&self, range: std::ops::Range<i64>) -> Vec<i64> {
        range.filter(|n| !self.seen.contains_key(n)).collect()
    }

    /// Readings seen more than once, with their count.
    pub fn duplicates(&self) -> Vec<(i64, u32)> {
        self.seen
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(k, c)| (*k, *c))
            .collect()
    }

    /// Readings seen outside `range` (never published).
    pub fn outside(&self, range: std::ops::Range<i64>) -> Vec<i64> {
        self.seen
            .keys()
            .copied()
            .filter(|n| !range.contains(n))
            .collect()
    }
}

/// `v` as contiguous ranges, for failure messages: `[3..=7, 9..=9]`.
pub fn ranges(v: &[i64]) -> Vec<std::ops::RangeInclusive<i64>> {
    let mut out: Vec<std::ops::RangeInclusive<i64>> = Vec::new();
    for &n in v {
        match out.last_mut() {
            Some(r) if *r.end() + 1 == n => *r = *r.start()..=n,
            _ => out.push(n..=n),
        }
    }
    out
}

/// Warm-up of a gateway whose MQTT devices read `(device, topic)` pairs from the broker on
/// `broker_port`: publishes a probe reading (counter −1) on every topic until each device
/// has stored one (its `outpost_stream_samples_stored_total` is at least 1), so the subscriptions
/// are in place before the first counted reading. Panics after `within`.
pub async fn warm_up(
    metrics: SocketAddr,
    broker_port: u16,
    devices: &[(String, &'static str)],
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let m = scrape(metrics).await.unwrap_or_else(|e| panic!("{e}"));
        let ready = devices
            .iter()
            .all(|(d, _)| m.value("outpost_stream_samples_stored_total", &[("device", d)]) >= 1.0);
        if ready {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the MQTT devices did not store a probe reading within {within:?}"
        );
        for &(_, topic) in devices {
            tokio::task::spawn_blocking(move || {
                crate::peers::mosquitto::publish_bytes(
                    broker_port,
                    topic,
                    1,
                    br#"{"n":-1,"ts":1700000000000}"#,
                )
            })
            .await
            .unwrap_or_else(|e| panic!("publishing a probe reading: {e}"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_text() {
        let m = Metrics::parse(
            "# HELP outpost_outbox_evicted Records evicted\n\
             # TYPE outpost_outbox_evicted counter\n\
             outpost_outbox_evicted_total{class=\"bulk\"} 12\n\
             outpost_outbox_evicted_total{class=\"normal\"} 0\n\
             outpost_x{b=\"2\",a=\"1\"} 0.5\n\
             outpost_plain 7\n\
             # EOF\n",
        );
        assert_eq!(
            m.get("outpost_outbox_evicted_total", &[("class", "bulk")]),
            Some(12.0)
        );
        assert_eq!(m.get("outpost_x", &[("a", "1"), ("b", "2")]), Some(0.5));
        assert_eq!(m.get("outpost_plain", &[]), Some(7.0));
        assert_eq!(m.get("outpost_outbox_evicted_total", &[]), None);
        assert_eq!(m.sum("outpost_outbox_evicted_total"), 12.0);
    }

    #[test]
    fn ranges_group_contiguous_values() {
        assert_eq!(ranges(&[1, 2, 3, 5, 7, 8]), vec![1..=3, 5..=5, 7..=8]);
        assert!(ranges(&[]).is_empty());
    }
}
