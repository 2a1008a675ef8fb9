//! The hub's config file (`outpost hub CONFIG`): where it listens, its certificates, and
//! where samples go. Same conventions and error reporting as the gateway config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::schema::{BackoffConfig, LogSection, MetricsSection, TlsClientConfig};
use super::types::{Bounded, Dur, Secret};
use super::{ConfigErrors, KeyPath};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    pub hub: HubSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default = "hub_metrics")]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub sink: SinkSection,
    /// Optional: republish every sample written to the sink to an MQTT broker, for other
    /// consumers (best effort: the sink is the durable record).
    pub republish: Option<RepublishSection>,
    /// Optional: also take gateways' frames from an MQTT broker (gateways with
    /// `[uplink] transport = "mqtt"`).
    pub mqtt_ingress: Option<MqttIngressSection>,
}

/// `[mqtt_ingress]`: the hub subscribes to `<topic_prefix>/+/up` on a broker, commits the
/// frames it reads there, and publishes acknowledgements on `<topic_prefix>/<gateway>/down`.
/// The gateway is the one the topic names: the broker's authentication and ACLs are what
/// keep a client from publishing on another gateway's topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttIngressSection {
    /// `host:port` of the broker.
    pub broker: String,
    /// First topic levels, as the gateways' `[uplink.mqtt] topic_prefix`.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Default `outpost-hub-ingress`. The session is persistent: keep it stable.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<TlsClientConfig>,
    /// MQTT keep-alive (whole seconds).
    #[serde(default = "default_ingress_keep_alive")]
    pub keep_alive: Dur<1_000, 65_535_000>,
    /// Backoff between connection attempts.
    #[serde(default)]
    pub reconnect: BackoffConfig,
}

fn default_ingress_keep_alive() -> Dur<1_000, 65_535_000> {
    Dur::from_millis(30_000)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepublishSection {
    /// `host:port` of the broker.
    pub broker: String,
    /// Topics are `<topic_prefix>/<gateway>/<stream>`.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    #[serde(default = "one_qos")]
    pub qos: super::Bounded<0, 1>,
    /// Default `outpost-hub`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Messages queued while the broker is slow or away before new ones are dropped.
    #[serde(default = "default_queue")]
    pub queue: super::Bounded<1, 10_000_000>,
}

fn default_prefix() -> String {
    "outpost".into()
}
fn one_qos() -> super::Bounded<0, 1> {
    super::Bounded(1)
}
fn default_queue() -> super::Bounded<1, 10_000_000> {
    super::Bounded(100_000)
}

fn hub_metrics() -> MetricsSection {
    MetricsSection {
        enabled: true,
        listen: SocketAddr::from(([127, 0, 0, 1], 9465)),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HubSection {
    /// UDP address the QUIC listener binds.
    pub listen: SocketAddr,
    /// Folder for the de-duplication state (and the sink, by default).
    pub data_dir: PathBuf,
    /// CA certificate (PEM): only gateways with a certificate it signed are accepted.
    pub ca: PathBuf,
    /// The hub's certificate (PEM) and private key.
    pub cert: PathBuf,
    pub key: Secret,
    /// `[hub.handshakes]`: how the QUIC listener keeps handshakes that never finish from
    /// locking gateways out.
    #[serde(default)]
    pub handshakes: HandshakesSection,
}

/// `[hub.handshakes]`. A handshake in progress holds a slot until it finishes or times out.
/// Clients that have not shown they receive what the hub sends to their address are taken
/// on only below `retry_above` handshakes in progress and within their source's share;
/// beyond, they are asked to validate their address first (a QUIC Retry: one more round
/// trip, no state held), which a spoofed or replayed Initial never does. A source is an
/// IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakesSection {
    /// Deadline for a gateway to complete its handshake. Default 10 s.
    #[serde(default = "default_handshake_timeout")]
    pub timeout: Dur<100, 120_000>,
    /// Handshakes in progress at most. Default 64.
    #[serde(default = "default_max_pending")]
    pub max_pending: Bounded<1, 65_536>,
    /// Handshakes in progress per source at most, counted apart for validated and
    /// unvalidated addresses (so Initials spoofed with a gateway's address cannot use up its
    /// share). Default 8.
    #[serde(default = "default_max_pending_per_source")]
    pub max_pending_per_source: Bounded<1, 65_536>,
    /// From this many handshakes in progress on, clients validate their address first.
    /// 0: always. Default 16.
    #[serde(default = "default_retry_above")]
    pub retry_above: Bounded<0, 65_536>,
    /// Of `max_pending`, slots only sources that completed a handshake in the last 24 h may
    /// use. Smaller than `max_pending`. Default 16.
    #[serde(default = "default_reserved_for_known")]
    pub reserved_for_known: Bounded<0, 65_535>,
}

impl Default for HandshakesSection {
    fn default() -> Self {
        HandshakesSection {
            timeout: default_handshake_timeout(),
            max_pending: default_max_pending(),
            max_pending_per_source: default_max_pending_per_source(),
            retry_above: default_retry_above(),
            reserved_for_known: default_reserved_for_known(),
        }
    }
}

fn default_handshake_timeout() -> Dur<100, 120_000> {
    Dur::from_millis(10_000)
}
fn default_max_pending() -> Bounded<1, 65_536> {
    Bounded(64)
}
fn default_max_pending_per_source() -> Bounded<1, 65_536> {
    Bounded(8)
}
fn default_retry_above() -> Bounded<0, 65_536> {
    Bounded(16)
}
fn default_reserved_for_known() -> Bounded<0, 65_535> {
    Bounded(16)
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSection {
    /// Folder of the JSON-lines files (`<gateway>/<YYYY-MM-DD>.jsonl`). Default
    /// `<data_dir>/sink`.
    pub dir: Option<PathBuf>,
}

impl HubConfig {
    /// The sink folder.
    pub fn sink_dir(&self) -> PathBuf {
        self.sink
            .dir
            .clone()
            .unwrap_or_else(|| self.hub.data_dir.join("sink"))
    }
}

/// A hub config that passed validation, with what it needs from this machine and did not
/// find (certificate files, secrets), as [`super::Loaded`] is for a gateway.
#[derive(Debug, Clone)]
pub struct LoadedHub {
    pub config: HubConfig,
    pub environment: Vec<super::ConfigError>,
}

impl LoadedHub {
    /// The config, or the environment problems as errors (what `outpost hub` needs).
    pub fn strict(self) -> Result<HubConfig, ConfigErrors> {
        if self.environment.is_empty() {
            Ok(self.config)
        } else {
            Err(ConfigErrors(self.environment))
        }
    }
}

/// Reads and validates a hub config file, environment problems included as errors;
/// relative paths are relative to its folder.
pub fn load_hub(path: &Path) -> Result<HubConfig, ConfigErrors> {
    load_hub_checked(path)?.strict()
}

/// Reads and validates a hub config file, keeping what the machine lacks apart (what
/// `outpost check` needs).
pub fn load_hub_checked(path: &Path) -> Result<LoadedHub, ConfigErrors> {
    let text = super::read_config_text(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_hub_checked(&text, path, base)
}

/// Parses and validates hub config text, environment problems included as errors.
pub fn parse_hub(text: &str, file: &Path, base: &Path) -> Result<HubConfig, ConfigErrors> {
    parse_hub_checked(text, file, base)?.strict()
}

/// Parses and validates hub config text. Errors come all at once, in file order; what the
/// machine lacks (files, secrets) is returned apart.
pub fn parse_hub_checked(text: &str, file: &Path, base: &Path) -> Result<LoadedHub, ConfigErrors> {
    let mut read = super::deserialize::<HubConfig>(text, file)?;
    let Some(mut c) = read.value.take() else {
        return Err(ConfigErrors(read.errors).in_file_order());
    };
    let fix = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    fix(&mut c.hub.data_dir);
    fix(&mut c.hub.ca);
    fix(&mut c.hub.cert);
    if let Secret::File { file } = &mut c.hub.key {
        fix(file);
    }
    if let Some(d) = &mut c.sink.dir {
        fix(d);
    }
    // Problems of the file, and what this machine lacks.
    let mut problems = Vec::new();
    let mut env = Vec::new();
    let at = KeyPath::default().key("hub");
    for (key, p) in [("ca", &c.hub.ca), ("cert", &c.hub.cert)] {
        if let Err(e) = std::fs::metadata(p) {
            env.push((
                at.clone().key(key),
                format!("cannot read {}: {e}", p.display()),
            ));
        }
    }
    if let Err(e) = c.hub.key.resolve() {
        env.push((at.clone().key("key"), e.to_string()));
    }
    let hs = &c.hub.handshakes;
    if hs.reserved_for_known.get() >= hs.max_pending.get() {
        problems.push((
            at.clone().key("handshakes").key("reserved_for_known"),
            format!(
                "must be smaller than `max_pending` ({}): the other slots are all unknown gateways may use",
                hs.max_pending.get()
            ),
        ));
    }
    if let Some(r) = &mut c.republish {
        let at = KeyPath::default().key("republish");
        if let Some(Secret::File { file }) = &mut r.password {
            fix(file);
        }
        match r
            .broker
            .rsplit_once(':')
            .map(|(h, p)| (h, p.parse::<u16>()))
        {
            Some((h, Ok(p))) if !h.is_empty() && p > 0 => {}
            _ => problems.push((
                at.clone().key("broker"),
                format!("invalid address {:?}: expected host:port", r.broker),
            )),
        }
        if let Some(pw) = &r.password
            && let Err(e) = pw.resolve()
        {
            env.push((at.key("password"), e.to_string()));
        }
    }
    if let Some(m) = &mut c.mqtt_ingress {
        let at = KeyPath::default().key("mqtt_ingress");
        if let Some(Secret::File { file }) = &mut m.password {
            fix(file);
        }
        if let Some(t) = &mut m.tls {
            fix(&mut t.ca);
            if let Some(cert) = &mut t.cert {
                fix(cert);
            }
            if let Some(Secret::File { file }) = &mut t.key {
                fix(file);
            }
        }
        match m
            .broker
            .rsplit_once(':')
            .map(|(h, p)| (h, p.parse::<u16>()))
        {
            Some((h, Ok(p))) if !h.is_empty() && p > 0 => {}
            _ => problems.push((
                at.clone().key("broker"),
                format!("invalid address {:?}: expected host:port", m.broker),
            )),
        }
        if let Some(e) = super::topic_prefix_problem(&m.topic_prefix) {
            problems.push((at.clone().key("topic_prefix"), e));
        }
        if m.client_id.as_deref().is_some_and(str::is_empty) {
            problems.push((
                at.clone().key("client_id"),
                "an MQTT client id may not be empty (the session is persistent); leave it out for `outpost-hub-ingress`".into(),
            ));
        }
        if m.password.is_some() && m.username.is_none() {
            problems.push((
                at.clone().key("password"),
                "a password needs a `username`".into(),
            ));
        }
        if let Some(pw) = &m.password
            && let Err(e) = pw.resolve()
        {
            env.push((at.clone().key("password"), e.to_string()));
        }
        if let Some(t) = &m.tls {
            let at = at.clone().key("tls");
            if t.cert.is_some() != t.key.is_some() {
                problems.push((
                    at.clone(),
                    "a client certificate needs both `cert` and `key`".into(),
                ));
            }
            for (key, p) in [("ca", Some(&t.ca)), ("cert", t.cert.as_ref())] {
                if let Some(p) = p
                    && let Err(e) = std::fs::metadata(p)
                {
                    env.push((
                        at.clone().key(key),
                        format!("cannot read {}: {e}", p.display()),
                    ));
                }
            }
            if let Some(k) = &t.key
                && let Err(e) = k.resolve()
            {
                env.push((at.clone().key("key"), e.to_string()));
            }
        }
        if m.reconnect.initial.get() > m.reconnect.max.get() {
            problems.push((
                at.key("reconnect").key("initial"),
                "initial backoff is larger than `max`".into(),
            ));
        }
    }
    let problems = read.semantic(problems);
    let mut errors = read.errors;
    errors.extend(super::located(text, file, &read.doc, problems).0);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors).in_file_order());
    }
    Ok(LoadedHub {
        config: c,
        environment: super::located(text, file, &read.doc, env).in_file_order().0,
    })
}
