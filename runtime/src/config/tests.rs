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
    assert_eq!(u.ca.as_deref(), Some(Path::new("/base/certs/ca.pem")));
    assert_eq!(u.send_timeout.get(), std::time::Duration::from_secs(30));
    // The documented default is the default.
    let bare = parse_ref(&REFERENCE.replace("send_timeout = \"30s\"\n", "")).unwrap();
    let bare = bare.config.uplink.unwrap();
    assert_eq!(bare.send_timeout.get(), std::time::Duration::from_secs(30));
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
    assert_eq!(e.key, "fusion[1].inputs");
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
    // (The gateway id is checked by its type while the file is read: a schema error.)
    let text = REFERENCE
        .replace(
            "stream = \"boiler/pressure\"",
            "stream = \"boiler/temperature\"",
        )
        .replace("quota = \"1GiB\"", "quota = \"1k\"");
    let errs = parse_ref(&text).unwrap_err();
    assert_eq!(errs.0.len(), 2, "{errs}");
    assert!(errs.to_string().contains("points[1].stream"));
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

/// The fusion groups of the reference, and a config with one group appended.
fn with_group(group: &str) -> String {
    format!("{REFERENCE}\n{group}")
}

#[test]
fn reference_fusion_groups_have_their_methods() {
    let c = parse_ref(REFERENCE).unwrap().config;
    let methods: Vec<&str> = c.fusion.iter().map(|g| g.method().unwrap().key()).collect();
    assert_eq!(
        methods,
        ["kalman", "weighted_average", "voting", "complementary"]
    );
    let vote = &c.fusion[2];
    match vote.method().unwrap() {
        FusionMethod::Voting(v) => {
            assert_eq!(v.sensors, 3, "filled in from the inputs");
            assert_eq!(v.method, VotingMethod::Median);
        }
        m => panic!("{m:?}"),
    }
    assert_eq!(
        vote.alarm_stream().as_deref(),
        Some("boiler/temperature_alarm")
    );
    assert_eq!(c.fusion[0].alarm_stream(), None);
    assert_eq!(
        c.fusion[3].output_streams(),
        ["line1/crane/roll", "line1/crane/pitch"]
    );
    let a = c.fusion[3].aligner_config();
    assert_eq!(a.period_ns, 20_000_000);
    assert_eq!(a.allowed_lateness_ms, 100);
    assert_eq!(a.streams.len(), 6);
    assert_eq!(a.streams[0].stale_after_ms, 1_000);
    a.validate().unwrap();
}

#[test]
fn voting_with_too_many_faults_for_its_size_is_an_error_at_the_key() {
    let text = REFERENCE.replace("faults = 1\n", "faults = 2\n");
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[2].voting.faults");
    assert!(e.message.contains("needs 5 sensors"), "{e}");
    assert!(e.message.contains("the group has 3"), "{e}");
    assert_eq!(e.line, Some(line_of(&text, "faults = 2")));
    // Marzullo needs 3f + 1: 3 inputs tolerate no fault at all.
    let text = REFERENCE.replace("method = \"median\"", "method = \"marzullo\"");
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[2].voting.faults");
    assert!(e.message.contains("3f + 1"), "{e}");
}

#[test]
fn unknown_method_section_suggests_the_right_one() {
    let text = REFERENCE.replace("[fusion.weighted_average]\n", "[fusion.weighted_averge]\n");
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[1].weighted_averge");
    assert_eq!(e.hint.as_deref(), Some("did you mean `weighted_average`?"));
    assert_eq!(e.line, Some(line_of(&text, "[fusion.weighted_averge]\n")));
    let text = REFERENCE.replace("[fusion.voting]\n", "[fusion.votng]\n");
    let e = one_error(&text);
    assert_eq!(e.hint.as_deref(), Some("did you mean `voting`?"), "{e}");
    // A misspelt key inside a method section.
    let text = REFERENCE.replace("outlier_k = 3.0", "outlier_kk = 3.0");
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[1].weighted_average.outlier_kk");
    assert_eq!(e.hint.as_deref(), Some("did you mean `outlier_k`?"));
}

#[test]
fn a_group_needs_exactly_one_method() {
    let text = with_group(
        "[[fusion]]\nname = \"none\"\ninputs = [\"boiler/pressure\"]\noutput = \"p2\"\ntick = \"1s\"\n",
    );
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[4]");
    assert!(e.message.contains("exactly one method section"), "{e}");
    let text = with_group(
        "[[fusion]]\nname = \"two\"\ninputs = [\"boiler/pressure\"]\noutput = \"p2\"\ntick = \"1s\"\n\
         [fusion.kalman]\nmodel = \"constant_velocity\"\n[fusion.madgwick]\n",
    );
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[4].madgwick");
    assert!(e.message.contains("expected exactly one"), "{e}");
}

#[test]
fn input_and_output_counts_must_match_the_method() {
    // Two axes need two position inputs, two outputs and two std outputs.
    let text = REFERENCE.replacen("axes = 1\n", "axes = 2\n", 1);
    let errs = parse_ref(&text).unwrap_err().0;
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "fusion[0].inputs",
            "fusion[0].output",
            "fusion[0].std_outputs"
        ],
        "{errs:?}"
    );
    assert!(errs[0].message.contains("needs 2 inputs"), "{}", errs[0]);
    // gps_imu: positions then accelerations.
    let text = REFERENCE.replacen("model = \"constant_velocity\"", "model = \"gps_imu\"", 1);
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[0].inputs");
    assert!(e.message.contains("then the acceleration"), "{e}");
    // Attitude: six inputs, two outputs.
    let text = REFERENCE.replace("\"line1/crane/accel_z\",\n", "\n");
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[3].inputs");
    assert!(e.message.contains("gyro x, y, z then accel x, y, z"), "{e}");
    let text = REFERENCE.replace(
        "outputs = [\"line1/crane/roll\", \"line1/crane/pitch\"]",
        "output = \"line1/crane/roll\"",
    );
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[3].output");
    assert!(e.message.contains("roll and pitch"), "{e}");
    // A sensor count that contradicts the inputs.
    let text = REFERENCE.replace("faults = 1\n", "faults = 1\nsensors = 4\n");
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[2].voting.sensors");
    // Values checked by the method's own validation, located at their key.
    let text = REFERENCE.replace("measurement_std = 0.5", "measurement_std = 0.0");
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[0].kalman.measurement_std");
    assert_eq!(e.line, Some(line_of(&text, "measurement_std = 0.0")));
    let text = REFERENCE.replace("variances = [0.04, 0.04, 0.25]", "variances = [0.04, 0.04]");
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[1].weighted_average.variances");
    // An alarm stream without voting, an output that collides with a device stream.
    let text = REFERENCE.replace(
        "output = \"boiler/temperature_kf\"",
        "output = \"boiler/temperature_kf\"\nalarm = \"x/alarm\"",
    );
    assert_eq!(one_error(&text).key, "fusion[0].alarm");
    let text = REFERENCE.replace(
        "output = \"boiler/temperature_kf\"",
        "output = \"boiler/pressure\"",
    );
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[0].output");
    assert!(e.message.contains("already produced"), "{e}");
}

#[test]
fn every_method_section_deserializes_from_toml() {
    let k: KinematicConfig = toml::from_str(
        "model = \"gps_imu\"\naxes = 3\nprocess_noise = 0.2\nmeasurement_std = 3.0\n\
         initial_std = 10.0\ngate = \"0.99\"\nmax_dt_s = 2.0\n",
    )
    .unwrap();
    assert_eq!(k.model, MotionModel::GpsImu);
    assert_eq!((k.axes, k.gate), (3, Some(GateConfidence::P99)));
    assert_eq!(k.state_dim(), 6);
    k.validate().unwrap();
    let k: KinematicConfig = toml::from_str("model = \"constant_acceleration\"").unwrap();
    assert_eq!(
        (k.axes, k.process_noise, k.initial_std, k.gate),
        (1, 1.0, 100.0, None)
    );
    assert_eq!(k.max_dt_s, 10.0);
    assert!(
        toml::from_str::<KinematicConfig>("model = \"constant_velocity\"\ngate = \"0.9\"").is_err()
    );

    let c: ComplementaryConfig =
        toml::from_str("time_constant_s = 0.5\naccel_rejection = 0.1\nmax_dt_s = 0.2").unwrap();
    assert_eq!(
        (c.time_constant_s, c.accel_rejection, c.max_dt_s),
        (0.5, 0.1, 0.2)
    );
    let c: ComplementaryConfig = toml::from_str("").unwrap();
    assert_eq!(
        (c.time_constant_s, c.accel_rejection, c.max_dt_s),
        (1.0, 0.0, 1.0)
    );

    let m: MadgwickConfig = toml::from_str("beta = 0.05\nmax_dt_s = 0.5").unwrap();
    assert_eq!((m.beta, m.max_dt_s), (0.05, 0.5));
    let m: MadgwickConfig = toml::from_str("").unwrap();
    assert_eq!((m.beta, m.max_dt_s), (0.1, 1.0));

    let w: WeightedAverageConfig = toml::from_str(
        "sensors = 2\nvariances = [1.0, 4.0]\nadaptive = true\nalpha = 0.1\n\
         outlier_k = 2.5\nreject_outliers = false\n",
    )
    .unwrap();
    assert_eq!(w.variances, [1.0, 4.0]);
    assert!(w.adaptive && !w.reject_outliers);
    assert_eq!((w.sensors, w.alpha, w.outlier_k), (2, 0.1, 2.5));
    w.validate().unwrap();
    let w: WeightedAverageConfig = toml::from_str("variances = [1.0]").unwrap();
    assert_eq!((w.sensors, w.alpha, w.outlier_k), (0, 0.02, 3.0));
    assert!(w.reject_outliers && !w.adaptive);

    for (name, method) in [
        ("majority", VotingMethod::Majority),
        ("median", VotingMethod::Median),
        ("marzullo", VotingMethod::Marzullo),
        ("brooks_iyengar", VotingMethod::BrooksIyengar),
    ] {
        let v: VotingConfig = toml::from_str(&format!(
            "method = \"{name}\"\nsensors = 4\nfaults = 1\nfault_frames = 3\nuncertainty = [0.5, 0.5, 1.0, 1.0]\n"
        ))
        .unwrap();
        assert_eq!(v.method, method);
        assert_eq!((v.sensors, v.faults, v.fault_frames), (4, 1, 3));
        v.validate().unwrap();
    }
    let v: VotingConfig = toml::from_str("method = \"median\"\nfaults = 0").unwrap();
    assert_eq!((v.sensors, v.fault_frames), (0, 5));
    assert!(v.uncertainty.is_empty());

    let a: AlignerConfig = toml::from_str(
        "period_ns = 1000000\nstreams = [{ stream = \"a\", interpolation = \"hold\" },\
         { stream = \"b\", interpolation = \"zero_order_hold\", stale_after_ms = 10, correct_clock = true }]",
    )
    .unwrap();
    assert_eq!(a.streams[0].interpolation, Interpolation::Hold);
    assert_eq!(a.streams[1].interpolation, Interpolation::Hold);
    assert!(a.streams[1].correct_clock);
    assert_eq!(
        (a.history, a.allowed_lateness_ms, a.late_policy),
        (256, 200, LatePolicy::Drop)
    );
    a.validate().unwrap();
}

/// The reference config with its commented `[uplink.mqtt]` example enabled, the transport
/// switched to MQTT and the QUIC-only keys removed.
fn reference_with_mqtt_uplink() -> String {
    let mut out = Vec::new();
    let mut in_example = false;
    for line in REFERENCE.lines() {
        let t = line.trim_start();
        if t == "# [uplink.mqtt]" {
            in_example = true;
            out.push("[uplink.mqtt]".to_owned());
            continue;
        }
        if in_example {
            match t.strip_prefix("# ") {
                Some(kv) if kv.split_once(" = ").is_some() => {
                    out.push(kv.to_owned());
                    continue;
                }
                _ => in_example = false,
            }
        }
        let quic_only = ["hub = ", "server_name = ", "ca = ", "cert = ", "key = "]
            .iter()
            .any(|k| line.starts_with(k));
        if quic_only {
            continue;
        }
        if line == "transport = \"quic\"" {
            out.push("transport = \"mqtt\"".to_owned());
        } else {
            out.push(line.to_owned());
        }
    }
    out.join("\n")
}

#[test]
fn the_commented_mqtt_uplink_of_the_reference_is_valid() {
    let text = reference_with_mqtt_uplink();
    let loaded = parse_ref(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let u = loaded.config.uplink.as_ref().unwrap();
    assert_eq!(u.transport, UplinkTransport::Mqtt);
    assert!(u.hub.is_none() && u.ca.is_none() && u.key.is_none());
    let m = u.mqtt.as_ref().unwrap();
    assert_eq!(m.broker, "127.0.0.1:1883");
    assert_eq!(m.topic_prefix, "outpost");
    assert_eq!(m.max_in_flight.get(), 32);
    assert_eq!(m.max_payload.0, 1 << 20);
    assert_eq!(m.keep_alive.get(), std::time::Duration::from_secs(30));
    let tls = m.tls.as_ref().unwrap();
    assert_eq!(tls.ca, Path::new("/base/certs/broker-ca.pem"), "rebased");
    assert_eq!(u.target(), "mqtt://127.0.0.1:1883");
    // The MQTT keys are checked on this machine, the QUIC ones are not.
    let keys: Vec<&str> = loaded.environment.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"uplink.mqtt.tls.ca"), "{keys:?}");
    assert!(keys.contains(&"uplink.mqtt.password"), "{keys:?}");
    assert!(!keys.contains(&"uplink.ca"), "{keys:?}");
}

#[test]
fn mqtt_transport_without_its_table_is_located_at_the_uplink() {
    let text = REFERENCE.replace("transport = \"quic\"", "transport = \"mqtt\"");
    let e = one_error(&text);
    assert_eq!(e.key, "uplink.mqtt", "{e}");
    assert!(e.message.contains("needs an [uplink.mqtt] table"), "{e}");
    assert!(e.message.contains("broker"), "{e}");
    assert_eq!(e.line, Some(line_of(&text, "[uplink]")), "{e}");
}

#[test]
fn quic_transport_without_hub_names_the_missing_key() {
    let text = REFERENCE.replace("hub = \"127.0.0.1:7443\"\n", "");
    let e = one_error(&text);
    assert_eq!(e.key, "uplink.hub", "{e}");
    assert!(e.message.contains("missing required key `hub`"), "{e}");
    assert!(e.message.contains("transport \"quic\" needs"), "{e}");
    assert_eq!(e.line, Some(line_of(&text, "[uplink]")), "{e}");
    // Every missing QUIC key is reported, not only the first.
    let text = ["hub = ", "server_name = ", "ca = ", "cert = ", "key = "]
        .iter()
        .fold(REFERENCE.to_owned(), |t, k| {
            t.lines()
                .filter(|l| !l.starts_with(k))
                .collect::<Vec<_>>()
                .join("\n")
        });
    let errs = parse_ref(&text).unwrap_err();
    let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "uplink.hub",
            "uplink.server_name",
            "uplink.ca",
            "uplink.cert",
            "uplink.key"
        ]
    );
}

#[test]
fn a_typo_in_uplink_mqtt_is_located_with_a_suggestion() {
    let text = reference_with_mqtt_uplink().replace("topic_prefix = ", "topic_prefx = ");
    let e = one_error(&text);
    assert_eq!(e.key, "uplink.mqtt.topic_prefx", "{e}");
    assert_eq!(e.hint.as_deref(), Some("did you mean `topic_prefix`?"));
    assert_eq!(e.line, Some(line_of(&text, "topic_prefx")));
}

#[test]
fn uplink_mqtt_values_are_checked() {
    let base = reference_with_mqtt_uplink();
    for (from, to, key, msg) in [
        (
            "topic_prefix = \"outpost\"",
            "topic_prefix = \"outpost/+\"",
            "uplink.mqtt.topic_prefix",
            "wildcards",
        ),
        (
            "broker = \"127.0.0.1:1883\"        # host:port. Required in this table.",
            "broker = \"localhost\"",
            "uplink.mqtt.broker",
            "expected host:port",
        ),
        (
            "max_payload = \"1MiB\"",
            "max_payload = \"2MiB\"",
            "uplink.mqtt.max_payload",
            "from 1KiB to 1MiB",
        ),
        (
            "max_in_flight = 32",
            "max_in_flight = 0",
            "uplink.mqtt.max_in_flight",
            "from 1 to 1000",
        ),
        (
            "username = \"plant-a-gw01\"\n",
            "",
            "uplink.mqtt.password",
            "needs a `username`",
        ),
    ] {
        assert!(base.contains(from), "{from}");
        let e = one_error(&base.replacen(from, to, 1));
        assert_eq!(e.key, key, "{e}");
        assert!(e.message.contains(msg), "{key}: {e}");
    }
}

#[test]
fn topic_prefixes_are_checked() {
    assert_eq!(topic_prefix_problem("outpost"), None);
    assert_eq!(topic_prefix_problem("site-a/outpost"), None);
    for bad in ["", "a/+", "#", "$SYS", "a//b", "/a", "a/", "a\u{0}b"] {
        assert!(topic_prefix_problem(bad).is_some(), "{bad:?}");
    }
}

#[test]
fn a_config_without_sync_section_backfills() {
    let text = "[gateway]\nid = \"gw-1\"\ndata_dir = \"/tmp/x\"\n";
    let c = parse_ref(text).unwrap().strict().unwrap();
    assert!(
        c.sync.backfill,
        "backfill defaults to on without a [sync] table"
    );
    assert_eq!(c.sync.mode, SyncModeSetting::default());
    let with = parse_ref(&format!("{text}[sync]\n"))
        .unwrap()
        .strict()
        .unwrap();
    assert!(with.sync.backfill, "and with an empty one");
}

#[test]
fn gap_and_idle_keys_reach_the_aligner_and_are_checked() {
    let c = parse_ref(REFERENCE).unwrap().config;
    let a = c.fusion[0].aligner_config();
    assert_eq!(a.streams[0].max_gap_ms, Some(3_000));
    assert_eq!(a.idle_timeout_ms, Some(10_000));
    assert_eq!(c.fusion[0].std_outputs, ["boiler/temperature_kf_std"]);
    // Left out: the aligner's defaults (stale_after).
    let a = c.fusion[1].aligner_config();
    assert_eq!((a.streams[0].max_gap_ms, a.idle_timeout_ms), (None, None));
    a.validate().unwrap();

    let text = REFERENCE.replace("max_gap = \"3s\"", "max_gap = \"11s\"");
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[0].max_gap");
    assert_eq!(e.line, Some(line_of(&text, "max_gap = \"11s\"")));
    assert!(e.message.contains("longer than stale_after"), "{e}");

    let text = REFERENCE.replace(
        "std_outputs = [\"boiler/temperature_kf_std\"]",
        "std_outputs = [\"a\", \"b\"]",
    );
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[0].std_outputs");
    assert!(e.message.contains("needs 1 streams"), "{e}");

    let text = with_group(
        "[[fusion]]\nname = \"sd\"\ninputs = [\"boiler/pressure\"]\noutput = \"p2\"\n\
         std_outputs = [\"p2_std\"]\ntick = \"1s\"\n[fusion.weighted_average]\nvariances = [1.0]\n",
    );
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[4].std_outputs");
    assert!(e.message.contains("only for groups with a `kalman`"), "{e}");

    // A std output is a stream like any other: names stay unique.
    let text = REFERENCE.replace(
        "std_outputs = [\"boiler/temperature_kf_std\"]",
        "std_outputs = [\"boiler/temperature_avg\"]",
    );
    let e = one_error(&text);
    assert!(e.message.contains("already produced"), "{e}");
}

#[test]
fn complementary_gravity_is_read_and_checked() {
    let c = parse_ref(REFERENCE).unwrap().config;
    assert_eq!(c.fusion[3].complementary.as_ref().unwrap().gravity, 9.80665);
    let text = REFERENCE.replace("gravity = 9.80665", "gravity = 0.0");
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[3].complementary.gravity");
    assert!(e.message.contains("must be > 0"), "{e}");
    // Left out: standard gravity.
    let text = REFERENCE.replace("gravity = 9.80665\n", "");
    let c = parse_ref(&text).unwrap().config;
    assert_eq!(c.fusion[3].complementary.as_ref().unwrap().gravity, 9.80665);
}

/// An MQTT device whose streams are named from the topic (`tank/{1}` from `plant/tank/+`).
const TANKS: &str = r#"
[[devices]]
name = "tanks"
[devices.mqtt]
broker = "127.0.0.1:1883"
[[devices.mqtt.subscriptions]]
topic = "plant/tank/+"
format = "number"
stream = "tank/{1}"
"#;

#[test]
fn fusion_inputs_may_come_from_templated_mqtt_streams() {
    let group = |inputs: &str, output: &str| {
        format!(
            "{TANKS}\n[[fusion]]\nname = \"tanks\"\ninputs = {inputs}\noutput = \"{output}\"\n\
             tick = \"1s\"\n[fusion.weighted_average]\nvariances = [1.0]\n"
        )
    };
    let text = with_group(&group(
        "[\"tank/a\", \"tank/b\", \"line1/press/temp\"]",
        "tanks/level",
    ));
    let c = parse_ref(&text).unwrap().config;
    assert_eq!(c.fusion[4].inputs[0], "tank/a");

    // A name the template cannot produce: a `+` is one level, never two.
    let text = with_group(&group("[\"tank/a\", \"tank/a/b\"]", "tanks/level"));
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[4].inputs");
    assert!(e.message.contains("\"tank/a/b\" is not produced"), "{e}");

    // A group output the template could also produce: two producers of one stream.
    let text = with_group(&group("[\"tank/a\", \"tank/b\"]", "tank/avg"));
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[4].output");
    assert!(e.message.contains("tank/{1}"), "{e}");
}

#[test]
fn weighted_average_fault_keys_and_alarm_stream() {
    let c = parse_ref(REFERENCE).unwrap().config;
    let avg = &c.fusion[1];
    match avg.method().unwrap() {
        FusionMethod::WeightedAverage(w) => {
            assert_eq!((w.fault_window, w.recover_frames), (20, 60));
        }
        m => panic!("{m:?}"),
    }
    assert_eq!(
        avg.alarm_stream().as_deref(),
        Some("boiler-temperature-avg/alarm")
    );
    let text = REFERENCE.replace("fault_window = 20", "fault_window = 0");
    let e = one_error(&text);
    assert_eq!(e.key, "fusion[1].weighted_average.fault_window");
    assert_eq!(e.line, Some(line_of(&text, "fault_window = 0")));
    let text = REFERENCE.replace("recover_frames = 60", "recover_frames = 0");
    assert_eq!(
        one_error(&text).key,
        "fusion[1].weighted_average.recover_frames"
    );
    // `alarm` names the stream of a weighted-average group too.
    let text = REFERENCE.replace(
        "output = \"boiler/temperature_avg\"",
        "output = \"boiler/temperature_avg\"\nalarm = \"boiler/avg_alarm\"",
    );
    let c = parse_ref(&text).unwrap().config;
    assert_eq!(
        c.fusion[1].alarm_stream().as_deref(),
        Some("boiler/avg_alarm")
    );
}

#[test]
fn mqtt_device_limits_are_read_and_checked() {
    let c = parse_ref(REFERENCE).unwrap().config;
    let m = c.devices[1].mqtt.as_ref().unwrap();
    assert_eq!(m.max_in_flight.get(), 1024);
    assert_eq!(m.max_packet.0, 512 * 1024);
    assert_eq!(m.max_payload.0, 256 * 1024);
    assert_eq!(m.max_streams.get(), 10_000);
    assert_eq!(m.stream_idle.get(), std::time::Duration::from_secs(3600));
    for (from, to, key) in [
        (
            "max_payload = \"256KiB\"",
            "max_payload = \"1MiB\"",
            "devices[1].mqtt.max_payload",
        ),
        (
            "max_packet = \"512KiB\"",
            "max_packet = \"300MiB\"",
            "devices[1].mqtt.max_packet",
        ),
        (
            "max_in_flight = 1024\n",
            "max_in_flight = 0\n",
            "devices[1].mqtt.max_in_flight",
        ),
    ] {
        let text = REFERENCE.replace(from, to);
        assert_ne!(text, REFERENCE, "{from}");
        let e = one_error(&text);
        assert_eq!(e.key, key, "{e}");
    }
}

fn all_errors(text: &str) -> Vec<ConfigError> {
    match parse(text, Path::new("gw.toml"), Path::new("/base")) {
        Ok(_) => panic!("expected errors"),
        Err(ConfigErrors(v)) => v,
    }
}

#[test]
fn every_schema_error_is_reported_in_file_order_with_the_file_s_paths() {
    // Point 0 lacks its stream (taken out whole), so point 1 is the copy's point 0: its
    // error must still name points[1]; the second device's errors name devices[1].
    let text = r#"[gateway]
id = "gw"
data_dir = "d"

[[devices]]
name = "a"
[devices.modbus]
address = "127.0.0.1:502"
[[devices.modbus.poll_groups]]
interval = "1s"
[[devices.modbus.poll_groups.points]]
table = "holding"
address = 0
type = "f32"
[[devices.modbus.poll_groups.points]]
stream = "b"
table = "holdin"
address = 0
type = "f32"

[[devices]]
name = "b"
[devices.modbus]
address = "127.0.0.1:502"
unti_id = 2
[[devices.modbus.poll_groups]]
interval = "0s"
[[devices.modbus.poll_groups.points]]
stream = "c"
table = "holding"
address = 0
type = "f32"
"#;
    let errors = all_errors(text);
    let got: Vec<(usize, &str)> = errors
        .iter()
        .map(|e| (e.line.unwrap(), e.key.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (11, "devices[0].modbus.poll_groups[0].points[0].stream"),
            (17, "devices[0].modbus.poll_groups[0].points[1].table"),
            (line_of(text, "unti_id"), "devices[1].modbus.unti_id"),
            (
                line_of(text, "interval = \"0s\""),
                "devices[1].modbus.poll_groups[0].interval"
            ),
        ],
        "{errors:#?}"
    );
    assert_eq!(
        errors[1].hint.as_deref(),
        Some("did you mean `holding`?"),
        "{}",
        errors[1]
    );
}

#[test]
fn semantic_problems_come_with_misspelt_keys_but_not_those_the_misspelling_causes() {
    // A misspelt method section leaves its group without a method: only the misspelling
    // is reported there; the quota problem elsewhere is reported too, in file order.
    let text = REFERENCE
        .replace("[fusion.weighted_average]\n", "[fusion.weighted_averge]\n")
        .replace("quota = \"1GiB\"", "quota = \"100KiB\"");
    let errors = all_errors(&text);
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        vec!["storage.quota", "fusion[1].weighted_averge"],
        "{errors:#?}"
    );
}

#[test]
fn schema_errors_stop_at_the_limit_with_a_note() {
    let mut text = String::from("[gateway]\nid = \"gw\"\ndata_dir = \"d\"\n");
    for i in 0..MAX_SCHEMA_ERRORS + 20 {
        text.push_str(&format!("k{i} = 1\n"));
    }
    let errors = all_errors(&text);
    assert_eq!(errors.len(), MAX_SCHEMA_ERRORS + 1);
    assert!(
        errors[0].message.contains("stopped after"),
        "the note has no place, so it comes first: {}",
        errors[0]
    );
    assert_eq!(errors[1].line, Some(4));
}

#[test]
fn hub_config_keeps_what_the_machine_lacks_apart() {
    const HUB: &str = include_str!("../../../config/hub.toml");
    let dir = Path::new("/nonexistent-outpost-dir");
    let loaded = parse_hub_checked(HUB, Path::new("hub.toml"), dir).unwrap();
    let keys: Vec<&str> = loaded.environment.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, vec!["hub.ca", "hub.cert", "hub.key"]);
    let e = parse_hub(HUB, Path::new("hub.toml"), dir).unwrap_err();
    assert_eq!(e.0.len(), 3, "{e}");
    // Every mistake at once, in file order.
    let text = HUB
        .replacen(
            "listen = \"127.0.0.1:7443\"",
            "lissen = \"127.0.0.1:7443\"",
            1,
        )
        .replacen("format = \"text\"", "format = \"txt\"", 1);
    let e = parse_hub_checked(&text, Path::new("hub.toml"), dir).unwrap_err();
    let keys: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
    // (`listen` is missing, but the misspelling already says so.)
    assert_eq!(keys, vec!["hub.lissen", "log.format"], "{e}");
}

#[test]
fn a_config_file_is_told_apart_by_its_hub_table() {
    let dir = tempfile::tempdir().unwrap();
    let hub = dir.path().join("hub.toml");
    std::fs::write(&hub, "[hub]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    assert_eq!(kind_of(&hub), ConfigKind::Hub);
    let gw = dir.path().join("gw.toml");
    std::fs::write(&gw, "[gateway]\nid = \"gw\"\n").unwrap();
    assert_eq!(kind_of(&gw), ConfigKind::Gateway);
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[hub\n").unwrap();
    assert_eq!(kind_of(&bad), ConfigKind::Gateway);
    assert_eq!(kind_of(&dir.path().join("none.toml")), ConfigKind::Gateway);
}

/// The one gateway id rule (the frame codec's, the hub's file names', MQTT topic levels'
/// and certificate CNs'): what the uplink could not use is refused where it is written.
#[test]
fn a_gateway_id_the_uplink_could_not_use_is_refused_where_it_is_written() {
    let long = "g".repeat(65);
    for bad in [
        "_gw", ".gw", "-gw", "..", "gw/1", "gw+", "gw#", "gw 1", "gwé", "", &long,
    ] {
        let text = REFERENCE.replace("id = \"plant-a-gw01\"", &format!("id = {bad:?}"));
        let e = one_error(&text);
        assert_eq!(e.key, "gateway.id", "{bad:?}: {e}");
        assert_eq!(e.line, Some(line_of(&text, "id = ")), "{bad:?}: {e}");
        assert!(e.message.contains("invalid gateway id"), "{bad:?}: {e}");
    }
    let long = "g".repeat(64);
    for good in ["gw_1.site", "G", "0", "plant-A.gw_01", "gw-", &long] {
        let text = REFERENCE.replace("id = \"plant-a-gw01\"", &format!("id = {good:?}"));
        let c = parse_ref(&text).unwrap().config;
        assert_eq!(c.gateway.id.as_str(), good);
    }
}
