//! Device drivers wired to the device-stream actor: one module per protocol, each turning
//! its section of a `[[devices]]` table into a [`DriverFn`].

pub mod modbus;
pub mod mqtt;

use outpost_runtime::config::DeviceConfig;

use crate::device::DriverFn;

/// The driver for a configured device.
pub fn driver_for(device: &DeviceConfig) -> Result<DriverFn, String> {
    match (&device.modbus, &device.mqtt) {
        (Some(m), _) => Ok(modbus::driver(m.clone())),
        (_, Some(cfg)) => Ok(mqtt::driver(cfg.clone())),
        _ => Err(format!("device {:?} has no protocol section", device.name)),
    }
}
