//! Link monitoring: a pure estimator of the uplink (windowed-maximum delivery
//! rate, windowed-minimum RTT, loss, outages) and a classifier with hysteresis that maps it
//! to a [`LinkClass`](outpost_runtime::model::LinkClass), plus the byte budget of active
//! throughput probes. No I/O here: the link-monitor actor feeds these types with QUIC path
//! statistics, the hub's acknowledgements and probe results, and the current time.
//!
//! Feeding them, in short:
//! - every 50-200 ms: [`LinkEstimator::on_path_stats`] with
//!   [`QuicConnection::path_stats`](outpost_protocols::uplink::quic::QuicConnection::path_stats),
//!   then [`Classifier::update`] with [`LinkEstimator::estimate`];
//! - on each frame written: [`LinkEstimator::on_sent`] (bytes, and whether more is waiting);
//! - on each ack from the hub: [`LinkEstimator::on_delivered`] (bytes of the frames acked);
//! - RTT pings: [`LinkEstimator::on_probe_sent`] / `on_probe_answered` / `on_probe_timed_out`;
//! - throughput probes when idle, gated by [`ProbeBudget`], sized by [`probe_bytes`].

pub mod classifier;
pub mod estimator;
pub mod monitor;

pub use classifier::{
    ChangeReason, ClassChange, Classifier, ClassifierConfig, ProbeBudget, ProbeRefused, probe_bytes,
};
pub use estimator::{Estimate, EstimatorConfig, LinkEstimator};
