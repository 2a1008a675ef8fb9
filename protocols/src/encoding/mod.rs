//! The sync-mode encodings as pure cores: what the sync actor
//! puts in a frame for each link class, and how the hub reads it back.
//!
//! - [`deadband`]: the per-stream deadband of the `delta` mode ([`DeadbandFilter`]) — which
//!   samples are sent; the skipped ones stay in the outbox for backfill.
//! - [`delta`]: the `delta` body ([`Encoding::Delta`]): per-stream delta / XOR / scaled-integer
//!   columns, then zstd. Lossless: the hub gets exactly the samples the gateway sent.
//! - [`summary`]: the `summary` mode's per-stream, per-window aggregates
//!   ([`SummaryAggregator`]) and their wire form ([`Encoding::Summary`]).
//!
//! The byte layouts are in `protocols/FRAME_FORMAT.md` and in the module docs of [`delta`]
//! and [`summary`]; [`crate::frame`] does the envelope, the checksum and the limits.
//!
//! # Which encoding for which records
//!
//! [`encoding_for`] is the policy: the sync mode picks the encoding of normal and bulk
//! frames; control and critical records (configuration, model rounds, alarms) are never
//! filtered nor summarized — in summary mode they go out as full zstd frames, so **critical
//! alarms always pass through raw**; in delta mode they are delta-encoded (lossless) but not
//! deadband-filtered ([`applies_deadband`]).

pub mod deadband;
pub mod delta;
pub mod summary;

pub use deadband::{Deadband, DeadbandConfig, DeadbandFilter, FilterOutcome, Verdict};
pub use summary::{
    FrameSummary, NumericStats, StreamSummary, SummaryAggregator, SummaryConfig, WindowSummary,
};

use outpost_runtime::model::{Priority, SyncMode};

use crate::frame::Encoding;

/// The frame encoding the sync actor uses for records of `priority` in `mode`; `None` when
/// nothing is sent (store-and-forward).
pub fn encoding_for(mode: SyncMode, priority: Priority) -> Option<Encoding> {
    let protected = matches!(priority, Priority::Control | Priority::Critical);
    match mode {
        SyncMode::Full => Some(Encoding::Raw),
        SyncMode::FullZstd => Some(Encoding::Zstd),
        SyncMode::Delta => Some(Encoding::Delta),
        SyncMode::Summary if protected => Some(Encoding::Zstd),
        SyncMode::Summary => Some(Encoding::Summary),
        // Between outages of a flapping link, alarms still go out when a connection is up.
        SyncMode::StoreAndForward if protected => Some(Encoding::Zstd),
        SyncMode::StoreAndForward => None,
    }
}

/// Whether records of `priority` go through the [`DeadbandFilter`] in delta mode (normal and
/// bulk telemetry only: control and critical records are always sent).
pub fn applies_deadband(priority: Priority) -> bool {
    matches!(priority, Priority::Normal | Priority::Bulk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn critical_and_control_are_never_summarized_nor_filtered() {
        for p in [Priority::Control, Priority::Critical] {
            assert_eq!(encoding_for(SyncMode::Summary, p), Some(Encoding::Zstd));
            assert!(!applies_deadband(p));
        }
        assert_eq!(
            encoding_for(SyncMode::Summary, Priority::Normal),
            Some(Encoding::Summary)
        );
        assert_eq!(
            encoding_for(SyncMode::Delta, Priority::Bulk),
            Some(Encoding::Delta)
        );
        assert!(applies_deadband(Priority::Normal));
        assert_eq!(
            encoding_for(SyncMode::StoreAndForward, Priority::Control),
            Some(Encoding::Zstd)
        );
        assert_eq!(
            encoding_for(SyncMode::StoreAndForward, Priority::Normal),
            None
        );
        assert_eq!(
            encoding_for(SyncMode::Full, Priority::Normal),
            Some(Encoding::Raw)
        );
    }
}
