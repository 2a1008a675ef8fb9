//! MQTT source: subscribes to a broker (MQTT 3.1.1 and 5) and turns publishes into
//! samples. [`mapping`] is the pure core (topic matching, payload parsing); [`wire`] the
//! packet framing and encoding and [`flow`] the back-pressure gate (both pure); [`source`]
//! is the client (connection, subscriptions, acknowledgements, backoff).

pub mod flow;
pub mod mapping;
pub mod publisher;
pub mod source;
pub mod wire;
