//! Outpost actors.
