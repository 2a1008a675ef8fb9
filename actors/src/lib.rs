//! Outpost's actors — device streams, aligner, fusion, training, link monitor, sync — and
//! the assembly of a gateway (and of the hub) from config. Actors own state and wiring;
//! the algorithms they run are plain types (here, in `outpost-protocols`, or in
//! `outpost-runtime`).

pub mod aligner;
pub mod bus;
pub mod demo;
pub mod device;
pub mod devices;
pub mod drain;
pub mod fusion;
pub mod fusion_actor;
pub mod gateway;
pub mod hub;
pub mod ingest;
pub mod link;
pub mod sync;
