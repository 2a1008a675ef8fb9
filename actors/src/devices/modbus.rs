//! The Modbus TCP device driver run by a device-stream actor: one polling loop per poll
//! group, each on its own interval, all sharing the device's one connection (tokio-modbus
//! allows one request at a time per connection, so the client sits behind a mutex and a
//! group holds it for one request at a time).
//!
//! Each group's points are batched by the planner ([`plan_reads`]) at start; a
//! [`ReadScheduler`] per group then adapts the plan to what the device refuses (a batched
//! read that answers "illegal data address" is split to find the address, the rest is
//! polled without it, the bad address is retried alone at a slower rate; each finding and
//! each recovery is logged once). A response's samples are timestamped when it arrives and carry quality `Good`, or `Bad`
//! when a float register holds NaN or an infinity (the value is kept as the device gave it).
//!
//! Failure policy:
//! - the device answers with an **exception**: counted (`outpost_modbus_exceptions{device,
//!   code}`), the request's points give no samples this round; never fatal, the other
//!   requests and groups go on. Exception 2 (illegal data address) is handled by the
//!   scheduler as above (`outpost_modbus_unreadable{device}` counts the points and joins
//!   it currently keeps out); other codes are logged when a request's exception changes;
//! - a **request fails** (timeout, broken connection, malformed answer): counted; the client
//!   drops the connection and the next request re-opens it at once. A transient failure is
//!   so retried once, in the next request, without restarting the actor. After
//!   [`MAX_CONSECUTIVE_FAILURES`] failed requests in a row (on any group) the driver
//!   returns `Err`;
//! - **connecting fails** (refused, unreachable, connect timeout), at start or when
//!   re-opening: the driver returns `Err` at once.
//!
//! An `Err` makes the supervisor restart the actor with backoff (`[supervision]`), which is
//! where waiting for an unreachable device belongs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::modbus::client::{ClientError, Exception, ModbusTcpClient, ReadData};
use outpost_protocols::modbus::schedule::{
    ILLEGAL_DATA_ADDRESS, Job, Outcome, ReadKind, ReadScheduler,
};
use outpost_protocols::modbus::{BatchConfig, PointConfig, Table, validate_points};
use outpost_runtime::config::ModbusDeviceConfig;
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Quality, Sample, StreamId, Value, now_ns};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Mutex;
use tokio::time::MissedTickBehavior;

use crate::device::{DeviceContext, DriverFn};

/// Failed requests in a row (timeouts, broken connections, malformed answers) after which
/// the driver gives up and lets the supervisor restart it with backoff.
pub const MAX_CONSECUTIVE_FAILURES: u32 = 3;

/// The driver of a configured Modbus TCP device.
pub fn driver(cfg: ModbusDeviceConfig) -> DriverFn {
    let cfg = Arc::new(cfg);
    Arc::new(move |ctx: DeviceContext| {
        let cfg = cfg.clone();
        Box::pin(async move { run(&cfg, ctx).await })
    })
}

/// One poll group, planned.
struct Group {
    interval: Duration,
    streams: Vec<StreamId>,
    schedule: ReadScheduler,
}

/// The device's counters, created once per run.
#[derive(Clone)]
struct Counters {
    metrics: Metrics,
    device: String,
    samples: Counter,
    requests: Counter,
    timeouts: Counter,
    unreadable: Gauge,
}

impl Counters {
    fn new(m: &Metrics, device: &str) -> Counters {
        let l = [("device", device)];
        let c = Counters {
            metrics: m.clone(),
            device: device.to_owned(),
            samples: super::counters::samples_read(m, device),
            requests: m.counter(
                "outpost_modbus_requests",
                "Modbus requests sent (one per planned read per poll)",
                &l,
            ),
            timeouts: m.counter(
                "outpost_modbus_timeouts",
                "Modbus requests that got no answer within the timeout",
                &l,
            ),
            unreadable: m.gauge(
                "outpost_modbus_unreadable",
                "Points the device refuses (exception 2) plus pairs of points it refuses to \
                 read in one request, now kept out of the poll and retried slowly",
                &l,
            ),
        };
        // A new run finds out afresh what the device refuses.
        c.unreadable.set(0);
        c
    }

    fn exception(&self, e: Exception) {
        self.metrics
            .counter(
                "outpost_modbus_exceptions",
                "Modbus exception responses, by exception code",
                &[("device", &self.device), ("code", &e.0.to_string())],
            )
            .inc();
    }

    fn error(&self, kind: &str) {
        super::counters::stream_errors(&self.metrics, &self.device, kind).inc();
    }
}

/// The connection and the failure count all groups share.
struct Conn {
    client: ModbusTcpClient,
    failures: u32,
}

fn plan(cfg: &ModbusDeviceConfig) -> Result<Vec<Group>, String> {
    let batch = BatchConfig::from_max_gap(cfg.max_gap.get());
    batch.validate().map_err(|e| e.to_string())?;
    cfg.poll_groups
        .iter()
        .map(|g| {
            let points: Vec<PointConfig> = g.points.iter().map(PointConfig::from).collect();
            validate_points(&points).map_err(|e| e.to_string())?;
            let streams = points
                .iter()
                .map(|p| StreamId::intern(&p.name).map_err(|e| format!("{:?}: {e}", p.name)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Group {
                interval: g.interval.get(),
                schedule: ReadScheduler::new(points, batch, g.interval.get()),
                streams,
            })
        })
        .collect()
}

async fn run(cfg: &ModbusDeviceConfig, ctx: DeviceContext) -> Result<(), String> {
    let groups = plan(cfg).map_err(|e| format!("device {:?}: {e}", ctx.name))?;
    let counters = Counters::new(&ctx.metrics, &ctx.name);
    let unit = u8::try_from(cfg.unit_id.get()).unwrap_or(u8::MAX);
    let client = match ModbusTcpClient::connect(&cfg.address, unit, cfg.timeout.get()).await {
        Ok(c) => c,
        Err(e) => {
            counters.error(e.kind());
            return Err(e.to_string());
        }
    };
    tracing::info!(
        device = %ctx.name,
        addr = %client.addr(),
        groups = groups.len(),
        requests = groups.iter().map(|g| g.schedule.plan().len()).sum::<usize>(),
        "modbus device connected"
    );
    let conn = Arc::new(Mutex::new(Conn {
        client,
        failures: 0,
    }));
    // Dropping the set (the driver being cancelled) aborts every group.
    let mut set = tokio::task::JoinSet::new();
    for g in groups {
        set.spawn(poll_group(g, conn.clone(), ctx.clone(), counters.clone()));
    }
    match set.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) if e.is_panic() => Err(format!("a poll group panicked: {e}")),
        Some(Err(e)) => Err(format!("a poll group was cancelled: {e}")),
        None => Ok(()),
    }
}

/// Polls one group forever; returns only with the error that ends the driver.
async fn poll_group(
    mut g: Group,
    conn: Arc<Mutex<Conn>>,
    ctx: DeviceContext,
    c: Counters,
) -> Result<(), String> {
    let mut tick = tokio::time::interval(g.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    // The last exception other than "illegal data address" of each read, to log changes
    // only (bounded: one entry per distinct read the scheduler makes).
    let mut last_exc: HashMap<(Table, u16, u16), Exception> = HashMap::new();
    let mut unreadable = 0i64;
    loop {
        tick.tick().await;
        let mut samples = Vec::with_capacity(g.schedule.points().len());
        g.schedule
            .start_poll(tokio::time::Instant::now().into_std());
        while let Some(job) = g.schedule.next_read() {
            let req = &job.request;
            let (res, ts) = {
                let mut conn = conn.lock().await;
                c.requests.inc();
                let res = conn.client.read(req).await;
                let ts = now_ns();
                match &res {
                    Err(e) if !matches!(e, ClientError::InvalidRequest(_)) => {
                        conn.failures += 1;
                    }
                    _ => conn.failures = 0,
                }
                if let Err(e) = &res {
                    c.error(e.kind());
                    if matches!(e, ClientError::Timeout(_)) {
                        c.timeouts.inc();
                    }
                    if e.is_connect() {
                        return Err(format!("device {:?}: {e}", ctx.name));
                    }
                    if conn.failures >= MAX_CONSECUTIVE_FAILURES {
                        return Err(format!(
                            "device {:?}: {} failed requests in a row, last: {e}",
                            ctx.name, conn.failures
                        ));
                    }
                    tracing::warn!(
                        device = %ctx.name, table = req.table.as_str(), address = req.address,
                        count = req.count, error = %e, "modbus request failed; reconnecting"
                    );
                }
                (res, ts)
            };
            let outcome = match &res {
                Ok(Ok(_)) => Outcome::Data,
                Ok(Err(exc)) => Outcome::Exception(exc.0),
                Err(_) => Outcome::Failed,
            };
            let key = (req.table, req.address, req.count);
            match res {
                Ok(Ok(data)) => {
                    last_exc.remove(&key);
                    if job.delivers() {
                        decode_into(&g, &job, &data, ts, &mut samples, &ctx.name, &c);
                    }
                }
                Ok(Err(exc)) => {
                    c.exception(exc);
                    // Exception 2 is the scheduler's: it logs what it finds, once.
                    if exc.0 != ILLEGAL_DATA_ADDRESS
                        && job.kind == ReadKind::Plan
                        && last_exc.get(&key) != Some(&exc)
                    {
                        tracing::warn!(
                            device = %ctx.name, table = req.table.as_str(),
                            address = req.address, count = req.count, %exc,
                            "modbus device answered with an exception"
                        );
                        last_exc.insert(key, exc);
                    }
                }
                Err(_) => {} // counted and logged above
            }
            let now = tokio::time::Instant::now().into_std();
            if let Some(f) = g.schedule.report(&job, outcome, now) {
                let message = f.message(g.schedule.points());
                if f.is_recovery() {
                    tracing::info!(device = %ctx.name, "{message}");
                } else {
                    tracing::warn!(device = %ctx.name, "{message}");
                }
                let n = (g.schedule.unreadable().count() + g.schedule.kept_apart().count()) as i64;
                c.unreadable.inc_by(n - unreadable);
                unreadable = n;
            }
        }
        if !samples.is_empty() {
            let n = samples.len() as u64;
            // Waits while the ingest queue is full (back-pressure); durability is not
            // awaited: a Modbus reading has no one to acknowledge to.
            ctx.ingest
                .submit(ctx.priority, samples)
                .await
                .map_err(|e| format!("device {:?}: {e}", ctx.name))?;
            c.samples.inc_by(n);
        }
    }
}

fn decode_into(
    g: &Group,
    job: &Job,
    data: &ReadData,
    ts: i64,
    out: &mut Vec<Sample>,
    device: &str,
    c: &Counters,
) {
    match job.request.decode(g.schedule.points(), data.as_response()) {
        Ok(values) => {
            for (i, value) in values {
                let Some(&stream) = g.streams.get(i) else {
                    continue;
                };
                let quality = match value {
                    Value::F64(v) if !v.is_finite() => Quality::Bad,
                    _ => Quality::Good,
                };
                out.push(Sample {
                    stream,
                    ts_ns: ts,
                    value,
                    quality,
                });
            }
        }
        // The client already checked the counts; this would be a planner bug.
        Err(e) => {
            c.error("decode");
            tracing::warn!(device, error = %e, "modbus answer does not fit its request");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> ModbusDeviceConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn groups_are_planned_from_the_config() {
        let c = cfg(r#"
address = "127.0.0.1:1"
max_gap = 0
[[poll_groups]]
interval = "250ms"
[[poll_groups.points]]
stream = "t/plan/a"
table = "holding"
address = 0
type = "f32"
[[poll_groups.points]]
stream = "t/plan/b"
table = "holding"
address = 2
type = "u16"
[[poll_groups.points]]
stream = "t/plan/c"
table = "holding"
address = 4
type = "u16"
[[poll_groups]]
interval = "1s"
[[poll_groups.points]]
stream = "t/plan/d"
table = "coil"
address = 3
type = "bool"
"#);
        let gs = plan(&c).unwrap();
        assert_eq!(gs.len(), 2);
        assert_eq!(gs[0].interval, Duration::from_millis(250));
        // 0..3 contiguous, 4 after a one-register gap: two reads with max_gap 0.
        assert_eq!(gs[0].schedule.plan().len(), 2);
        assert_eq!(gs[1].schedule.plan().len(), 1);
        assert_eq!(&*gs[1].streams[0].name(), "t/plan/d");
        let mut c2 = c.clone();
        c2.max_gap = outpost_runtime::config::Bounded(1);
        assert_eq!(plan(&c2).unwrap()[0].schedule.plan().len(), 1);
    }

    /// `config/demo.toml`'s points, read from the demo's simulated boiler through a whole
    /// gateway (driver, device actor, ingest, outbox): plausible values in every stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_demo_config_reads_plausible_values_from_the_simulator() {
        use crate::demo::sim::{SimConfig, SimDevice};
        use crate::gateway::Gateway;
        use outpost_runtime::model::Priority;
        use std::collections::HashMap;

        let sim = SimDevice::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
            .await
            .unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo.toml");
        let mut config = outpost_runtime::config::load(&path).unwrap().config;
        let dir = tempfile::tempdir().unwrap();
        config.gateway.data_dir = dir.path().to_path_buf();
        config.metrics.enabled = false;
        config.devices[0].modbus.as_mut().unwrap().address = sim.addr().to_string();
        let m = Metrics::new();
        let gw = Gateway::start(&config, m.clone()).await.unwrap();
        // 200 ms interval: wait for a few polls of every point.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let by_stream = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let recs = gw
                .outbox()
                .scan(Priority::Normal, None, 100_000, 64 << 20)
                .unwrap();
            let mut by: HashMap<String, Vec<Sample>> = HashMap::new();
            for r in recs {
                let s = outpost_runtime::record::decode(&r.value).unwrap();
                by.entry(s.stream.name().to_string()).or_default().push(s);
            }
            // The four device points (the demo's fusion group adds a fifth, fused stream).
            let points = [
                "demo/boiler/temperature",
                "demo/boiler/pressure",
                "demo/boiler/flow",
                "demo/boiler/burner_on",
            ];
            if points
                .iter()
                .all(|p| by.get(*p).is_some_and(|v| v.len() >= 5))
            {
                break by;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "too few samples: {by:?}"
            );
        };
        // The driver stops with its actor (a detached driver would keep the ingest open and
        // hold the shutdown for its 30 s timeout).
        tokio::time::timeout(Duration::from_secs(5), gw.shutdown())
            .await
            .expect("the gateway stops promptly")
            .unwrap();
        let now = sim.readings();
        let f = |s: &Sample| s.value.as_f64().unwrap();
        for s in by_stream.values().flatten() {
            assert_eq!(s.quality, Quality::Good);
        }
        for s in &by_stream["demo/boiler/temperature"] {
            assert!((70.0..90.0).contains(&f(s)), "{s:?}");
        }
        for s in &by_stream["demo/boiler/pressure"] {
            assert!((1.2..1.6).contains(&f(s)), "{s:?}");
        }
        for s in &by_stream["demo/boiler/flow"] {
            // Word order little: read as big it would be ~ ±2e9.
            assert!((5.0..15.0).contains(&f(s)), "{s:?}");
        }
        for s in &by_stream["demo/boiler/burner_on"] {
            assert!(matches!(s.value, Value::Bool(_)), "{s:?}");
        }
        // Timestamps: increasing per stream, and recent.
        for v in by_stream.values() {
            assert!(v.windows(2).all(|w| w[0].ts_ns < w[1].ts_ns));
            assert!(now_ns() - v[v.len() - 1].ts_ns < 30_000_000_000);
        }
        assert!((70.0..90.0).contains(&now.temperature), "{now:?}");
        // The four points are two holding registers runs (0..3 in one read with the default
        // gap), one input read and one coil read: 3 requests per poll.
        let polls = by_stream["demo/boiler/temperature"].len() as u64;
        let requests = m.counter_value("outpost_modbus_requests", &[("device", "demo-boiler")]);
        assert!(
            requests >= 3 * polls && requests <= 3 * (polls + 2),
            "{requests} for {polls} polls"
        );
    }
}
