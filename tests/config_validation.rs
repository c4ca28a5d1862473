//! Configuration validation, table-driven: one bad value per rule, each naming its key; and the
//! ranges the reference configuration states are the ones enforced, at both ends.

use std::collections::BTreeMap;

use cync_gateway::config::Config;

type Doc = BTreeMap<String, BTreeMap<String, String>>;

/// A minimal valid file as sections, plus a context that lets every range end be tried on its
/// own: retries that fit any deadline (100 ms, no backoff), small frames and a large device
/// queue (so either end of both fits two frames), the widest pre-hello budget and the smallest
/// per-source share (so either end of either is consistent).
fn base() -> Doc {
    let mut d = Doc::new();
    d.entry("upstream.legacy".into())
        .or_default()
        .insert("address".into(), "\"127.0.0.1:1\"".into());
    let r = d.entry("reliable".into()).or_default();
    r.insert("max_attempts".into(), "1".into());
    r.insert("ack_timeout".into(), "\"100ms\"".into());
    r.insert("backoff_multiplier".into(), "1.0".into());
    r.insert("jitter".into(), "0".into());
    r.insert("upstream_queue_bytes".into(), "67108864".into());
    d.entry("protocol".into())
        .or_default()
        .insert("max_frame_len".into(), "1024".into());
    let l = d.entry("listen".into()).or_default();
    l.insert("max_pending".into(), "1000000".into());
    l.insert("max_pending_per_source".into(), "1".into());
    l.insert("backlog".into(), "65535".into());
    d
}

/// The section `""` holds top-level keys (`state_dir`): it sorts first and gets no header, so
/// its keys come before any table, where TOML wants them.
fn render(d: &Doc) -> String {
    let mut out = String::new();
    for (section, keys) in d {
        if !section.is_empty() {
            out.push_str(&format!("[{section}]\n"));
        }
        for (k, v) in keys {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
    out
}

fn with(section: &str, key: &str, value: &str) -> String {
    let mut d = base();
    d.entry(section.into())
        .or_default()
        .insert(key.into(), value.into());
    render(&d)
}

fn problems(text: &str) -> Option<Vec<String>> {
    Config::parse(text)
        .err()
        .map(|e| e.problems().into_iter().map(|p| p.key).collect())
}

#[test]
fn the_context_itself_is_valid() {
    assert!(
        problems(&render(&base())).is_none(),
        "{:?}",
        problems(&render(&base()))
    );
}

/// (section, key, bad value, the key the problem must name)
const BAD: &[(&str, &str, &str, &str)] = &[
    ("listen", "devices", "\"not-an-address\"", "listen.devices"),
    ("listen", "metrics", "\"127.0.0.1\"", "listen.metrics"),
    ("listen", "max_connections", "0", "listen.max_connections"),
    (
        "listen",
        "handshake_timeout",
        "0",
        "listen.handshake_timeout",
    ),
    (
        "listen",
        "handshake_timeout",
        "\"-1s\"",
        "listen.handshake_timeout",
    ),
    (
        "listen",
        "handshake_timeout",
        "\"soon\"",
        "listen.handshake_timeout",
    ),
    (
        "listen",
        "handshake_timeout",
        "\"400days\"",
        "listen.handshake_timeout",
    ),
    (
        "listen",
        "tls_handshake_timeout",
        "0",
        "listen.tls_handshake_timeout",
    ),
    ("listen", "max_pending", "0", "listen.max_pending"),
    (
        "listen",
        "max_pending_per_source",
        "2000000",
        "listen.max_pending_per_source",
    ),
    ("listen", "backlog", "0", "listen.backlog"),
    ("listen", "backlog", "65536", "listen.backlog"),
    ("listen", "tcp_keepalive", "-1", "listen.tcp_keepalive"),
    (
        "listen",
        "http_header_timeout",
        "0",
        "listen.http_header_timeout",
    ),
    (
        "listen",
        "http_max_connections",
        "0",
        "listen.http_max_connections",
    ),
    ("listen", "colour", "\"blue\"", "listen.colour"),
    ("device_tls", "mode", "\"ssl\"", "device_tls.mode"),
    (
        "device_tls",
        "cert_file",
        "\"/x.pem\"",
        "device_tls.cert_file",
    ),
    ("device_tls", "ciphers", "\" \"", "device_tls.ciphers"),
    (
        "device_tls",
        "min_version",
        "\"tls2\"",
        "device_tls.min_version",
    ),
    (
        "device_tls",
        "max_version",
        "\"tls1.1\"",
        "device_tls.max_version",
    ),
    (
        "upstream.legacy",
        "address",
        "\"addon\"",
        "upstream.legacy.address",
    ),
    (
        "upstream.legacy",
        "address",
        "\"addon:0\"",
        "upstream.legacy.address",
    ),
    (
        "upstream.legacy",
        "verify",
        "\"some\"",
        "upstream.legacy.verify",
    ),
    (
        "upstream.legacy",
        "verify",
        "\"ca\"",
        "upstream.legacy.ca_file",
    ),
    (
        "upstream.legacy",
        "verify",
        "\"fingerprint\"",
        "upstream.legacy.fingerprint_sha256",
    ),
    (
        "upstream.legacy",
        "connect_timeout",
        "0",
        "upstream.legacy.connect_timeout",
    ),
    (
        "upstream.legacy",
        "tcp_keepalive",
        "\"-5s\"",
        "upstream.legacy.tcp_keepalive",
    ),
    (
        "upstream.shadow",
        "address",
        "\"shadow\"",
        "upstream.shadow.address",
    ),
    (
        "protocol",
        "max_frame_len",
        "1023",
        "protocol.max_frame_len",
    ),
    (
        "protocol",
        "command_deadline",
        "0",
        "protocol.command_deadline",
    ),
    ("protocol", "reply_timeout", "0", "protocol.reply_timeout"),
    ("shutdown", "drain_timeout", "-1", "shutdown.drain_timeout"),
    ("logging", "format", "\"xml\"", "logging.format"),
    ("logging", "level", "\"info,[\"", "logging.level"),
    (
        "logging",
        "file_rotation",
        "\"weekly\"",
        "logging.file_rotation",
    ),
    ("metrics", "per_device_max", "0", "metrics.per_device_max"),
    ("metrics", "per_device_idle", "0", "metrics.per_device_idle"),
    ("legacy", "idle_timeout", "0", "legacy.idle_timeout"),
    ("routing", "canary_percent", "101", "routing.canary_percent"),
    (
        "routing",
        "canary_percent",
        "12.345",
        "routing.canary_percent",
    ),
    ("routing", "force_new", "[\"xyz\"]", "routing.force_new"),
    (
        "routing",
        "force_legacy",
        "[\"1234567\"]",
        "routing.force_legacy",
    ),
    ("routing", "rehome", "\"sometimes\"", "routing.rehome"),
    ("routing", "rehome_rate", "0", "routing.rehome_rate"),
    ("routing", "rehome_rate", "10001", "routing.rehome_rate"),
    ("routing", "drain_grace", "\"-1s\"", "routing.drain_grace"),
    ("dark_launch", "mode", "\"loud\"", "dark_launch.mode"),
    ("dark_launch", "mode", "\"mirror\"", "upstream.shadow"),
    ("dark_launch", "percent", "-1", "dark_launch.percent"),
    (
        "dark_launch",
        "compare_window",
        "0",
        "dark_launch.compare_window",
    ),
    (
        "dark_launch",
        "mirror_queue_bytes",
        "100",
        "dark_launch.mirror_queue_bytes",
    ),
    ("reload", "poll_interval", "\"-1s\"", "reload.poll_interval"),
    ("reliable", "ack_timeout", "0", "reliable.ack_timeout"),
    ("reliable", "max_attempts", "0", "reliable.max_attempts"),
    (
        "reliable",
        "backoff_multiplier",
        "0.5",
        "reliable.backoff_multiplier",
    ),
    ("reliable", "jitter", "\"-1ms\"", "reliable.jitter"),
    (
        "reliable",
        "retry_until",
        "\"never\"",
        "reliable.retry_until",
    ),
    ("reliable", "dedup_capacity", "0", "reliable.dedup_capacity"),
    ("reliable", "dedup_ttl", "0", "reliable.dedup_ttl"),
    (
        "reliable",
        "device_queue_bytes",
        "16383",
        "reliable.device_queue_bytes",
    ),
    (
        "reliable",
        "upstream_queue_bytes",
        "4095",
        "reliable.upstream_queue_bytes",
    ),
    (
        "reliable",
        "backpressure_timeout",
        "-1",
        "reliable.backpressure_timeout",
    ),
    ("reliable", "stuck_timeout", "0", "reliable.stuck_timeout"),
    (
        "reliable",
        "resume_attempts",
        "101",
        "reliable.resume_attempts",
    ),
    ("reliable", "resume_window", "0", "reliable.resume_window"),
    (
        "reliable",
        "resume_hello_timeout",
        "0",
        "reliable.resume_hello_timeout",
    ),
    (
        "reliable",
        "resume_stable_after",
        "\"-1s\"",
        "reliable.resume_stable_after",
    ),
    (
        "reliable",
        "retry_budget_ratio",
        "1.5",
        "reliable.retry_budget_ratio",
    ),
    (
        "reliable",
        "retry_budget_min",
        "-1",
        "reliable.retry_budget_min",
    ),
    (
        "reliable",
        "retry_budget_window",
        "0",
        "reliable.retry_budget_window",
    ),
    ("reliable", "idle_timeout", "0", "reliable.idle_timeout"),
    ("", "state_dir", "\"\"", "state_dir"),
    ("slo", "success_target", "0.49", "slo.success_target"),
    ("slo", "success_target", "1.0", "slo.success_target"),
    ("slo", "success_target", "nan", "slo.success_target"),
    ("slo", "latency_threshold", "0", "slo.latency_threshold"),
    (
        "slo",
        "latency_threshold",
        "\"-1s\"",
        "slo.latency_threshold",
    ),
    ("slo", "latency_target", "0.49", "slo.latency_target"),
    ("slo", "latency_target", "1.0", "slo.latency_target"),
    ("slo", "decode_error_max", "0", "slo.decode_error_max"),
    ("slo", "decode_error_max", "0.51", "slo.decode_error_max"),
    ("slo", "queue_full_max", "0.000009", "slo.queue_full_max"),
    ("slo", "queue_full_max", "0.51", "slo.queue_full_max"),
    ("slo", "retransmit_max", "0.000009", "slo.retransmit_max"),
    ("slo", "retransmit_max", "0.51", "slo.retransmit_max"),
    (
        "slo",
        "churn_max_per_device_hour",
        "0.0009",
        "slo.churn_max_per_device_hour",
    ),
    (
        "slo",
        "churn_max_per_device_hour",
        "1000.1",
        "slo.churn_max_per_device_hour",
    ),
    ("slo", "persist_interval", "0", "slo.persist_interval"),
    ("slo", "persist_interval", "\"5ms\"", "slo.persist_interval"),
    ("slo", "colour", "\"blue\"", "slo.colour"),
    ("rollback", "check_interval", "0", "rollback.check_interval"),
    ("rollback", "window", "0", "rollback.window"),
    ("rollback", "min_events", "0", "rollback.min_events"),
    (
        "rollback",
        "min_events",
        "1000000001",
        "rollback.min_events",
    ),
    ("rollback", "max_violations", "0", "rollback.max_violations"),
    (
        "rollback",
        "max_violations",
        "1001",
        "rollback.max_violations",
    ),
    (
        "rollback",
        "success_floor",
        "-0.01",
        "rollback.success_floor",
    ),
    (
        "rollback",
        "success_floor",
        "1.01",
        "rollback.success_floor",
    ),
    (
        "rollback",
        "latency_floor",
        "-0.01",
        "rollback.latency_floor",
    ),
    (
        "rollback",
        "latency_floor",
        "1.01",
        "rollback.latency_floor",
    ),
    (
        "rollback",
        "max_burn_rate",
        "0.99",
        "rollback.max_burn_rate",
    ),
    (
        "rollback",
        "max_burn_rate",
        "1000.1",
        "rollback.max_burn_rate",
    ),
    ("rollback", "confidence", "0.49", "rollback.confidence"),
    ("rollback", "confidence", "0.99991", "rollback.confidence"),
    (
        "rollback",
        "webhook_url",
        "\"https://x\"",
        "rollback.webhook_url",
    ),
    (
        "rollback",
        "webhook_url",
        "\"ftp://x\"",
        "rollback.webhook_url",
    ),
    (
        "rollback",
        "webhook_token_file",
        "\"/x\"",
        "rollback.webhook_token_file",
    ),
    (
        "rollback",
        "webhook_timeout",
        "0",
        "rollback.webhook_timeout",
    ),
    (
        "rollback",
        "webhook_attempts",
        "0",
        "rollback.webhook_attempts",
    ),
    (
        "rollback",
        "webhook_attempts",
        "21",
        "rollback.webhook_attempts",
    ),
    ("audit", "max_bytes", "4095", "audit.max_bytes"),
    ("audit", "max_bytes", "1099511627777", "audit.max_bytes"),
    ("audit", "keep", "-1", "audit.keep"),
    ("audit", "keep", "101", "audit.keep"),
    (
        "admin",
        "socket",
        "\"/var/lib/cync-gateway/a-path-far-too-long-for-a-unix-socket-because-sun-path-holds-only-108-bytes-with-its-nul/admin.sock\"",
        "admin.socket",
    ),
    ("admin", "listen", "\"not an address\"", "admin.listen"),
];

#[test]
fn every_rule_rejects_its_bad_value_and_names_its_key() {
    let mut missed = Vec::new();
    for (section, key, bad, named) in BAD {
        match problems(&with(section, key, bad)) {
            Some(keys) if keys.iter().any(|k| k == named) => {}
            other => missed.push(format!("[{section}] {key} = {bad}: {other:?}")),
        }
    }
    assert!(
        missed.is_empty(),
        "not rejected as expected:\n{}",
        missed.join("\n")
    );
}

#[test]
fn rules_that_span_keys_are_enforced() {
    // Two of the largest frames must fit the device queue.
    let mut d = base();
    d.get_mut("protocol")
        .expect("protocol")
        .insert("max_frame_len".into(), "4096".into());
    d.get_mut("reliable")
        .expect("reliable")
        .insert("upstream_queue_bytes".into(), "8201".into());
    assert_eq!(
        problems(&render(&d)),
        Some(vec!["reliable.upstream_queue_bytes".to_string()])
    );
    d.get_mut("reliable")
        .expect("reliable")
        .insert("upstream_queue_bytes".into(), "8202".into());
    assert_eq!(problems(&render(&d)), None);
    // The whole retry schedule must end one ack_timeout inside the deadline.
    let r = "[upstream.legacy]\naddress = \"h:1\"\n[reliable]\nmax_attempts = 5\n";
    assert_eq!(problems(r), Some(vec!["reliable.max_attempts".to_string()]));
    let r = "[upstream.legacy]\naddress = \"h:1\"\n[reliable]\nmax_attempts = 4\n";
    assert_eq!(problems(r), None);
    // Mirror mode needs somewhere to mirror to.
    let m = "[upstream.legacy]\naddress = \"h:1\"\n[dark_launch]\nmode = \"mirror\"\n";
    assert_eq!(problems(m), Some(vec!["upstream.shadow".to_string()]));
    // The per-source share of the pre-hello budget cannot exceed the budget.
    let mut d = base();
    let l = d.get_mut("listen").expect("listen");
    l.insert("max_pending".into(), "10".into());
    l.insert("max_pending_per_source".into(), "20".into());
    assert_eq!(
        problems(&render(&d)),
        Some(vec!["listen.max_pending_per_source".to_string()])
    );
    // The admin API on TCP needs a token file, and an address other hosts can reach needs
    // allow_remote as well.
    let a = "[upstream.legacy]\naddress = \"h:1\"\n[admin]\nlisten = \"127.0.0.1:9401\"\n";
    assert_eq!(problems(a), Some(vec!["admin.token_file".to_string()]));
    let a = "[upstream.legacy]\naddress = \"h:1\"\n[admin]\nlisten = \"127.0.0.1:9401\"\ntoken_file = \"/t\"\n";
    assert_eq!(problems(a), None);
    let a = "[upstream.legacy]\naddress = \"h:1\"\n[admin]\nlisten = \"0.0.0.0:9401\"\ntoken_file = \"/t\"\n";
    assert_eq!(problems(a), Some(vec!["admin.listen".to_string()]));
    let a = "[upstream.legacy]\naddress = \"h:1\"\n[admin]\nlisten = \"0.0.0.0:9401\"\ntoken_file = \"/t\"\nallow_remote = true\n";
    assert_eq!(problems(a), None);
    // A source pool needs addresses that parse.
    let u = "[upstream.legacy]\naddress = \"h:1\"\nsource_address = \"pool\"\n";
    assert_eq!(
        problems(u),
        Some(vec!["upstream.legacy.source_pool".to_string()])
    );
    let u = "[upstream.legacy]\naddress = \"h:1\"\nsource_address = \"pool\"\nsource_pool = [\"127.1.0.0/33\"]\n";
    assert_eq!(
        problems(u),
        Some(vec!["upstream.legacy.source_pool".to_string()])
    );
    let u = "[upstream.legacy]\naddress = \"h:1\"\nsource_address = \"pool\"\nsource_pool = [\"127.1.0.0/24\", \"127.2.0.1\"]\n";
    assert_eq!(problems(u), None);
    // Transparent mode takes no pool (and is Linux only).
    let u = "[upstream.legacy]\naddress = \"h:1\"\nsource_address = \"transparent\"\n";
    assert_eq!(problems(u), None);
    let u = "[upstream.legacy]\naddress = \"h:1\"\nsource_address = \"transparent\"\nsource_pool = [\"127.1.0.1\"]\n";
    assert_eq!(
        problems(u),
        Some(vec!["upstream.legacy.source_pool".to_string()])
    );
    let u = "[upstream.legacy]\naddress = \"h:1\"\nsource_address = \"device\"\n";
    assert_eq!(
        problems(u),
        Some(vec!["upstream.legacy.source_address".to_string()])
    );
    // PROXY headers from a balancer: sources must parse, and only mean something when on.
    let l = "[listen]\naccept_proxy_protocol = true\nproxy_protocol_sources = [\"10.0.0.0/8\", \"192.168.1.5\"]\n[upstream.legacy]\naddress = \"h:1\"\n";
    assert_eq!(problems(l), None);
    let l = "[listen]\naccept_proxy_protocol = true\nproxy_protocol_sources = [\"10.0.0.0/40\"]\n[upstream.legacy]\naddress = \"h:1\"\n";
    assert_eq!(
        problems(l),
        Some(vec!["listen.proxy_protocol_sources".to_string()])
    );
    let l = "[listen]\nproxy_protocol_sources = [\"10.0.0.0/8\"]\n[upstream.legacy]\naddress = \"h:1\"\n";
    assert_eq!(
        problems(l),
        Some(vec!["listen.proxy_protocol_sources".to_string()])
    );
    let l = "[listen]\naccept_proxy_protocol = true\nproxy_header_timeout = \"0s\"\n[upstream.legacy]\naddress = \"h:1\"\n";
    assert_eq!(
        problems(l),
        Some(vec!["listen.proxy_header_timeout".to_string()])
    );
    let u = "[upstream.legacy]\naddress = \"h:1\"\nsource_pool = [\"127.1.0.1\"]\n";
    assert_eq!(
        problems(u),
        Some(vec!["upstream.legacy.source_pool".to_string()])
    );
    // [mqtt]: a broker address with a port, id-safe instance, topics without wildcards,
    // credentials and a CA only where they mean something, a publish interval in range.
    let mq = "[upstream.legacy]\naddress = \"h:1\"\n[mqtt]\nenabled = true\n";
    for (extra, key) in [
        ("broker = \"core-mosquitto\"\n", "mqtt.broker"),
        ("broker = \"h:0\"\n", "mqtt.broker"),
        ("instance = \"my home\"\n", "mqtt.instance"),
        ("base_topic = \"cync/#\"\n", "mqtt.base_topic"),
        (
            "discovery_prefix = \"/homeassistant\"\n",
            "mqtt.discovery_prefix",
        ),
        ("password_file = \"/p\"\n", "mqtt.password_file"),
        ("ca_file = \"/ca.pem\"\n", "mqtt.ca_file"),
        ("publish_interval = \"500ms\"\n", "mqtt.publish_interval"),
        ("queue = 1\n", "mqtt.queue"),
    ] {
        assert_eq!(
            problems(&format!("{mq}{extra}")),
            Some(vec![key.to_string()]),
            "{extra}"
        );
    }
    let ok = format!("{mq}broker = \"core-mosquitto:1883\"\ntls = true\nca_file = \"/ca.pem\"\nusername = \"u\"\npassword_file = \"/p\"\ninstance = \"home-1\"\nbase_topic = \"cync/home\"\n");
    assert_eq!(problems(&ok), None);
    // upstream.legacy is required, and alone the missing one is the only problem.
    assert_eq!(problems(""), Some(vec!["upstream.legacy".to_string()]));
    // A rollback window shorter than the check interval would leave events between checks
    // unjudged; one as long is enough.
    let mut d = base();
    let r = d.entry("rollback".into()).or_default();
    r.insert("check_interval".into(), "\"2m\"".into());
    r.insert("window".into(), "\"119s\"".into());
    assert_eq!(
        problems(&render(&d)),
        Some(vec!["rollback.window".to_string()])
    );
    d.get_mut("rollback")
        .expect("rollback")
        .insert("window".into(), "\"2m\"".into());
    assert_eq!(problems(&render(&d)), None);
    // Against the default check interval (60 s) too.
    assert_eq!(
        problems(&with("rollback", "window", "\"30s\"")),
        Some(vec!["rollback.window".to_string()])
    );
    // A webhook token needs a webhook; with one it is fine (the file is read at start, not
    // here). An empty URL is no webhook.
    let mut d = base();
    let r = d.entry("rollback".into()).or_default();
    r.insert("webhook_token_file".into(), "\"/x\"".into());
    r.insert("webhook_url".into(), "\"\"".into());
    assert_eq!(
        problems(&render(&d)),
        Some(vec!["rollback.webhook_token_file".to_string()])
    );
    d.get_mut("rollback")
        .expect("rollback")
        .insert("webhook_url".into(), "\"http://127.0.0.1:9/hook\"".into());
    assert_eq!(problems(&render(&d)), None);
}

#[test]
fn state_dir_is_a_top_level_key() {
    let legacy = "[upstream.legacy]\naddress = \"h:1\"\n";
    let parse = |text: &str| Config::parse(text).map_err(|e| e.problems());
    // Default, and set before the first table.
    let c = parse(legacy).expect("minimal");
    assert_eq!(c.state_dir, std::path::Path::new("/var/lib/cync-gateway"));
    let c = parse(&format!("state_dir = \"/srv/gw\"\n{legacy}")).expect("state_dir set");
    assert_eq!(c.state_dir, std::path::Path::new("/srv/gw"));
    // Empty is refused, naming the key.
    assert_eq!(
        problems(&format!("state_dir = \"\"\n{legacy}")),
        Some(vec!["state_dir".to_string()])
    );
    // Written after a table header it belongs to that table, where it is unknown.
    assert_eq!(
        problems(&format!("{legacy}state_dir = \"/srv/gw\"\n")),
        Some(vec!["upstream.legacy.state_dir".to_string()])
    );
}

/// `# Range: lo..hi` lines of the reference file and the key each stands above.
fn stated_ranges() -> Vec<(String, String, String, String, bool)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
    let text = std::fs::read_to_string(path).expect("reference config");
    let mut out = Vec::new();
    let mut section = String::new();
    let mut range: Option<(String, String)> = None;
    for line in text.lines() {
        let l = line.trim();
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
            range = None;
        } else if let Some(r) = l.strip_prefix("# Range: ") {
            let r = r
                .split([' ', ','])
                .next()
                .unwrap_or("")
                .trim_end_matches('.');
            let (lo, hi) = r.split_once("..").expect("lo..hi");
            range = Some((lo.to_string(), hi.to_string()));
        } else if let Some((key, value)) = l.split_once(" = ") {
            if !l.starts_with('#') {
                if let Some((lo, hi)) = range.take() {
                    out.push((
                        section.clone(),
                        key.to_string(),
                        lo,
                        hi,
                        value.contains('.'),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn the_ranges_the_reference_states_are_the_ones_enforced() {
    let ranges = stated_ranges();
    assert!(ranges.len() >= 32, "{ranges:?}");
    let mut wrong = Vec::new();
    for (section, key, lo, hi, float) in &ranges {
        let step = |v: &str, by: f64| {
            let x: f64 = v.parse().expect("number");
            if *float {
                format!("{:.1}", x + by / 2.0)
            } else {
                format!("{}", (x + by) as i64)
            }
        };
        let ok = |v: &str| problems(&with(section, key, v)).is_none();
        if !ok(lo) {
            wrong.push(format!("{section}.{key} = {lo} (stated lowest) rejected"));
        }
        if !ok(hi) {
            wrong.push(format!("{section}.{key} = {hi} (stated highest) rejected"));
        }
        let below = step(lo, -1.0);
        let above = step(hi, 1.0);
        if ok(&below) {
            wrong.push(format!(
                "{section}.{key} = {below} (below the stated range) accepted"
            ));
        }
        if ok(&above) {
            wrong.push(format!(
                "{section}.{key} = {above} (above the stated range) accepted"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
