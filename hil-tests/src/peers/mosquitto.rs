//! Mosquitto (Debian's `mosquitto` and `mosquitto-clients`) as a test peer: a broker on an
//! ephemeral loopback port, restartable on the same port, killed on `Drop`; publishing
//! with `mosquitto_pub`; and the telemetry readings the MQTT tests and benchmarks publish,
//! with the check that each reading arrived exactly once (a function over decoded samples,
//! so the same check serves at the outbox and at the hub sink).
//!
//! `OUTPOST_MOSQUITTO` names the broker binary (default `/usr/sbin/mosquitto`); the client
//! programs are looked up next to it, then on `PATH`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_runtime::{Sample, Value};

const INSTALL: &str = "install it with `apt-get install mosquitto mosquitto-clients`, or run \
                       `hil-tests/run-tests.sh`, which installs the test peers";

/// The broker binary: `$OUTPOST_MOSQUITTO` or `/usr/sbin/mosquitto`; an error naming the
/// install step if it is missing.
pub fn find_broker() -> Result<PathBuf, String> {
    let p = std::env::var_os("OUTPOST_MOSQUITTO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/mosquitto"));
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "the Mosquitto broker ({}) is missing: {INSTALL}",
            p.display()
        ))
    }
}

/// [`find_broker`], panicking if the broker is missing.
pub fn broker_binary() -> PathBuf {
    find_broker().unwrap_or_else(|e| panic!("{e}"))
}

/// A Mosquitto client program (`mosquitto_pub`, `mosquitto_sub`). Panics if missing.
pub fn client_binary(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = vec![PathBuf::from("/usr/bin")];
    if let Some(dir) = broker_binary().parent() {
        dirs.insert(0, dir.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is missing: {INSTALL}"))
}

/// A running Mosquitto broker on `127.0.0.1:port`.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    persistent: bool,
    /// Extra configuration lines (more listeners, TLS, authentication).
    extra: String,
}

impl Mosquitto {
    /// A broker without persistence: sessions and queued messages live in memory only.
    pub fn start() -> Mosquitto {
        Mosquitto::start_with(false)
    }

    /// A broker that saves sessions and queued messages to disk when it stops (SIGTERM),
    /// so [`restart`](Self::restart) keeps persistent sessions and unacknowledged QoS 1
    /// messages, as a production broker would.
    pub fn start_persistent() -> Mosquitto {
        Mosquitto::start_with(true)
    }

    /// A broker (without persistence) on a given loopback port.
    pub fn start_on(port: u16) -> Mosquitto {
        Mosquitto::start_at(port, false)
    }

    fn start_with(persistent: bool) -> Mosquitto {
        Mosquitto::start_at(super::free_port(), persistent)
    }

    fn start_at(port: u16, persistent: bool) -> Mosquitto {
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        // Started as root, mosquitto drops to the `mosquitto` user: it must be able to
        // write its log and persistence file here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .expect("cannot open up the broker's directory");
        let mut m = Mosquitto {
            child: None,
            port,
            dir,
            persistent,
            extra: String::new(),
        };
        m.spawn();
        m
    }

    /// A broker (without persistence) whose configuration gets `extra` appended; `extra`
    /// may use `{dir}` for the broker's own folder (readable by the broker's user), which
    /// `files` are copied into first (name, bytes). With `allow_anonymous` in `extra`, the
    /// default `allow_anonymous true` is left out.
    pub fn start_configured(extra: &str, files: &[(&str, &[u8])]) -> Mosquitto {
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .expect("cannot open up the broker's directory");
        for (name, bytes) in files {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).expect("cannot write a broker file");
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .expect("cannot open up a broker file");
        }
        let extra = extra.replace("{dir}", &dir.path().display().to_string());
        let mut m = Mosquitto {
            child: None,
            port: super::free_port(),
            dir,
            persistent: false,
            extra,
        };
        m.spawn();
        m
    }

    /// The broker's folder.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, as a device's `broker` setting.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let anonymous = if self.extra.contains("allow_anonymous") {
            ""
        } else {
            "allow_anonymous true\n"
        };
        let mut text = format!(
            "listener {port} 127.0.0.1\n\
             {anonymous}\
             max_inflight_messages 1000\n\
             max_queued_messages 1000000\n\
             max_queued_bytes 0\n\
             log_dest file {log}\n\
             log_type error\nlog_type warning\nlog_type notice\n",
            port = self.port,
            log = self.log_path().display(),
        );
        if self.persistent {
            text.push_str(&format!(
                "persistence true\npersistence_location {}/\nautosave_interval 0\n",
                self.dir.path().display()
            ));
        } else {
            text.push_str("persistence false\n");
        }
        text.push_str(&self.extra);
        std::fs::write(&conf, text).expect("cannot write mosquitto.conf");
        let child = Command::new(broker_binary())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start mosquitto: {e}; {INSTALL}"));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "mosquitto exited at start ({status}); its log:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                panic!("mosquitto does not accept connections on {addr} after 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker with SIGTERM (it saves its persistence file) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same port (after [`stop`](Self::stop), or stops it
    /// first).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The broker's process id while it runs (its CPU and memory are in /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the broker process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `mosquitto_pub` to the broker on loopback `port`, at `qos`, on `topic`, reading its
/// message(s) from a piped stdin: add `-l` (a message per line) or `-s` (one message),
/// credentials or other flags, then spawn.
pub fn mosquitto_pub(port: u16, qos: u8, topic: &str) -> Command {
    let mut c = Command::new(client_binary("mosquitto_pub"));
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        &qos.to_string(),
    ])
    .args(["-t", topic])
    .stdin(Stdio::piped())
    .stdout(Stdio::null());
    c
}

/// A running `mosquitto_pub -l` (one message per line of its stdin).
pub struct Publisher {
    child: Child,
}

impl Publisher {
    /// Starts `mosquitto_pub -l` publishing each of `lines` to `topic` with `qos`; the
    /// lines are written from a thread so the caller is not blocked.
    pub fn lines(port: u16, topic: &str, qos: u8, lines: Vec<String>) -> Publisher {
        let mut child = mosquitto_pub(port, qos, topic)
            .arg("-l")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start mosquitto_pub: {e}; {INSTALL}"));
        let mut stdin = child.stdin.take().expect("piped stdin");
        std::thread::spawn(move || {
            let mut buf = String::with_capacity(lines.len() * 64);
            for l in &lines {
                buf.push_str(l);
                buf.push('\n');
            }
            let _ = stdin.write_all(buf.as_bytes());
        });
        Publisher { child }
    }

    /// Waits until every line is published (QoS 1: acknowledged by the broker); panics
    /// when `mosquitto_pub` fails.
    pub fn wait(mut self) {
        let status = self.child.wait().expect("cannot wait for mosquitto_pub");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert!(status.success(), "mosquitto_pub failed ({status}): {err}");
    }
}

/// Publishes one message with arbitrary bytes (read by `mosquitto_pub -s` from stdin).
pub fn publish_bytes(port: u16, topic: &str, qos: u8, payload: &[u8]) {
    let mut child = mosquitto_pub(port, qos, topic)
        .arg("-s")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start mosquitto_pub: {e}; {INSTALL}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(payload)
        .expect("cannot write to mosquitto_pub");
    drop(stdin);
    let out = child.wait_with_output().expect("mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Epoch of the readings' source timestamps (ms); reading `n` is stamped `EPOCH_MS + n`.
pub const EPOCH_MS: i64 = 1_700_000_000_000;

/// Reading `n` as JSON: a unique counter `n`, a value `v` and a source timestamp `ts` (ms).
pub fn telemetry_line(n: u64) -> String {
    format!(
        r#"{{"n":{n},"v":{}.{},"ts":{}}}"#,
        20 + n % 10,
        n % 100,
        EPOCH_MS + n as i64
    )
}

/// The `[[devices]]` table of an MQTT device that takes [`telemetry_line`] readings from
/// `plant/+/telemetry`: streams `plant/{1}/n` (the counter) and `plant/{1}/v`, timestamps
/// from the payload. `version` is `"5"` or `"3.1.1"`.
pub fn telemetry_device_toml(name: &str, broker: &str, version: &str) -> String {
    format!(
        r#"
[[devices]]
name = "{name}"
[devices.mqtt]
broker = "{broker}"
version = "{version}"
reconnect = {{ initial = "50ms", max = "1s" }}
[[devices.mqtt.subscriptions]]
topic = "plant/+/telemetry"
qos = 1
format = "json"
timestamp_pointer = "/ts"
[[devices.mqtt.subscriptions.fields]]
pointer = "/n"
stream = "plant/{{1}}/n"
[[devices.mqtt.subscriptions.fields]]
pointer = "/v"
stream = "plant/{{1}}/v"
"#
    )
}

/// How often each reading counter was seen.
#[derive(Debug, Default, Clone)]
pub struct CounterCheck {
    /// Counter value → occurrences.
    pub seen: BTreeMap<i64, u32>,
    /// Counter samples whose timestamp does not match their counter.
    pub bad_timestamps: usize,
}

impl CounterCheck {
    /// Collects the counters of [`telemetry_line`] readings: samples of streams ending in
    /// `/n` with an integer value.
    pub fn of<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> CounterCheck {
        let mut c = CounterCheck::default();
        for s in samples {
            if let Value::I64(n) = s.value
                && s.stream.name().ends_with("/n")
            {
                *c.seen.entry(n).or_default() += 1;
                if s.ts_ns != (EPOCH_MS + n) * 1_000_000 {
                    c.bad_timestamps += 1;
                }
            }
        }
        c
    }

    /// Counters in `0..n` never seen.
    pub fn missing(&self, n: u64) -> Vec<i64> {
        (0..n as i64)
            .filter(|i| !self.seen.contains_key(i))
            .collect()
    }

    /// Counters seen more than once, with their count.
    pub fn duplicates(&self) -> Vec<(i64, u32)> {
        self.seen
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(k, c)| (*k, *c))
            .collect()
    }

    /// Extra copies in total (0 when every counter was seen at most once).
    pub fn extra_copies(&self) -> u64 {
        self.seen
            .values()
            .map(|c| u64::from(c.saturating_sub(1)))
            .sum()
    }

    /// Distinct counters in `0..n` seen.
    pub fn distinct_in(&self, n: u64) -> usize {
        self.seen.range(0..n as i64).count()
    }

    /// Panics unless exactly the counters `0..n` were seen, each once, with their
    /// timestamps.
    pub fn assert_exactly_once(&self, n: u64) {
        self.assert_no_loss(n);
        let dups = self.duplicates();
        assert!(
            dups.is_empty(),
            "{} readings duplicated (first: {:?})",
            dups.len(),
            &dups[..dups.len().min(10)]
        );
    }

    /// Panics unless every counter `0..n` was seen (at least once), nothing else was, and
    /// timestamps match.
    pub fn assert_no_loss(&self, n: u64) {
        let missing = self.missing(n);
        assert!(
            missing.is_empty(),
            "{} of {n} readings missing (first: {:?})",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        let extra: Vec<_> = self.seen.range(n as i64..).map(|(k, _)| *k).collect();
        assert!(extra.is_empty(), "unexpected readings {extra:?}");
        assert!(self.seen.keys().all(|k| *k >= 0), "negative counters");
        assert_eq!(self.bad_timestamps, 0, "readings with a wrong timestamp");
    }
}

/// Writes `lines` to `path`, one per line (for tools that read files).
pub fn write_lines(path: &Path, lines: &[String]) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for l in lines {
        writeln!(f, "{l}")?;
    }
    f.flush()
}
