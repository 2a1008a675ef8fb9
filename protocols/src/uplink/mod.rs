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
//! codec.

pub mod certs;
pub mod mqtt;
pub mod quic;

/// Longest gateway id, in bytes (the same rule as `gateway.id` in the gateway config).
pub const MAX_GATEWAY_ID_LEN: usize = 64;

/// Whether `id` is a valid gateway id: 1 to [`MAX_GATEWAY_ID_LEN`] ASCII letters, digits,
/// `-`, `_` or `.` — the rule the gateway config applies to `gateway.id`.
///
/// Certificates whose id breaks this rule are neither generated nor accepted by the hub: the
/// id ends up in file names and metric labels there.
pub fn is_valid_gateway_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_GATEWAY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_id_rule_matches_the_config_rule() {
        assert!(is_valid_gateway_id("plant-a-gw01"));
        assert!(is_valid_gateway_id("gw_1.site"));
        assert!(is_valid_gateway_id(&"a".repeat(64)));
        assert!(!is_valid_gateway_id(&"a".repeat(65)));
        assert!(!is_valid_gateway_id(""));
        assert!(!is_valid_gateway_id("gw/1"));
        assert!(!is_valid_gateway_id("gw 1"));
        assert!(!is_valid_gateway_id("gwé"));
    }
}
