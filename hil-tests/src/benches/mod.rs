//! Benchmarks run by the `bench` binary. Each is `fn(&[String]) -> Result<serde_json::Value, String>`
//! and registers itself in [`run`] and [`NAMES`].

pub mod aligner;
pub mod e2e;
#[allow(non_snake_case)] // adskalman's traits name their matrices F, Q, H, R.
pub mod kalman;
pub mod link_detect;
pub mod mqtt_ingest;
pub mod outbox;
pub mod relay;
pub mod sync_bytes;

/// Names accepted by the `bench` binary.
pub const NAMES: &[&str] = &[
    "outbox",
    "outbox_space",
    "kalman",
    "aligner",
    "mqtt_ingest",
    "e2e",
    "link_detect",
    "sync_bytes",
    "relay",
];

/// Runs the benchmark `name` with extra arguments `args`.
pub fn run(name: &str, args: &[String]) -> Result<serde_json::Value, String> {
    match name {
        "outbox" => outbox::run(args),
        "outbox_space" => outbox::run_space(args),
        "kalman" => kalman::run(args),
        "aligner" => aligner::run(args),
        "mqtt_ingest" => mqtt_ingest::run(args),
        "e2e" => e2e::run(args),
        "link_detect" => link_detect::run(args),
        "sync_bytes" => sync_bytes::run(args),
        "relay" => relay::run(args),
        _ => Err(format!(
            "unknown benchmark {name:?}; known: {}",
            NAMES.join(", ")
        )),
    }
}
