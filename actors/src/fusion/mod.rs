//! Sensor-fusion pure cores: plain Rust types with no I/O that the fusion actors own.
//!
//! - [`kalman`]: linear Kalman filter with gating and the built-in kinematic models.
//! - [`ekf`]: extended Kalman filter (range/bearing measurement model).
//! - [`complementary`]: roll/pitch from gyro + accelerometer: complementary and Madgwick.
//! - [`voting`]: majority, median, Marzullo and Brooks–Iyengar voting with fault flagging.
//! - [`wavg`]: inverse-variance weighted average with MAD outlier rejection.

pub mod complementary;
pub mod ekf;
pub mod kalman;
pub mod voting;
pub mod wavg;

#[cfg(test)]
pub(crate) mod sim;
