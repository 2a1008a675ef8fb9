//! Outpost hil.
