//! Outpost protocols: device drivers, uplink transports and the frame codec.

pub mod frame;
pub mod modbus;
