//! A pymodbus TCP server as a test peer (`hil-tests/py/modbus_server.py`), plus the known
//! values it holds and the check that samples match them.
//!
//! The values are described once as [`KnownPoint`]s: the server encodes them itself (with
//! Python's `struct`, independently of Outpost's codec), the gateway config is generated
//! from the same list, and [`verify_samples`] checks decoded samples against it — at the
//! outbox now, at the hub's sink once the hub end-to-end test exists.
//!
//! The interpreter is `OUTPOST_PYTHON` (the venv `hil-tests/run-tests.sh` builds from
//! `hil-tests/requirements.txt`). Without it, or without pymodbus in it, starting the peer
//! panics with the install step.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost_runtime::model::{Priority, Quality, Sample, Value};
use serde_json::{Value as Json, json};

/// How to get a Python with pymodbus.
pub const INSTALL: &str = "the pymodbus test peer needs OUTPOST_PYTHON: create the test venv \
with `python3 -m venv hil-tests/.venv && hil-tests/.venv/bin/pip install -r \
hil-tests/requirements.txt` and run with `OUTPOST_PYTHON=hil-tests/.venv/bin/python` (absolute, \
or relative to the workspace root), or run everything with `hil-tests/run-tests.sh`";

/// The Python interpreter to use, resolved against the workspace root when relative.
pub fn python() -> PathBuf {
    let Some(p) = std::env::var_os("OUTPOST_PYTHON") else {
        panic!("OUTPOST_PYTHON is not set; {INSTALL}");
    };
    let p = PathBuf::from(p);
    if p.is_absolute() {
        return p;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if root.join(&p).exists() {
        root.join(p)
    } else {
        p
    }
}

/// A running pymodbus server. Killed on drop.
pub struct PyModbusServer {
    spec: Json,
    port: u16,
    child: Option<Child>,
}

impl PyModbusServer {
    /// Starts a server holding `points` on a free port of 127.0.0.1.
    pub fn start(points: &[KnownPoint]) -> PyModbusServer {
        Self::start_spec(server_spec(points))
    }

    /// Starts a server from a raw spec (see the script's doc).
    pub fn start_spec(spec: Json) -> PyModbusServer {
        let mut s = PyModbusServer {
            spec,
            port: 0,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/modbus_server.py");
        let mut spec = self.spec.clone();
        spec["port"] = json!(self.port);
        let mut child = Command::new(python())
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL}", python().display()));
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(spec.to_string().as_bytes())
            .expect("write the spec");
        drop(stdin);
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let Some(port) = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse::<u16>().ok())
        else {
            let _ = child.kill();
            let out = child.wait_with_output().ok();
            let err = out
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default();
            panic!("the pymodbus server did not start ({line:?}): {err}\n{INSTALL}");
        };
        self.port = port;
        self.child = Some(child);
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same values.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for PyModbusServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Modbus tables, as named in the gateway config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tbl {
    Coil,
    DiscreteInput,
    Holding,
    Input,
}

impl Tbl {
    fn config_name(self) -> &'static str {
        match self {
            Tbl::Coil => "coil",
            Tbl::DiscreteInput => "discrete_input",
            Tbl::Holding => "holding",
            Tbl::Input => "input",
        }
    }
}

/// A point the server holds with a known raw value, and how the gateway reads it.
#[derive(Debug, Clone)]
pub struct KnownPoint {
    pub stream: String,
    pub table: Tbl,
    pub address: u16,
    /// `bool`, `u16`, `i16`, `u32`, `i32`, `f32`, `f64`.
    pub ty: &'static str,
    /// `big` or `little`.
    pub word_order: &'static str,
    /// `big` or `little`.
    pub byte_order: &'static str,
    pub scale: f64,
    pub offset: f64,
    /// The raw value (0/1 for bools). Integers up to 2^53 are exact.
    pub raw: f64,
}

impl KnownPoint {
    /// An unscaled point in big/big order.
    pub fn new(stream: &str, table: Tbl, address: u16, ty: &'static str, raw: f64) -> Self {
        KnownPoint {
            stream: stream.to_owned(),
            table,
            address,
            ty,
            word_order: "big",
            byte_order: "big",
            scale: 1.0,
            offset: 0.0,
            raw,
        }
    }

    /// With word and byte order.
    pub fn order(mut self, word: &'static str, byte: &'static str) -> Self {
        self.word_order = word;
        self.byte_order = byte;
        self
    }

    /// With scale and offset.
    pub fn scaled(mut self, scale: f64, offset: f64) -> Self {
        self.scale = scale;
        self.offset = offset;
        self
    }

    /// Registers (or bits) it occupies.
    pub fn width(&self) -> u16 {
        match self.ty {
            "u32" | "i32" | "f32" => 2,
            "f64" => 4,
            _ => 1,
        }
    }

    /// The value the gateway must report, by the config reference's rule
    /// (value = raw × scale + offset; unscaled integers stay integers).
    pub fn expected(&self) -> Value {
        let unscaled = self.scale == 1.0 && self.offset == 0.0;
        match self.ty {
            "bool" => Value::Bool(self.raw != 0.0),
            "u16" | "i16" | "u32" | "i32" if unscaled => Value::I64(self.raw as i64),
            "f32" => Value::F64(f64::from(self.raw as f32) * self.scale + self.offset),
            _ => Value::F64(self.raw * self.scale + self.offset),
        }
    }

    /// The point's `[[devices.modbus.poll_groups.points]]` table.
    pub fn config_toml(&self) -> String {
        format!(
            "[[devices.modbus.poll_groups.points]]\nstream = {:?}\ntable = {:?}\naddress = {}\n\
             type = {:?}\nword_order = {:?}\nbyte_order = {:?}\nscale = {:?}\noffset = {:?}\n",
            self.stream,
            self.table.config_name(),
            self.address,
            self.ty,
            self.word_order,
            self.byte_order,
            self.scale,
            self.offset
        )
    }
}

/// The server spec holding `points` (register tables sized to cover every point).
pub fn server_spec(points: &[KnownPoint]) -> Json {
    let mut coils: BTreeMap<u16, bool> = BTreeMap::new();
    let mut dis: BTreeMap<u16, bool> = BTreeMap::new();
    let (mut holding, mut input) = (Vec::new(), Vec::new());
    let (mut hsize, mut isize) = (1u32, 1u32);
    for p in points {
        let end = u32::from(p.address) + u32::from(p.width());
        let reg = json!({"address": p.address, "type": p.ty, "word_order": p.word_order,
                         "byte_order": p.byte_order, "value": p.raw});
        match p.table {
            Tbl::Coil => {
                coils.insert(p.address, p.raw != 0.0);
            }
            Tbl::DiscreteInput => {
                dis.insert(p.address, p.raw != 0.0);
            }
            Tbl::Holding => {
                holding.push(reg);
                hsize = hsize.max(end);
            }
            Tbl::Input => {
                input.push(reg);
                isize = isize.max(end);
            }
        }
    }
    let bits = |m: &BTreeMap<u16, bool>| -> Vec<bool> {
        let n = m.keys().next_back().map_or(1, |&a| usize::from(a) + 1);
        (0..n)
            .map(|a| m.get(&(a as u16)).copied().unwrap_or(false))
            .collect()
    };
    json!({
        "coils": bits(&coils), "discrete_inputs": bits(&dis),
        "holding": holding, "input": input,
        "holding_size": hsize, "input_size": isize,
    })
}

/// A Modbus device table for the gateway config: one poll group per `(interval ms,
/// points)`.
pub fn device_toml(
    name: &str,
    addr: SocketAddr,
    timeout_ms: u64,
    max_gap: u16,
    groups: &[(u64, &[KnownPoint])],
) -> String {
    let mut s = format!(
        "[[devices]]\nname = {name:?}\n[devices.modbus]\naddress = \"{addr}\"\nunit_id = 1\n\
         timeout = \"{timeout_ms}ms\"\nmax_gap = {max_gap}\n"
    );
    for (interval, points) in groups {
        s += &format!("[[devices.modbus.poll_groups]]\ninterval = \"{interval}ms\"\n");
        for p in *points {
            s += &p.config_toml();
        }
    }
    s
}

/// A gateway config for a test: data in `data_dir`, metrics off, the given devices and
/// supervision section (TOML, may be empty).
pub fn gateway_config(
    data_dir: &Path,
    devices: &str,
    supervision: &str,
) -> outpost_runtime::config::Config {
    let text = format!(
        "[gateway]\nid = \"hil-gw\"\ndata_dir = {:?}\n[metrics]\nenabled = false\n\
         [storage]\ncommit_interval = \"10ms\"\n{supervision}\n{devices}",
        data_dir.display().to_string()
    );
    outpost_runtime::config::parse(&text, Path::new("test.toml"), data_dir)
        .unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
        .config
}

/// Every sample in a gateway's outbox, decoded, in sequence order per priority class.
pub fn outbox_samples(gw: &outpost_actors::gateway::Gateway) -> Vec<Sample> {
    let mut out = Vec::new();
    for p in Priority::ALL {
        let recs = gw
            .outbox()
            .scan(p, None, 10_000_000, usize::MAX)
            .expect("scan the outbox");
        for r in recs {
            out.push(outpost_runtime::record::decode(&r.value).expect("decode a record"));
        }
    }
    out
}

/// What [`verify_samples`] found.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Samples per expected stream.
    pub per_stream: BTreeMap<String, usize>,
}

impl Verified {
    /// The fewest samples of any expected stream.
    pub fn min_samples(&self) -> usize {
        self.per_stream.values().copied().min().unwrap_or(0)
    }
}

/// Checks that every stream of `points` has at least `min_each` samples in `samples`, all of
/// quality Good with exactly the expected value. Samples of other streams are ignored.
pub fn verify_samples(
    points: &[KnownPoint],
    samples: &[Sample],
    min_each: usize,
) -> Result<Verified, String> {
    let by_name: BTreeMap<&str, &KnownPoint> =
        points.iter().map(|p| (p.stream.as_str(), p)).collect();
    let mut per_stream: BTreeMap<String, usize> =
        points.iter().map(|p| (p.stream.clone(), 0)).collect();
    for s in samples {
        let name = s.stream.name();
        let Some(p) = by_name.get(&*name) else {
            continue;
        };
        let want = p.expected();
        if s.value != want || s.quality != Quality::Good {
            return Err(format!(
                "{name}: got {:?} ({:?}), expected {want:?} ({} {} word {} byte {})",
                s.value, s.quality, p.ty, p.address, p.word_order, p.byte_order
            ));
        }
        *per_stream.entry(name.to_string()).or_default() += 1;
    }
    if let Some((name, n)) = per_stream.iter().find(|(_, n)| **n < min_each) {
        return Err(format!("{name}: {n} samples, expected at least {min_each}"));
    }
    Ok(Verified { per_stream })
}
