//! What the hub does with a gateway's frames, whichever way they came in: over QUIC straight
//! from the gateway ([`super::server`]) or over MQTT through a broker
//! ([`super::mqtt_ingress`]). Both ingress paths only move bytes and keep their transport's
//! promises; the decisions are here, once, so the two cannot drift apart:
//!
//! - [`Session`] (pure): which messages of a gateway's session are admitted. A Hello must
//!   name the gateway the transport vouches for (QUIC: the client certificate; MQTT: the
//!   topic); a Data frame must name it too, and needs a Hello earlier in its session.
//!   Refusals have a `kind` ([`Refusal::kind`]) for `outpost_hub_bad_input`.
//! - [`MqttSessions`] (pure): the sessions of gateways behind a broker, where the hub sees
//!   no connection: a gateway's session starts with its Hello and lasts while the hub runs.
//!   Data from a gateway with no Hello (a hub restart forgot it, or a gateway that skipped
//!   it) is refused — not written, not acknowledged, so the gateway keeps it in its outbox
//!   — and the hub asks the gateway, at most every [`HELLO_REQUEST_INTERVAL`], to start a
//!   new session (a Hello naming the gateway on its down topic: the gateway ends its
//!   session, reconnects, says Hello and sends again what is unacknowledged). This is what
//!   a QUIC gateway does when the hub closes its connection for the same fault.
//! - [`HubIngest`]: commits admitted Data frames through [`HubStore`] (duplicates dropped,
//!   the rest written and made durable), counts what happened, republishes what was written
//!   (`[republish]`) and returns the acknowledgements to send.
//!
//! # Metrics
//!
//! The same series for both paths; MQTT's carry `transport="mqtt"`, QUIC's no `transport`
//! label (they came first): `outpost_hub_samples_written`, `outpost_hub_duplicates`,
//! `outpost_hub_summaries_written`, `outpost_hub_summary_duplicates` (per gateway),
//! `outpost_hub_acks_sent`, `outpost_hub_storage_errors`, `outpost_hub_bad_input{kind}`,
//! and `outpost_hub_republish_dropped` (one for the hub).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocols::frame::{Ack, DataFrame, Hello};
use outpost_protocols::mqtt::publisher::{MqttPublisher, PublisherOptions};
use outpost_runtime::config::GatewayId;
use outpost_runtime::config::hub::RepublishSection;
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{TimestampNs, now_ns};
use prometheus_client::metrics::counter::Counter;

use super::store::{Committed, HubStore, HubStoreError};

/// How often at most the hub asks one gateway behind a broker for a new session while its
/// data keeps coming without a Hello (the request may be lost: a gateway's MQTT session is
/// clean, so a request sent while it is offline is dropped).
pub const HELLO_REQUEST_INTERVAL: Duration = Duration::from_secs(5);
/// Gateways behind a broker whose session the hub remembers at most; beyond, the one heard
/// from least recently is forgotten (it is asked for a new session when it sends again).
pub const MAX_MQTT_SESSIONS: usize = 65_536;

/// Which way a frame came in: the label set of its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Quic,
    Mqtt,
}

impl Transport {
    /// `base` and this transport's label (none for QUIC).
    fn labels<'a>(self, base: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut l = base.to_vec();
        if self == Transport::Mqtt {
            l.push(("transport", "mqtt"));
        }
        l
    }

    fn index(self) -> usize {
        match self {
            Transport::Quic => 0,
            Transport::Mqtt => 1,
        }
    }
}

/// Why a message of a session is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A Hello or Data frame names another gateway than the one the transport vouches for.
    #[error("the frame names gateway {claimed:?}, but this is gateway {actual:?}")]
    Identity { claimed: String, actual: String },
    /// A Data frame before any Hello in its session.
    #[error("data from gateway {0:?} before its Hello")]
    NoHello(String),
}

impl Refusal {
    /// The `kind` label of `outpost_hub_bad_input`.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Identity { .. } => "identity",
            Refusal::NoHello(_) => "no_hello",
        }
    }
}

/// At most 64 characters of a claimed id, for messages.
fn quoted(s: &str) -> String {
    s.chars().take(64).collect()
}

/// One session of one gateway (pure): over QUIC a stream, over MQTT what follows a Hello.
#[derive(Debug, Clone)]
pub struct Session {
    gateway: GatewayId,
    hello: bool,
}

impl Session {
    /// A session of `gateway`, the id its transport vouches for; no Hello yet.
    pub fn new(gateway: GatewayId) -> Session {
        Session {
            gateway,
            hello: false,
        }
    }

    /// The gateway.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// Whether a Hello was admitted.
    pub fn said_hello(&self) -> bool {
        self.hello
    }

    /// Admits a Hello naming this session's gateway.
    pub fn hello(&mut self, h: &Hello) -> Result<(), Refusal> {
        if h.gateway_id != self.gateway {
            return Err(Refusal::Identity {
                claimed: quoted(&h.gateway_id),
                actual: self.gateway.to_string(),
            });
        }
        self.hello = true;
        Ok(())
    }

    /// Admits Data frames: each must name this session's gateway, and a Hello must have come
    /// first.
    pub fn admit(&self, frames: &[DataFrame]) -> Result<(), Refusal> {
        if let Some(f) = frames.iter().find(|f| f.gateway_id != self.gateway) {
            return Err(Refusal::Identity {
                claimed: quoted(&f.gateway_id),
                actual: self.gateway.to_string(),
            });
        }
        if !self.hello {
            return Err(Refusal::NoHello(self.gateway.to_string()));
        }
        Ok(())
    }
}

/// What to do with a refused Data frame from behind a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub refusal: Refusal,
    /// Ask the gateway for a new session now (at most every [`HELLO_REQUEST_INTERVAL`]).
    pub ask_hello: bool,
}

#[derive(Debug)]
struct Entry {
    session: Session,
    /// Position in the recency order.
    stamp: u64,
    /// When the gateway was last asked for a new session.
    asked: Option<Instant>,
}

/// The sessions of the gateways behind a broker (pure; bounded by `capacity`, the gateway
/// heard from least recently forgotten first).
#[derive(Debug)]
pub struct MqttSessions {
    map: HashMap<String, Entry>,
    /// (gateway, stamp) in the order heard; entries whose stamp is not the gateway's current
    /// one are stale and skipped.
    order: VecDeque<(String, u64)>,
    next: u64,
    capacity: usize,
    ask_every: Duration,
}

impl Default for MqttSessions {
    fn default() -> Self {
        MqttSessions::new(MAX_MQTT_SESSIONS, HELLO_REQUEST_INTERVAL)
    }
}

impl MqttSessions {
    /// At most `capacity` gateways (≥ 1), each asked at most every `ask_every`.
    pub fn new(capacity: usize, ask_every: Duration) -> MqttSessions {
        MqttSessions {
            map: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            capacity: capacity.max(1),
            ask_every,
        }
    }

    /// Gateways remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether `gateway` has a session (its Hello came).
    pub fn has_session(&self, gateway: &str) -> bool {
        self.map
            .get(gateway)
            .is_some_and(|e| e.session.said_hello())
    }

    /// The entry of `gateway`, made the most recent (created, forgetting the least recent
    /// one when full).
    fn touch(&mut self, gateway: &GatewayId) -> &mut Entry {
        let stamp = self.next;
        self.next += 1;
        self.order.push_back((gateway.to_string(), stamp));
        if !self.map.contains_key(gateway.as_str()) {
            while self.map.len() >= self.capacity {
                let Some((old, s)) = self.order.pop_front() else {
                    break;
                };
                if self.map.get(&old).is_some_and(|e| e.stamp == s) {
                    self.map.remove(&old);
                }
            }
        }
        // Stale order entries are dropped once they outnumber the live ones.
        if self.order.len() > 2 * self.capacity.max(self.map.len()) + 16 {
            let map = &self.map;
            self.order
                .retain(|(g, s)| map.get(g).is_some_and(|e| e.stamp == *s) || *s == stamp);
        }
        let e = self
            .map
            .entry(gateway.to_string())
            .or_insert_with(|| Entry {
                session: Session::new(gateway.clone()),
                stamp,
                asked: None,
            });
        e.stamp = stamp;
        e
    }

    /// A Hello from `gateway` (the topic's): its session starts (again).
    pub fn hello(&mut self, gateway: &GatewayId, h: &Hello) -> Result<(), Refusal> {
        let e = self.touch(gateway);
        e.session.hello(h)?;
        e.asked = None;
        Ok(())
    }

    /// A Data frame from `gateway` (the topic's) at `now`: admitted, or refused (and
    /// whether to ask the gateway for a new session now).
    pub fn data(
        &mut self,
        gateway: &GatewayId,
        frame: &DataFrame,
        now: Instant,
    ) -> Result<(), Refused> {
        let ask_every = self.ask_every;
        let e = self.touch(gateway);
        match e.session.admit(std::slice::from_ref(frame)) {
            Ok(()) => Ok(()),
            Err(refusal @ Refusal::Identity { .. }) => Err(Refused {
                refusal,
                ask_hello: false,
            }),
            Err(refusal) => {
                let ask_hello = e
                    .asked
                    .is_none_or(|t| now.saturating_duration_since(t) >= ask_every);
                if ask_hello {
                    e.asked = Some(now);
                }
                Err(Refused { refusal, ask_hello })
            }
        }
    }
}

/// Where written samples are republished (`[republish]`, best effort).
#[derive(Clone)]
pub struct Republish {
    prefix: String,
    publisher: MqttPublisher,
}

impl Republish {
    /// Starts the publisher of `[republish]` (the config loader checked the broker address).
    pub fn start(r: &RepublishSection) -> Republish {
        let (host, port) = r
            .broker
            .rsplit_once(':')
            .map(|(h, p)| (h.to_owned(), p.parse().unwrap_or(1883)))
            .unwrap_or_else(|| (r.broker.clone(), 1883));
        let credentials = r.username.clone().map(|u| {
            let pw = r
                .password
                .as_ref()
                .and_then(|p| p.resolve_string().ok())
                .unwrap_or_default();
            (u, pw)
        });
        tracing::info!(broker = %r.broker, prefix = %r.topic_prefix, "republishing samples over MQTT");
        Republish {
            prefix: r.topic_prefix.trim_end_matches('/').to_owned(),
            publisher: MqttPublisher::start(PublisherOptions {
                host,
                port,
                client_id: r.client_id.clone().unwrap_or_else(|| "outpost-hub".into()),
                credentials,
                qos: r.qos.get() as u8,
                queue: r.queue.get() as usize,
                backoff_initial: Duration::from_millis(200),
                backoff_max: Duration::from_secs(30),
            }),
        }
    }

    /// Publishes the samples of `frame` at `idx`; counts those the publisher had no room for.
    fn samples(&self, gateway: &str, frame: &DataFrame, idx: &[usize], dropped: &Counter) {
        for &i in idx {
            let Some(s) = frame.samples.get(i) else {
                continue;
            };
            let topic = format!("{}/{gateway}/{}", self.prefix, frame.stream_name(s));
            let payload = serde_json::json!({
                "seq": s.seq,
                "ts_ns": s.ts_ns,
                "value": s.value,
                "quality": s.quality,
            });
            if !self
                .publisher
                .publish(topic, payload.to_string().into_bytes())
            {
                dropped.inc();
            }
        }
    }
}

/// A commit that failed: nothing of it may be acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot store data of gateway {gateway:?}: {source}")]
    Store {
        gateway: String,
        source: HubStoreError,
    },
    #[error("commit task failed: {0}")]
    Task(String),
}

/// Data frames of one gateway, committed together.
#[derive(Debug, Clone)]
pub struct Group {
    pub gateway: GatewayId,
    pub frames: Vec<DataFrame>,
}

/// The acknowledgements of one [`Group`], one per frame, in order.
#[derive(Debug, Clone)]
pub struct Acks {
    pub gateway: GatewayId,
    pub acks: Vec<Ack>,
}

/// The commit path both ingress paths share.
pub struct HubIngest {
    store: Arc<HubStore>,
    metrics: Metrics,
    republish: Option<Republish>,
    republish_dropped: Counter,
    /// Per [`Transport::index`].
    acks_sent: [Counter; 2],
    storage_errors: [Counter; 2],
}

impl HubIngest {
    pub fn new(store: Arc<HubStore>, metrics: Metrics, republish: Option<Republish>) -> HubIngest {
        let per = |name, help| {
            [Transport::Quic, Transport::Mqtt].map(|t| metrics.counter(name, help, &t.labels(&[])))
        };
        HubIngest {
            acks_sent: per("outpost_hub_acks_sent", "Acknowledgements sent to gateways"),
            storage_errors: per(
                "outpost_hub_storage_errors",
                "Commits that failed (the data stays unacknowledged)",
            ),
            republish_dropped: metrics.counter(
                "outpost_hub_republish_dropped",
                "Samples not republished over MQTT because the broker was slow or away",
                &[],
            ),
            store,
            metrics,
            republish,
        }
    }

    /// The store commits go to.
    pub fn store(&self) -> &Arc<HubStore> {
        &self.store
    }

    /// Counts rejected input of `kind` that came over `t`.
    pub fn bad(&self, t: Transport, kind: &str) {
        self.metrics
            .counter(
                "outpost_hub_bad_input",
                "Rejected input from gateways",
                &t.labels(&[("kind", kind)]),
            )
            .inc();
    }

    /// Counts `n` acknowledgements sent over `t`.
    pub fn acks_sent(&self, t: Transport, n: usize) {
        self.acks_sent[t.index()].inc_by(n as u64);
    }

    /// Commits the groups (one blocking task; each group is atomic, in order), counts,
    /// republishes what was written, and returns the acknowledgements. On an error the
    /// groups before it are committed (and acknowledged again, as duplicates, when the
    /// gateway sends them again) and nothing may be acknowledged.
    pub async fn commit(
        self: &Arc<Self>,
        t: Transport,
        groups: Vec<Group>,
    ) -> Result<Vec<Acks>, IngestError> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let me = Arc::clone(self);
        let r = match tokio::task::spawn_blocking(move || me.commit_blocking(t, &groups, now_ns()))
            .await
        {
            Ok(r) => r,
            Err(e) => Err(IngestError::Task(e.to_string())),
        };
        if let Err(e) = &r {
            self.storage_errors[t.index()].inc();
            tracing::error!(error = %e, transport = ?t, "hub cannot store data");
        }
        r
    }

    /// [`Self::commit`], on this thread.
    pub fn commit_blocking(
        &self,
        t: Transport,
        groups: &[Group],
        arrival: TimestampNs,
    ) -> Result<Vec<Acks>, IngestError> {
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            let done = self
                .store
                .commit_many(&g.gateway, &g.frames, arrival)
                .map_err(|source| IngestError::Store {
                    gateway: g.gateway.to_string(),
                    source,
                })?;
            self.count(t, &g.gateway, &done);
            if let Some(r) = &self.republish {
                for (frame, done) in g.frames.iter().zip(&done) {
                    r.samples(
                        &g.gateway,
                        frame,
                        &done.written_idx,
                        &self.republish_dropped,
                    );
                }
            }
            out.push(Acks {
                gateway: g.gateway.clone(),
                acks: g.frames.iter().map(Ack::for_frame).collect(),
            });
        }
        Ok(out)
    }

    fn count(&self, t: Transport, gateway: &str, done: &[Committed]) {
        let l = t.labels(&[("gateway", gateway)]);
        let sum = |f: fn(&Committed) -> usize| done.iter().map(f).sum::<usize>() as u64;
        for (name, help, n) in [
            (
                "outpost_hub_samples_written",
                "Samples written to the sink",
                sum(|d| d.written),
            ),
            (
                "outpost_hub_duplicates",
                "Samples received again and dropped",
                sum(|d| d.duplicates),
            ),
            (
                "outpost_hub_summaries_written",
                "Window summaries written to the summaries sink",
                sum(|d| d.summaries_written),
            ),
            (
                "outpost_hub_summary_duplicates",
                "Window summaries received again and dropped",
                sum(|d| d.summary_duplicates),
            ),
        ] {
            self.metrics.counter(name, help, &l).inc_by(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> GatewayId {
        s.parse().unwrap()
    }
    use outpost_protocols::frame::{Encoding, VERSION};
    use outpost_runtime::model::{Priority, Sample, StreamId, Value};

    fn hello(gw: &str) -> Hello {
        Hello {
            gateway_id: id(gw),
            max_version: VERSION,
        }
    }

    fn data(gw: &str, seqs: &[u64]) -> DataFrame {
        let s = StreamId::intern("ingest/t").unwrap();
        let samples: Vec<Sample> = seqs
            .iter()
            .map(|q| Sample::new(s, *q as i64, Value::I64(*q as i64)))
            .collect();
        DataFrame::from_samples(
            &id(gw),
            Priority::Normal,
            Encoding::Raw,
            seqs.iter().copied().zip(samples.iter()),
        )
    }

    #[test]
    fn a_session_needs_a_hello_naming_its_gateway_before_data() {
        let mut s = Session::new(id("gw-1"));
        assert_eq!(
            s.admit(&[data("gw-1", &[1])]),
            Err(Refusal::NoHello("gw-1".into()))
        );
        let e = s.hello(&hello("gw-2")).unwrap_err();
        assert_eq!(e.kind(), "identity");
        assert!(!s.said_hello());
        s.hello(&hello("gw-1")).unwrap();
        s.admit(&[data("gw-1", &[1]), data("gw-1", &[2])]).unwrap();
        let e = s
            .admit(&[data("gw-1", &[3]), data("gw-2", &[4])])
            .unwrap_err();
        assert_eq!(e.kind(), "identity");
        assert_eq!(Refusal::NoHello("x".into()).kind(), "no_hello");
    }

    #[test]
    fn mqtt_data_without_a_hello_is_refused_and_the_request_rate_limited() {
        let mut m = MqttSessions::new(8, Duration::from_secs(5));
        let t0 = Instant::now();
        let d = data("gw-1", &[1]);
        let first = m.data(&id("gw-1"), &d, t0).unwrap_err();
        assert_eq!(first.refusal.kind(), "no_hello");
        assert!(first.ask_hello);
        // Not asked again until the interval has passed.
        assert!(
            !m.data(&id("gw-1"), &d, t0 + Duration::from_secs(1))
                .unwrap_err()
                .ask_hello
        );
        assert!(
            m.data(&id("gw-1"), &d, t0 + Duration::from_secs(5))
                .unwrap_err()
                .ask_hello
        );
        // Another gateway is asked on its own.
        assert!(
            m.data(&id("gw-2"), &d_for("gw-2"), t0)
                .unwrap_err()
                .ask_hello
        );
        // After the Hello, data is admitted; a Hello naming another gateway is not.
        m.hello(&id("gw-1"), &hello("gw-1")).unwrap();
        assert!(m.has_session("gw-1"));
        m.data(&id("gw-1"), &d, t0).unwrap();
        assert_eq!(
            m.hello(&id("gw-3"), &hello("gw-1")).unwrap_err().kind(),
            "identity"
        );
        assert!(!m.has_session("gw-3"));
        // Data naming another gateway than its topic: identity, and no request.
        let wrong = m.data(&id("gw-1"), &data("gw-9", &[1]), t0).unwrap_err();
        assert_eq!(wrong.refusal.kind(), "identity");
        assert!(!wrong.ask_hello);
        assert!(m.has_session("gw-1"));
    }

    fn d_for(gw: &str) -> DataFrame {
        data(gw, &[7])
    }

    #[test]
    fn mqtt_sessions_are_bounded_and_forget_the_least_recent() {
        let mut m = MqttSessions::new(3, Duration::from_secs(5));
        let now = Instant::now();
        for gw in ["a", "b", "c"] {
            m.hello(&id(gw), &hello(gw)).unwrap();
        }
        // "a" heard again: "b" is now the least recent.
        m.data(&id("a"), &d_for("a"), now).unwrap();
        m.hello(&id("d"), &hello("d")).unwrap();
        assert_eq!(m.len(), 3);
        assert!(m.has_session("a") && m.has_session("c") && m.has_session("d"));
        assert!(!m.has_session("b"));
        // A forgotten gateway is asked again, and so on, for many gateways: the memory
        // stays bounded.
        assert!(m.data(&id("b"), &d_for("b"), now).unwrap_err().ask_hello);
        for i in 0..10_000 {
            let gw = format!("g{}", i % 50);
            m.hello(&id(&gw), &hello(&gw)).unwrap();
        }
        assert_eq!(m.len(), 3);
        assert!(m.order.len() <= 2 * 3 + 16 + 1, "{}", m.order.len());
    }
}
