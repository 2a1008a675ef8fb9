//! Gateway config: one TOML file per gateway ([`schema`]), read with errors that name the
//! file, line, column and key path and say what was expected; unknown keys are errors with
//! a "did you mean"; values are range-checked; secrets may come from files or environment
//! variables ([`types::Secret`]). `outpost check FILE` is [`load`] (or [`load_hub`]) +
//! printing the result.
//!
//! Every problem of a file is reported at once, in file order: after a schema error
//! (unknown key, wrong type, value out of range) the offending key or value is taken out
//! of a working copy of the document and the copy is read again, so the next error shows
//! too. Semantic checks (cross-key rules) run when the only schema errors were unknown
//! keys, whose removal leaves the file's meaning intact.

pub mod fusion;
pub mod hub;
pub mod schema;
pub mod types;
mod validate;

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use fusion::*;
pub use hub::{
    HubConfig, LoadedHub, MqttIngressSection, load_hub, load_hub_checked, parse_hub,
    parse_hub_checked,
};
pub use schema::*;
pub use types::{Bounded, ByteSize, Dur, GatewayId, GatewayIdError, Secret};
pub use validate::{topic_filter_wildcards, topic_prefix_problem};

/// Largest config file accepted (a config is hand-written; anything bigger is a mistake).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Most schema errors reported for one file; past them, the check stops with a note.
pub const MAX_SCHEMA_ERRORS: usize = 100;

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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

/// Every problem found in a config file (at least one), in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Sorts the problems in file order (problems without a place first, as they concern
    /// the whole file).
    fn in_file_order(mut self) -> ConfigErrors {
        self.0.sort_by_key(|e| (e.line.is_some(), e.line, e.column));
        self
    }
}

/// One problem per line, without a prefix (the CLI adds `error: ` or `warning: `).
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
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

/// Which program a config file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    Gateway,
    Hub,
}

/// A file with a top-level `[hub]` table and no `[gateway]` is a hub config; anything else
/// (unreadable or not TOML included) is checked as a gateway config, whose errors then say
/// what is wrong.
pub fn kind_of(path: &Path) -> ConfigKind {
    let Ok(text) = read_config_text(path) else {
        return ConfigKind::Gateway;
    };
    match toml::de::DeTable::parse(&text) {
        Ok(doc) if doc.get_ref().contains_key("hub") && !doc.get_ref().contains_key("gateway") => {
            ConfigKind::Hub
        }
        _ => ConfigKind::Gateway,
    }
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

/// What [`deserialize`] read.
struct Deserialized<'t, T> {
    /// The value, when the file means it: no schema errors, or only unknown keys (which the
    /// value leaves out, as their author meant it to have them). Semantic checks run on it.
    value: Option<T>,
    /// The schema errors, located in the file.
    errors: Vec<ConfigError>,
    /// What was taken out of the document to get past them.
    taken: Vec<KeyPath>,
    /// The spanned document, for locating later (semantic) errors.
    doc: toml::Spanned<toml::de::DeTable<'t>>,
}

impl<T> Deserialized<'_, T> {
    /// Semantic problems of the value, without those about a table that lost a key to a
    /// schema error, its keys or the tables above it (a misspelt method section leaves
    /// its group without a method, and the group's `alarm` without a use: the misspelling
    /// is the error to report). A top-level key taken out only hides top-level problems.
    fn semantic(&self, problems: Problems) -> Problems {
        problems
            .into_iter()
            .filter(|(p, _)| {
                !self.taken.iter().any(|t| {
                    let table = &t.0[..t.0.len().saturating_sub(1)];
                    if table.is_empty() {
                        p.0.is_empty()
                    } else {
                        table.starts_with(&p.0) || p.0.starts_with(table)
                    }
                })
            })
            .collect()
    }
}

/// Semantic problems: a key path and what is wrong there.
type Problems = Vec<(KeyPath, String)>;

/// Deserializes config text into `T`, reporting every schema error: after each, the key
/// or value at fault is taken out of a working copy of the document and the copy is read
/// again, until it reads, nothing more can be taken out, or [`MAX_SCHEMA_ERRORS`] are
/// reported. A syntax error stops at once (the document cannot be read at all).
fn deserialize<'t, T: serde::de::DeserializeOwned>(
    text: &'t str,
    file: &Path,
) -> Result<Deserialized<'t, T>, ConfigErrors> {
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
    let mut work = doc.clone();
    let mut taken = TakenOut::default();
    let mut errors = Vec::new();
    let mut only_unknown_keys = true;
    loop {
        let de = toml::de::Deserializer::from(work.clone());
        let e = match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(value) => {
                return Ok(Deserialized {
                    value: only_unknown_keys.then_some(value),
                    errors,
                    taken: taken.paths,
                    doc,
                });
            }
            Err(e) => e,
        };
        let at = segments(e.path());
        let inner = e.into_inner();
        let Some(at) = at else {
            // A place serde cannot name: report it and stop.
            errors.push(serde_error(file, text, "", &inner));
            break;
        };
        let original = taken.original(&at);
        let shown = if original.0.is_empty() {
            String::new()
        } else {
            original.to_string()
        };
        let message = inner.message().trim();
        let error = serde_error(file, text, &shown, &inner);
        // What to take out of the working copy to get past this error.
        let (remove, report) = if let Some(field) = quoted_after(message, "unknown field `") {
            let mut remove = at.clone();
            if remove.0.last() != Some(&Seg::Key(field.to_owned())) {
                remove.0.push(Seg::Key(field.to_owned()));
            }
            if let Some(meant) = error
                .hint
                .as_deref()
                .and_then(|h| quoted_after(h, "did you mean `"))
            {
                let mut table = taken.original(&remove);
                table.0.pop();
                taken.meant.push(table.key(meant));
            }
            (remove, true)
        } else if let Some(field) = quoted_after(message, "missing field `") {
            only_unknown_keys = false;
            // Missing because an earlier error took it out, or because it is misspelt:
            // that error is reported already.
            let missing = original.clone().key(field);
            let known = taken.paths.contains(&missing) || taken.meant.contains(&missing);
            (at.clone(), !known)
        } else {
            only_unknown_keys = false;
            (at.clone(), true)
        };
        if report {
            errors.push(error);
        }
        if errors.len() >= MAX_SCHEMA_ERRORS {
            errors.push(ConfigError {
                file: file.to_owned(),
                line: None,
                column: None,
                key: "(file)".into(),
                message: format!("stopped after {MAX_SCHEMA_ERRORS} errors"),
                hint: None,
            });
            break;
        }
        if remove.0.is_empty() || !take_out(work.get_mut(), &remove.0) {
            break;
        }
        let original = taken.original(&remove);
        taken.record(original);
    }
    Ok(Deserialized {
        value: None,
        errors,
        taken: taken.paths,
        doc,
    })
}

/// `x` in `…{prefix}x`…`: the name a serde message quotes after `prefix`.
fn quoted_after<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    message
        .strip_prefix(prefix)?
        .split_once('`')
        .map(|(x, _)| x)
}

/// A serde path as a key path; `None` if serde could not follow it (untagged values).
fn segments(path: &serde_path_to_error::Path) -> Option<KeyPath> {
    use serde_path_to_error::Segment;
    path.iter()
        .map(|s| match s {
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            Segment::Unknown => None,
        })
        .collect::<Option<Vec<_>>>()
        .map(KeyPath)
}

/// What [`deserialize`] took out of its working copy: the original paths, and which
/// array elements are gone, so a path in the copy maps back to the file.
#[derive(Default)]
struct TakenOut {
    paths: Vec<KeyPath>,
    /// The keys the unknown keys taken out were probably meant to be (their "did you mean").
    meant: Vec<KeyPath>,
    /// Original indices taken out of each array (by the array's original path), sorted.
    elements: HashMap<Vec<Seg>, Vec<usize>>,
}

impl TakenOut {
    /// The path in the file of `path` in the working copy.
    fn original(&self, path: &KeyPath) -> KeyPath {
        let mut out: Vec<Seg> = Vec::with_capacity(path.0.len());
        for s in &path.0 {
            match s {
                Seg::Index(j) => {
                    // The j-th element the copy still has.
                    let mut i = *j;
                    for gone in self.elements.get(&out).into_iter().flatten() {
                        if *gone <= i {
                            i += 1;
                        } else {
                            break;
                        }
                    }
                    out.push(Seg::Index(i));
                }
                k => out.push(k.clone()),
            }
        }
        KeyPath(out)
    }

    /// Notes that the value at `original` (a path in the file) was taken out.
    fn record(&mut self, original: KeyPath) {
        if let Some((Seg::Index(i), array)) = original.0.split_last() {
            let gone = self.elements.entry(array.to_vec()).or_default();
            let at = gone.partition_point(|g| g < i);
            gone.insert(at, *i);
        }
        self.paths.push(original);
    }
}

/// Takes the key or array element at `path` out of `table`; false if there is none.
fn take_out(table: &mut toml::de::DeTable<'_>, path: &[Seg]) -> bool {
    use toml::de::DeValue;
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let Seg::Key(k) = first else { return false };
    if rest.is_empty() {
        return table.remove(k.as_str()).is_some();
    }
    let Some(v) = table.get_mut(k.as_str()) else {
        return false;
    };
    match v.get_mut() {
        DeValue::Table(t) => take_out(t, rest),
        DeValue::Array(a) => take_out_of_array(a, rest),
        _ => false,
    }
}

fn take_out_of_array(array: &mut toml::de::DeArray<'_>, path: &[Seg]) -> bool {
    use toml::de::DeValue;
    let Some((Seg::Index(i), rest)) = path.split_first() else {
        return false;
    };
    if *i >= array.len() {
        return false;
    }
    if rest.is_empty() {
        let items = std::mem::replace(array, toml::de::DeArray::new());
        *array = items
            .into_iter()
            .enumerate()
            .filter(|(j, _)| j != i)
            .map(|(_, v)| v)
            .collect();
        return true;
    }
    match array.as_mut()[*i].get_mut() {
        DeValue::Table(t) => take_out(t, rest),
        DeValue::Array(a) => take_out_of_array(a, rest),
        _ => false,
    }
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
/// taken relative to `base`. Errors come all at once, in file order.
pub fn parse(text: &str, file: &Path, base: &Path) -> Result<Loaded, ConfigErrors> {
    let mut read = deserialize::<Config>(text, file)?;
    if let Some(config) = &read.value {
        let problems = read.semantic(validate::validate(config));
        let found = located(text, file, &read.doc, problems).0;
        read.errors.extend(found);
    }
    let Deserialized {
        value, errors, doc, ..
    } = read;
    let mut config = match value {
        Some(config) if errors.is_empty() => config,
        _ => return Err(ConfigErrors(errors).in_file_order()),
    };
    validate::rebase_paths(&mut config, base);
    let environment = located(text, file, &doc, validate::environment(&config))
        .in_file_order()
        .0;
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
