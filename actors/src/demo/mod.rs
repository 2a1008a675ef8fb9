//! Peers for `outpost demo`, which must need nothing installed: a simulated Modbus device
//! ([`sim`]). Demo devices only; the gateway talks to them through its real drivers.

pub mod run;
pub mod sim;
