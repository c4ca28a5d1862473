//! The Home Assistant integration against a real broker (Debian's `mosquitto`, on a free
//! loopback port) and the real gateway binary: discovery retained and well-formed (each
//! component's fields checked against Home Assistant's MQTT discovery schema, listed here from
//! its documentation), the state carrying the numbers `status --json` gives, the buttons and
//! the number going through the control path and the audit log (actor `mqtt`), malformed and
//! refused commands never applied, a broker restart survived, and device traffic unaffected
//! when the broker dies under load.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::daemon::{cli, Daemon};
use common::*;
use cync_gateway::sim::device::{self, DeviceConfig, DeviceStats};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const INSTANCE: &str = "t1";
const BASE: &str = "cync-gateway/t1";

fn mosquitto_bin() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "mosquitto".into()
}

/// A real broker on `port` (0: a free one), until dropped.
struct Broker {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Broker {
    async fn start(port: u16) -> Broker {
        Broker::start_with(port, |_| String::new()).await
    }

    /// With more configuration, written by `extra` into the broker's own directory (the
    /// listener line is the first; what follows applies to it).
    async fn start_with(port: u16, extra: impl Fn(&Path) -> String) -> Broker {
        // A free port, taken and released: mosquitto cannot report one it chose itself. A
        // port taken meanwhile makes it exit, and another is tried.
        for _ in 0..10 {
            let port = if port != 0 {
                port
            } else {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("free port")
                    .port()
            };
            let dir = tempfile::tempdir().expect("dir");
            let conf = dir.path().join("mosquitto.conf");
            let more = extra(dir.path());
            let anonymous = if more.is_empty() { "true" } else { "false" };
            std::fs::write(
                &conf,
                format!(
                    "per_listener_settings false\nallow_anonymous {anonymous}\npersistence false\nlog_dest stderr\nuser root\nlistener {port} 127.0.0.1\n{more}"
                ),
            )
            .expect("conf");
            let mut child = Command::new(mosquitto_bin())
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("mosquitto (Debian package mosquitto; scripts/test.sh installs it)");
            let up = tokio::time::timeout(DEADLINE, async {
                loop {
                    if let Ok(Some(_)) = child.try_wait() {
                        return false;
                    }
                    if tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok()
                    {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .unwrap_or(false);
            if up {
                return Broker {
                    child,
                    port,
                    _dir: dir,
                };
            }
        }
        panic!("mosquitto did not start");
    }

    async fn kill(mut self) -> u16 {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
        self.port
    }
}

/// Everything a test client has received, by topic: the newest payload and its retain flag.
type Seen = Arc<Mutex<BTreeMap<String, (Vec<u8>, bool)>>>;

/// A client subscribed to the discovery prefix and the gateway's base topic.
async fn watcher(port: u16, name: &str) -> (AsyncClient, Seen, CancellationToken) {
    let mut o = MqttOptions::new(name, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(o, 64);
    client
        .subscribe("homeassistant/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    client
        .subscribe(format!("{BASE}/#"), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let seen: Seen = Arc::default();
    let stop = CancellationToken::new();
    let (s, st) = (seen.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = st.cancelled() => return,
                ev = events.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    s.lock()
                        .expect("lock")
                        .insert(p.topic.clone(), (p.payload.to_vec(), p.retain));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (client, seen, stop)
}

fn snapshot(seen: &Seen) -> BTreeMap<String, (Vec<u8>, bool)> {
    seen.lock().expect("lock").clone()
}

fn configs(seen: &Seen) -> BTreeMap<String, Value> {
    snapshot(seen)
        .into_iter()
        .filter(|(t, (p, _))| t.starts_with("homeassistant/") && !p.is_empty())
        .map(|(t, (p, _))| (t, serde_json::from_slice(&p).expect("discovery JSON")))
        .collect()
}

fn state(seen: &Seen) -> Option<Value> {
    snapshot(seen)
        .get(&format!("{BASE}/state"))
        .and_then(|(p, _)| serde_json::from_slice(p).ok())
}

/// Home Assistant's MQTT discovery fields (full names) per component, from its
/// documentation (integrations/{sensor,binary_sensor,number,button}.mqtt): what is allowed,
/// and what is required.
fn schema(component: &str) -> (Vec<&'static str>, Vec<&'static str>) {
    let common = [
        "name",
        "unique_id",
        "object_id",
        "default_entity_id",
        "availability_topic",
        "payload_available",
        "payload_not_available",
        "availability",
        "availability_mode",
        "availability_template",
        "device",
        "origin",
        "entity_category",
        "enabled_by_default",
        "icon",
        "entity_picture",
        "json_attributes_topic",
        "json_attributes_template",
        "qos",
        "encoding",
    ];
    let (own, required): (&[&str], &[&str]) = match component {
        "sensor" => (
            &[
                "state_topic",
                "value_template",
                "unit_of_measurement",
                "device_class",
                "state_class",
                "expire_after",
                "force_update",
                "last_reset_value_template",
                "suggested_display_precision",
                "options",
            ],
            &["state_topic"],
        ),
        "binary_sensor" => (
            &[
                "state_topic",
                "value_template",
                "payload_on",
                "payload_off",
                "device_class",
                "expire_after",
                "force_update",
                "off_delay",
            ],
            &["state_topic"],
        ),
        "number" => (
            &[
                "command_topic",
                "command_template",
                "state_topic",
                "value_template",
                "min",
                "max",
                "step",
                "mode",
                "unit_of_measurement",
                "device_class",
                "optimistic",
                "payload_reset",
                "retain",
            ],
            &["command_topic"],
        ),
        "button" => (
            &[
                "command_topic",
                "command_template",
                "payload_press",
                "device_class",
                "retain",
            ],
            &["command_topic"],
        ),
        other => panic!("unexpected component {other}"),
    };
    (
        common.iter().chain(own).copied().collect(),
        required.to_vec(),
    )
}

/// Every discovery message: its topic's shape, its fields, its device, and its templates'
/// keys present in `state`.
fn check_discovery(configs: &BTreeMap<String, Value>, state: &Value) {
    let id_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    let mut ids = HashSet::new();
    for (topic, c) in configs {
        let parts: Vec<&str> = topic.split('/').collect();
        assert_eq!(parts.len(), 5, "{topic}");
        assert_eq!((parts[0], parts[4]), ("homeassistant", "config"), "{topic}");
        assert!(id_ok(parts[2]) && id_ok(parts[3]), "{topic}: ids");
        let (allowed, required) = schema(parts[1]);
        let obj = c.as_object().expect("an object");
        for k in obj.keys() {
            assert!(
                allowed.contains(&k.as_str()),
                "{topic}: {k} is not a {} field",
                parts[1]
            );
        }
        for k in required {
            assert!(obj.contains_key(k), "{topic}: {k} is required");
        }
        let uid = c["unique_id"].as_str().expect("unique_id");
        assert!(ids.insert(uid.to_string()), "{uid} twice");
        assert_eq!(c["availability_topic"], format!("{BASE}/availability"));
        let dev = &c["device"];
        assert_eq!(
            dev["identifiers"],
            serde_json::json!([format!("cync_gateway_{INSTANCE}")])
        );
        assert_eq!(dev["name"], format!("Cync gateway {INSTANCE}"));
        if let Some(t) = c.get("state_topic") {
            assert_eq!(t, &Value::from(format!("{BASE}/state")), "{topic}");
        }
        if let Some(t) = c.get("command_topic").and_then(Value::as_str) {
            assert!(
                t.starts_with(BASE) && !t.contains(['#', '+']),
                "{topic}: {t}"
            );
        }
        if let Some(tpl) = c.get("value_template").and_then(Value::as_str) {
            let key = tpl
                .split("value_json.")
                .nth(1)
                .and_then(|r| {
                    r.split(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
                        .next()
                })
                .expect("a value_json key");
            assert!(state.get(key).is_some(), "{topic}: state has no {key}");
        }
        match parts[1] {
            "number" => {
                assert!(c["min"].as_f64() < c["max"].as_f64());
                assert!(c["step"].as_f64().is_some_and(|s| s > 0.0));
                assert!(["auto", "box", "slider"].contains(&c["mode"].as_str().unwrap_or("auto")));
            }
            "sensor" if c.get("device_class") == Some(&Value::from("duration")) => {
                assert!(["d", "h", "min", "s", "ms"]
                    .contains(&c["unit_of_measurement"].as_str().unwrap_or("")));
            }
            _ => {}
        }
    }
}

/// What the state topic must say, by the test's own reading of `status --json`.
fn expected_state(s: &Value) -> Value {
    let path = |t: &str| {
        s["paths"]
            .as_array()
            .expect("paths")
            .iter()
            .find(|p| p["transport"] == t)
            .expect("path")
            .clone()
    };
    let pct = |v: &Value| {
        v.as_f64()
            .map_or(Value::Null, |x| Value::from((x * 10_000.0).round() / 100.0))
    };
    let mut e = serde_json::json!({
        "canary_configured": s["configured_percent"],
        "canary_effective": s["effective_percent"],
        "latched": s["latch"]["latched"],
    });
    for t in ["new", "legacy"] {
        let p = path(t);
        e[format!("devices_{t}")] = p["connections"].clone();
        let hour = p["windows"]
            .as_array()
            .expect("windows")
            .iter()
            .find(|w| w["window"] == "1h")
            .expect("1h")["success"]
            .clone();
        e[format!("success_1h_{t}")] = pct(&hour);
        let budget = p["budget_remaining"]
            .as_array()
            .expect("budgets")
            .iter()
            .find(|b| b[0] == "success")
            .expect("success budget")[1]
            .clone();
        e[format!("budget_{t}")] = pct(&budget);
        e[format!("p99_ms_{t}")] = p["p99_s"]
            .as_f64()
            .map_or(Value::Null, |x| Value::from((x * 1e6).round() / 1e3));
    }
    e
}

async fn status(cfg: &str) -> Value {
    let o = cli(&["status", "--config", cfg, "--json"]).await;
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    serde_json::from_slice(&o.stdout).expect("status JSON")
}

/// The state topic eventually says what `status --json` says (both read repeatedly: the
/// figures move between the two reads).
async fn state_matches_status(seen: &Seen, cfg: &str) -> Value {
    eventually(
        "the state topic carries status --json's numbers",
        || async {
            let want = expected_state(&status(cfg).await);
            let got = state(seen)?;
            let fields = want.as_object()?;
            fields
                .iter()
                .all(|(k, v)| got.get(k) == Some(v))
                .then_some(got)
        },
    )
    .await
}

async fn press(c: &AsyncClient, what: &str, payload: &str) {
    c.publish(
        format!("{BASE}/{what}"),
        QoS::AtLeastOnce,
        false,
        payload.to_string(),
    )
    .await
    .expect("publish");
}

fn commands(m: &str, command: &str, result: &str) -> f64 {
    sample(
        m,
        &format!("tcp_comm_mqtt_commands_total{{command=\"{command}\",result=\"{result}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_is_a_home_assistant_device_over_a_real_broker() {
    let broker = Broker::start(0).await;
    let addon = start_addon(fast_addon()).await;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.toml");
    let text = format!(
        "# The canary, set from Home Assistant.\n{}\n[mqtt]\nenabled = true\nbroker = \"127.0.0.1:{}\"\ninstance = \"{INSTANCE}\"\nallow_control = true\npublish_interval = \"1s\"\n",
        TestGateway::new(addon.addr())
            .set("routing.canary_percent", 50)
            .set("logging.format", "json")
            .text(),
        broker.port
    );
    std::fs::write(&path, &text).expect("config");
    let d = Daemon::start(path.clone(), None).await;
    let cfg = path.to_str().expect("utf-8");
    let stop_devices = CancellationToken::new();
    for i in 0..8 {
        let mut c = DeviceConfig::new(d.devices, 21, i);
        c.redial = (Duration::from_millis(50), Duration::from_millis(300));
        tokio::spawn(device::run(
            c,
            Arc::new(DeviceStats::default()),
            stop_devices.clone(),
        ));
    }
    eventually("8 devices ready at the add-on", || async {
        (addon.connections().1 == 8).then_some(())
    })
    .await;

    // Discovery: 12 sensors, the binary sensor, the number and 3 buttons, retained.
    let (client, seen, stop_watch) = watcher(broker.port, "ha-test").await;
    eventually("discovery, availability and state arrive", || async {
        let s = snapshot(&seen);
        (configs(&seen).len() == 17
            && s.get(&format!("{BASE}/availability"))
                .map(|(p, _)| p.as_slice())
                == Some(b"online".as_slice())
            && state(&seen).is_some())
        .then_some(())
    })
    .await;
    for (topic, (_, retained)) in snapshot(&seen) {
        assert!(retained, "{topic} is retained");
    }
    let st = state_matches_status(&seen, cfg).await;
    check_discovery(&configs(&seen), &st);
    let on_new = st["devices_new"].as_u64().expect("count");
    assert_eq!(on_new + st["devices_legacy"].as_u64().expect("count"), 8);
    println!("state: {st}");

    // The rollback button sets the latch, audited as mqtt with its topic.
    press(&client, "rollback/press", "PRESS").await;
    wait_metric(d.metrics, "tcp_comm_rollback_active", 1.0).await;
    let s = status(cfg).await;
    assert_eq!(s["latch"]["actor"], "mqtt");
    let st = state_matches_status(&seen, cfg).await;
    assert_eq!(st["latched"], true);
    assert_eq!(st["canary_effective"], 0.0);
    assert!(
        st["last_rollback_reason"]
            .as_str()
            .is_some_and(|r| r.contains("rollback/press")),
        "{st}"
    );
    // The number is refused while latched: the file is untouched.
    press(&client, "canary/set", "25").await;
    wait_metric(
        d.metrics,
        "tcp_comm_mqtt_commands_total{command=\"canary\",result=\"refused\"}",
        1.0,
    )
    .await;
    assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
    // Resume, then the number writes the file, comments kept, and is in force.
    press(&client, "resume/press", "PRESS").await;
    wait_metric(d.metrics, "tcp_comm_rollback_active", 0.0).await;
    press(&client, "canary/set", "25").await;
    eventually("25 % in force", || async {
        (status(cfg).await["configured_percent"] == 25.0).then_some(())
    })
    .await;
    let after = std::fs::read_to_string(&path).expect("read");
    assert_eq!(
        after,
        text.replace("canary_percent = 50", "canary_percent = 25")
    );
    assert!(after.starts_with("# The canary, set from Home Assistant.\n"));
    let st = state_matches_status(&seen, cfg).await;
    assert_eq!(st["canary_configured"], 25.0);
    // Malformed payloads are logged and never applied.
    for (what, payload) in [
        ("canary/set", "abc"),
        ("canary/set", "12.345"),
        ("rollback/press", "yes"),
    ] {
        press(&client, what, payload).await;
    }
    let m = wait_metric(
        d.metrics,
        "tcp_comm_mqtt_commands_total{command=\"rollback\",result=\"malformed\"}",
        1.0,
    )
    .await;
    assert_eq!(commands(&m, "canary", "malformed"), 2.0);
    assert_eq!(commands(&m, "canary", "accepted"), 1.0);
    assert_eq!(commands(&m, "rollback", "accepted"), 1.0);
    assert_eq!(commands(&m, "resume", "accepted"), 1.0);
    assert!(d.logged("MQTT: command not applied"));
    assert!(d.logged("cync-gateway/t1/canary/set"));
    assert_eq!(status(cfg).await["latch"]["latched"], false);
    let h = cli(&["history", "--config", cfg, "--json"]).await;
    let history: Value = serde_json::from_slice(&h.stdout).expect("history JSON");
    let by_mqtt: Vec<(String, String)> = history["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["actor"] == "mqtt")
        .map(|e| {
            (
                e["action"].as_str().unwrap_or("").to_string(),
                e["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let actions: Vec<&str> = by_mqtt.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(actions, ["rollback", "resume", "set_canary"], "{by_mqtt:?}");
    assert!(
        by_mqtt.iter().all(|(_, r)| r.contains("cync-gateway/t1/")),
        "{by_mqtt:?}"
    );

    // A broker restart (nothing kept: no persistence) is survived: everything again.
    stop_watch.cancel();
    let port = broker.kill().await;
    wait_metric(d.metrics, "tcp_comm_mqtt_connected", 0.0).await;
    let broker = Broker::start(port).await;
    wait_metric(d.metrics, "tcp_comm_mqtt_connected", 1.0).await;
    let (_client, seen, stop_watch) = watcher(broker.port, "ha-test-2").await;
    eventually(
        "discovery and availability again after the restart",
        || async {
            let s = snapshot(&seen);
            (configs(&seen).len() == 17
                && s.get(&format!("{BASE}/availability"))
                    .map(|(p, _)| p.as_slice())
                    == Some(b"online".as_slice()))
            .then_some(())
        },
    )
    .await;
    stop_watch.cancel();

    // The broker dies under device load: device traffic does not notice.
    addon.reset_report();
    let up = drive(&addon, 600, 100.0, 3).await;
    let _ = broker.kill().await;
    wait_metric(d.metrics, "tcp_comm_mqtt_connected", 0.0).await;
    addon.reset_report();
    let down = drive(&addon, 600, 100.0, 4).await;
    println!(
        "broker up: {:.2} % of {} (p50 {:.1} ms, p99 {:.1} ms); broker killed: {:.2} % of {} (p50 {:.1} ms, p99 {:.1} ms)",
        up.success_ratio() * 100.0,
        up.sent,
        up.p50_ms,
        up.p99_ms,
        down.success_ratio() * 100.0,
        down.sent,
        down.p50_ms,
        down.p99_ms
    );
    assert_eq!(up.done, up.sent, "{up:?}");
    assert_eq!(down.done, down.sent, "{down:?}");
    assert_eq!(addon.connections().1, 8, "no device disconnected");
    stop_devices.cancel();
    drop(d);
}

/// Without `allow_control`, no control is announced and command topics are not listened to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_allow_control_there_are_no_controls_and_commands_do_nothing() {
    let broker = Broker::start(0).await;
    let addon = start_addon(fast_addon()).await;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.toml");
    let text = format!(
        "{}\n[mqtt]\nenabled = true\nbroker = \"127.0.0.1:{}\"\ninstance = \"{INSTANCE}\"\n",
        TestGateway::new(addon.addr())
            .set("logging.format", "json")
            .text(),
        broker.port
    );
    std::fs::write(&path, &text).expect("config");
    let d = Daemon::start(path.clone(), None).await;
    let (client, seen, _stop) = watcher(broker.port, "ha-test-3").await;
    eventually("the sensors are announced", || async {
        (configs(&seen).len() == 13 && state(&seen).is_some()).then_some(())
    })
    .await;
    let kinds: HashSet<String> = configs(&seen)
        .keys()
        .map(|t| t.split('/').nth(1).unwrap_or("").to_string())
        .collect();
    assert_eq!(
        kinds,
        HashSet::from(["sensor".to_string(), "binary_sensor".to_string()])
    );
    press(&client, "rollback/press", "PRESS").await;
    // Published after the press, so seen after it: the press had its chance.
    client
        .publish(format!("{BASE}/probe"), QoS::AtLeastOnce, false, "x")
        .await
        .expect("probe");
    eventually("the probe comes back", || async {
        snapshot(&seen)
            .contains_key(&format!("{BASE}/probe"))
            .then_some(())
    })
    .await;
    let m = scrape(d.metrics).await;
    assert_eq!(sample(&m, "tcp_comm_rollback_active"), 0.0);
    assert_eq!(family_total(&m, "tcp_comm_mqtt_commands_total"), 0.0);
}

/// A certificate for `localhost` that is its own CA, and its key, as PEM.
fn localhost_cert() -> (Vec<u8>, Vec<u8>) {
    use openssl::asn1::Asn1Time;
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::rsa::Rsa;
    use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
    use openssl::x509::{X509NameBuilder, X509};
    let key = PKey::from_rsa(Rsa::generate(2048).expect("rsa")).expect("key");
    let mut name = X509NameBuilder::new().expect("name");
    name.append_entry_by_text("CN", "localhost").expect("cn");
    let name = name.build();
    let mut b = X509::builder().expect("builder");
    b.set_version(2).expect("v3");
    b.set_subject_name(&name).expect("subject");
    b.set_issuer_name(&name).expect("issuer");
    b.set_pubkey(&key).expect("pubkey");
    b.set_not_before(&Asn1Time::days_from_now(0).expect("t"))
        .expect("nb");
    b.set_not_after(&Asn1Time::days_from_now(2).expect("t"))
        .expect("na");
    b.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
        .expect("bc");
    let san = SubjectAlternativeName::new()
        .dns("localhost")
        .build(&b.x509v3_context(None, None))
        .expect("san");
    b.append_extension(san).expect("san");
    b.sign(&key, MessageDigest::sha256()).expect("sign");
    (
        b.build().to_pem().expect("pem"),
        key.private_key_to_pem_pkcs8().expect("key pem"),
    )
}

/// TLS to the broker, verified against `mqtt.ca_file`, with a user and a password file: the
/// bridge connects and announces; with a wrong password the broker refuses it, and it says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_credentials_to_the_broker() {
    let (cert, key) = localhost_cert();
    let broker = Broker::start_with(0, |dir| {
        std::fs::write(dir.join("cert.pem"), &cert).expect("cert");
        std::fs::write(dir.join("key.pem"), &key).expect("key");
        let passwd = dir.join("passwd");
        let ok = std::process::Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&passwd)
            .args(["gw", "s3cret-pass"])
            .status()
            .expect("mosquitto_passwd (Debian package mosquitto)");
        assert!(ok.success());
        format!(
            "certfile {}\nkeyfile {}\npassword_file {}\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display(),
            passwd.display()
        )
    })
    .await;
    let addon = start_addon(fast_addon()).await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("ca.pem"), &cert).expect("ca");
    for (password, connects) in [("s3cret-pass", true), ("wrong", false)] {
        std::fs::write(dir.path().join("pw"), format!("{password}\n")).expect("pw");
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            format!(
                "{}\n[mqtt]\nenabled = true\nbroker = \"localhost:{}\"\ntls = true\nca_file = \"{}\"\nusername = \"gw\"\npassword_file = \"{}\"\ninstance = \"{INSTANCE}\"\n",
                TestGateway::new(addon.addr()).set("logging.format", "json").text(),
                broker.port,
                dir.path().join("ca.pem").display(),
                dir.path().join("pw").display(),
            ),
        )
        .expect("config");
        let d = Daemon::start(path, None).await;
        if connects {
            wait_metric(d.metrics, "tcp_comm_mqtt_connected", 1.0).await;
            // Connected comes first; the discovery and state messages follow it.
            let metrics = d.metrics;
            eventually("19 messages published over TLS", || async move {
                let (_, body) = http_get(metrics, "/metrics").await;
                (sample(&body, "tcp_comm_mqtt_messages_total{outcome=\"published\"}") >= 19.0)
                    .then_some(())
            })
            .await;
        } else {
            eventually("the refusal is logged", || async {
                d.logged("MQTT broker unreachable").then_some(())
            })
            .await;
            assert_eq!(
                sample(&scrape(d.metrics).await, "tcp_comm_mqtt_connected"),
                0.0
            );
        }
    }
}
