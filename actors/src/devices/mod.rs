//! Device drivers wired to the device-stream actor: one module per protocol, each turning
//! its section of a `[[devices]]` table into a [`DriverFn`].

use outpost_runtime::config::DeviceConfig;

use crate::device::DriverFn;

pub mod mqtt;

/// The driver for a configured device.
pub fn driver_for(device: &DeviceConfig) -> Result<DriverFn, String> {
    match (&device.modbus, &device.mqtt) {
        (Some(_), _) => Err(format!(
            "device {:?}: the Modbus driver is not wired into this build yet",
            device.name
        )),
        (_, Some(cfg)) => Ok(mqtt::driver(cfg.clone())),
        _ => Err(format!("device {:?} has no protocol section", device.name)),
    }
}
