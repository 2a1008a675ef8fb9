//! A simulated Modbus TCP device for `outpost demo`: a small boiler whose registers drift
//! slowly and noisily, served by a tokio-modbus server on loopback. It is a demo peer, not
//! a product path: the gateway reads it through the real Modbus driver like any device.
//!
//! Register map (matching `config/demo.toml`):
//!
//! | table | address | type | content |
//! |-------|---------|------|---------|
//! | holding | 0–1 | f32 (ABCD) | water temperature, °C (≈ 80, between the hysteresis bounds) |
//! | holding | 2 | u16 | pressure, bar × 100 |
//! | holding | 3 | u16 | temperature set point, °C × 10 (writable; default 800) |
//! | holding | 4–15 | u16 | scratch registers (writable) |
//! | input | 0–1 | i32, word order little (CDAB) | flow, l/min × 1000 |
//! | coil | 0 | bool | burner on; switches with ±2 °C hysteresis around the set point (writable: forces the burner until the next switch) |
//! | coil | 1–7 | bool | scratch coils (writable) |
//! | discrete input | 0 | bool | flame detected (follows the burner) |
//!
//! Other addresses answer exception 2 (illegal data address), other function codes
//! exception 1. The noise comes from a seeded PRNG, so a run is reproducible.

use std::future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_modbus::server::Service;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response};

const HOLDING: usize = 16;
const INPUT: usize = 2;
const COILS: usize = 8;
const DISCRETE: usize = 1;
/// Hysteresis half-width around the set point, °C.
const HYSTERESIS: f64 = 2.0;

/// Settings of a simulated device.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed of the noise.
    pub seed: u64,
    /// How often the physics advances and the registers are rewritten.
    pub update: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 20_240_601,
            update: Duration::from_millis(100),
        }
    }
}

/// The values the simulated boiler currently shows, in engineering units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Readings {
    /// °C.
    pub temperature: f64,
    /// bar.
    pub pressure: f64,
    /// l/min.
    pub flow: f64,
    /// Burner state.
    pub burner: bool,
    /// Set point, °C.
    pub setpoint: f64,
}

/// The register image the server answers from.
#[derive(Debug, Clone)]
struct Image {
    holding: [u16; HOLDING],
    input: [u16; INPUT],
    coils: [bool; COILS],
    discrete: [bool; DISCRETE],
}

/// The boiler's state between updates.
struct Physics {
    temperature: f64,
    flow: f64,
    rng: fastrand::Rng,
}

impl Physics {
    /// Advances by `dt` seconds and rewrites the measured registers.
    fn step(&mut self, dt: f64, img: &mut Image) {
        let setpoint = f64::from(img.holding[3]) / 10.0;
        let mut burner = img.coils[0];
        // Heating ~1 °C/s when on; cooling towards 20 °C ambient when off.
        let heat = if burner { 1.0 } else { 0.0 };
        let cool = 0.012 * (self.temperature - 20.0);
        let noise = (self.rng.f64() - 0.5) * 0.1;
        self.temperature += (heat - cool) * dt + noise;
        if burner && self.temperature > setpoint + HYSTERESIS {
            burner = false;
        } else if !burner && self.temperature < setpoint - HYSTERESIS {
            burner = true;
        }
        // Flow: a slow random walk around 12 l/min with the burner on, 8 off.
        let target = if burner { 12.0 } else { 8.0 };
        self.flow += (target - self.flow) * 0.05 * dt * 10.0 + (self.rng.f64() - 0.5) * 0.05;
        let pressure = 1.2 + 0.004 * (self.temperature - 20.0) + (self.rng.f64() - 0.5) * 0.01;

        let t = (self.temperature as f32).to_bits();
        img.holding[0] = (t >> 16) as u16;
        img.holding[1] = t as u16;
        img.holding[2] = (pressure * 100.0).round().clamp(0.0, 65_535.0) as u16;
        let f = (self.flow * 1000.0)
            .round()
            .clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32 as u32;
        // Word order little: low word first.
        img.input[0] = f as u16;
        img.input[1] = (f >> 16) as u16;
        img.coils[0] = burner;
        img.discrete[0] = burner;
    }
}

fn readings(img: &Image) -> Readings {
    let t = f32::from_bits((u32::from(img.holding[0]) << 16) | u32::from(img.holding[1]));
    let f = ((u32::from(img.input[1]) << 16) | u32::from(img.input[0])) as i32;
    Readings {
        temperature: f64::from(t),
        pressure: f64::from(img.holding[2]) / 100.0,
        flow: f64::from(f) / 1000.0,
        burner: img.coils[0],
        setpoint: f64::from(img.holding[3]) / 10.0,
    }
}

/// A `start..start+count` range inside a table of `len`, or exception 2.
fn range(start: u16, count: usize, len: usize) -> Result<std::ops::Range<usize>, ExceptionCode> {
    let s = usize::from(start);
    if count == 0 || s + count > len {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(s..s + count)
}

#[derive(Clone)]
struct SimService {
    image: Arc<Mutex<Image>>,
}

impl SimService {
    fn answer(&self, req: Request<'static>) -> Result<Response, ExceptionCode> {
        let mut img = self.image.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match req {
            Request::ReadCoils(a, n) => {
                Response::ReadCoils(img.coils[range(a, n.into(), COILS)?].to_vec())
            }
            Request::ReadDiscreteInputs(a, n) => {
                Response::ReadDiscreteInputs(img.discrete[range(a, n.into(), DISCRETE)?].to_vec())
            }
            Request::ReadHoldingRegisters(a, n) => {
                Response::ReadHoldingRegisters(img.holding[range(a, n.into(), HOLDING)?].to_vec())
            }
            Request::ReadInputRegisters(a, n) => {
                Response::ReadInputRegisters(img.input[range(a, n.into(), INPUT)?].to_vec())
            }
            Request::WriteSingleCoil(a, v) => {
                let r = range(a, 1, COILS)?;
                img.coils[r].fill(v);
                Response::WriteSingleCoil(a, v)
            }
            Request::WriteMultipleCoils(a, vs) => {
                let r = range(a, vs.len(), COILS)?;
                img.coils[r].copy_from_slice(&vs);
                Response::WriteMultipleCoils(a, vs.len() as u16)
            }
            Request::WriteSingleRegister(a, v) => {
                let r = range(a, 1, HOLDING)?;
                img.holding[r].fill(v);
                Response::WriteSingleRegister(a, v)
            }
            Request::WriteMultipleRegisters(a, vs) => {
                let r = range(a, vs.len(), HOLDING)?;
                img.holding[r].copy_from_slice(&vs);
                Response::WriteMultipleRegisters(a, vs.len() as u16)
            }
            _ => return Err(ExceptionCode::IllegalFunction),
        })
    }
}

impl Service for SimService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        future::ready(self.answer(req))
    }
}

/// A running simulated device. Dropping it (or [`SimDevice::stop`]) stops the server and
/// closes its connections.
pub struct SimDevice {
    addr: SocketAddr,
    image: Arc<Mutex<Image>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SimDevice {
    /// Starts the device on `addr` (port 0 picks a free port).
    pub async fn start(addr: SocketAddr, config: SimConfig) -> io::Result<SimDevice> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mut img = Image {
            holding: [0; HOLDING],
            input: [0; INPUT],
            coils: [false; COILS],
            discrete: [false; DISCRETE],
        };
        img.holding[3] = 800;
        let mut physics = Physics {
            temperature: 79.0,
            flow: 10.0,
            rng: fastrand::Rng::with_seed(config.seed),
        };
        physics.step(0.0, &mut img);
        let image = Arc::new(Mutex::new(img));

        let service = SimService {
            image: image.clone(),
        };
        let server = tokio::spawn(async move {
            let on_connected = move |stream, peer| {
                let service = service.clone();
                async move { accept_tcp_connection(stream, peer, move |_| Ok(Some(service.clone()))) }
            };
            let on_error =
                |e: io::Error| tracing::debug!(error = %e, "simulated device: connection error");
            if let Err(e) = Server::new(listener).serve(&on_connected, on_error).await {
                tracing::warn!(error = %e, "simulated device: server stopped");
            }
        });
        let img = image.clone();
        let update = config.update.max(Duration::from_millis(1));
        let physics_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(update);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut img = img.lock().unwrap_or_else(|e| e.into_inner());
                physics.step(update.as_secs_f64(), &mut img);
            }
        });
        Ok(SimDevice {
            addr,
            image,
            tasks: vec![server, physics_task],
        })
    }

    /// Where the device listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the registers show now.
    pub fn readings(&self) -> Readings {
        readings(&self.image.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Stops the server and the physics.
    pub fn stop(self) {}
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boiler_cycles_around_its_set_point_reproducibly() {
        let run = |seed| {
            let mut img = Image {
                holding: [0; HOLDING],
                input: [0; INPUT],
                coils: [false; COILS],
                discrete: [false; DISCRETE],
            };
            img.holding[3] = 800;
            let mut p = Physics {
                temperature: 79.0,
                flow: 10.0,
                rng: fastrand::Rng::with_seed(seed),
            };
            let mut out = Vec::new();
            for _ in 0..6000 {
                p.step(0.1, &mut img);
                out.push(readings(&img));
            }
            out
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same series");
        assert_ne!(a, run(8));
        let switches = a.windows(2).filter(|w| w[0].burner != w[1].burner).count();
        assert!(switches >= 4, "the burner cycles: {switches} switches");
        for r in &a[100..] {
            assert!((76.0..84.0).contains(&r.temperature), "{r:?}");
            assert!((1.3..1.5).contains(&r.pressure), "{r:?}");
            assert!((7.0..13.5).contains(&r.flow), "{r:?}");
        }
    }
}
