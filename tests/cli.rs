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
