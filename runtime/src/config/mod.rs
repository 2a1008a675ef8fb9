//! Gateway config: one TOML file per gateway ([`schema`]), read with errors that name the
//! file, line, column and key path and say what was expected; unknown keys are errors with
//! a "did you mean"; values are range-checked; secrets may come from files or environment
//! variables ([`types::Secret`]). `outpost check FILE` is [`load`] + printing the result.

pub mod fusion;
pub mod hub;
pub mod schema;
pub mod types;
mod validate;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use fusion::*;
pub use hub::{HubConfig, MqttIngressSection, load_hub, parse_hub};
pub use schema::*;
pub use types::{Bounded, ByteSize, Dur, GatewayId, GatewayIdError, Secret};
pub use validate::{topic_filter_wildcards, topic_prefix_problem};

/// Largest config file accepted (a config is hand-written; anything bigger is a mistake).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A key path such as `devices[0].modbus.address`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    pub fn key(mut self, k: &str) -> KeyPath {
        self.0.push(Seg::Key(k.to_owned()));
        self
    }
    pub fn index(mut self, i: usize) -> KeyPath {
        self.0.push(Seg::Index(i));
        self
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(top level)");
        }
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when the problem has a place in the file.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The key path, e.g. `devices[0].modbus.address`.
    pub key: String,
    /// What is wrong and what was expected.
    pub message: String,
    /// E.g. "did you mean `address`?"
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        write!(f, ": `{}`: {}", self.key, self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "; {h}")?;
        }
        Ok(())
    }
}

/// Every problem found in a config file (at least one).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A config that passed validation, with what it needs from this machine and did not find
/// (missing files, unset environment variables).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub environment: Vec<ConfigError>,
}

impl Loaded {
    /// The config, or the environment problems as errors (what `outpost run` needs).
    pub fn strict(self) -> Result<Config, ConfigErrors> {
        if self.environment.is_empty() {
            Ok(self.config)
        } else {
            Err(ConfigErrors(self.environment))
        }
    }
}

/// Reads and validates a config file. Relative paths in it are taken relative to the
/// file's folder.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let text = read_config_text(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, path, base)
}

/// Reads a config file, refusing one larger than [`MAX_CONFIG_BYTES`].
fn read_config_text(path: &Path) -> Result<String, ConfigErrors> {
    let io_err = |message: String| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: None,
            column: None,
            key: "(file)".into(),
            message,
            hint: None,
        }])
    };
    let meta = std::fs::metadata(path).map_err(|e| io_err(format!("cannot read: {e}")))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(io_err(format!(
            "file is {} bytes; a config may be at most {MAX_CONFIG_BYTES}",
            meta.len()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| io_err(format!("cannot read: {e}")))
}

/// Deserializes config text into `T`, with located errors; also returns the spanned
/// document for locating later (semantic) errors.
fn deserialize<'t, T: serde::de::DeserializeOwned>(
    text: &'t str,
    file: &Path,
) -> Result<(T, toml::Spanned<toml::de::DeTable<'t>>), ConfigErrors> {
    let doc = toml::de::DeTable::parse(text).map_err(|e| {
        ConfigErrors(vec![locate(
            file,
            text,
            e.span(),
            "(syntax)".into(),
            e.message().trim().to_owned(),
            None,
        )])
    })?;
    let de = toml::de::Deserializer::from(doc.clone());
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ConfigErrors(vec![serde_error(file, text, &path, &inner)])
    })?;
    Ok((value, doc))
}

/// Locates semantic problems (key paths) in the document.
fn located(
    text: &str,
    file: &Path,
    doc: &toml::Spanned<toml::de::DeTable<'_>>,
    problems: Vec<(KeyPath, String)>,
) -> ConfigErrors {
    ConfigErrors(
        problems
            .into_iter()
            .map(|(path, message)| {
                let span = span_of(doc, &path);
                locate(file, text, span, path.to_string(), message, None)
            })
            .collect(),
    )
}

/// Parses and validates config text. `file` names it in messages; relative paths are
/// taken relative to `base`.
pub fn parse(text: &str, file: &Path, base: &Path) -> Result<Loaded, ConfigErrors> {
    let (mut config, doc): (Config, _) = deserialize(text, file)?;
    let problems = validate::validate(&config);
    if !problems.is_empty() {
        return Err(located(text, file, &doc, problems));
    }
    validate::rebase_paths(&mut config, base);
    let environment = located(text, file, &doc, validate::environment(&config)).0;
    Ok(Loaded {
        config,
        environment,
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

fn locate(
    file: &Path,
    text: &str,
    span: Option<Range<usize>>,
    key: String,
    message: String,
    hint: Option<String>,
) -> ConfigError {
    let (line, column) = match span {
        Some(s) => {
            let (l, c) = line_col(text, s.start);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    ConfigError {
        file: file.to_owned(),
        line,
        column,
        key,
        message,
        hint,
    }
}

/// Turns a serde/toml error into a located error with a key path and, for unknown keys,
/// a suggestion.
fn serde_error(file: &Path, text: &str, path: &str, e: &toml::de::Error) -> ConfigError {
    let msg = e.message().trim().to_owned();
    let path = if path == "." {
        String::new()
    } else {
        path.to_owned()
    };
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    // "unknown field `adress`, expected one of `address`, `unit_id`" / "expected `x`"
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some((field, tail)) = rest.split_once('`')
    {
        let expected: Vec<&str> = tail
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|s| !s.is_empty())
            .collect();
        let hint = did_you_mean(field, &expected).map(|k| format!("did you mean `{k}`?"));
        // serde_path_to_error already includes the unknown key in the path.
        let key = if path.ends_with(field) {
            path.clone()
        } else {
            join(field)
        };
        let message = if expected.is_empty() {
            format!("unknown key `{field}`: this table takes no keys")
        } else {
            format!(
                "unknown key `{field}`: expected one of {}",
                quoted_list(&expected)
            )
        };
        return locate(file, text, e.span(), key, message, hint);
    }
    if let Some(rest) = msg.strip_prefix("missing field `")
        && let Some((field, _)) = rest.split_once('`')
    {
        return locate(
            file,
            text,
            e.span(),
            join(field),
            format!("missing required key `{field}`"),
            None,
        );
    }
    if let Some(rest) = msg.strip_prefix("unknown variant `")
        && let Some((variant, tail)) = rest.split_once('`')
    {
        let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        let hint = did_you_mean(variant, &expected).map(|k| format!("did you mean `{k}`?"));
        return locate(
            file,
            text,
            e.span(),
            if path.is_empty() {
                "(top level)".into()
            } else {
                path
            },
            format!(
                "unknown value `{variant}`: expected one of {}",
                quoted_list(&expected)
            ),
            hint,
        );
    }
    let msg = msg.replace("invalid type: ", "wrong type: ");
    locate(
        file,
        text,
        e.span(),
        if path.is_empty() {
            "(top level)".into()
        } else {
            path
        },
        msg,
        None,
    )
}

/// "`a`, `b`, `c`"
fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The closest known key, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(unknown, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Finds the span of the value at `path` in the parsed document (the nearest existing
/// ancestor when the key itself is absent).
fn span_of(doc: &toml::Spanned<toml::de::DeTable<'_>>, path: &KeyPath) -> Option<Range<usize>> {
    use toml::de::DeValue;
    let mut span = doc.span();
    let mut table: Option<&toml::de::DeTable<'_>> = Some(doc.get_ref());
    let mut array: Option<&toml::de::DeArray<'_>> = None;
    for seg in &path.0 {
        let next = match seg {
            Seg::Key(k) => table.and_then(|t| {
                t.iter()
                    .find(|(key, _)| key.get_ref().as_ref() == k.as_str())
                    .map(|(key, v)| (key.span(), v))
            }),
            Seg::Index(i) => array.and_then(|a| a.get(*i)).map(|v| (v.span(), v)),
        };
        let Some((key_span, value)) = next else { break };
        span = key_span;
        table = None;
        array = None;
        match value.get_ref() {
            DeValue::Table(t) => table = Some(t),
            DeValue::Array(a) => array = Some(a),
            _ => {}
        }
    }
    Some(span)
}

#[cfg(test)]
mod tests;
