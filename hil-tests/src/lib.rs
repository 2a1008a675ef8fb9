//! System tests, crash tests, the link emulator and benchmarks for Outpost. The tests under
//! `tests/` start real peers (Mosquitto, pymodbus, ...) and the gateway itself;
//! `src/bin/bench.rs` runs the benchmarks.

pub mod benches;
pub mod crash_record;
pub mod emulator;
pub mod harness;
pub mod observe;
pub mod peers;
pub mod traffic;
