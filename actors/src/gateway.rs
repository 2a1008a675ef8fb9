//! Gateway assembly: opens the outbox, starts the ingest writer and builds the supervision
//! tree from a [`Config`]; runs until SIGINT/SIGTERM, then shuts down in order — stop
//! intake (devices first), drain the ingest queue into the outbox, make it durable, exit.
//!
//! ```text
//! root (one-for-one)
//! ├── fusion (one-for-one, [supervision] limits) ── fusion:<group> ...
//! ├── devices (one-for-one, [supervision] limits) ── device:<name> ...
//! └── sync (when an uplink is configured)
//! ```

use std::sync::Arc;
use std::time::Duration;

use outpost_runtime::config::Config;
use outpost_runtime::metrics::{self, Metrics};
use outpost_runtime::storage::{GatewayOutbox, StorageError, open_gateway_outbox};
use outpost_runtime::supervisor::{
    self, BackoffPolicy, Restart, Strategy, SupervisorMsg, SupervisorSpec,
};
use ractor::ActorRef;
use tokio::sync::Notify;

use crate::bus::Bus;
use crate::device::{self, DeviceContext};
use crate::ingest::{Ingest, IngestConfig, RECEIPTS_PER_SOURCE};
use outpost_runtime::storage::receipts::capacity_for_in_flight;

/// Errors that stop a gateway from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the signal handler: {0}")]
    Signal(std::io::Error),
    #[error("cannot create the data folder {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the outbox in {path}: {source}")]
    Outbox {
        path: std::path::PathBuf,
        source: StorageError,
    },
    #[error("{0}")]
    Device(String),
    #[error("uplink: {0}")]
    Uplink(String),
    #[error("{0}")]
    Fusion(String),
    #[error("cannot start the supervision tree: {0}")]
    Supervisor(String),
    #[error("the supervision tree failed: {0}")]
    TreeFailed(String),
    #[error("the last outbox flush failed: {0}")]
    Flush(StorageError),
}

/// A running gateway.
pub struct Gateway {
    root: ActorRef<SupervisorMsg>,
    root_join: tokio::task::JoinHandle<()>,
    ingest: Ingest,
    writer: tokio::task::JoinHandle<()>,
    outbox: Arc<GatewayOutbox>,
    metrics: Metrics,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    metrics_addr: Option<std::net::SocketAddr>,
    /// Notified after every durable ingest batch (the sync actor waits on it).
    pub wake: Arc<Notify>,
}

impl Gateway {
    /// Starts a gateway: outbox, ingest, metrics endpoint, supervision tree.
    pub async fn start(config: &Config, metrics: Metrics) -> Result<Gateway, GatewayError> {
        let dir = &config.gateway.data_dir;
        std::fs::create_dir_all(dir).map_err(|source| GatewayError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let outbox_dir = dir.join("outbox");
        let outbox = Arc::new(
            open_gateway_outbox(&outbox_dir, config.storage.quota.0, Some(metrics.clone()))
                .map_err(|source| GatewayError::Outbox {
                    path: outbox_dir.clone(),
                    source,
                })?,
        );
        let st = outbox.stats();
        tracing::info!(
            records = st.records.iter().sum::<u64>(),
            bytes = st.total_bytes(),
            next_seq = st.next_seq,
            "outbox open"
        );

        let (metrics_task, metrics_addr) = if config.metrics.enabled {
            let (addr, task) = metrics::serve(metrics.clone(), config.metrics.listen)
                .await
                .map_err(|source| GatewayError::Metrics {
                    addr: config.metrics.listen,
                    source,
                })?;
            tracing::info!(%addr, "metrics at http://{addr}/metrics");
            (Some(task), Some(addr))
        } else {
            (None, None)
        };

        let wake = Arc::new(Notify::new());
        let bus = Bus::new(&metrics);
        let (ingest, writer) = Ingest::start(
            outbox.clone(),
            IngestConfig {
                max_batch: config.storage.max_batch.get() as usize,
                commit_interval: config.storage.commit_interval.get(),
                // Redelivery receipts for the MQTT device that may have the most messages
                // unacknowledged at a crash.
                receipts_per_source: config
                    .devices
                    .iter()
                    .filter_map(|d| d.mqtt.as_ref())
                    .map(|m| capacity_for_in_flight(m.max_in_flight.get() as usize))
                    .max()
                    .unwrap_or(RECEIPTS_PER_SOURCE),
                ..IngestConfig::default()
            },
            bus,
            &metrics,
            wake.clone(),
        );

        let sv = &config.supervision;
        let backoff = BackoffPolicy::new(sv.backoff.initial.get(), sv.backoff.max.get(), 2.0, 0.2);
        let mut devices = SupervisorSpec::new("devices", Strategy::OneForOne, metrics.clone())
            .with_intensity(sv.max_restarts.get() as u32, sv.within.get())
            .with_backoff(backoff);
        for d in &config.devices {
            let driver = crate::devices::driver_for(d).map_err(GatewayError::Device)?;
            let ctx = DeviceContext {
                name: d.name.clone(),
                priority: d.priority,
                ingest: ingest.clone(),
                metrics: metrics.clone(),
                gateway_id: config.gateway.id.clone(),
            };
            devices = devices.child(device::child_spec(ctx, driver));
        }
        // Fusion starts before the devices (its bus subscriptions see their first samples)
        // and so stops after them (it fuses what they last produced).
        let fusion = crate::fusion_actor::supervisor_spec(&config.fusion, &ingest, &metrics)
            .map_err(|e| GatewayError::Fusion(e.to_string()))?
            .with_intensity(sv.max_restarts.get() as u32, sv.within.get())
            .with_backoff(backoff);
        let mut root = SupervisorSpec::new("root", Strategy::OneForOne, metrics.clone())
            .with_intensity(3, Duration::from_secs(600))
            .with_backoff(backoff)
            .child(fusion.into_child(Restart::Permanent))
            .child(devices.into_child(Restart::Permanent));
        if config.uplink.is_some() {
            // The link monitor outlives restarts of the sync actor (its estimate is history).
            // It starts optimistic, as broadband (full + zstd): down-grades take under 2 s
            // of evidence and up-grades need a sustained rate, like a TCP slow start.
            let link = crate::link::monitor::spawn(
                &config.link,
                outpost_runtime::model::LinkClass::Broadband,
                &metrics,
            );
            let ctx = crate::sync::context_from_config(
                config,
                link,
                outbox.clone(),
                wake.clone(),
                metrics.clone(),
            )
            .map_err(GatewayError::Uplink)?;
            let task: device::TaskFn = Arc::new(move || Box::pin(crate::sync::run(ctx.clone())));
            root = root.child(device::task_child_spec("sync", task));
        }
        let (root, root_join) = root
            .spawn()
            .await
            .map_err(|e| GatewayError::Supervisor(e.to_string()))?;
        tracing::info!(
            gateway = %config.gateway.id,
            devices = config.devices.len(),
            "gateway started"
        );
        Ok(Gateway {
            root,
            root_join,
            ingest,
            writer,
            outbox,
            metrics,
            metrics_task,
            metrics_addr,
            wake,
        })
    }

    /// The ingest handle (for in-process producers and tests).
    pub fn ingest(&self) -> &Ingest {
        &self.ingest
    }

    /// The outbox.
    pub fn outbox(&self) -> &Arc<GatewayOutbox> {
        &self.outbox
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where the metrics endpoint listens, if enabled.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// Runs until SIGINT/SIGTERM (then shuts down cleanly) or until the supervision tree
    /// fails (then shuts down and reports it).
    /// `signals` must be installed before the gateway starts (a signal that arrives
    /// earlier would otherwise kill the process with the default action).
    pub async fn run_until_signal(
        mut self,
        mut signals: ShutdownSignals,
    ) -> Result<(), GatewayError> {
        let outcome = tokio::select! {
            sig = signals.recv() => { tracing::info!(signal = sig, "shutting down"); Ok(()) }
            _ = &mut self.root_join => Err(GatewayError::TreeFailed(
                "the root supervisor stopped (a restart storm escalated to the top)".into())),
        };
        let flushed = self.shutdown().await;
        outcome.and(flushed)
    }

    /// Orderly stop: devices and all actors first (no new intake), then the ingest queue is
    /// drained into the outbox and the outbox made durable.
    pub async fn shutdown(self) -> Result<(), GatewayError> {
        if !self.root_join.is_finished()
            && let Err(e) = supervisor::shutdown(&self.root, Duration::from_secs(30)).await
        {
            tracing::warn!(error = %e, "supervision tree did not stop cleanly");
        }
        drop(self.ingest);
        // The writer ends once every producer handle is gone (actors just released theirs).
        if tokio::time::timeout(Duration::from_secs(30), self.writer)
            .await
            .is_err()
        {
            tracing::warn!("ingest writer did not finish within 30 s");
        }
        let flushed = self.outbox.durable().await.map_err(GatewayError::Flush);
        // Blocking storage calls still running hold the outbox; let them finish so the
        // store is closed when this returns (a restart in the same process can reopen it).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while Arc::strong_count(&self.outbox) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(t) = self.metrics_task {
            t.abort();
        }
        let st = self.outbox.stats();
        tracing::info!(
            records = st.records.iter().sum::<u64>(),
            next_seq = st.next_seq,
            "stopped; outbox flushed"
        );
        flushed
    }
}

/// SIGINT and SIGTERM handlers. Install them first thing: from then on these signals are
/// delivered here instead of ending the process.
pub struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Installs the handlers (needs a tokio runtime).
    pub fn install() -> Result<ShutdownSignals, GatewayError> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate()).map_err(GatewayError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(GatewayError::Signal)?,
        })
    }

    /// Waits for SIGINT or SIGTERM; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Runs the gateway described by `config` until SIGINT or SIGTERM.
pub async fn run_until_signal(config: Config) -> Result<(), GatewayError> {
    let signals = ShutdownSignals::install()?;
    let gw = Gateway::start(&config, Metrics::new()).await?;
    gw.run_until_signal(signals).await
}
