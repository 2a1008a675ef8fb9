//! Outpost's protocol layer: device drivers (Modbus, MQTT; OPC-UA and CAN to come), the
//! uplink transports, and the frame codec. Pure cores (codecs, mappings, planners) are
//! plain types with no I/O; the drivers around them do the networking.

pub mod encoding;
pub mod frame;
pub mod modbus;
pub mod mqtt;
pub mod uplink;
