//! Outpost actors.

pub mod fusion;
