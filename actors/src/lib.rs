//! Outpost actors.

pub mod aligner;
pub mod fusion;
