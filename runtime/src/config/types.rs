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

/// A gateway's identity, checked once where it enters (the config's `gateway.id`, the
/// `--gateway` of `outpost certs`, a certificate's subject, a frame, an MQTT topic level):
/// a value of this type is valid everywhere it goes.
///
/// The rule: 1 to [`GatewayId::MAX_LEN`] ASCII letters, digits, `-`, `_` or `.`, starting
/// with a letter or digit. It is the strictest of what carries the id: a frame's gateway id
/// field, a level of the MQTT topics `<prefix>/<id>/up` and `/down` (no `/`, `+`, `#`), the
/// hub's folder `<id>/` of output files (never `.` or `..`, nothing hidden), a certificate's
/// subject CN (printable) and metric labels. Ids are compared as written (case matters).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct GatewayId(String);

/// Why a text is not a [`GatewayId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid gateway id {shown:?}: {reason}; expected 1 to 64 ASCII letters, digits, `-`, `_` \
     or `.`, starting with a letter or digit"
)]
pub struct GatewayIdError {
    /// The text (its first 80 characters).
    shown: String,
    /// What is wrong with it.
    reason: &'static str,
}

impl GatewayIdError {
    /// What is wrong, in a few words (`"empty"`, `"longer than 64 bytes"`, ...).
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl GatewayId {
    /// Longest id, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Checks `s` against the gateway id rule.
    pub fn parse(s: &str) -> Result<GatewayId, GatewayIdError> {
        let fail = |reason| GatewayIdError {
            shown: s.chars().take(80).collect(),
            reason,
        };
        let b = s.as_bytes();
        match b.first() {
            None => Err(fail("empty")),
            Some(_) if b.len() > Self::MAX_LEN => Err(fail("longer than 64 bytes")),
            Some(c) if !c.is_ascii_alphanumeric() => {
                Err(fail("must start with an ASCII letter or digit"))
            }
            Some(_)
                if !b
                    .iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')) =>
            {
                Err(fail(
                    "only ASCII letters, digits, '-', '_' and '.' are allowed",
                ))
            }
            Some(_) => Ok(GatewayId(s.to_owned())),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for GatewayId {
    type Err = GatewayIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GatewayId::parse(s)
    }
}

impl TryFrom<&str> for GatewayId {
    type Error = GatewayIdError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        GatewayId::parse(s)
    }
}

impl TryFrom<String> for GatewayId {
    type Error = GatewayIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        GatewayId::parse(&s)
    }
}

impl std::ops::Deref for GatewayId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for GatewayId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for GatewayId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl PartialEq<str> for GatewayId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for GatewayId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<GatewayId> for str {
    fn eq(&self, other: &GatewayId) -> bool {
        self == other.0
    }
}

impl PartialEq<GatewayId> for &str {
    fn eq(&self, other: &GatewayId) -> bool {
        *self == other.0
    }
}

impl<'de> Deserialize<'de> for GatewayId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        GatewayId::parse(&s).map_err(de::Error::custom)
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
    fn gateway_ids_follow_one_rule() {
        for good in [
            "gw",
            "G",
            "0",
            "plant-a-gw01",
            "gw_1.site",
            "gw-",
            "a.b_c-d",
        ] {
            let id = GatewayId::parse(good).unwrap();
            assert_eq!(id, good);
            assert_eq!(id.to_string(), good);
            assert_eq!(format!("{id:?}"), format!("{good:?}"));
        }
        assert!(GatewayId::parse(&"a".repeat(64)).is_ok());
        for (bad, reason) in [
            ("", "empty"),
            (&"a".repeat(65) as &str, "longer than 64 bytes"),
            ("_gw", "must start with an ASCII letter or digit"),
            (".", "must start with an ASCII letter or digit"),
            ("..", "must start with an ASCII letter or digit"),
            ("-gw", "must start with an ASCII letter or digit"),
            (
                "gw/1",
                "only ASCII letters, digits, '-', '_' and '.' are allowed",
            ),
            (
                "gw+",
                "only ASCII letters, digits, '-', '_' and '.' are allowed",
            ),
            (
                "gw#",
                "only ASCII letters, digits, '-', '_' and '.' are allowed",
            ),
            (
                "gw 1",
                "only ASCII letters, digits, '-', '_' and '.' are allowed",
            ),
            (
                "gwé",
                "only ASCII letters, digits, '-', '_' and '.' are allowed",
            ),
            (
                "gw\0",
                "only ASCII letters, digits, '-', '_' and '.' are allowed",
            ),
        ] {
            let e = GatewayId::parse(bad).unwrap_err();
            assert_eq!(e.reason(), reason, "{bad:?}");
            assert!(e.to_string().starts_with("invalid gateway id"), "{e}");
        }
        // A long bad id is shown shortened.
        let e = GatewayId::parse(&"é".repeat(1000)).unwrap_err();
        assert!(e.to_string().len() < 400, "{e}");
        // Deserialized through the same rule.
        #[derive(Deserialize)]
        struct T {
            id: GatewayId,
        }
        assert_eq!(toml::from_str::<T>("id = \"gw-1\"").unwrap().id, "gw-1");
        let e = toml::from_str::<T>("id = \"_gw\"").err().unwrap();
        assert!(e.to_string().contains("invalid gateway id"), "{e}");
        assert_eq!("gw-1".parse::<GatewayId>().unwrap().as_str(), "gw-1");
    }

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
