//! Sensor-fusion pure cores: plain Rust types with no I/O that the fusion actors own.
//!
//! - [`kalman`]: linear Kalman filter with gating and the built-in kinematic models.

pub mod kalman;

#[cfg(test)]
pub(crate) mod sim;
