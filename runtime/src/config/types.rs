//! Value types used in the config schema that check their own range while being
//! deserialized, so that a bad value is reported with the exact line and column of the
//! value in the TOML file.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// An unsigned integer that must lie in `MIN..=MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Bounded<const MIN: u64, const MAX: u64>(pub u64);

impl<const MIN: u64, const MAX: u64> Bounded<MIN, MAX> {
    pub fn get(self) -> u64 {
        self.0
    }
}

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d).map_err(|_| {
            de::Error::custom(format_args!("expected an integer from {MIN} to {MAX}"))
        })?;
        if v < 0 || (v as u64) < MIN || (v as u64) > MAX {
            return Err(de::Error::custom(format_args!(
                "{v} is out of range: expected an integer from {MIN} to {MAX}"
            )));
        }
        Ok(Bounded(v as u64))
    }
}

/// A float that must be finite and lie in `[min, max]` — checked by [`check_f64`] since
/// floats can't be const generic parameters.
pub fn check_f64<'de, D: Deserializer<'de>>(d: D, min: f64, max: f64) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if !v.is_finite() || v < min || v > max {
        return Err(de::Error::custom(format_args!(
            "{v} is out of range: expected a number from {min} to {max}"
        )));
    }
    Ok(v)
}

/// A duration written as a string with a unit: `"250ms"`, `"5s"`, `"1m 30s"`, `"2h"`.
/// `MIN_MS..=MAX_MS` bounds it, in milliseconds.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur<const MIN_MS: u64, const MAX_MS: u64>(pub Duration);

impl<const MIN_MS: u64, const MAX_MS: u64> Dur<MIN_MS, MAX_MS> {
    pub fn get(self) -> Duration {
        self.0
    }
    pub const fn from_millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
}

impl<const A: u64, const B: u64> fmt::Debug for Dur<A, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<const A: u64, const B: u64> Serialize for Dur<A, B> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

impl<'de, const MIN_MS: u64, const MAX_MS: u64> Deserialize<'de> for Dur<MIN_MS, MAX_MS> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const A: u64, const B: u64>;
        impl<const A: u64, const B: u64> Visitor<'_> for V<A, B> {
            type Value = Dur<A, B>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a duration string such as \"500ms\" or \"10s\", from {} to {}",
                    humantime::format_duration(Duration::from_millis(A)),
                    humantime::format_duration(Duration::from_millis(B))
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                let d = humantime::parse_duration(s.trim()).map_err(|e| {
                    E::custom(format_args!(
                        "invalid duration {s:?} ({e}): expected a number with a unit such as \"500ms\", \"10s\", \"5m\""
                    ))
                })?;
                let ms = d.as_millis();
                if ms < u128::from(A) || ms > u128::from(B) {
                    return Err(E::custom(format_args!(
                        "duration {s:?} is out of range: expected from {} to {}",
                        humantime::format_duration(Duration::from_millis(A)),
                        humantime::format_duration(Duration::from_millis(B))
                    )));
                }
                Ok(Dur(d))
            }
        }
        d.deserialize_str(V::<MIN_MS, MAX_MS>)
    }
}

/// A size in bytes: an integer, or a string with a unit (`"512MiB"`, `"2 GB"`, `"64k"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

/// Parses `"512MiB"`, `"2GB"`, `"64 k"`, `"1000"`: decimal (k, M, G, T = 1000^n) and binary
/// (Ki, Mi, Gi, Ti = 1024^n) prefixes, with or without a trailing `B`.
pub fn parse_byte_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let unit = unit.trim();
    let unit = unit.strip_suffix(['B', 'b']).unwrap_or(unit);
    let mult: f64 = match unit {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" | "ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = num * mult;
    (v.is_finite() && (0.0..1.8e19).contains(&v)).then_some(v as u64)
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"512MiB\", \"2GB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| {
                    E::custom(format_args!(
                        "{v} is out of range: a size cannot be negative"
                    ))
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ByteSize, E> {
                parse_byte_size(s).map(ByteSize).ok_or_else(|| {
                    E::custom(format_args!(
                        "invalid size {s:?}: expected a number with an optional unit such as \"512MiB\" or \"2GB\""
                    ))
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A secret (password, private key): written inline, or read from a file or an
/// environment variable so it need not live in the config file.
///
/// ```toml
/// password = "inline"              # discouraged
/// password = { env = "MQTT_PASSWORD" }
/// password = { file = "/etc/outpost/mqtt.pw" }
/// ```
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Secret {
    Inline(String),
    Env { env: String },
    File { file: PathBuf },
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Inline(_) => f.write_str("Secret(inline, redacted)"),
            Secret::Env { env } => write!(f, "Secret(env {env})"),
            Secret::File { file } => write!(f, "Secret(file {})", file.display()),
        }
    }
}

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} is not set (or not valid UTF-8)")]
    EnvMissing(String),
    #[error("cannot read secret file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret file {0} is larger than 1 MiB")]
    TooLarge(PathBuf),
}

impl Secret {
    /// Reads the secret's bytes (a file's trailing newline is kept; trim where it matters).
    pub fn resolve(&self) -> Result<Vec<u8>, SecretError> {
        match self {
            Secret::Inline(s) => Ok(s.as_bytes().to_vec()),
            Secret::Env { env } => std::env::var(env)
                .map(String::into_bytes)
                .map_err(|_| SecretError::EnvMissing(env.clone())),
            Secret::File { file } => {
                let meta = std::fs::metadata(file).map_err(|source| SecretError::File {
                    path: file.clone(),
                    source,
                })?;
                if meta.len() > 1 << 20 {
                    return Err(SecretError::TooLarge(file.clone()));
                }
                std::fs::read(file).map_err(|source| SecretError::File {
                    path: file.clone(),
                    source,
                })
            }
        }
    }

    /// The secret as text with surrounding whitespace (a file's final newline) removed.
    pub fn resolve_string(&self) -> Result<String, SecretError> {
        let bytes = self.resolve()?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_byte_size("512MiB"), Some(512 * 1024 * 1024));
        assert_eq!(parse_byte_size("2GB"), Some(2_000_000_000));
        assert_eq!(parse_byte_size("64 k"), Some(64_000));
        assert_eq!(parse_byte_size("1000"), Some(1000));
        assert_eq!(parse_byte_size("1.5Ki"), Some(1536));
        assert_eq!(parse_byte_size("-1"), None);
        assert_eq!(parse_byte_size("12 parsecs"), None);
        assert_eq!(parse_byte_size(""), None);
    }
}
