//! The MQTT source over TLS (rustls, ring) with username and password: a Mosquitto broker
//! with a TLS listener whose certificate our CA signed, a password file, and no anonymous
//! access. Readings published on its plain listener (with credentials) reach the gateway
//! over TLS; a wrong password gets nothing in and is counted as failed connections.

use std::process::Command;
use std::time::Duration;

use outpost_actors::gateway::Gateway;
use outpost_hil::harness::{self, Pki};
use outpost_hil::peers::mosquitto::{self, Mosquitto};
use outpost_runtime::metrics::Metrics;

fn tls_broker(pki: &Pki) -> (Mosquitto, u16) {
    let tls_port = outpost_hil::peers::free_port();
    let cert = std::fs::read(&pki.bundle.hub_cert).unwrap();
    let key = std::fs::read(&pki.bundle.hub_key).unwrap();
    let ca = std::fs::read(&pki.bundle.ca_cert).unwrap();
    // The password file, made with the broker's own tool.
    let pw = tempfile::NamedTempFile::new().unwrap();
    let st = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(pw.path())
        .args(["gw", "s3cret"])
        .status()
        .expect("mosquitto_passwd (apt-get install mosquitto)");
    assert!(st.success());
    let pwfile = std::fs::read(pw.path()).unwrap();
    let extra = format!(
        "allow_anonymous false\npassword_file {{dir}}/passwd\n\
         listener {tls_port} 127.0.0.1\ncafile {{dir}}/ca.pem\ncertfile {{dir}}/server.pem\n\
         keyfile {{dir}}/server.key\ntls_version tlsv1.2\n"
    );
    let broker = Mosquitto::start_configured(
        &extra,
        &[
            ("ca.pem", &ca),
            ("server.pem", &cert),
            ("server.key", &key),
            ("passwd", &pwfile),
        ],
    );
    (broker, tls_port)
}

fn device(pki: &Pki, tls_port: u16, password_env: &str) -> String {
    format!(
        r#"
[[devices]]
name = "secure"
[devices.mqtt]
broker = "127.0.0.1:{tls_port}"
username = "gw"
password = {{ env = "{password_env}" }}
tls = {{ ca = "{ca}", server_name = "localhost" }}
reconnect = {{ initial = "50ms", max = "500ms" }}
[[devices.mqtt.subscriptions]]
topic = "plant/+/telemetry"
qos = 1
format = "json"
timestamp_pointer = "/ts"
[[devices.mqtt.subscriptions.fields]]
pointer = "/n"
stream = "plant/{{1}}/n"
"#,
        ca = pki.bundle.ca_cert.display()
    )
}

fn publish_with_credentials(port: u16, n: u64) {
    let lines: Vec<String> = (0..n).map(mosquitto::telemetry_line).collect();
    let mut child = mosquitto::mosquitto_pub(port, 1, "plant/m1/telemetry")
        .args(["-l", "-u", "gw", "-P", "s3cret"])
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all((lines.join("\n") + "\n").as_bytes())
        .unwrap();
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_password_delivers_and_a_wrong_password_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), &["gw-tls"]);
    let (broker, tls_port) = tls_broker(&pki);
    // SAFETY: variables only this test reads.
    unsafe {
        std::env::set_var("OUTPOST_TEST_MQTT_PW_GOOD", "s3cret");
        std::env::set_var("OUTPOST_TEST_MQTT_PW_BAD", "nope");
    }

    let good = harness::gateway_config(
        "gw-tls",
        &dir.path().join("good"),
        &device(&pki, tls_port, "OUTPOST_TEST_MQTT_PW_GOOD"),
        None,
    );
    let bad = harness::gateway_config(
        "gw-tls-bad",
        &dir.path().join("bad"),
        &device(&pki, tls_port, "OUTPOST_TEST_MQTT_PW_BAD"),
        None,
    );
    let (mg, mb) = (Metrics::new(), Metrics::new());
    let gw_good = Gateway::start(&good, mg.clone()).await.unwrap();
    let gw_bad = Gateway::start(&bad, mb.clone()).await.unwrap();
    let connected = harness::wait_for(Duration::from_secs(10), || {
        mg.encode()
            .contains("outpost_mqtt_connected{device=\"secure\"} 1")
    })
    .await;
    assert!(
        connected,
        "TLS connection: {}\nbroker log:\n{}",
        mg.encode(),
        std::fs::read_to_string(broker.log_path()).unwrap_or_default()
    );
    tokio::task::spawn_blocking({
        let port = broker.port();
        move || publish_with_credentials(port, 200)
    })
    .await
    .unwrap();
    let got = harness::wait_for(Duration::from_secs(20), || {
        mg.counter_value("outpost_stream_samples_stored", &[("device", "secure")]) >= 200
    })
    .await;
    assert!(got, "readings over TLS: {}", mg.encode());
    assert_eq!(
        mb.counter_value("outpost_stream_samples_stored", &[("device", "secure")]),
        0
    );
    assert!(
        mb.counter_value("outpost_mqtt_reconnects", &[("device", "secure")]) >= 1,
        "a refused login is a failed connection: {}",
        mb.encode()
    );
    assert!(
        !mb.encode()
            .contains("outpost_mqtt_connected{device=\"secure\"} 1")
    );
    gw_good.shutdown().await.unwrap();
    gw_bad.shutdown().await.unwrap();
}
