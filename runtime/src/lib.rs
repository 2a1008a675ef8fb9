//! Outpost's base layer: the data model, the gateway config schema, OTP-style supervision
//! over ractor, durable storage (the outbox), metrics and logging. Everything else in the
//! workspace depends on this crate; it depends on none of them.

pub mod config;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod rangeset;
pub mod record;
pub mod storage;
pub mod supervisor;

pub use model::{LinkClass, Priority, Quality, Sample, StreamId, SyncMode, TimestampNs, Value};
