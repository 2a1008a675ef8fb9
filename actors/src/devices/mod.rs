//! Device drivers wired to the device-stream actor: one module per protocol, each turning
//! its section of a `[[devices]]` table into a [`DriverFn`].

pub mod modbus;

use outpost_runtime::config::DeviceConfig;

use crate::device::DriverFn;

/// The driver for a configured device.
pub fn driver_for(device: &DeviceConfig) -> Result<DriverFn, String> {
    match (&device.modbus, &device.mqtt) {
        (Some(m), _) => Ok(modbus::driver(m.clone())),
        (_, Some(_)) => Err(format!(
            "device {:?}: the MQTT driver is not wired into this build yet",
            device.name
        )),
        _ => Err(format!("device {:?} has no protocol section", device.name)),
    }
}
