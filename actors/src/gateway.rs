//! Gateway assembly: builds the supervision tree from a [`Config`] and runs it until
//! SIGINT/SIGTERM, then shuts down in order (stop intake, flush the outbox, exit).

use outpost_runtime::config::Config;
use outpost_runtime::metrics::{self, Metrics};

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
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() -> Result<&'static str, GatewayError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(GatewayError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(GatewayError::Signal)?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Runs the gateway described by `config` until SIGINT or SIGTERM.
pub async fn run_until_signal(config: Config) -> Result<(), GatewayError> {
    let metrics = Metrics::new();
    let metrics_task = if config.metrics.enabled {
        let (addr, task) = metrics::serve(metrics.clone(), config.metrics.listen)
            .await
            .map_err(|source| GatewayError::Metrics {
                addr: config.metrics.listen,
                source,
            })?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
        Some(task)
    } else {
        None
    };
    tracing::info!(gateway = %config.gateway.id, devices = config.devices.len(), "gateway started");
    let sig = shutdown_signal().await?;
    tracing::info!(signal = sig, "shutting down");
    if let Some(t) = metrics_task {
        t.abort();
    }
    tracing::info!("stopped");
    Ok(())
}
