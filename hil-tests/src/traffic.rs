//! Steady, identifiable MQTT traffic for the long system tests: a [`PacedPublisher`] feeds
//! one `mosquitto_pub -l` with readings `{"n":N,"ts":MS}` (N counts from 0, MS is the wall
//! clock) at a fixed rate, so a test knows exactly which readings were published and when;
//! [`reading_device_toml`] is the gateway device that maps each reading to one sample of a
//! stream whose value is N.

use std::io::Write;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::peers::mosquitto::mosquitto_pub;

/// Reading `n` stamped now: `{"n":n,"ts":<ms since the epoch>}`.
pub fn reading_line(n: u64) -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!(r#"{{"n":{n},"ts":{ms}}}"#)
}

/// The `[[devices]]` table of an MQTT device of `priority` (`critical`, `normal`, `bulk`)
/// subscribed to `topic` at QoS 1 that turns each [`reading_line`] into one sample of
/// `stream` (value N, source timestamp from `ts`).
pub fn reading_device_toml(
    name: &str,
    priority: &str,
    broker: &str,
    topic: &str,
    stream: &str,
) -> String {
    format!(
        r#"
[[devices]]
name = "{name}"
priority = "{priority}"
[devices.mqtt]
broker = "{broker}"
version = "5"
reconnect = {{ initial = "50ms", max = "1s" }}
[[devices.mqtt.subscriptions]]
topic = "{topic}"
qos = 1
format = "json"
timestamp_pointer = "/ts"
[[devices.mqtt.subscriptions.fields]]
pointer = "/n"
stream = "{stream}"
"#
    )
}

/// A `mosquitto_pub -l` publishing [`reading_line`]s 0, 1, 2... at a steady rate until
/// stopped. Reading `n` is written at `start + n / rate` (no catching up in bursts beyond
/// what the schedule says).
pub struct PacedPublisher {
    child: Child,
    written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    feeder: Option<JoinHandle<Result<(), String>>>,
    topic: String,
}

impl PacedPublisher {
    /// Starts publishing to `topic` on the loopback broker at `port` with `qos`, `rate`
    /// readings per second.
    pub fn start(port: u16, topic: &str, qos: u8, rate: f64) -> PacedPublisher {
        assert!(rate > 0.0, "rate must be positive");
        let mut child = mosquitto_pub(port, qos, topic)
            .arg("-l")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start mosquitto_pub: {e}"));
        let mut stdin = child.stdin.take().expect("piped stdin");
        let written = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (w, s) = (Arc::clone(&written), Arc::clone(&stop));
        let feeder = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut n = 0u64;
            while !s.load(Ordering::Acquire) {
                let due = t0 + Duration::from_secs_f64(n as f64 / rate);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep((due - now).min(Duration::from_millis(50)));
                    continue;
                }
                writeln!(stdin, "{}", reading_line(n))
                    .map_err(|e| format!("mosquitto_pub stopped reading: {e}"))?;
                n += 1;
                w.store(n, Ordering::Release);
            }
            Ok(())
        });
        PacedPublisher {
            child,
            written,
            stop,
            feeder: Some(feeder),
            topic: topic.to_owned(),
        }
    }

    /// Readings handed to `mosquitto_pub` so far (`0..published()`).
    pub fn published(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Stops feeding, lets `mosquitto_pub` publish what it was given (at QoS 1: until the
    /// broker acknowledged every reading) and returns how many readings were published.
    /// Panics if `mosquitto_pub` failed.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        let fed = self
            .feeder
            .take()
            .expect("feeder")
            .join()
            .expect("feeder thread panicked");
        // The feeder owned stdin: joining it closed it, so mosquitto_pub sees EOF.
        let status = self.child.wait().expect("cannot wait for mosquitto_pub");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert!(
            fed.is_ok() && status.success(),
            "mosquitto_pub on {} failed ({status}, {fed:?}): {err}",
            self.topic
        );
        self.published()
    }
}

impl Drop for PacedPublisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if self.feeder.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
