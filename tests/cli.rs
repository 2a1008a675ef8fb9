//! The `outpost` binary's command line: `check` exit codes and messages, `--version`.

use std::process::Command;

fn outpost() -> Command {
    Command::new(env!("CARGO_BIN_EXE_outpost"))
}

fn reference() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/reference.toml"
    ))
    .unwrap()
}

#[test]
fn check_accepts_the_reference_config() {
    let out = outpost()
        .args([
            "check",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/reference.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
}

#[test]
fn check_strict_fails_when_the_machine_lacks_the_certificates() {
    let out = outpost()
        .args([
            "check",
            "--strict",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/reference.toml"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("uplink.ca"));
}

fn check_text(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("gw.toml");
    std::fs::write(&f, text).unwrap();
    let out = outpost().arg("check").arg(&f).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_a_misspelt_key_with_line_column_and_key() {
    let text = reference().replacen("timeout = \"1s\"", "timout = \"1s\"", 1);
    let line = text[..text.find("timout").unwrap()].matches('\n').count() + 1;
    let (ok, err) = check_text(&text);
    assert!(!ok);
    assert!(
        err.contains(&format!("gw.toml:{line}:1: `devices[0].modbus.timout`")),
        "{err}"
    );
    assert!(err.contains("did you mean `timeout`?"), "{err}");
}

#[test]
fn check_reports_an_out_of_range_value_with_line_column_and_key() {
    let text = reference().replacen("interval = \"1s\"", "interval = \"0ms\"", 1);
    // At the start of a line: `commit_interval = "0ms"` comes earlier in the file.
    let line = text[..text.find("\ninterval = \"0ms\"").unwrap()]
        .matches('\n')
        .count()
        + 2;
    let (ok, err) = check_text(&text);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "gw.toml:{line}:12: `devices[0].modbus.poll_groups[0].interval`"
        )),
        "{err}"
    );
    assert!(err.contains("out of range"), "{err}");
}

#[test]
fn check_reports_a_missing_file() {
    let out = outpost()
        .args(["check", "/nonexistent/gw.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn version_prints() {
    let out = outpost().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("outpost "));
}

#[test]
fn certs_writes_a_bundle_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let run = || {
        outpost()
            .arg("certs")
            .arg("--out")
            .arg(&out)
            .args([
                "--hub-name",
                "localhost",
                "--gateway",
                "gw-a",
                "--gateway",
                "gw-b",
            ])
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for f in [
        "ca.pem", "ca.key", "hub.pem", "hub.key", "gw-a.pem", "gw-a.key", "gw-b.pem",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let second = run();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("exists"));
}

#[test]
fn run_shuts_down_cleanly_on_sigterm_and_sigint() {
    use std::io::{BufRead, BufReader};
    for sig in ["-TERM", "-INT"] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("gw.toml");
        std::fs::write(
            &cfg,
            "[gateway]\nid = \"gw-cli\"\ndata_dir = \"data\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        )
        .unwrap();
        let mut child = outpost()
            .arg("run")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut log = String::new();
        while !log.contains("gateway started") {
            let mut line = String::new();
            assert!(err.read_line(&mut line).unwrap() > 0, "exited early: {log}");
            log.push_str(&line);
        }
        let killed = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{sig}: exit {status:?}\n{log}{rest}");
        assert!(rest.contains("outbox flushed"), "{rest}");
        assert!(dir.path().join("data/outbox").exists());
    }
}

#[test]
fn json_logs_are_one_json_object_per_line() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[gateway]\nid = \"gw-json\"\ndata_dir = \"data\"\n[log]\nformat = \"json\"\n[metrics]\nenabled = false\n",
    )
    .unwrap();
    let mut child = outpost()
        .arg("run")
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.contains("gateway started")) {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "exited early: {lines:?}"
        );
        lines.push(line);
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    lines.extend(rest.lines().map(str::to_owned));
    for l in lines.iter().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{l}"
        );
    }
}

#[test]
fn demo_runs_with_nothing_installed_and_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = outpost()
        .args(["demo", "--seconds", "4", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    let ingested = v["samples_ingested"].as_u64().unwrap();
    assert!(ingested > 20, "{v}");
    assert_eq!(v["samples_delivered"].as_u64().unwrap(), ingested, "{v}");
    assert_eq!(v["duplicates"].as_u64().unwrap(), 0, "{v}");
    assert!(stdout.contains("boiler"), "{stdout}");
}

/// The 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    text[..text.find(needle).unwrap()].matches('\n').count() + 1
}

/// The lines of `err` that report a problem, with the line number each one names
/// (`gw.toml:LINE:COL: ...`).
fn reported_lines(err: &str) -> Vec<usize> {
    err.lines()
        .filter_map(|l| l.strip_prefix("error: "))
        .filter_map(|l| l.split(':').nth(1)?.parse().ok())
        .collect()
}

#[test]
fn check_reports_every_schema_error_in_file_order() {
    let text = r#"[gateway]
id = "gw-errs"
data_dir = "data"
colour = "blue"

[[devices]]
name = "plc"

[devices.modbus]
address = "127.0.0.1:502"
unti_id = 1

[[devices.modbus.poll_groups]]
interval = "0ms"

[[devices.modbus.poll_groups.points]]
stream = "plc/temp"
table = "holding"
address = 0
type = "f32"

[metrics]
listen = 9464
"#;
    let (ok, err) = check_text(text);
    assert!(!ok);
    let want = [
        (line_of(text, "colour"), "`gateway.colour`"),
        (line_of(text, "unti_id"), "`devices[0].modbus.unti_id`"),
        (
            line_of(text, "interval"),
            "`devices[0].modbus.poll_groups[0].interval`",
        ),
        (line_of(text, "listen"), "`metrics.listen`"),
    ];
    for (line, key) in want {
        assert!(
            err.contains(&format!("gw.toml:{line}:")) && err.contains(key),
            "{key} at line {line} not reported:\n{err}"
        );
    }
    let lines = reported_lines(&err);
    assert_eq!(
        lines,
        want.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        "{err}"
    );
    assert!(err.contains("gw.toml: 4 error(s)"), "{err}");
}

#[test]
fn check_reports_schema_and_semantic_errors_together_in_file_order() {
    let text = r#"[gateway]
id = "gw-errs"
data_dir = "data"
colour = "blue"

[storage]
quota = "100KiB"

[metrics]
enabeld = false
"#;
    let (ok, err) = check_text(text);
    assert!(!ok);
    assert_eq!(
        reported_lines(&err),
        vec![
            line_of(text, "colour"),
            line_of(text, "quota"),
            line_of(text, "enabeld")
        ],
        "{err}"
    );
    assert!(err.contains("too small"), "{err}");
    assert!(err.contains("did you mean `enabled`?"), "{err}");
    assert!(err.contains("gw.toml: 3 error(s)"), "{err}");
}

#[test]
fn check_validates_a_hub_config() {
    let hub = concat!(env!("CARGO_MANIFEST_DIR"), "/config/hub.toml");
    // The shipped hub config: valid; its certificates are not on this machine (warnings).
    let out = outpost().args(["check", hub]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("unknown key `hub`"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok (hub"));
    // --strict: the missing certificates are errors, counted.
    let out = outpost().args(["check", "--strict", hub]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("`hub.ca`"), "{err}");
    assert!(err.contains("error(s)"), "{err}");
    // A mistake in a hub config is located like a gateway config's.
    let text = std::fs::read_to_string(hub).unwrap().replacen(
        "listen = \"127.0.0.1:7443\"",
        "lissen = \"127.0.0.1:7443\"",
        1,
    );
    let line = line_of(&text, "lissen");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("hub.toml");
    std::fs::write(&f, &text).unwrap();
    let out = outpost().arg("check").arg(&f).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("hub.toml:{line}:1: `hub.lissen`")),
        "{err}"
    );
    assert!(err.contains("did you mean `listen`?"), "{err}");
}

#[test]
fn check_strict_counts_its_errors() {
    let out = outpost()
        .args([
            "check",
            "--strict",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/reference.toml"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let n = err.lines().filter(|l| l.starts_with("error: ")).count();
    assert!(n > 0, "{err}");
    assert!(
        err.contains(&format!("reference.toml: {n} error(s)")),
        "{err}"
    );
}

#[test]
fn run_and_hub_print_config_errors_with_one_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let gw = dir.path().join("gw.toml");
    std::fs::write(
        &gw,
        "[gateway]\nid = \"gw\"\ndata_dir = \"d\"\ncolour = 1\n",
    )
    .unwrap();
    let hub = dir.path().join("hub.toml");
    std::fs::write(&hub, "[hub]\nlissen = \"127.0.0.1:0\"\n").unwrap();
    for (cmd, f) in [("run", &gw), ("hub", &hub)] {
        let out = outpost().arg(cmd).arg(f).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.lines().any(|l| l.starts_with("error: ")),
            "{cmd}: {err}"
        );
        for l in err.lines() {
            assert!(l.matches("error:").count() <= 1, "{cmd}: {l}");
        }
        assert!(err.contains("error(s)"), "{cmd}: {err}");
    }
}

#[test]
fn text_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[gateway]\nid = \"gw-plain\"\ndata_dir = \"data\"\n[log]\nformat = \"text\"\n[metrics]\nenabled = false\n",
    )
    .unwrap();
    let mut child = outpost()
        .arg("run")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    while !log.contains("gateway started") {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "exited early: {log}");
        log.push_str(&line);
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    std::io::Read::read_to_string(&mut err, &mut log).unwrap();
    assert!(child.wait().unwrap().success(), "{log}");
    assert!(log.contains(" INFO "), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a piped log:\n{log:?}"
    );
}

/// Runs `outpost demo --seconds N` in a folder of its own; returns (stdout, the folder).
fn demo(seconds: &str) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let out = outpost()
        .args(["demo", "--seconds", seconds, "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (stdout, dir)
}

#[test]
fn demo_shows_streams_the_kalman_output_the_link_and_the_hub_file() {
    let (stdout, dir) = demo("5");
    // Every stream of config/demo.toml, by name, with a value.
    for stream in [
        "demo/boiler/temperature",
        "demo/boiler/pressure",
        "demo/boiler/flow",
        "demo/boiler/burner_on",
        "demo/boiler/temperature_kf",
    ] {
        assert!(
            stdout.lines().any(|l| {
                l.split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| {
                        w[0] == stream
                            && (w[1].parse::<f64>().is_ok() || w[1] == "on" || w[1] == "off")
                    })
            }),
            "no value shown for {stream}:\n{stdout}"
        );
    }
    // The link class and the sync mode.
    let classes = ["fiber", "broadband", "mobile", "satellite", "intermittent"];
    let modes = ["full", "full_zstd", "delta", "summary", "store_and_forward"];
    assert!(
        stdout.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.windows(2)
                .any(|p| p[0] == "link" && classes.contains(&p[1]))
                && w.windows(3)
                    .any(|p| p[0] == "sync" && p[1] == "mode" && modes.contains(&p[2]))
        }),
        "no link class and sync mode shown:\n{stdout}"
    );
    // The hub's output file: shown, and it holds the delivered samples.
    let file = stdout
        .split_whitespace()
        .find(|w| w.ends_with(".jsonl") && !w.ends_with(".summary.jsonl"))
        .unwrap_or_else(|| panic!("no hub output file shown:\n{stdout}"));
    let file = std::path::Path::new(file);
    assert!(file.starts_with(dir.path()), "{}", file.display());
    let lines = std::fs::read_to_string(file).unwrap();
    assert!(lines.contains("demo/boiler/temperature_kf"), "{lines}");
}

#[test]
fn demo_device_listens_where_config_demo_toml_says_or_says_why_not() {
    let (stdout, _dir) = demo("1");
    assert!(
        stdout.contains("simulated boiler at 127.0.0.1:5020")
            || stdout.contains("127.0.0.1:5020 is taken"),
        "{stdout}"
    );
}

/// A gateway id the frame codec, the hub or an MQTT topic could not carry is refused by
/// `check` (located at the key) and by `certs`, instead of a gateway that reconnects for
/// ever.
#[test]
fn check_and_certs_refuse_a_gateway_id_the_uplink_could_not_use() {
    for bad in ["_gw", ".gw", "-gw", ".."] {
        let text = reference().replacen("id = \"plant-a-gw01\"", &format!("id = \"{bad}\""), 1);
        let line = text[..text.find(&format!("id = \"{bad}\"")).unwrap()]
            .matches('\n')
            .count()
            + 1;
        let (ok, err) = check_text(&text);
        assert!(!ok, "{bad}: check passed");
        assert!(
            err.contains(&format!("gw.toml:{line}:6: `gateway.id`")),
            "{bad}: {err}"
        );
        assert!(err.contains("invalid gateway id"), "{bad}: {err}");

        let dir = tempfile::tempdir().unwrap();
        let out = outpost()
            .arg("certs")
            .arg("--out")
            .arg(dir.path().join("certs"))
            .args(["--hub-name", "localhost", &format!("--gateway={bad}")])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad}: certs made a certificate");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("invalid gateway id"),
            "{bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!dir.path().join("certs").exists(), "{bad}: files written");
    }
}
