//! Real peers the system tests and benchmarks start: each helper starts the real program
//! (from a Debian package or a virtualenv) on an ephemeral loopback port and stops it on
//! `Drop`. A missing program is a setup error: the helper panics naming the install step.
//! `flood_broker` is the exception: a minimal MQTT broker written here, for what no real
//! broker does on demand (send far past the client's Receive Maximum).

pub mod flood_broker;
pub mod mosquitto;
pub mod pymodbus;

use std::net::TcpListener;

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind(("127.0.0.1", 0)).expect("cannot bind an ephemeral port");
    l.local_addr().expect("no local address").port()
}
