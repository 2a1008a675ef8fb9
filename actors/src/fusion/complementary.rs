//! Attitude (roll and pitch) from a gyroscope and an accelerometer, with the real time step of
//! every sample: a complementary filter and Madgwick's gradient-descent filter (IMU form).
//!
//! Conventions (the same as x-io Fusion's NWU default): body axes x forward, y left, z up; the
//! accelerometer measures specific force, so it reads `(0, 0, +g)` lying level; gyroscope in
//! rad/s about the body axes. Euler angles are ZYX (yaw, pitch, roll), in radians:
//! `roll = atan2(a_y, a_z)`, `pitch = atan2(−a_x, √(a_y² + a_z²))` from the accelerometer.
//! The accelerometer may be in any unit (m/s² or g): the attitude uses only its direction; the
//! complementary filter's acceleration rejection compares its magnitude with `gravity` (1 g in
//! that unit).

use nalgebra::{Quaternion, UnitQuaternion, Vector3};
pub use outpost_runtime::config::{ComplementaryConfig, FusionConfigError, MadgwickConfig};

/// Errors of the attitude filters and their configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AttitudeError {
    /// Invalid configuration value.
    #[error("invalid attitude filter configuration: {0}")]
    Config(String),
    /// A reading with NaN or infinity, or a bad time step; the state was not changed.
    #[error("rejected input: {0}")]
    Input(&'static str),
}

/// Roll and pitch, radians.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attitude {
    pub roll: f64,
    pub pitch: f64,
}

/// Roll and pitch implied by the accelerometer alone; `None` for a zero vector.
pub fn accel_attitude(a: &Vector3<f64>) -> Option<Attitude> {
    if a.norm_squared() <= 0.0 || !a.iter().all(|v| v.is_finite()) {
        return None;
    }
    Some(Attitude {
        roll: a.y.atan2(a.z),
        pitch: (-a.x).atan2((a.y * a.y + a.z * a.z).sqrt()),
    })
}

/// Wraps an angle to (−π, π].
pub fn wrap_pi(a: f64) -> f64 {
    let w = (a + std::f64::consts::PI).rem_euclid(std::f64::consts::TAU) - std::f64::consts::PI;
    if w <= -std::f64::consts::PI {
        w + std::f64::consts::TAU
    } else {
        w
    }
}

fn check_step(
    gyro: &Vector3<f64>,
    accel: &Vector3<f64>,
    dt: f64,
    max_dt: f64,
) -> Result<(), AttitudeError> {
    if !gyro.iter().all(|v| v.is_finite()) {
        return Err(AttitudeError::Input("gyroscope not finite"));
    }
    if !accel.iter().all(|v| v.is_finite()) {
        return Err(AttitudeError::Input("accelerometer not finite"));
    }
    if !(dt.is_finite() && dt >= 0.0 && dt <= max_dt) {
        return Err(AttitudeError::Input(
            "time step negative, non-finite or above max_dt_s",
        ));
    }
    Ok(())
}

impl From<FusionConfigError> for AttitudeError {
    fn from(e: FusionConfigError) -> Self {
        AttitudeError::Config(e.message)
    }
}

/// Complementary filter for roll and pitch:
/// `angle = α (angle + rate · dt) + (1 − α) accel_angle`, with the gyroscope's body rates turned
/// into Euler-angle rates (`φ̇ = p + (q sin φ + r cos φ) tan θ`, `θ̇ = q cos φ − r sin φ`) and the
/// blend done on the wrapped difference so ±180° roll does not jump.
///
/// Acceleration rejection: a reading whose magnitude is off 1 g (`gravity`) by more than
/// `accel_rejection` carries linear acceleration; its correction is skipped and counted. The
/// reference is fixed, never the first reading: a filter started while moving would otherwise
/// measure every resting reading against a wrong g and reject them all.
#[derive(Debug, Clone)]
pub struct Complementary {
    cfg: ComplementaryConfig,
    att: Option<Attitude>,
    rejected: u64,
    streak: u64,
}

impl Complementary {
    /// A filter for `cfg` (validated here).
    pub fn new(cfg: ComplementaryConfig) -> Result<Self, AttitudeError> {
        cfg.validate()?;
        Ok(Complementary {
            cfg,
            att: None,
            rejected: 0,
            streak: 0,
        })
    }

    /// The current estimate (`None` before the first usable accelerometer reading).
    pub fn attitude(&self) -> Option<Attitude> {
        self.att
    }

    /// Accelerometer corrections skipped by the rejection threshold.
    pub fn accel_rejections(&self) -> u64 {
        self.rejected
    }

    /// Corrections skipped in a row up to the last step (0 after one was applied). A long
    /// streak at rest means `gravity` is not 1 g in the accelerometer's unit.
    pub fn rejection_streak(&self) -> u64 {
        self.streak
    }

    /// One step: gyroscope (rad/s), accelerometer, seconds since the previous sample.
    pub fn update(
        &mut self,
        gyro: &Vector3<f64>,
        accel: &Vector3<f64>,
        dt: f64,
    ) -> Result<Option<Attitude>, AttitudeError> {
        check_step(gyro, accel, dt, self.cfg.max_dt_s)?;
        let meas = accel_attitude(accel);
        let Some(att) = self.att else {
            self.att = meas;
            return Ok(self.att);
        };
        let (sr, cr) = att.roll.sin_cos();
        let cp = att.pitch.cos().max(1e-6);
        let tp = att.pitch.sin() / cp;
        let roll_rate = gyro.x + (gyro.y * sr + gyro.z * cr) * tp;
        let pitch_rate = gyro.y * cr - gyro.z * sr;
        let mut roll = wrap_pi(att.roll + roll_rate * dt);
        let mut pitch = (att.pitch + pitch_rate * dt)
            .clamp(-std::f64::consts::FRAC_PI_2, std::f64::consts::FRAC_PI_2);
        let reject = self.cfg.accel_rejection > 0.0
            && (accel.norm() / self.cfg.gravity - 1.0).abs() > self.cfg.accel_rejection;
        if reject {
            self.rejected += 1;
            self.streak += 1;
        } else if let Some(m) = meas {
            self.streak = 0;
            let w = dt / (self.cfg.time_constant_s + dt); // 1 − α
            roll = wrap_pi(roll + w * wrap_pi(m.roll - roll));
            pitch += w * (m.pitch - pitch);
        }
        if !(roll.is_finite() && pitch.is_finite()) {
            return Err(AttitudeError::Input("non-finite result"));
        }
        self.att = Some(Attitude { roll, pitch });
        Ok(self.att)
    }
}

/// Madgwick's orientation filter, IMU form (gyroscope + accelerometer, no magnetometer):
/// `q̇ = ½ q ⊗ (0, ω) − β ∇f / |∇f|`, where `f` is the misfit between the gravity direction
/// predicted by `q` and the measured one (S. Madgwick, *An efficient orientation filter for
/// inertial and inertial/magnetic sensor arrays*, 2010). The quaternion is initialised from the
/// first accelerometer reading (yaw 0).
#[derive(Debug, Clone)]
pub struct Madgwick {
    cfg: MadgwickConfig,
    q: Option<UnitQuaternion<f64>>,
}

impl Madgwick {
    /// A filter for `cfg` (validated here).
    pub fn new(cfg: MadgwickConfig) -> Result<Self, AttitudeError> {
        cfg.validate()?;
        Ok(Madgwick { cfg, q: None })
    }

    /// The orientation (body to earth), if initialised.
    pub fn quaternion(&self) -> Option<UnitQuaternion<f64>> {
        self.q
    }

    /// Roll and pitch of the current orientation.
    pub fn attitude(&self) -> Option<Attitude> {
        self.q.map(|q| {
            let (roll, pitch, _yaw) = q.euler_angles();
            Attitude { roll, pitch }
        })
    }

    /// One step: gyroscope (rad/s), accelerometer, seconds since the previous sample.
    pub fn update(
        &mut self,
        gyro: &Vector3<f64>,
        accel: &Vector3<f64>,
        dt: f64,
    ) -> Result<Option<Attitude>, AttitudeError> {
        check_step(gyro, accel, dt, self.cfg.max_dt_s)?;
        let Some(q) = self.q else {
            self.q = accel_attitude(accel)
                .map(|a| UnitQuaternion::from_euler_angles(a.roll, a.pitch, 0.0));
            return Ok(self.attitude());
        };
        let (q0, q1, q2, q3) = (q.w, q.i, q.j, q.k);
        // ½ q ⊗ (0, ω)
        let mut dq = [
            0.5 * (-q1 * gyro.x - q2 * gyro.y - q3 * gyro.z),
            0.5 * (q0 * gyro.x + q2 * gyro.z - q3 * gyro.y),
            0.5 * (q0 * gyro.y - q1 * gyro.z + q3 * gyro.x),
            0.5 * (q0 * gyro.z + q1 * gyro.y - q2 * gyro.x),
        ];
        let an = accel.norm();
        if an > 0.0 {
            let a = accel / an;
            // Objective f and its Jacobian J (gravity (0, 0, 1) in earth frame).
            let f = [
                2.0 * (q1 * q3 - q0 * q2) - a.x,
                2.0 * (q0 * q1 + q2 * q3) - a.y,
                2.0 * (0.5 - q1 * q1 - q2 * q2) - a.z,
            ];
            let g = [
                -2.0 * q2 * f[0] + 2.0 * q1 * f[1],
                2.0 * q3 * f[0] + 2.0 * q0 * f[1] - 4.0 * q1 * f[2],
                -2.0 * q0 * f[0] + 2.0 * q3 * f[1] - 4.0 * q2 * f[2],
                2.0 * q1 * f[0] + 2.0 * q2 * f[1],
            ];
            let gn = g.iter().map(|v| v * v).sum::<f64>().sqrt();
            if gn > 0.0 {
                for (d, gi) in dq.iter_mut().zip(g) {
                    *d -= self.cfg.beta * gi / gn;
                }
            }
        }
        let raw = Quaternion::new(
            q0 + dq[0] * dt,
            q1 + dq[1] * dt,
            q2 + dq[2] * dt,
            q3 + dq[3] * dt,
        );
        if !raw.coords.iter().all(|v| v.is_finite()) || raw.norm() <= 0.0 {
            return Err(AttitudeError::Input("non-finite result"));
        }
        self.q = Some(UnitQuaternion::from_quaternion(raw));
        Ok(self.attitude())
    }
}

#[cfg(test)]
#[path = "complementary_tests.rs"]
mod tests;
