//! Benchmarks run by the `bench` binary. Each is `fn(&[String]) -> Result<serde_json::Value, String>`
//! and registers itself in [`run`] and [`NAMES`].

pub mod aligner;
#[allow(non_snake_case)] // adskalman's traits name their matrices F, Q, H, R.
pub mod kalman;
pub mod outbox;
pub mod sync_bytes;

/// Names accepted by the `bench` binary.
pub const NAMES: &[&str] = &["outbox", "outbox_space", "kalman", "aligner", "sync_bytes"];

/// Runs the benchmark `name` with extra arguments `args`.
pub fn run(name: &str, args: &[String]) -> Result<serde_json::Value, String> {
    match name {
        "outbox" => outbox::run(args),
        "outbox_space" => outbox::run_space(args),
        "kalman" => kalman::run(args),
        "aligner" => aligner::run(args),
        "sync_bytes" => sync_bytes::run(args),
        _ => Err(format!(
            "unknown benchmark {name:?}; known: {}",
            NAMES.join(", ")
        )),
    }
}
