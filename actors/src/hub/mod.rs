//! The hub: the receiving end of the uplink (`outpost hub CONFIG`). It authenticates
//! gateways, decodes their frames, de-duplicates by (gateway, stream, sequence) durably,
//! writes every sample once to its sink and acknowledges. Gateways on the MQTT uplink reach
//! it through a broker instead ([`mqtt_ingress`]). What both ways in do with a frame is
//! decided once, in [`ingest`].

pub mod ingest;
pub mod mqtt_ingress;
pub mod server;
pub mod sink;
pub mod store;

pub use server::{Hub, HubError};
