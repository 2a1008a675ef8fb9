//! Outpost protocols.
