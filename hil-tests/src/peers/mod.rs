//! Real peers the system tests start and stop: external programs run as child processes on
//! ephemeral loopback ports, killed when dropped.

pub mod pymodbus;
