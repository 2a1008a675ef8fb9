//! The shipped hub config (`config/hub.toml`) is valid as written once its certificates
//! exist (made here the way its comment says), including its commented `[republish]` and
//! `[mqtt_ingress]` sections; its `[hub.handshakes]` shows the defaults; a misspelt key in
//! it is reported with its line.

use std::path::Path;

use outpost_hil::harness::Pki;
use outpost_runtime::config;

const HUB_TOML: &str = include_str!("../../config/hub.toml");

#[test]
fn the_reference_hub_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let _pki = Pki::new(dir.path(), &["plant-a-gw01"]); // writes certs/ca.pem, hub.pem, hub.key
    let c = config::parse_hub(HUB_TOML, Path::new("hub.toml"), dir.path()).unwrap();
    assert_eq!(c.hub.listen.port(), 7443);
    let hs = &c.hub.handshakes;
    assert_eq!(
        (
            hs.timeout.get().as_secs(),
            hs.max_pending.get(),
            hs.max_pending_per_source.get(),
            hs.retry_above.get(),
            hs.reserved_for_known.get()
        ),
        (10, 64, 8, 16, 16),
        "the documented defaults"
    );
    assert_eq!(
        format!("{hs:?}"),
        format!("{:?}", config::hub::HandshakesSection::default()),
        "config/hub.toml shows the defaults"
    );
    let no_room = HUB_TOML.replace("reserved_for_known = 16 ", "reserved_for_known = 64 ");
    let e = config::parse_hub(&no_room, Path::new("hub.toml"), dir.path()).unwrap_err();
    assert!(
        e.to_string()
            .contains("`hub.handshakes.reserved_for_known`"),
        "{e}"
    );
    assert!(c.republish.is_none());
    assert!(c.mqtt_ingress.is_none());

    // The commented republish and mqtt_ingress sections, enabled.
    let enabled: String = HUB_TOML
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("# [republish]")
                || t.starts_with("# [mqtt_ingress]")
                || (t.starts_with("# ")
                    && t[2..].split_once(" = ").is_some()
                    && !t.contains("dir ="))
            {
                t[2..].to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    // SAFETY: a variable only this test reads.
    unsafe { std::env::set_var("OUTPOST_HUB_MQTT_PASSWORD", "pw") };
    // SAFETY: as above.
    unsafe { std::env::set_var("OUTPOST_HUB_INGRESS_PASSWORD", "pw") };
    let c = config::parse_hub(&enabled, Path::new("hub.toml"), dir.path())
        .unwrap_or_else(|e| panic!("{e}\n{enabled}"));
    let r = c.republish.expect("republish section");
    assert_eq!(r.broker, "127.0.0.1:1883");
    assert_eq!(r.topic_prefix, "outpost");
    let m = c.mqtt_ingress.expect("mqtt_ingress section");
    assert_eq!(m.broker, "127.0.0.1:8883");
    assert_eq!(m.topic_prefix, "outpost");
    assert_eq!(m.client_id.as_deref(), Some("outpost-hub-ingress"));
    assert_eq!(m.tls.expect("tls").ca, dir.path().join("certs/ca.pem"));

    // A typo in the enabled mqtt_ingress section is located.
    let typo = enabled.replace(
        "topic_prefix = \"outpost\"         # as",
        "topic_prefx = \"outpost\"         # as",
    );
    assert_ne!(typo, enabled);
    let e = config::parse_hub(&typo, Path::new("hub.toml"), dir.path()).unwrap_err();
    assert!(e.to_string().contains("`mqtt_ingress.topic_prefx`"), "{e}");
    assert!(
        e.to_string().contains("did you mean `topic_prefix`?"),
        "{e}"
    );

    let typo = HUB_TOML.replace("listen = \"127.0.0.1:7443\"", "lisen = \"127.0.0.1:7443\"");
    let e = config::parse_hub(&typo, Path::new("hub.toml"), dir.path()).unwrap_err();
    let shown = e.to_string();
    let line = HUB_TOML[..HUB_TOML.find("listen = \"127.0.0.1:7443\"").unwrap()]
        .matches('\n')
        .count()
        + 1;
    assert!(
        shown.contains(&format!("hub.toml:{line}:1: `hub.lisen`")),
        "{shown}"
    );
    assert!(shown.contains("did you mean `listen`?"), "{shown}");
}
