//! Config tests: the reference file, and that every kind of mistake is reported with its
//! place and what was expected.

use super::*;

const REFERENCE: &str = include_str!("../../../config/reference.toml");
const DEMO: &str = include_str!("../../../config/demo.toml");

fn parse_ref(text: &str) -> Result<Loaded, ConfigErrors> {
    parse(text, Path::new("reference.toml"), Path::new("/base"))
}

fn one_error(text: &str) -> ConfigError {
    match parse_ref(text) {
        Ok(_) => panic!("expected an error"),
        Err(ConfigErrors(mut v)) => {
            assert!(!v.is_empty());
            v.remove(0)
        }
    }
}

/// Line (1-based) of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    let pos = text.find(needle).expect("needle in text");
    text[..pos].matches('\n').count() + 1
}

#[test]
fn reference_and_demo_configs_are_valid() {
    let loaded = parse_ref(REFERENCE).unwrap();
    let c = &loaded.config;
    assert_eq!(c.gateway.id, "plant-a-gw01");
    assert_eq!(c.devices.len(), 2);
    assert_eq!(c.storage.quota.0, 1 << 30);
    assert!(
        c.gateway.data_dir.starts_with("/base"),
        "relative paths are rebased"
    );
    let u = c.uplink.as_ref().unwrap();
    assert_eq!(u.ca, Path::new("/base/certs/ca.pem"));
    // The certificates and the password variable are not on this machine: environment
    // problems, not config errors.
    let keys: Vec<&str> = loaded.environment.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"uplink.ca"), "{keys:?}");
    assert!(keys.contains(&"devices[1].mqtt.password"), "{keys:?}");
    assert!(loaded.clone().strict().is_err());
    parse(DEMO, Path::new("demo.toml"), Path::new("."))
        .unwrap()
        .strict()
        .unwrap();
}

#[test]
fn misspelt_key_names_line_column_key_and_suggestion() {
    let text = REFERENCE.replace("unit_id = 1\n", "unti_id = 1\n");
    let e = one_error(&text);
    assert_eq!(e.line, Some(line_of(&text, "unti_id")));
    assert_eq!(e.column, Some(1));
    assert_eq!(e.key, "devices[0].modbus.unti_id");
    assert!(e.message.contains("unknown key `unti_id`"), "{e}");
    assert!(
        e.message.contains("`unit_id`"),
        "lists what is expected: {e}"
    );
    assert_eq!(e.hint.as_deref(), Some("did you mean `unit_id`?"));
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("reference.toml:{}:1: ", e.line.unwrap())),
        "{shown}"
    );
}

#[test]
fn misspelt_top_level_section_is_reported() {
    let text = REFERENCE.replace("[metrics]", "[metric]");
    let e = one_error(&text);
    assert_eq!(e.key, "metric");
    assert_eq!(e.hint.as_deref(), Some("did you mean `metrics`?"));
    assert_eq!(e.line, Some(line_of(&text, "[metric]")));
}

#[test]
fn out_of_range_values_are_errors_with_their_place() {
    let cases = [
        (
            "interval = \"1s\"",
            "interval = \"0s\"",
            "devices[0].modbus.poll_groups[0].interval",
            "out of range",
        ),
        (
            "quota = \"1GiB\"",
            "quota = -5",
            "storage.quota",
            "negative",
        ),
        (
            "unit_id = 1\n",
            "unit_id = 300\n",
            "devices[0].modbus.unit_id",
            "from 0 to 255",
        ),
        (
            "max_batch = 2000",
            "max_batch = 0",
            "storage.max_batch",
            "from 1 to 100000",
        ),
        (
            "address = \"127.0.0.1:5020\"",
            "address = \"127.0.0.1:70000\"",
            "devices[0].modbus.address",
            "port 70000 is out of range",
        ),
        (
            "listen = \"127.0.0.1:9464\"",
            "listen = \"127.0.0.1:70000\"",
            "metrics.listen",
            "socket address",
        ),
        (
            "tick = \"1s\"",
            "tick = \"soon\"",
            "fusion[0].tick",
            "invalid duration",
        ),
    ];
    for (from, to, key, msg) in cases {
        assert!(REFERENCE.contains(from), "{from}");
        let text = REFERENCE.replacen(from, to, 1);
        let e = one_error(&text);
        assert_eq!(e.key, key, "{e}");
        assert!(e.message.contains(msg), "{key}: {e}");
        let needle = to.trim_end();
        assert_eq!(e.line, Some(line_of(&text, needle)), "{e}");
        assert!(e.column.is_some());
    }
}

#[test]
fn bad_enum_value_suggests_the_closest() {
    let text = REFERENCE.replace("format = \"json\"\n# JSON", "format = \"jsno\"\n# JSON");
    let e = one_error(&text);
    assert_eq!(e.key, "devices[1].mqtt.subscriptions[0].format");
    assert_eq!(e.hint.as_deref(), Some("did you mean `json`?"));
}

#[test]
fn missing_required_key_is_named() {
    let text = REFERENCE.replace("id = \"plant-a-gw01\"\n", "");
    let e = one_error(&text);
    assert_eq!(e.key, "gateway.id");
    assert!(e.message.contains("missing required key `id`"), "{e}");
}

#[test]
fn semantic_errors_point_at_the_key() {
    // duplicate stream
    let text = REFERENCE.replace(
        "stream = \"boiler/pressure\"",
        "stream = \"boiler/temperature\"",
    );
    let e = one_error(&text);
    assert_eq!(e.key, "devices[0].modbus.poll_groups[0].points[1].stream");
    assert!(e.message.contains("already produced"), "{e}");
    assert_eq!(
        e.line,
        Some(
            text.match_indices("stream = \"boiler/temperature\"")
                .nth(1)
                .map(|(p, _)| text[..p].matches('\n').count() + 1)
                .unwrap()
        )
    );

    // unknown fusion input, with a suggestion
    let text = REFERENCE.replace(
        "inputs = [\"boiler/temperature\", ",
        "inputs = [\"boiler/temprature\", ",
    );
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[0].inputs");
    assert!(
        e.message.contains("did you mean \"boiler/temperature\""),
        "{e}"
    );

    // wrong type for the table
    let text = REFERENCE.replace("type = \"bool\"", "type = \"u16\"");
    let e = one_error(&text);
    assert_eq!(e.key, "devices[0].modbus.poll_groups[1].points[0].type");

    // placeholder beyond the wildcards
    let text = REFERENCE.replace("stream = \"line1/{1}/temp\"", "stream = \"line1/{2}/temp\"");
    let e = one_error(&text);
    assert!(e.message.contains("placeholder {2}"), "{e}");

    // a device without a protocol section
    let text = format!("{REFERENCE}\n[[devices]]\nname = \"orphan\"\n");
    let e = one_error(&text);
    assert_eq!(e.key, "devices[2]");
    assert!(e.message.contains("exactly one protocol section"), "{e}");
    assert_eq!(e.line, Some(line_of(&text, "name = \"orphan\"") - 1));
}

#[test]
fn several_semantic_errors_are_all_reported() {
    let text = REFERENCE
        .replace("id = \"plant-a-gw01\"", "id = \"plant a\"")
        .replace("quota = \"1GiB\"", "quota = \"1k\"");
    let errs = parse_ref(&text).unwrap_err();
    assert_eq!(errs.0.len(), 2, "{errs}");
    assert!(errs.to_string().contains("gateway.id"));
    assert!(errs.to_string().contains("storage.quota"));
}

#[test]
fn syntax_errors_have_a_place() {
    let e = one_error("[gateway\nid = 1");
    assert_eq!(e.key, "(syntax)");
    assert_eq!(e.line, Some(1));
}

#[test]
fn secrets_resolve_from_env_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pw");
    std::fs::write(&f, "s3cret\n").unwrap();
    assert_eq!(Secret::File { file: f }.resolve_string().unwrap(), "s3cret");
    // SAFETY: this test is the only user of this variable name.
    unsafe { std::env::set_var("OUTPOST_TEST_SECRET_X", "abc") };
    assert_eq!(
        Secret::Env {
            env: "OUTPOST_TEST_SECRET_X".into()
        }
        .resolve_string()
        .unwrap(),
        "abc"
    );
    assert!(
        Secret::Env {
            env: "OUTPOST_TEST_SECRET_UNSET".into()
        }
        .resolve()
        .is_err()
    );
    assert!(!format!("{:?}", Secret::Inline("pw".into())).contains("pw\""));
}

#[test]
fn topic_filters_are_checked() {
    assert_eq!(topic_filter_wildcards("a/+/b/+"), Ok(2));
    assert_eq!(topic_filter_wildcards("a/#"), Ok(0));
    assert!(topic_filter_wildcards("a/#/b").is_err());
    assert!(topic_filter_wildcards("a/b+").is_err());
    assert!(topic_filter_wildcards("").is_err());
}

#[test]
fn did_you_mean_only_suggests_close_keys() {
    assert_eq!(
        did_you_mean("adress", &["address", "unit_id"]),
        Some("address")
    );
    assert_eq!(did_you_mean("zzzzzz", &["address", "unit_id"]), None);
}
