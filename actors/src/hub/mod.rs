//! The hub: the receiving end of the uplink (`outpost hub CONFIG`). It authenticates
//! gateways, decodes their frames, de-duplicates by (gateway, stream, sequence) durably,
//! writes every sample once to its sinks and acknowledges.

pub mod sink;
