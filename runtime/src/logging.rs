//! Process-wide logging: `tracing` to stderr as text or JSON lines, with the `log` output of
//! dependencies (rumqttc, sled, tokio-modbus) bridged into it.

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// Log output format, chosen in config (`[log] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive (e.g. `info` or
/// `info,outpost_actors=debug`); `RUST_LOG`, when set, takes precedence. Calling it twice is
/// harmless (the second call does nothing).
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init` also installs the `log` → `tracing` bridge (feature `tracing-log`).
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
