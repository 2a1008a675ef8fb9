//! Device drivers wired to the device-stream actor: one module per protocol, each turning
//! its section of a `[[devices]]` table into a [`DriverFn`].

pub mod modbus;
pub mod mqtt;

use outpost_runtime::config::DeviceConfig;
use outpost_runtime::metrics::Metrics;
use prometheus_client::metrics::counter::Counter;

use crate::device::DriverFn;

/// The driver for a configured device.
pub fn driver_for(device: &DeviceConfig) -> Result<DriverFn, String> {
    match (&device.modbus, &device.mqtt) {
        (Some(m), _) => Ok(modbus::driver(m.clone())),
        (_, Some(cfg)) => Ok(mqtt::driver(cfg.clone())),
        _ => Err(format!("device {:?} has no protocol section", device.name)),
    }
}

/// The per-device counters every driver may keep, registered here only, so each name has
/// one meaning and one help text whichever driver registers it first.
pub mod counters {
    use super::{Counter, Metrics};

    /// `outpost_stream_samples_read{device}`: samples a driver read from its device and
    /// handed to storage (Modbus: each poll's decoded points).
    pub fn samples_read(m: &Metrics, device: &str) -> Counter {
        m.counter(
            "outpost_stream_samples_read",
            "Samples a device driver read from its device and handed to storage",
            &[("device", device)],
        )
    }

    /// `outpost_stream_samples_stored{device}`: samples of the device made durable in the
    /// outbox (MQTT: counted when the batch is durable, before the broker is acknowledged).
    pub fn samples_stored(m: &Metrics, device: &str) -> Counter {
        m.counter(
            "outpost_stream_samples_stored",
            "Samples of a device made durable in the outbox",
            &[("device", device)],
        )
    }

    /// `outpost_stream_errors{device,kind}`: bad input or failed reads of a device stream.
    pub fn stream_errors(m: &Metrics, device: &str, kind: &str) -> Counter {
        m.counter(
            "outpost_stream_errors",
            "Bad input or failed reads on a device stream, by kind",
            &[("device", device), ("kind", kind)],
        )
    }
}
