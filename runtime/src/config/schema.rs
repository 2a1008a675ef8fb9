//! The gateway config schema: one TOML file per gateway. Every struct rejects unknown keys;
//! every number and duration checks its range while it is read (see [`super::types`]), and
//! [`super::validate`] checks what spans several keys (unique names, references).
//!
//! `config/reference.toml` documents every key; keep the two in step.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::fusion::FusionGroupConfig;
use super::types::{Bounded, ByteSize, Dur, GatewayId, Secret};
use crate::logging::LogFormat;
use crate::model::Priority;

/// A whole gateway config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Who this gateway is and where it keeps its data.
    pub gateway: GatewaySection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub storage: StorageSection,
    /// Device connections: one device-stream actor each.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// Fusion groups: one supervised actor each (aligner + method), see [`super::fusion`].
    #[serde(default)]
    pub fusion: Vec<FusionGroupConfig>,
    /// Where data goes. Without it the gateway only stores.
    pub uplink: Option<UplinkConfig>,
    #[serde(default)]
    pub link: LinkSection,
    /// How data is shipped in each sync mode.
    #[serde(default)]
    pub sync: SyncSection,
    #[serde(default)]
    pub supervision: SupervisionSection,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Identity of this gateway at the hub (see [`GatewayId`] for the rule).
    pub id: GatewayId,
    /// Directory for the outbox, local history and model state. Created if missing.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default)]
    pub format: LogFormat,
    /// An EnvFilter directive such as `info` or `info,outpost_actors=debug`.
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    "info".into()
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Text,
            level: default_level(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Address of the Prometheus endpoint (`GET /metrics`).
    #[serde(default = "default_metrics_addr")]
    pub listen: SocketAddr,
}

fn yes() -> bool {
    true
}

fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            enabled: true,
            listen: default_metrics_addr(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// Most bytes the outbox may hold. Past it: bulk evicted first, then normal
    /// oldest-first; control and critical never (intake is slowed and an alarm raised).
    #[serde(default = "default_quota")]
    pub quota: ByteSize,
    /// How long a batch waits for more samples before it is written. 0 (the default): no
    /// wait — a batch is whatever queued while the previous one was being made durable.
    #[serde(default = "default_commit")]
    pub commit_interval: Dur<0, 10_000>,
    /// Most samples in one durable batch.
    #[serde(default = "default_batch")]
    pub max_batch: Bounded<1, 100_000>,
}

fn default_quota() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_commit() -> Dur<0, 10_000> {
    Dur::from_millis(0)
}
fn default_batch() -> Bounded<1, 100_000> {
    Bounded(2_000)
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            quota: default_quota(),
            commit_interval: default_commit(),
            max_batch: default_batch(),
        }
    }
}

/// One device connection. Exactly one protocol section (`modbus`, `mqtt`) is present.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Unique name; also the prefix of this device's metrics labels.
    pub name: String,
    /// Priority class of this device's samples.
    #[serde(default = "normal")]
    pub priority: Priority,
    pub modbus: Option<ModbusDeviceConfig>,
    pub mqtt: Option<MqttDeviceConfig>,
}

fn normal() -> Priority {
    Priority::Normal
}

impl DeviceConfig {
    /// The protocol this device speaks, for logs and metrics.
    pub fn protocol(&self) -> &'static str {
        match (&self.modbus, &self.mqtt) {
            (Some(_), _) => "modbus",
            (_, Some(_)) => "mqtt",
            _ => "none",
        }
    }
}

/// Modbus TCP device.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDeviceConfig {
    /// `host:port` of the Modbus TCP server.
    pub address: String,
    #[serde(default = "one_u8")]
    pub unit_id: Bounded<0, 255>,
    /// Timeout of each request; the connection is re-opened after one.
    #[serde(default = "default_modbus_timeout")]
    pub timeout: Dur<10, 60_000>,
    /// Gap (in registers) bridged when merging neighbouring points into one request.
    #[serde(default = "default_max_gap")]
    pub max_gap: Bounded<0, 124>,
    pub poll_groups: Vec<PollGroupConfig>,
}

fn one_u8() -> Bounded<0, 255> {
    Bounded(1)
}
fn default_modbus_timeout() -> Dur<10, 60_000> {
    Dur::from_millis(1000)
}
fn default_max_gap() -> Bounded<0, 124> {
    Bounded(8)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PollGroupConfig {
    pub interval: Dur<10, 86_400_000>,
    pub points: Vec<ModbusPointConfig>,
}

/// Modbus table a point lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModbusTable {
    /// Function code 1.
    Coil,
    /// Function code 2.
    DiscreteInput,
    /// Function code 3.
    Holding,
    /// Function code 4.
    Input,
}

/// Data type of a Modbus point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModbusType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    F32,
    F64,
}

impl ModbusType {
    /// Registers (or bits, for `bool`) the type occupies.
    pub fn width(self) -> u16 {
        match self {
            ModbusType::Bool | ModbusType::U16 | ModbusType::I16 => 1,
            ModbusType::U32 | ModbusType::I32 | ModbusType::F32 => 2,
            ModbusType::F64 => 4,
        }
    }
}

/// Order of words (registers) or of bytes within a word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endian {
    #[default]
    Big,
    Little,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusPointConfig {
    /// Stream name of the samples this point produces.
    pub stream: String,
    pub table: ModbusTable,
    /// Zero-based address (protocol address, not the 4xxxx notation).
    pub address: Bounded<0, 65_535>,
    #[serde(rename = "type")]
    pub data_type: ModbusType,
    #[serde(default)]
    pub word_order: Endian,
    #[serde(default)]
    pub byte_order: Endian,
    /// value = raw * scale + offset
    #[serde(default = "one_f64")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
}

fn one_f64() -> f64 {
    1.0
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum MqttVersion {
    #[serde(rename = "3.1.1")]
    V311,
    #[default]
    #[serde(rename = "5")]
    V5,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttDeviceConfig {
    /// `host:port` of the broker.
    pub broker: String,
    #[serde(default)]
    pub version: MqttVersion,
    /// Defaults to `outpost-<gateway id>-<device name>`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<TlsClientConfig>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive: Dur<1_000, 3_600_000>,
    #[serde(default)]
    pub reconnect: BackoffConfig,
    /// QoS 1 messages taken from the broker and not yet acknowledged, at most. Past it the
    /// client stops reading (the broker keeps the rest). MQTT 5: also announced to the
    /// broker as its Receive Maximum. Sizes the redelivery receipts.
    #[serde(default = "default_device_in_flight")]
    pub max_in_flight: Bounded<1, 65_535>,
    /// Largest MQTT packet taken from the broker, whole. MQTT 5: announced as the Maximum
    /// Packet Size (the broker then drops bigger messages for this client without telling
    /// it). MQTT 3.1.1: a bigger PUBLISH is read past, counted and acknowledged.
    #[serde(default = "default_device_max_packet")]
    pub max_packet: ByteSize,
    /// Largest payload mapped into samples; bigger ones are counted (`too_large`) and
    /// acknowledged. At most `max_packet`.
    #[serde(default = "default_device_max_payload")]
    pub max_payload: ByteSize,
    /// Distinct streams this device may name at once (names come from topic levels, which
    /// publishers control).
    #[serde(default = "default_device_max_streams")]
    pub max_streams: Bounded<1, 1_000_000>,
    /// A stream silent this long gives its slot back when a new stream needs one.
    #[serde(default = "default_device_stream_idle")]
    pub stream_idle: Dur<1_000, 31_536_000_000>,
    pub subscriptions: Vec<MqttSubscriptionConfig>,
}

fn default_keep_alive() -> Dur<1_000, 3_600_000> {
    Dur::from_millis(30_000)
}
/// Default `max_in_flight` of an MQTT device.
pub const DEFAULT_DEVICE_IN_FLIGHT: u64 = 1_024;
fn default_device_in_flight() -> Bounded<1, 65_535> {
    Bounded(DEFAULT_DEVICE_IN_FLIGHT)
}
fn default_device_max_packet() -> ByteSize {
    ByteSize(512 * 1024)
}
fn default_device_max_payload() -> ByteSize {
    ByteSize(256 * 1024)
}
fn default_device_max_streams() -> Bounded<1, 1_000_000> {
    Bounded(10_000)
}
fn default_device_stream_idle() -> Dur<1_000, 31_536_000_000> {
    Dur::from_millis(3_600_000)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsClientConfig {
    /// CA certificate(s), PEM, that sign the server's certificate.
    pub ca: PathBuf,
    /// Client certificate (PEM) for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    pub key: Option<Secret>,
    /// Name expected in the server certificate; defaults to the host part of the address.
    pub server_name: Option<String>,
}

/// Payload format of an MQTT subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// A JSON document; `fields` pick values by JSON pointer.
    Json,
    /// The payload is one number in text (`21.5`).
    Number,
    /// The payload as a string value (at most 255 bytes kept).
    Raw,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSubscriptionConfig {
    /// Topic filter; `+` and `#` wildcards allowed.
    pub topic: String,
    #[serde(default = "one_qos")]
    pub qos: Bounded<0, 1>,
    pub format: PayloadFormat,
    /// For `number` and `raw`: the stream name; `{1}`, `{2}`... are the topic segments
    /// matched by the 1st, 2nd... `+` wildcard.
    pub stream: Option<String>,
    /// For `json`: one stream per field.
    #[serde(default)]
    pub fields: Vec<JsonFieldConfig>,
    /// JSON pointer to a source timestamp (ns, ms or s since the epoch as a number, or
    /// RFC 3339 text). Without it, the arrival time is used.
    pub timestamp_pointer: Option<String>,
}

fn one_qos() -> Bounded<0, 1> {
    Bounded(1)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JsonFieldConfig {
    /// JSON pointer (RFC 6901), e.g. `/sensors/0/value`.
    pub pointer: String,
    /// Stream name; `{1}`... as for `stream` above.
    pub stream: String,
    #[serde(default = "one_f64")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
}

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    #[serde(default = "default_backoff_initial")]
    pub initial: Dur<1, 600_000>,
    #[serde(default = "default_backoff_max")]
    pub max: Dur<1, 3_600_000>,
}

fn default_backoff_initial() -> Dur<1, 600_000> {
    Dur::from_millis(200)
}
fn default_backoff_max() -> Dur<1, 3_600_000> {
    Dur::from_millis(30_000)
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
        }
    }
}

/// Uplink transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UplinkTransport {
    /// QUIC with TLS 1.3 and client certificates, straight to the hub (`hub`,
    /// `server_name`, `ca`, `cert`, `key`).
    #[default]
    Quic,
    /// MQTT 3.1.1 through any broker (`[uplink.mqtt]`): the same frames as QoS 1 payloads.
    Mqtt,
}

impl UplinkTransport {
    /// The transport's name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            UplinkTransport::Quic => "quic",
            UplinkTransport::Mqtt => "mqtt",
        }
    }
}

/// `[uplink]`: where data goes and how. The QUIC keys are required (and used) only with
/// `transport = "quic"`, the `[uplink.mqtt]` table only with `transport = "mqtt"`; the
/// validator reports a missing one at its place.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    #[serde(default)]
    pub transport: UplinkTransport,
    /// QUIC: `host:port` of the hub.
    pub hub: Option<String>,
    /// QUIC: name in the hub's certificate.
    pub server_name: Option<String>,
    /// QUIC: CA certificate (PEM) that signs the hub's and the gateways' certificates.
    pub ca: Option<PathBuf>,
    /// QUIC: this gateway's certificate (PEM), signed by the CA.
    pub cert: Option<PathBuf>,
    /// QUIC: this gateway's private key (PEM).
    pub key: Option<Secret>,
    /// QUIC keep-alive interval.
    #[serde(default = "default_uplink_keep_alive")]
    pub keep_alive: Dur<100, 600_000>,
    /// Both transports: a frame whose send makes no progress for this long (QUIC: the hub
    /// takes no byte of it; MQTT: the broker acknowledges nothing to make room for it) ends
    /// the session; the gateway reconnects and sends again what was not acknowledged.
    #[serde(default = "default_send_timeout")]
    pub send_timeout: Dur<100, 600_000>,
    /// Most samples per frame.
    #[serde(default = "default_frame_samples")]
    pub max_frame_samples: Bounded<1, 65_535>,
    #[serde(default)]
    pub reconnect: BackoffConfig,
    /// MQTT: the broker and how to reach it (with `transport = "mqtt"`).
    pub mqtt: Option<UplinkMqttConfig>,
}

impl UplinkConfig {
    /// Where the uplink goes, for logs and `outpost check`: `quic://HUB` or `mqtt://BROKER`.
    pub fn target(&self) -> String {
        match self.transport {
            UplinkTransport::Quic => {
                format!("quic://{}", self.hub.as_deref().unwrap_or("(no hub)"))
            }
            UplinkTransport::Mqtt => format!(
                "mqtt://{}",
                self.mqtt
                    .as_ref()
                    .map_or("(no broker)", |m| m.broker.as_str())
            ),
        }
    }
}

/// `[uplink.mqtt]`: the MQTT uplink. The gateway publishes each frame as one QoS 1 message
/// on `<topic_prefix>/<gateway id>/up` and reads the hub's acknowledgements from
/// `<topic_prefix>/<gateway id>/down`. The broker's authentication and ACLs are what keep
/// one gateway from writing another's topics.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkMqttConfig {
    /// `host:port` of the broker.
    pub broker: String,
    /// Defaults to `outpost-<gateway id>-uplink`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<TlsClientConfig>,
    /// First topic levels (no wildcards, no empty level, not starting with `$`).
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// MQTT keep-alive (whole seconds, at most 65535 s).
    #[serde(default = "default_mqtt_keep_alive")]
    pub keep_alive: Dur<1_000, 65_535_000>,
    /// Publishes sent and not yet acknowledged by the broker (PUBACK) at most.
    #[serde(default = "default_mqtt_in_flight")]
    pub max_in_flight: Bounded<1, 1_000>,
    /// Largest payload (one encoded frame) sent; brokers often limit messages (AWS IoT:
    /// 128 KiB). At most 1 MiB, the largest frame.
    #[serde(default = "default_mqtt_max_payload")]
    pub max_payload: ByteSize,
}

/// The default topic prefix of the MQTT uplink.
pub fn default_topic_prefix() -> String {
    "outpost".into()
}
fn default_mqtt_keep_alive() -> Dur<1_000, 65_535_000> {
    Dur::from_millis(30_000)
}
fn default_mqtt_in_flight() -> Bounded<1, 1_000> {
    Bounded(32)
}
fn default_mqtt_max_payload() -> ByteSize {
    ByteSize(1 << 20)
}

fn default_uplink_keep_alive() -> Dur<100, 600_000> {
    Dur::from_millis(5_000)
}
fn default_send_timeout() -> Dur<100, 600_000> {
    Dur::from_millis(30_000)
}
fn default_frame_samples() -> Bounded<1, 65_535> {
    Bounded(1_000)
}

/// Thresholds of the link classes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSection {
    #[serde(default = "d_fiber_mbps")]
    pub fiber_min_mbps: f64,
    #[serde(default = "d_fiber_rtt")]
    pub fiber_max_rtt: Dur<0, 60_000>,
    #[serde(default = "d_broadband_mbps")]
    pub broadband_min_mbps: f64,
    #[serde(default = "d_mobile_mbps")]
    pub mobile_min_mbps: f64,
    /// RTT above which the link is satellite whatever its rate.
    #[serde(default = "d_sat_rtt")]
    pub satellite_min_rtt: Dur<0, 60_000>,
    /// Sustained evidence needed before an up-grade.
    #[serde(default = "d_upgrade")]
    pub upgrade_after: Dur<0, 3_600_000>,
    /// Least time spent in a class before another change.
    #[serde(default = "d_dwell")]
    pub min_dwell: Dur<0, 3_600_000>,
    /// Active probe budget.
    #[serde(default = "d_probe_budget")]
    pub probe_budget_per_hour: ByteSize,
    /// Up-grades need a rate this fraction above the threshold (0.4 = 40 %), so a link
    /// whose rate jitters around a threshold does not flap.
    #[serde(default = "d_up_margin", deserialize_with = "de_up_margin")]
    pub up_margin: f64,
    /// Up-grades need an RTT this fraction below the threshold.
    #[serde(default = "d_rtt_margin", deserialize_with = "de_rtt_margin")]
    pub rtt_margin: f64,
    /// Loss rate (lost / sent packets) at or above which the link is intermittent.
    #[serde(
        default = "d_intermittent_loss",
        deserialize_with = "de_intermittent_loss"
    )]
    pub intermittent_loss: f64,
    /// Interval of the RTT ping the link monitor sends to the hub.
    #[serde(default = "d_ping_interval")]
    pub ping_interval: Dur<50, 60_000>,
}

fn d_up_margin() -> f64 {
    0.4
}
fn de_up_margin<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    super::types::check_f64(d, 0.0, 10.0)
}
fn d_rtt_margin() -> f64 {
    0.1
}
fn de_rtt_margin<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    super::types::check_f64(d, 0.0, 0.9)
}
fn d_intermittent_loss() -> f64 {
    0.8
}
fn de_intermittent_loss<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    super::types::check_f64(d, 0.01, 1.0)
}
fn d_ping_interval() -> Dur<50, 60_000> {
    Dur::from_millis(200)
}

fn d_fiber_mbps() -> f64 {
    100.0
}
fn d_fiber_rtt() -> Dur<0, 60_000> {
    Dur::from_millis(20)
}
fn d_broadband_mbps() -> f64 {
    10.0
}
fn d_mobile_mbps() -> f64 {
    1.0
}
fn d_sat_rtt() -> Dur<0, 60_000> {
    Dur::from_millis(500)
}
fn d_upgrade() -> Dur<0, 3_600_000> {
    Dur::from_millis(5_000)
}
fn d_dwell() -> Dur<0, 3_600_000> {
    Dur::from_millis(1_000)
}
fn d_probe_budget() -> ByteSize {
    ByteSize(20_000_000)
}

impl Default for LinkSection {
    fn default() -> Self {
        LinkSection {
            fiber_min_mbps: d_fiber_mbps(),
            fiber_max_rtt: d_fiber_rtt(),
            broadband_min_mbps: d_broadband_mbps(),
            mobile_min_mbps: d_mobile_mbps(),
            satellite_min_rtt: d_sat_rtt(),
            upgrade_after: d_upgrade(),
            min_dwell: d_dwell(),
            probe_budget_per_hour: d_probe_budget(),
            up_margin: d_up_margin(),
            rtt_margin: d_rtt_margin(),
            intermittent_loss: d_intermittent_loss(),
            ping_interval: d_ping_interval(),
        }
    }
}

/// Which sync mode the sync actor uses: the one the link class gives, or a fixed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncModeSetting {
    /// Follow the link monitor's class (the mode `LinkClass::sync_mode` gives).
    #[default]
    Auto,
    Full,
    FullZstd,
    Delta,
    Summary,
    StoreAndForward,
}

impl SyncModeSetting {
    /// The fixed mode, if any.
    pub fn fixed(self) -> Option<crate::model::SyncMode> {
        use crate::model::SyncMode as M;
        match self {
            SyncModeSetting::Auto => None,
            SyncModeSetting::Full => Some(M::Full),
            SyncModeSetting::FullZstd => Some(M::FullZstd),
            SyncModeSetting::Delta => Some(M::Delta),
            SyncModeSetting::Summary => Some(M::Summary),
            SyncModeSetting::StoreAndForward => Some(M::StoreAndForward),
        }
    }
}

/// `[sync]`: how data is shipped.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSection {
    /// `auto` (follow the link class) or a fixed mode.
    #[serde(default)]
    pub mode: SyncModeSetting,
    /// Whether raw samples held back by delta, summary or store-and-forward are sent as
    /// bulk when the link allows: all of them on fiber and broadband; on mobile and
    /// satellite only the backlog of an outage or lost connection, one frame at a time.
    /// Off: they stay in the outbox until the quota evicts them.
    #[serde(default = "d_true")]
    pub backfill: bool,
    #[serde(default)]
    pub delta: DeltaSection,
    #[serde(default)]
    pub summary: SummarySection,
}

fn d_true() -> bool {
    true
}

// Written out, not derived: a config without a `[sync]` table gets this, and a derived
// `Default` would turn backfill off (the field's serde default applies only inside the
// table).
impl Default for SyncSection {
    fn default() -> Self {
        SyncSection {
            mode: SyncModeSetting::default(),
            backfill: d_true(),
            delta: DeltaSection::default(),
            summary: SummarySection::default(),
        }
    }
}

/// A deadband: how far a number must move from the last sent value to be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DeadbandSpec {
    /// Send when `|v − last_sent| > band` (engineering units).
    Absolute(#[serde(deserialize_with = "de_band")] f64),
    /// Send when `|v − last_sent| > fraction × |last_sent|` (0.01 = 1 %).
    Relative(#[serde(deserialize_with = "de_band")] f64),
}

fn de_band<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    super::types::check_f64(d, 0.0, 1e12)
}

/// `[sync.delta]`: the delta mode's per-stream deadband.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaSection {
    /// Deadband of streams not listed in `streams`; absent = every change is sent.
    #[serde(default)]
    pub default: Option<DeadbandSpec>,
    /// Send a sample anyway once a stream has sent nothing for this long (by sample time).
    #[serde(default)]
    pub max_silence: Option<Dur<1, 86_400_000>>,
    /// Per-stream deadbands, by exact stream name.
    #[serde(default)]
    pub streams: std::collections::BTreeMap<String, DeadbandSpec>,
}

/// `[sync.summary]`: the summary mode's windows.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SummarySection {
    /// Window length (aligned on sample timestamps).
    #[serde(default = "d_summary_window")]
    pub window: Dur<1, 86_400_000>,
    /// How long after a window ends its summary waits for late samples.
    #[serde(default = "d_summary_lateness")]
    pub lateness: Dur<0, 3_600_000>,
}

fn d_summary_window() -> Dur<1, 86_400_000> {
    Dur::from_millis(10_000)
}
fn d_summary_lateness() -> Dur<0, 3_600_000> {
    Dur::from_millis(2_000)
}

impl Default for SummarySection {
    fn default() -> Self {
        SummarySection {
            window: d_summary_window(),
            lateness: d_summary_lateness(),
        }
    }
}

/// Restart policy of the device-stream actors' supervisor.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisionSection {
    /// Most restarts of one supervisor's children within `within` before it escalates.
    #[serde(default = "d_max_restarts")]
    pub max_restarts: Bounded<1, 10_000>,
    #[serde(default = "d_within")]
    pub within: Dur<100, 86_400_000>,
    #[serde(default)]
    pub backoff: BackoffConfig,
}

fn d_max_restarts() -> Bounded<1, 10_000> {
    Bounded(10)
}
fn d_within() -> Dur<100, 86_400_000> {
    Dur::from_millis(60_000)
}

impl Default for SupervisionSection {
    fn default() -> Self {
        SupervisionSection {
            max_restarts: d_max_restarts(),
            within: d_within(),
            backoff: BackoffConfig::default(),
        }
    }
}
