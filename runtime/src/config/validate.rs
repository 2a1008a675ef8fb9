//! Checks that span several keys or need more than a type: unique names, references
//! between sections, address syntax, topic filters, files and secrets that must exist.

use std::collections::{HashMap, HashSet};

use super::fusion::{FUSION_METHODS, FusionGroupConfig, FusionMethod};
use super::schema::*;
use super::{KeyPath, Secret};
use crate::model::StreamId;

/// MQTT's largest packet: a remaining length of 268,435,455 bytes plus a 5-byte header,
/// rounded down to 256 MiB.
pub const MAX_MQTT_PACKET: u64 = 256 << 20;

type Problems = Vec<(KeyPath, String)>;

fn root() -> KeyPath {
    KeyPath::default()
}

/// Every problem found; empty when the config is valid.
pub(super) fn validate(c: &Config) -> Problems {
    let mut p = Problems::new();
    if c.storage.quota.0 < 1 << 20 {
        p.push((
            root().key("storage").key("quota"),
            format!(
                "quota of {} bytes is too small: expected at least 1MiB",
                c.storage.quota.0
            ),
        ));
    }

    let mut streams: HashMap<String, KeyPath> = HashMap::new();
    let mut device_names = HashSet::new();
    for (i, d) in c.devices.iter().enumerate() {
        let at = root().key("devices").index(i);
        if d.name.trim().is_empty() {
            p.push((at.clone().key("name"), "device name is empty".into()));
        } else if !device_names.insert(d.name.as_str()) {
            p.push((
                at.clone().key("name"),
                format!("duplicate device name {:?}: names must be unique", d.name),
            ));
        }
        let sections = usize::from(d.modbus.is_some()) + usize::from(d.mqtt.is_some());
        if sections != 1 {
            p.push((
                at.clone(),
                format!(
                    "device {:?} must have exactly one protocol section (`modbus` or `mqtt`), found {sections}",
                    d.name
                ),
            ));
        }
        if let Some(m) = &d.modbus {
            let at = at.clone().key("modbus");
            check_host_port(&mut p, &m.address, at.clone().key("address"));
            if m.poll_groups.is_empty() {
                p.push((
                    at.clone().key("poll_groups"),
                    "expected at least one poll group".into(),
                ));
            }
            for (g, group) in m.poll_groups.iter().enumerate() {
                let at = at.clone().key("poll_groups").index(g);
                if group.points.is_empty() {
                    p.push((
                        at.clone().key("points"),
                        "expected at least one point".into(),
                    ));
                }
                for (k, pt) in group.points.iter().enumerate() {
                    let at = at.clone().key("points").index(k);
                    add_stream(&mut p, &mut streams, &pt.stream, at.clone().key("stream"));
                    let bit_table =
                        matches!(pt.table, ModbusTable::Coil | ModbusTable::DiscreteInput);
                    if bit_table != (pt.data_type == ModbusType::Bool) {
                        p.push((
                            at.clone().key("type"),
                            if bit_table {
                                "coils and discrete inputs hold bits: expected type = \"bool\"".into()
                            } else {
                                "registers hold numbers: expected one of u16, i16, u32, i32, f32, f64".into()
                            },
                        ));
                    }
                    if pt.address.0 + u64::from(pt.data_type.width()) > 65_536 {
                        p.push((
                            at.clone().key("address"),
                            format!(
                                "a {:?} at address {} runs past the last register (65535)",
                                pt.data_type, pt.address.0
                            ),
                        ));
                    }
                    if !pt.scale.is_finite() || pt.scale == 0.0 {
                        p.push((
                            at.clone().key("scale"),
                            "expected a finite, non-zero number".into(),
                        ));
                    }
                    if !pt.offset.is_finite() {
                        p.push((at.clone().key("offset"), "expected a finite number".into()));
                    }
                }
            }
        }
        if let Some(m) = &d.mqtt {
            let at = at.clone().key("mqtt");
            check_host_port(&mut p, &m.broker, at.clone().key("broker"));
            if m.password.is_some() && m.username.is_none() {
                p.push((
                    at.clone().key("password"),
                    "a password needs a `username`".into(),
                ));
            }
            if let Some(t) = &m.tls
                && t.cert.is_some() != t.key.is_some()
            {
                p.push((
                    at.clone().key("tls"),
                    "a client certificate needs both `cert` and `key`".into(),
                ));
            }
            if m.reconnect.initial.get() > m.reconnect.max.get() {
                p.push((
                    at.clone().key("reconnect").key("initial"),
                    "initial backoff is larger than `max`".into(),
                ));
            }
            if m.subscriptions.is_empty() {
                p.push((
                    at.clone().key("subscriptions"),
                    "expected at least one subscription".into(),
                ));
            }
            if !(1024..=MAX_MQTT_PACKET).contains(&m.max_packet.0) {
                p.push((
                    at.clone().key("max_packet"),
                    format!(
                        "{} bytes is out of range: expected from 1KiB to 256MiB (MQTT's largest packet)",
                        m.max_packet.0
                    ),
                ));
            } else if m.max_payload.0 == 0 || m.max_payload.0 > m.max_packet.0 {
                p.push((
                    at.clone().key("max_payload"),
                    format!(
                        "{} bytes is out of range: expected from 1 byte to `max_packet` ({} bytes)",
                        m.max_payload.0, m.max_packet.0
                    ),
                ));
            }
            for (k, s) in m.subscriptions.iter().enumerate() {
                let at = at.clone().key("subscriptions").index(k);
                let wildcards = match topic_filter_wildcards(&s.topic) {
                    Ok(n) => n,
                    Err(e) => {
                        p.push((at.clone().key("topic"), e));
                        0
                    }
                };
                let check_template = |p: &mut Problems, name: &str, at: KeyPath| {
                    for n in placeholders(name) {
                        if n == 0 || n > wildcards {
                            p.push((
                                at.clone(),
                                format!(
                                    "placeholder {{{n}}} refers to a `+` wildcard the topic {:?} does not have ({wildcards} there)",
                                    s.topic
                                ),
                            ));
                        }
                    }
                };
                match s.format {
                    PayloadFormat::Json => {
                        if s.fields.is_empty() {
                            p.push((
                                at.clone().key("fields"),
                                "format \"json\" needs at least one `fields` entry".into(),
                            ));
                        }
                        if s.stream.is_some() {
                            p.push((
                                at.clone().key("stream"),
                                "format \"json\" names its streams in `fields`; remove `stream`"
                                    .into(),
                            ));
                        }
                        for (f, field) in s.fields.iter().enumerate() {
                            let at = at.clone().key("fields").index(f);
                            if !(field.pointer.is_empty() || field.pointer.starts_with('/')) {
                                p.push((
                                    at.clone().key("pointer"),
                                    format!("invalid JSON pointer {:?}: expected \"\" or a path starting with `/`", field.pointer),
                                ));
                            }
                            check_template(&mut p, &field.stream, at.clone().key("stream"));
                            add_stream(
                                &mut p,
                                &mut streams,
                                &field.stream,
                                at.clone().key("stream"),
                            );
                        }
                    }
                    PayloadFormat::Number | PayloadFormat::Raw => {
                        match &s.stream {
                            Some(name) => {
                                check_template(&mut p, name, at.clone().key("stream"));
                                add_stream(&mut p, &mut streams, name, at.clone().key("stream"));
                            }
                            None => p.push((
                                at.clone().key("stream"),
                                "formats \"number\" and \"raw\" need a `stream` name".into(),
                            )),
                        }
                        if !s.fields.is_empty() {
                            p.push((
                                at.clone().key("fields"),
                                "`fields` is only for format \"json\"".into(),
                            ));
                        }
                    }
                }
                if let Some(ptr) = &s.timestamp_pointer
                    && !(ptr.is_empty() || ptr.starts_with('/'))
                {
                    p.push((
                        at.clone().key("timestamp_pointer"),
                        format!("invalid JSON pointer {ptr:?}: expected a path starting with `/`"),
                    ));
                }
            }
        }
    }

    validate_fusion(c, &mut p, &mut streams);

    if let Some(u) = &c.uplink {
        validate_uplink(u, &mut p);
    }

    let l = &c.link;
    let at = root().key("link");
    for (key, v) in [
        ("fiber_min_mbps", l.fiber_min_mbps),
        ("broadband_min_mbps", l.broadband_min_mbps),
        ("mobile_min_mbps", l.mobile_min_mbps),
    ] {
        if !v.is_finite() || v <= 0.0 || v > 1e6 {
            p.push((
                at.clone().key(key),
                format!("{v} is out of range: expected a rate in Mbit/s from above 0 to 1000000"),
            ));
        }
    }
    if !(l.fiber_min_mbps > l.broadband_min_mbps && l.broadband_min_mbps > l.mobile_min_mbps) {
        p.push((
            at.clone().key("broadband_min_mbps"),
            "thresholds must decrease: fiber_min_mbps > broadband_min_mbps > mobile_min_mbps"
                .into(),
        ));
    }
    if l.satellite_min_rtt <= l.fiber_max_rtt {
        p.push((
            at.key("satellite_min_rtt"),
            "satellite_min_rtt must be larger than fiber_max_rtt".into(),
        ));
    }
    p
}

/// `[uplink]`: the keys of the chosen transport must be there (and make sense).
fn validate_uplink(u: &UplinkConfig, p: &mut Problems) {
    let at = root().key("uplink");
    match u.transport {
        UplinkTransport::Quic => {
            let mut missing = |key: &str, what: &str| {
                p.push((
                    at.clone().key(key),
                    format!(
                        "missing required key `{key}` ({what}): transport \"quic\" needs `hub`, `server_name`, `ca`, `cert` and `key`"
                    ),
                ))
            };
            if u.hub.is_none() {
                missing("hub", "the hub's host:port");
            }
            if u.server_name.is_none() {
                missing("server_name", "the name in the hub's certificate");
            }
            if u.ca.is_none() {
                missing("ca", "the CA certificate");
            }
            if u.cert.is_none() {
                missing("cert", "this gateway's certificate");
            }
            if u.key.is_none() {
                missing("key", "this gateway's private key");
            }
            if let Some(hub) = &u.hub {
                check_host_port(p, hub, at.clone().key("hub"));
            }
            if let Some(name) = &u.server_name
                && name.trim().is_empty()
            {
                p.push((
                    at.clone().key("server_name"),
                    "expected the name in the hub's certificate".into(),
                ));
            }
        }
        UplinkTransport::Mqtt => {
            let Some(m) = &u.mqtt else {
                p.push((
                    at.clone().key("mqtt"),
                    "transport \"mqtt\" needs an [uplink.mqtt] table with at least `broker = \"host:port\"`".into(),
                ));
                return;
            };
            let at = at.key("mqtt");
            check_host_port(p, &m.broker, at.clone().key("broker"));
            if m.client_id.as_deref().is_some_and(str::is_empty) {
                p.push((
                    at.clone().key("client_id"),
                    "an MQTT client id may not be empty; leave it out for `outpost-<gateway id>-uplink`".into(),
                ));
            }
            if m.password.is_some() && m.username.is_none() {
                p.push((
                    at.clone().key("password"),
                    "a password needs a `username`".into(),
                ));
            }
            if let Some(t) = &m.tls
                && t.cert.is_some() != t.key.is_some()
            {
                p.push((
                    at.clone().key("tls"),
                    "a client certificate needs both `cert` and `key`".into(),
                ));
            }
            if let Some(e) = topic_prefix_problem(&m.topic_prefix) {
                p.push((at.clone().key("topic_prefix"), e));
            }
            if !(1024..=1 << 20).contains(&m.max_payload.0) {
                p.push((
                    at.key("max_payload"),
                    format!(
                        "{} bytes is out of range: expected from 1KiB to 1MiB (the largest frame)",
                        m.max_payload.0
                    ),
                ));
            }
        }
    }
}

/// Why `prefix` cannot be the first levels of the MQTT uplink's topics
/// (`<prefix>/<gateway>/up`, `<prefix>/<gateway>/down`), or `None` when it can.
pub fn topic_prefix_problem(prefix: &str) -> Option<String> {
    if prefix.is_empty() {
        return Some("the topic prefix is empty: expected e.g. \"outpost\"".into());
    }
    if prefix.len() > 1024 {
        return Some("the topic prefix is longer than 1024 bytes".into());
    }
    if prefix.contains(['+', '#']) {
        return Some(format!(
            "invalid topic prefix {prefix:?}: the wildcards `+` and `#` are not allowed"
        ));
    }
    if prefix.starts_with('$') {
        return Some(format!(
            "invalid topic prefix {prefix:?}: topics starting with `$` are reserved for the broker"
        ));
    }
    if prefix.chars().any(char::is_control) {
        return Some(format!(
            "invalid topic prefix {prefix:?}: control characters are not allowed"
        ));
    }
    if prefix.split('/').any(str::is_empty) {
        return Some(format!(
            "invalid topic prefix {prefix:?}: empty topic level (a leading, trailing or doubled `/`)"
        ));
    }
    None
}

/// `{1}` placeholders replaced by a letter, so a template can be checked as a stream name.
fn placeholder_free(name: &str) -> String {
    name.replace(['{', '}'], "_")
}

/// One piece of a stream-name template: literal text, or `{n}` (n ≥ 1), the level matched
/// by the n-th `+` of the topic filter.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TemplatePart<'a> {
    Lit(&'a str),
    Level(usize),
}

/// Splits a stream-name template the way the MQTT mapping expands it: `{n}` with n ≥ 1 is a
/// placeholder; any other brace text is literal.
fn template_parts(template: &str) -> Vec<TemplatePart<'_>> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else { break };
        match after[..end].parse::<usize>() {
            Ok(n) if n >= 1 => {
                if start > 0 {
                    out.push(TemplatePart::Lit(&rest[..start]));
                }
                out.push(TemplatePart::Level(n));
            }
            _ => out.push(TemplatePart::Lit(&rest[..start + end + 2])),
        }
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        out.push(TemplatePart::Lit(rest));
    }
    out
}

/// Whether an MQTT stream template (`tank/{1}`) can produce `name`: each placeholder stands
/// for one topic level (no `/`, `+`, `#`; possibly empty), the same placeholder for the same
/// text. The search is bounded (templates come from the file); a template too ambiguous to
/// decide within the bound does not match.
fn template_matches(template: &str, name: &str) -> bool {
    fn go<'a>(
        parts: &[TemplatePart<'_>],
        name: &'a str,
        bound: &mut Vec<(usize, &'a str)>,
        budget: &mut u32,
    ) -> bool {
        if *budget == 0 {
            return false;
        }
        *budget -= 1;
        let Some((first, rest)) = parts.split_first() else {
            return name.is_empty();
        };
        match *first {
            TemplatePart::Lit(l) => name
                .strip_prefix(l)
                .is_some_and(|r| go(rest, r, bound, budget)),
            TemplatePart::Level(n) => {
                if let Some(&(_, v)) = bound.iter().find(|(k, _)| *k == n) {
                    return name
                        .strip_prefix(v)
                        .is_some_and(|r| go(rest, r, bound, budget));
                }
                let level = name.find(['/', '+', '#', '\0']).unwrap_or(name.len());
                for end in (0..=level).filter(|&e| name.is_char_boundary(e)) {
                    bound.push((n, &name[..end]));
                    if go(rest, &name[end..], bound, budget) {
                        return true;
                    }
                    bound.pop();
                }
                false
            }
        }
    }
    let parts = template_parts(template);
    if !parts.iter().any(|p| matches!(p, TemplatePart::Level(_))) {
        return template == name;
    }
    go(&parts, name, &mut Vec::new(), &mut 100_000)
}

/// The numbers inside `{n}` placeholders.
fn placeholders(name: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = name;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => {
                out.push(after[..end].parse().unwrap_or(0));
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    out
}

/// Validates an MQTT topic filter; returns its number of `+` wildcards.
pub fn topic_filter_wildcards(filter: &str) -> Result<usize, String> {
    if filter.is_empty() || filter.len() > 65_535 {
        return Err("invalid topic filter: expected 1 to 65535 bytes".into());
    }
    let segs: Vec<&str> = filter.split('/').collect();
    let mut plus = 0;
    for (i, s) in segs.iter().enumerate() {
        if s.contains('#') && (*s != "#" || i + 1 != segs.len()) {
            return Err(format!(
                "invalid topic filter {filter:?}: `#` must be a whole, last level"
            ));
        }
        if s.contains('+') {
            if *s != "+" {
                return Err(format!(
                    "invalid topic filter {filter:?}: `+` must be a whole level"
                ));
            }
            plus += 1;
        }
    }
    Ok(plus)
}

fn check_host_port(p: &mut Problems, addr: &str, at: KeyPath) {
    let Some((host, port)) = addr.rsplit_once(':') else {
        p.push((
            at,
            format!("invalid address {addr:?}: expected host:port, e.g. \"127.0.0.1:502\""),
        ));
        return;
    };
    if host.trim_matches(['[', ']']).is_empty() {
        p.push((at, format!("invalid address {addr:?}: the host is empty")));
        return;
    }
    match port.parse::<u32>() {
        Ok(n) if (1..=65_535).contains(&n) => {}
        Ok(n) => p.push((at, format!("port {n} is out of range: expected 1 to 65535"))),
        Err(_) => p.push((
            at,
            format!("invalid port {port:?} in {addr:?}: expected a number from 1 to 65535"),
        )),
    }
}

fn check_file(p: &mut Problems, path: &std::path::Path, at: KeyPath) {
    if let Err(e) = std::fs::metadata(path) {
        p.push((at, format!("cannot read {}: {e}", path.display())));
    }
}

fn check_secret(p: &mut Problems, s: &Secret, at: KeyPath) {
    if let Err(e) = s.resolve() {
        p.push((at, e.to_string()));
    }
}

fn check_tls(p: &mut Problems, t: &TlsClientConfig, at: KeyPath) {
    check_file(p, &t.ca, at.clone().key("ca"));
    if let Some(c) = &t.cert {
        check_file(p, c, at.clone().key("cert"));
    }
    if let Some(k) = &t.key {
        check_secret(p, k, at.key("key"));
    }
}

/// What the config needs from the machine: files that must exist, secrets that must
/// resolve. Separate from [`validate`] so `outpost check` can validate a config on a
/// machine other than the gateway.
pub(super) fn environment(c: &Config) -> Problems {
    let mut p = Problems::new();
    for (i, d) in c.devices.iter().enumerate() {
        if let Some(m) = &d.mqtt {
            let at = root().key("devices").index(i).key("mqtt");
            if let Some(s) = &m.password {
                check_secret(&mut p, s, at.clone().key("password"));
            }
            if let Some(t) = &m.tls {
                check_tls(&mut p, t, at.key("tls"));
            }
        }
    }
    if let Some(u) = &c.uplink {
        let at = root().key("uplink");
        match u.transport {
            UplinkTransport::Quic => {
                if let Some(ca) = &u.ca {
                    check_file(&mut p, ca, at.clone().key("ca"));
                }
                if let Some(cert) = &u.cert {
                    check_file(&mut p, cert, at.clone().key("cert"));
                }
                if let Some(key) = &u.key {
                    check_secret(&mut p, key, at.key("key"));
                }
            }
            UplinkTransport::Mqtt => {
                if let Some(m) = &u.mqtt {
                    let at = at.key("mqtt");
                    if let Some(s) = &m.password {
                        check_secret(&mut p, s, at.clone().key("password"));
                    }
                    if let Some(t) = &m.tls {
                        check_tls(&mut p, t, at.key("tls"));
                    }
                }
            }
        }
    }
    p
}

/// Makes every relative path in the config relative to `base` (the config file's folder).
pub(super) fn rebase_paths(c: &mut Config, base: &std::path::Path) {
    fn fix(p: &mut std::path::PathBuf, base: &std::path::Path) {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    fn fix_secret(s: &mut Secret, base: &std::path::Path) {
        if let Secret::File { file } = s {
            fix(file, base);
        }
    }
    fn fix_tls(t: &mut TlsClientConfig, base: &std::path::Path) {
        fix(&mut t.ca, base);
        if let Some(c) = &mut t.cert {
            fix(c, base);
        }
        if let Some(k) = &mut t.key {
            fix_secret(k, base);
        }
    }
    fix(&mut c.gateway.data_dir, base);
    for d in &mut c.devices {
        if let Some(m) = &mut d.mqtt {
            if let Some(s) = &mut m.password {
                fix_secret(s, base);
            }
            if let Some(t) = &mut m.tls {
                fix_tls(t, base);
            }
        }
    }
    if let Some(u) = &mut c.uplink {
        if let Some(ca) = &mut u.ca {
            fix(ca, base);
        }
        if let Some(cert) = &mut u.cert {
            fix(cert, base);
        }
        if let Some(key) = &mut u.key {
            fix_secret(key, base);
        }
        if let Some(m) = &mut u.mqtt {
            if let Some(s) = &mut m.password {
                fix_secret(s, base);
            }
            if let Some(t) = &mut m.tls {
                fix_tls(t, base);
            }
        }
    }
}

fn add_stream(p: &mut Problems, streams: &mut HashMap<String, KeyPath>, name: &str, at: KeyPath) {
    if let Err(e) = StreamId::intern(&placeholder_free(name)) {
        p.push((at.clone(), format!("invalid stream name {name:?}: {e}")));
    }
    if let Some(prev) = streams.get(name) {
        p.push((
            at,
            format!("stream {name:?} is already produced by `{prev}`: stream names must be unique"),
        ));
    } else {
        streams.insert(name.to_owned(), at);
    }
}

/// The `[[fusion]]` groups: names, inputs (known streams, counts the method needs), exactly
/// one method section and its values, outputs and alarm streams.
fn validate_fusion(c: &Config, p: &mut Problems, streams: &mut HashMap<String, KeyPath>) {
    let mut group_names = HashSet::new();
    // Inputs may come from devices and from earlier groups (no cycles). A device stream
    // named from the topic (`tank/{1}`) produces every name its template can expand to.
    let mut known: HashSet<String> = streams.keys().cloned().collect();
    let mut templates: Vec<(String, KeyPath)> = streams
        .iter()
        .filter(|(name, _)| {
            template_parts(name)
                .iter()
                .any(|p| matches!(p, TemplatePart::Level(_)))
        })
        .map(|(name, at)| (name.clone(), at.clone()))
        .collect();
    templates.sort_by_key(|(_, at)| at.to_string());
    let from_template = |name: &str| {
        templates
            .iter()
            .find(|(t, _)| template_matches(t, name))
            .map(|(t, at)| (t.clone(), at.clone()))
    };
    let mut produced = Vec::new();
    for (i, g) in c.fusion.iter().enumerate() {
        let at = root().key("fusion").index(i);
        if !group_names.insert(g.name.as_str()) {
            p.push((
                at.clone().key("name"),
                format!("duplicate fusion group name {:?}", g.name),
            ));
        }
        if g.inputs.is_empty() {
            p.push((
                at.clone().key("inputs"),
                "expected at least one input stream".into(),
            ));
        }
        for (k, input) in g.inputs.iter().enumerate() {
            if g.inputs[..k].contains(input) {
                p.push((
                    at.clone().key("inputs"),
                    format!("input stream {input:?} is listed twice"),
                ));
            }
            if !known.contains(input) && from_template(input).is_none() {
                let names: Vec<&str> = known.iter().map(String::as_str).collect();
                let hint = super::did_you_mean(input, &names)
                    .map(|k| format!("; did you mean {k:?}?"))
                    .unwrap_or_default();
                p.push((
                    at.clone().key("inputs"),
                    format!("input stream {input:?} is not produced by any device or earlier fusion group{hint}"),
                ));
            }
        }
        if g.inputs.len() > 64 {
            p.push((
                at.clone().key("inputs"),
                format!("{} inputs: a group takes at most 64", g.inputs.len()),
            ));
        }
        check_fusion_method(g, &at, p);
        let outputs = g.output_streams();
        if g.output.is_some() && !g.outputs.is_empty() {
            p.push((
                at.clone().key("outputs"),
                "give either `output` (one stream) or `outputs` (several), not both".into(),
            ));
        }
        let out_key = if g.output.is_some() {
            "output"
        } else {
            "outputs"
        };
        for name in outputs {
            known.insert(name.clone());
            produced.push((name, at.clone().key(out_key)));
        }
        check_std_outputs(g, &at, p);
        for name in &g.std_outputs {
            known.insert(name.clone());
            produced.push((name.clone(), at.clone().key("std_outputs")));
        }
        if let Some(gap) = g.max_gap
            && gap.get() > g.stale_after.get()
        {
            p.push((
                at.clone().key("max_gap"),
                format!(
                    "max_gap ({:?}) is longer than stale_after ({:?}): a gap that long makes the input stale, it cannot be bridged",
                    gap, g.stale_after
                ),
            ));
        }
        match (&g.alarm, g.alarm_stream()) {
            (Some(_), None) => p.push((
                at.clone().key("alarm"),
                "`alarm` is only for groups with a `voting` or `weighted_average` section".into(),
            )),
            (_, Some(alarm)) => {
                known.insert(alarm.clone());
                produced.push((
                    alarm,
                    at.clone()
                        .key(if g.alarm.is_some() { "alarm" } else { "name" }),
                ));
            }
            (None, None) => {}
        }
    }
    for (name, at) in produced {
        if let Some((template, by)) = from_template(&name) {
            p.push((
                at.clone(),
                format!(
                    "stream {name:?} could also be produced by the template {template:?} of `{by}`: stream names must be unique"
                ),
            ));
        }
        add_stream(p, streams, &name, at);
    }
}

/// `std_outputs`: Kalman groups only, one stream per axis.
fn check_std_outputs(g: &FusionGroupConfig, at: &KeyPath, p: &mut Problems) {
    if g.std_outputs.is_empty() {
        return;
    }
    let at = at.clone().key("std_outputs");
    match (&g.kalman, g.methods().len()) {
        (Some(k), 1) if k.axes != g.std_outputs.len() => p.push((
            at,
            format!(
                "std_outputs needs {} streams, the standard deviation of each axis' position; the group has {}",
                k.axes,
                g.std_outputs.len()
            ),
        )),
        (Some(_), _) => {}
        (None, _) => p.push((
            at,
            "`std_outputs` is only for groups with a `kalman` section".into(),
        )),
    }
}

/// Exactly one method section, its own values, and the input/output counts it needs.
fn check_fusion_method(g: &FusionGroupConfig, at: &KeyPath, p: &mut Problems) {
    let methods = g.methods();
    let method = match methods.as_slice() {
        [m] => m,
        [] => {
            p.push((
                at.clone(),
                format!(
                    "fusion group {:?} needs exactly one method section: one of {}",
                    g.name,
                    FUSION_METHODS.map(|m| format!("[fusion.{m}]")).join(", ")
                ),
            ));
            return;
        }
        [_, second, ..] => {
            p.push((
                at.clone().key(second.key()),
                format!(
                    "fusion group {:?} has {} method sections ({}): expected exactly one",
                    g.name,
                    methods.len(),
                    methods
                        .iter()
                        .map(FusionMethod::key)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
            return;
        }
    };
    let section = at.clone().key(method.key());
    let n = g.inputs.len();
    // A sensor count written in the section must match the inputs.
    let written = match method.key() {
        "weighted_average" => g.weighted_average.as_ref().map(|c| c.sensors),
        "voting" => g.voting.as_ref().map(|c| c.sensors),
        _ => None,
    };
    if let Some(s) = written
        && s != 0
        && s != n
    {
        p.push((
            section.clone().key("sensors"),
            format!(
                "sensors = {s} but the group has {n} inputs; leave `sensors` out to use the inputs"
            ),
        ));
        return;
    }
    if let Err(e) = method.validate() {
        p.push((section.clone().key(e.key), e.message));
        return;
    }
    if let Some(need) = method.inputs()
        && need != n
    {
        let what = match method {
            FusionMethod::Kalman(k) if k.model == super::MotionModel::GpsImu => format!(
                "gps_imu with {} axes needs {need} inputs: the position of each axis, then the acceleration of each axis",
                k.axes
            ),
            FusionMethod::Kalman(k) => format!(
                "{:?} with {} axes needs {need} inputs: the position of each axis",
                k.model, k.axes
            ),
            _ => format!(
                "{} needs {need} inputs: gyro x, y, z then accel x, y, z",
                method.key()
            ),
        };
        p.push((
            at.clone().key("inputs"),
            format!("{what}; the group has {n}"),
        ));
    }
    let outs = g.output_streams().len();
    let need = method.outputs();
    if outs != need {
        let what = match method {
            FusionMethod::Kalman(_) if need > 1 => {
                format!("`outputs` with {need} streams, the position of each axis")
            }
            FusionMethod::Complementary(_) | FusionMethod::Madgwick(_) => {
                "`outputs` with 2 streams, roll and pitch".to_owned()
            }
            _ => "one output stream (`output = \"name\"`)".to_owned(),
        };
        p.push((
            at.clone().key(if g.output.is_some() {
                "output"
            } else {
                "outputs"
            }),
            format!("{} needs {what}; the group has {outs}", method.key()),
        ));
    }
}

#[cfg(test)]
mod template_tests {
    use super::template_matches;

    #[test]
    fn templates_match_what_the_mqtt_mapping_can_expand_to() {
        assert!(template_matches("tank/{1}", "tank/a"));
        assert!(
            template_matches("tank/{1}", "tank/"),
            "an empty level is a level"
        );
        assert!(!template_matches("tank/{1}", "tank/a/b"));
        assert!(!template_matches("tank/{1}", "tanks/a"));
        assert!(template_matches("line1/{1}/temp", "line1/press/temp"));
        assert!(
            template_matches("{1}_{2}", "a_b_c"),
            "split anywhere within a level"
        );
        assert!(template_matches("{1}/x/{1}", "a/x/a"));
        assert!(
            !template_matches("{1}/x/{1}", "a/x/b"),
            "one placeholder, one text"
        );
        assert!(
            template_matches("t/{x}/{0}", "t/{x}/{0}"),
            "not placeholders: literal"
        );
        assert!(!template_matches("t/{1}", "t/a+b"));
        assert!(template_matches("plain", "plain") && !template_matches("plain", "plan"));
        // Pathological: bounded, no hang.
        let t = "{1}{2}{3}{4}{5}{6}{7}{8}{9}{10}{11}{12}!";
        assert!(!template_matches(t, &"a".repeat(200)));
    }
}
