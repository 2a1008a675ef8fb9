//! Seeded, documented generators for the accuracy tests (test-only).
//!
//! Randomness: `fastrand::Rng::with_seed(seed)` (wyrand), so every run sees the same data.
//! Gaussian noise: Box–Muller transform on two uniform draws in (0, 1].
#![allow(dead_code)] // each test module uses a different subset

/// A seeded Gaussian noise source.
pub struct Noise {
    rng: fastrand::Rng,
}

impl Noise {
    /// A generator with a fixed seed.
    pub fn new(seed: u64) -> Noise {
        Noise {
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.rng.f64()
    }

    /// Standard normal by Box–Muller: `sqrt(-2 ln u1) · cos(2π u2)`, `u1` in (0, 1].
    pub fn gauss(&mut self) -> f64 {
        let u1 = 1.0 - self.rng.f64();
        let u2 = self.rng.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Normal with standard deviation `sd`.
    pub fn normal(&mut self, sd: f64) -> f64 {
        sd * self.gauss()
    }
}

/// Root mean square of `errs`.
pub fn rms(errs: &[f64]) -> f64 {
    (errs.iter().map(|e| e * e).sum::<f64>() / errs.len().max(1) as f64).sqrt()
}
