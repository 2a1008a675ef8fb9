//! Uplink transports: how a gateway's frames reach the hub.
//!
//! - [`quic`]: QUIC (quinn) with TLS 1.3 and mutual authentication. The hub accepts only
//!   client certificates signed by its CA and learns each gateway's id from its certificate.
//! - [`mqtt`]: the same frames as QoS 1 MQTT payloads through any broker (gateway side;
//!   the hub's side is `outpost_actors::hub::mqtt_ingress`). The broker's authentication
//!   and ACLs stand in for the client certificates.
//! - [`certs`]: generation of a CA, a hub certificate and gateway certificates (what
//!   `outpost certs` writes), for trying the QUIC uplink out.
//!
//! Framing is not done here: QUIC streams and MQTT payloads carry the bytes of the frame
//! codec. Every transport speaks of gateways by `outpost_runtime::config::GatewayId`: the
//! one gateway id rule, checked where an id enters.

pub mod certs;
pub mod mqtt;
pub mod quic;
