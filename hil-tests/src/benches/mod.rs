//! Benchmarks run by the `bench` binary. Each is `fn(&[String]) -> Result<serde_json::Value, String>`
//! and registers itself in [`run`] and [`NAMES`].

/// Names accepted by the `bench` binary.
pub const NAMES: &[&str] = &[];

/// Runs the benchmark `name` with extra arguments `args`.
pub fn run(name: &str, args: &[String]) -> Result<serde_json::Value, String> {
    let _ = args;
    Err(format!(
        "unknown benchmark {name:?}; known: {}",
        NAMES.join(", ")
    ))
}
