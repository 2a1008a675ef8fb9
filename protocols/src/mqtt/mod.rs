//! MQTT source: subscribes to a broker (rumqttc, v3.1.1 and v5) and turns publishes into
//! samples. [`mapping`] is the pure core (topic matching, payload parsing); [`source`] is
//! the client (connection, subscriptions, backoff, manual acks).

pub mod mapping;
pub mod publisher;
pub mod source;
