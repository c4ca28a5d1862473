//! Validation: the raw file ([`super::raw`]) into a typed [`Config`], collecting every
//! problem before failing.
//!
//! Invariants:
//! - A problem never stops the checking of other keys: each check records its problem and
//!   returns the default, so one pass lists everything wrong with a file.
//! - Enumerated string keys go through one table-driven helper ([`Validator::choice`]): the
//!   accepted spellings and the error message come from the same table.
//! - Defaults live here, once, and are documented key by key in `config/gateway.toml`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use super::raw::*;
use super::types::*;
use crate::protocol::{DeviceId, DEFAULT_MAX_DATA_LEN};

pub(super) struct Validator<'a> {
    pub(super) problems: &'a mut Vec<Problem>,
}

impl Validator<'_> {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// An enumerated string key: one of the names in `table`, or `default` when absent. The
    /// accepted spellings and the message for any other come from the one table.
    fn choice<T: Copy>(
        &mut self,
        key: &str,
        raw: Option<&str>,
        default: T,
        table: &[(&str, T)],
    ) -> T {
        let Some(text) = raw else { return default };
        if let Some((_, v)) = table.iter().find(|(name, _)| *name == text) {
            return *v;
        }
        let names: Vec<String> = table.iter().map(|(n, _)| format!("{n:?}")).collect();
        self.problem(key, format!("{text:?} is not one of {}", names.join(", ")));
        default
    }

    fn socket_addr(&mut self, key: &str, raw: Option<String>, default: &str) -> SocketAddr {
        let text = raw.unwrap_or_else(|| default.to_string());
        match text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.problem(
                    key,
                    format!("{text:?} is not an IP:port address (e.g. \"0.0.0.0:23779\")"),
                );
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        }
    }

    fn host_port(&mut self, key: &str, raw: Option<String>) -> String {
        let Some(text) = raw else {
            self.problem(key, "required (host:port of the add-on)");
            return String::new();
        };
        let ok = match text.rsplit_once(':') {
            Some((host, port)) => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                !host.is_empty()
                    && !host.contains(char::is_whitespace)
                    && port.parse::<u16>().is_ok_and(|p| p != 0)
            }
            None => false,
        };
        if !ok {
            self.problem(
                key,
                format!("{text:?} is not a host:port address with a port 1-65535"),
            );
        }
        text
    }

    fn duration(&mut self, key: &str, raw: Option<RawDuration>, default: Duration) -> Duration {
        let Some(raw) = raw else { return default };
        let parsed = match raw {
            RawDuration::Seconds(s) if s < 0.0 || s.is_nan() => Err("must not be negative".into()),
            RawDuration::Seconds(s) if s > 1e9 => Err("is too large".into()),
            RawDuration::Seconds(s) => Ok(Duration::from_secs_f64(s)),
            RawDuration::Text(t) if t.trim_start().starts_with('-') => {
                Err("must not be negative".into())
            }
            RawDuration::Text(t) => humantime::parse_duration(t.trim())
                .map_err(|e| format!("{t:?} is not a duration like \"10s\" or \"250ms\": {e}")),
        };
        match parsed {
            // A year is far beyond any sensible timeout, and keeps every `Instant + d` and
            // backoff product far from overflow.
            Ok(d) if d > MAX_DURATION => {
                self.problem(key, "is too large (at most a year)");
                default
            }
            Ok(d) => d,
            Err(msg) => {
                self.problem(key, msg);
                default
            }
        }
    }

    fn positive_duration(
        &mut self,
        key: &str,
        raw: Option<RawDuration>,
        default: Duration,
    ) -> Duration {
        let before = self.problems.len();
        let d = self.duration(key, raw, default);
        if d.is_zero() && self.problems.len() == before {
            self.problem(key, "must be greater than zero");
        }
        d
    }

    /// A duration within `lo..=hi`, the range named when it is not.
    fn duration_in(
        &mut self,
        key: &str,
        raw: Option<RawDuration>,
        default: Duration,
        lo: Duration,
        hi: Duration,
    ) -> Duration {
        let before = self.problems.len();
        let d = self.duration(key, raw, default);
        if self.problems.len() == before && (d < lo || d > hi) {
            self.problem(
                key,
                format!(
                    "{} is outside {}..{}",
                    humantime::format_duration(d),
                    humantime::format_duration(lo),
                    humantime::format_duration(hi)
                ),
            );
            return default;
        }
        d
    }

    fn int_in(&mut self, key: &str, raw: Option<i64>, default: usize, lo: i64, hi: i64) -> usize {
        let Some(v) = raw else { return default };
        if v < lo || v > hi {
            self.problem(key, format!("{v} is out of range {lo}..={hi}"));
            return default;
        }
        usize::try_from(v).unwrap_or(default)
    }

    pub(super) fn config(&mut self, raw: RawConfig) -> Config {
        let listen = Listen {
            devices: self.socket_addr("listen.devices", raw.listen.devices, "0.0.0.0:23779"),
            metrics: self.socket_addr("listen.metrics", raw.listen.metrics, "127.0.0.1:9400"),
            max_connections: self.int_in(
                "listen.max_connections",
                raw.listen.max_connections,
                20_000,
                1,
                1_000_000,
            ),
            handshake_timeout: self.positive_duration(
                "listen.handshake_timeout",
                raw.listen.handshake_timeout,
                Duration::from_secs(10),
            ),
            tls_handshake_timeout: self.positive_duration(
                "listen.tls_handshake_timeout",
                raw.listen.tls_handshake_timeout,
                Duration::from_secs(5),
            ),
            max_pending: self.int_in(
                "listen.max_pending",
                raw.listen.max_pending,
                1024,
                1,
                1_000_000,
            ),
            max_pending_per_source: self.int_in(
                "listen.max_pending_per_source",
                raw.listen.max_pending_per_source,
                64,
                1,
                1_000_000,
            ),
            backlog: u32::try_from(self.int_in(
                "listen.backlog",
                raw.listen.backlog,
                DEFAULT_BACKLOG as usize,
                1,
                65_535,
            ))
            .unwrap_or(DEFAULT_BACKLOG),
            tcp_keepalive: self.duration(
                "listen.tcp_keepalive",
                raw.listen.tcp_keepalive,
                Duration::from_secs(60),
            ),
            http_header_timeout: self.positive_duration(
                "listen.http_header_timeout",
                raw.listen.http_header_timeout,
                Duration::from_secs(10),
            ),
            http_max_connections: self.int_in(
                "listen.http_max_connections",
                raw.listen.http_max_connections,
                64,
                1,
                100_000,
            ),
            accept_proxy_protocol: raw.listen.accept_proxy_protocol.unwrap_or(false),
            proxy_header_timeout: self.positive_duration(
                "listen.proxy_header_timeout",
                raw.listen.proxy_header_timeout,
                Duration::from_secs(3),
            ),
            proxy_protocol_sources: self.networks(
                "listen.proxy_protocol_sources",
                raw.listen.proxy_protocol_sources.clone(),
            ),
        };
        if !listen.accept_proxy_protocol && raw.listen.proxy_protocol_sources.is_some() {
            self.problem(
                "listen.proxy_protocol_sources",
                "is only used with accept_proxy_protocol = true",
            );
        }
        if listen.max_pending_per_source > listen.max_pending {
            self.problem(
                "listen.max_pending_per_source",
                format!(
                    "{} is above listen.max_pending ({})",
                    listen.max_pending_per_source, listen.max_pending
                ),
            );
        }
        let device_tls = self.device_tls(raw.device_tls);
        let upstream_legacy = match raw.upstream.legacy {
            Some(u) => self.upstream("upstream.legacy", u),
            None => {
                self.problem(
                    "upstream.legacy",
                    "required: [upstream.legacy] address = \"host:port\"",
                );
                self.upstream(
                    "upstream.legacy",
                    RawUpstream {
                        address: Some("invalid:1".into()),
                        ..RawUpstream::default()
                    },
                )
            }
        };
        let protocol = Protocol {
            max_frame_len: self.int_in(
                "protocol.max_frame_len",
                raw.protocol.max_frame_len,
                DEFAULT_MAX_DATA_LEN,
                1024,
                65_535,
            ),
            command_deadline: self.positive_duration(
                "protocol.command_deadline",
                raw.protocol.command_deadline,
                Duration::from_secs(5),
            ),
            reply_timeout: self.positive_duration(
                "protocol.reply_timeout",
                raw.protocol.reply_timeout,
                Duration::from_secs(10),
            ),
            half_close_timeout: self.positive_duration(
                "protocol.half_close_timeout",
                raw.protocol.half_close_timeout,
                Duration::from_secs(30),
            ),
        };
        let protocol_deadline = protocol.command_deadline;
        let protocol_frame_len = protocol.max_frame_len;
        let shutdown = Shutdown {
            drain_timeout: self.duration(
                "shutdown.drain_timeout",
                raw.shutdown.drain_timeout,
                Duration::from_secs(30),
            ),
        };
        let logging = self.logging(raw.logging);
        Config {
            listen,
            device_tls,
            upstream_legacy,
            protocol,
            shutdown,
            logging,
            metrics: MetricsConfig {
                per_device: raw.metrics.per_device.unwrap_or(false),
                per_device_max: self.int_in(
                    "metrics.per_device_max",
                    raw.metrics.per_device_max,
                    256,
                    1,
                    100_000,
                ),
                per_device_idle: self.positive_duration(
                    "metrics.per_device_idle",
                    raw.metrics.per_device_idle,
                    Duration::from_secs(3600),
                ),
            },
            legacy: LegacyPath {
                idle_timeout: self.positive_duration(
                    "legacy.idle_timeout",
                    raw.legacy.idle_timeout,
                    Duration::from_secs(90),
                ),
            },
            routing: self.routing(raw.routing),
            dark_launch: self.dark_launch(raw.dark_launch, raw.upstream.shadow.is_some()),
            upstream_shadow: raw
                .upstream
                .shadow
                .map(|u| self.upstream("upstream.shadow", u)),
            upstream_new: raw.upstream.new.map(|u| self.upstream("upstream.new", u)),
            reload: Reload {
                poll_interval: self.duration(
                    "reload.poll_interval",
                    raw.reload.poll_interval,
                    Duration::from_secs(1),
                ),
            },
            reliable: self.reliable(raw.reliable, &protocol_deadline, protocol_frame_len),
            admin: self.admin(raw.admin, raw.state_dir.as_deref()),
            rollout: self.rollout(raw.rollout),
            mqtt: self.mqtt(raw.mqtt),
            state_dir: self.state_dir(raw.state_dir),
            slo: self.slo(raw.slo),
            rollback: self.rollback(raw.rollback),
            audit: AuditConfig {
                max_bytes: self.int_in(
                    "audit.max_bytes",
                    raw.audit.max_bytes,
                    10 * 1024 * 1024,
                    4096,
                    1 << 40,
                ) as u64,
                keep: self.int_in("audit.keep", raw.audit.keep, 5, 0, 100),
            },
        }
    }

    fn admin(&mut self, raw: RawAdmin, state_dir: Option<&std::path::Path>) -> AdminConfig {
        let socket = raw.socket.unwrap_or_else(|| {
            state_dir
                .unwrap_or(std::path::Path::new(DEFAULT_STATE_DIR))
                .join("admin.sock")
        });
        // sun_path holds 108 bytes, the terminating NUL included.
        if socket.as_os_str().len() > 107 {
            self.problem(
                "admin.socket",
                format!(
                    "{} is {} bytes long; a Unix socket path is at most 107 (set admin.socket to a shorter path)",
                    socket.display(),
                    socket.as_os_str().len()
                ),
            );
        }
        let listen = raw
            .listen
            .map(|text| self.socket_addr("admin.listen", Some(text), ""));
        let allow_remote = raw.allow_remote.unwrap_or(false);
        if let Some(addr) = listen {
            if raw.token_file.is_none() {
                self.problem(
                    "admin.token_file",
                    format!("required with admin.listen ({addr}): on TCP every change needs a bearer token, read from this file (one line)"),
                );
            }
            if !addr.ip().is_loopback() && !allow_remote {
                self.problem(
                    "admin.listen",
                    format!("{addr} is reachable from other hosts: set admin.allow_remote = true if that is meant, or listen on 127.0.0.1"),
                );
            }
        }
        AdminConfig {
            socket,
            listen,
            token_file: raw.token_file,
            allow_remote,
        }
    }

    fn mqtt(&mut self, raw: RawMqtt) -> MqttConfig {
        let broker = raw.broker.unwrap_or_else(|| "127.0.0.1:1883".into());
        let port_ok = broker
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            self.problem(
                "mqtt.broker",
                format!("{broker:?} is not host:port (e.g. \"127.0.0.1:1883\", \"core-mosquitto:1883\")"),
            );
        }
        let tls = raw.tls.unwrap_or(false);
        if raw.ca_file.is_some() && !tls {
            self.problem("mqtt.ca_file", "is only used with mqtt.tls = true");
        }
        if raw.password_file.is_some() && raw.username.is_none() {
            self.problem("mqtt.password_file", "needs mqtt.username");
        }
        // Home Assistant's discovery node and object ids: [a-zA-Z0-9_-]+.
        let id_safe = |t: &str| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if let Some(i) = &raw.instance {
            if !id_safe(i) {
                self.problem(
                    "mqtt.instance",
                    format!("{i:?}: only letters, digits, '_' and '-' (it is part of Home Assistant's ids)"),
                );
            }
        }
        let topic_ok = |t: &str| {
            !t.is_empty()
                && !t.starts_with('/')
                && !t.ends_with('/')
                && !t.contains(['#', '+', '\0'])
        };
        let discovery_prefix = raw
            .discovery_prefix
            .unwrap_or_else(|| "homeassistant".into());
        for (key, t) in [
            ("mqtt.discovery_prefix", Some(&discovery_prefix)),
            ("mqtt.base_topic", raw.base_topic.as_ref()),
        ] {
            if let Some(t) = t {
                if !topic_ok(t) {
                    self.problem(
                        key,
                        format!("{t:?} is not a topic to publish under: no wildcards (# +), no leading or trailing '/'"),
                    );
                }
            }
        }
        MqttConfig {
            enabled: raw.enabled.unwrap_or(false),
            broker,
            tls,
            ca_file: raw.ca_file,
            username: raw.username,
            password_file: raw.password_file,
            instance: raw.instance,
            client_id: raw.client_id,
            discovery_prefix,
            base_topic: raw.base_topic,
            allow_control: raw.allow_control.unwrap_or(false),
            publish_interval: self.duration_in(
                "mqtt.publish_interval",
                raw.publish_interval,
                Duration::from_secs(30),
                Duration::from_secs(1),
                Duration::from_secs(3600),
            ),
            keep_alive: self.duration_in(
                "mqtt.keep_alive",
                raw.keep_alive,
                Duration::from_secs(30),
                Duration::from_secs(5),
                Duration::from_secs(3600),
            ),
            queue: self.int_in("mqtt.queue", raw.queue, 256, 16, 100_000),
        }
    }

    fn state_dir(&mut self, raw: Option<std::path::PathBuf>) -> std::path::PathBuf {
        let dir = raw.unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        if dir.as_os_str().is_empty() {
            self.problem("state_dir", "must not be empty");
        }
        dir
    }

    /// A number in `lo..=hi` (NaN is never in range).
    fn float_in(&mut self, key: &str, raw: Option<f64>, default: f64, lo: f64, hi: f64) -> f64 {
        let Some(v) = raw else { return default };
        if !(lo..=hi).contains(&v) {
            self.problem(key, format!("{v} is out of range {lo}..={hi}"));
            return default;
        }
        v
    }

    fn slo(&mut self, raw: RawSlo) -> SloConfig {
        SloConfig {
            success_target: self.float_in(
                "slo.success_target",
                raw.success_target,
                0.999,
                0.5,
                0.99999,
            ),
            latency_threshold: self.positive_duration(
                "slo.latency_threshold",
                raw.latency_threshold,
                Duration::from_millis(1500),
            ),
            latency_target: self.float_in(
                "slo.latency_target",
                raw.latency_target,
                0.99,
                0.5,
                0.99999,
            ),
            decode_error_max: self.float_in(
                "slo.decode_error_max",
                raw.decode_error_max,
                0.001,
                0.00001,
                0.5,
            ),
            queue_full_max: self.float_in(
                "slo.queue_full_max",
                raw.queue_full_max,
                0.01,
                0.00001,
                0.5,
            ),
            retransmit_max: self.float_in(
                "slo.retransmit_max",
                raw.retransmit_max,
                0.01,
                0.00001,
                0.5,
            ),
            churn_max_per_device_hour: self.float_in(
                "slo.churn_max_per_device_hour",
                raw.churn_max_per_device_hour,
                0.5,
                0.001,
                1000.0,
            ),
            persist_interval: {
                let d = self.positive_duration(
                    "slo.persist_interval",
                    raw.persist_interval,
                    Duration::from_secs(60),
                );
                if d < Duration::from_millis(10) {
                    self.problem("slo.persist_interval", "must be at least 10ms");
                }
                d
            },
        }
    }

    fn rollback(&mut self, raw: RawRollback) -> RollbackConfig {
        let check_interval = self.positive_duration(
            "rollback.check_interval",
            raw.check_interval,
            Duration::from_secs(60),
        );
        let window =
            self.positive_duration("rollback.window", raw.window, Duration::from_secs(600));
        if window < check_interval {
            self.problem(
                "rollback.window",
                format!(
                    "{} is shorter than rollback.check_interval ({}): checks would not see every event",
                    humantime::format_duration(window),
                    humantime::format_duration(check_interval)
                ),
            );
        }
        let webhook_url = raw.webhook_url.filter(|u| !u.is_empty());
        if let Some(u) = &webhook_url {
            if !u.starts_with("http://") {
                self.problem(
                    "rollback.webhook_url",
                    format!("{u:?} is not an http:// URL (https is not supported yet)"),
                );
            }
        }
        if raw.webhook_token_file.is_some() && webhook_url.is_none() {
            self.problem(
                "rollback.webhook_token_file",
                "set without rollback.webhook_url",
            );
        }
        RollbackConfig {
            enabled: raw.enabled.unwrap_or(true),
            check_interval,
            window,
            min_events: self.int_in("rollback.min_events", raw.min_events, 100, 1, 1_000_000_000)
                as u64,
            max_violations: self.int_in("rollback.max_violations", raw.max_violations, 3, 1, 1000)
                as u32,
            success_floor: self.float_in(
                "rollback.success_floor",
                raw.success_floor,
                0.995,
                0.0,
                1.0,
            ),
            latency_floor: self.float_in(
                "rollback.latency_floor",
                raw.latency_floor,
                0.99,
                0.0,
                1.0,
            ),
            max_burn_rate: self.float_in(
                "rollback.max_burn_rate",
                raw.max_burn_rate,
                14.4,
                1.0,
                1000.0,
            ),
            compare_to_legacy: raw.compare_to_legacy.unwrap_or(true),
            confidence: self.float_in("rollback.confidence", raw.confidence, 0.99, 0.5, 0.9999),
            webhook_url,
            webhook_token_file: raw.webhook_token_file,
            webhook_timeout: self.positive_duration(
                "rollback.webhook_timeout",
                raw.webhook_timeout,
                Duration::from_secs(5),
            ),
            webhook_attempts: self.int_in(
                "rollback.webhook_attempts",
                raw.webhook_attempts,
                4,
                1,
                20,
            ) as u32,
        }
    }

    fn rollout(&mut self, raw: RawRollout) -> Rollout {
        let stages = match raw.stages {
            None => vec![10.0, 25.0, 50.0, 75.0, 90.0, 100.0],
            Some(list) => {
                if list.is_empty() {
                    self.problem(
                        "rollout.stages",
                        "must name at least one stage, e.g. [10, 25, 50, 100]",
                    );
                }
                for p in &list {
                    self.percent("rollout.stages", Some(*p));
                    if *p == 0.0 {
                        self.problem(
                            "rollout.stages",
                            "a stage of 0 is no stage: start at the first share of devices to move, e.g. 10",
                        );
                    }
                }
                if list.windows(2).any(|w| w[0] >= w[1]) {
                    self.problem(
                        "rollout.stages",
                        format!("{list:?} must increase strictly, e.g. [10, 25, 50, 100]"),
                    );
                }
                list
            }
        };
        Rollout {
            stages,
            bake_time: self.duration(
                "rollout.bake_time",
                raw.bake_time,
                Duration::from_secs(3600),
            ),
            min_budget: self.float_in("rollout.min_budget", raw.min_budget, 0.5, 0.0, 1.0),
            auto_promote: raw.auto_promote.unwrap_or(false),
        }
    }

    fn percent(&mut self, key: &str, raw: Option<f64>) -> f64 {
        let p = raw.unwrap_or(0.0);
        if !(0.0..=100.0).contains(&p) || p.is_nan() {
            self.problem(key, format!("{p} is out of range 0..=100"));
            0.0
        } else if ((p * 100.0).round() - p * 100.0).abs() > 1e-6 {
            self.problem(
                key,
                format!("{p} has more than two decimals (steps are 0.01 %)"),
            );
            0.0
        } else {
            p
        }
    }

    fn device_ids(&mut self, key: &str, raw: Option<Vec<String>>) -> BTreeSet<DeviceId> {
        let mut out = BTreeSet::new();
        for text in raw.unwrap_or_default() {
            match DeviceId::from_hex(text.trim()) {
                Some(id) => {
                    out.insert(id);
                }
                None => self.problem(
                    key,
                    format!("{text:?} is not a device id (8 hex digits, as in logs and metrics)"),
                ),
            }
        }
        out
    }

    fn routing(&mut self, raw: RawRouting) -> Routing {
        let canary_percent = self.percent("routing.canary_percent", raw.canary_percent);
        let force_new = self.device_ids("routing.force_new", raw.force_new);
        let force_legacy = self.device_ids("routing.force_legacy", raw.force_legacy);
        let rehome = self.choice(
            "routing.rehome",
            raw.rehome.as_deref(),
            Rehome::Auto,
            &[("auto", Rehome::Auto), ("never", Rehome::Never)],
        );
        let rehome_rate = match raw.rehome_rate {
            None => 5.0,
            Some(r) if r > 0.0 && r <= 10_000.0 => r,
            Some(r) => {
                self.problem(
                    "routing.rehome_rate",
                    format!("{r} is out of range (0, 10000] connections per second"),
                );
                5.0
            }
        };
        Routing {
            canary_percent,
            force_new,
            force_legacy,
            rehome,
            rehome_rate,
            drain_grace: self.duration(
                "routing.drain_grace",
                raw.drain_grace,
                Duration::from_secs(5),
            ),
        }
    }

    fn dark_launch(&mut self, raw: RawDarkLaunch, shadow: bool) -> DarkLaunch {
        let mode = self.choice(
            "dark_launch.mode",
            raw.mode.as_deref(),
            DarkMode::Off,
            &[
                ("off", DarkMode::Off),
                ("observe", DarkMode::Observe),
                ("mirror", DarkMode::Mirror),
            ],
        );
        if mode == DarkMode::Mirror && !shadow {
            self.problem(
                "upstream.shadow",
                "required when dark_launch.mode = \"mirror\": [upstream.shadow] address = \"host:port\"",
            );
        }
        DarkLaunch {
            mode,
            percent: self.percent("dark_launch.percent", raw.percent),
            compare_window: self.positive_duration(
                "dark_launch.compare_window",
                raw.compare_window,
                Duration::from_secs(2),
            ),
            mirror_queue_bytes: self.int_in(
                "dark_launch.mirror_queue_bytes",
                raw.mirror_queue_bytes,
                64 * 1024,
                4096,
                64 * 1024 * 1024,
            ),
        }
    }

    fn reliable(
        &mut self,
        raw: RawReliable,
        command_deadline: &Duration,
        max_frame_len: usize,
    ) -> Reliable {
        let retry_until = self.choice(
            "reliable.retry_until",
            raw.retry_until.as_deref(),
            RetryUntil::Reply,
            &[("reply", RetryUntil::Reply), ("ack", RetryUntil::Ack)],
        );
        let backoff_multiplier = match raw.backoff_multiplier {
            None => 2.0,
            Some(m) if (1.0..=10.0).contains(&m) => m,
            Some(m) => {
                self.problem(
                    "reliable.backoff_multiplier",
                    format!("{m} is out of range 1..=10"),
                );
                2.0
            }
        };
        let r = Reliable {
            ack_timeout: self.positive_duration(
                "reliable.ack_timeout",
                raw.ack_timeout,
                Duration::from_millis(400),
            ),
            max_attempts: self.int_in("reliable.max_attempts", raw.max_attempts, 4, 1, 10) as u32,
            backoff_multiplier,
            jitter: self.duration("reliable.jitter", raw.jitter, Duration::from_millis(100)),
            retry_until,
            dedup_capacity: self.int_in(
                "reliable.dedup_capacity",
                raw.dedup_capacity,
                1000,
                1,
                1_000_000,
            ),
            dedup_ttl: self.positive_duration(
                "reliable.dedup_ttl",
                raw.dedup_ttl,
                Duration::from_secs(300),
            ),
            device_queue_bytes: self.int_in(
                "reliable.device_queue_bytes",
                raw.device_queue_bytes,
                64 * 1024,
                // One device read (16 KiB) must always fit.
                16 * 1024,
                64 * 1024 * 1024,
            ),
            upstream_queue_bytes: self.int_in(
                "reliable.upstream_queue_bytes",
                raw.upstream_queue_bytes,
                64 * 1024,
                4096,
                64 * 1024 * 1024,
            ),
            backpressure_timeout: self.duration(
                "reliable.backpressure_timeout",
                raw.backpressure_timeout,
                Duration::from_secs(2),
            ),
            stuck_timeout: self.positive_duration(
                "reliable.stuck_timeout",
                raw.stuck_timeout,
                Duration::from_secs(30),
            ),
            resume_attempts: self.int_in(
                "reliable.resume_attempts",
                raw.resume_attempts,
                20,
                0,
                100,
            ) as u32,
            resume_window: self.positive_duration(
                "reliable.resume_window",
                raw.resume_window,
                Duration::from_secs(30),
            ),
            resume_hello_timeout: self.positive_duration(
                "reliable.resume_hello_timeout",
                raw.resume_hello_timeout,
                Duration::from_secs(5),
            ),
            resume_stable_after: self.duration(
                "reliable.resume_stable_after",
                raw.resume_stable_after,
                Duration::from_secs(10),
            ),
            retry_budget_ratio: match raw.retry_budget_ratio {
                None => 0.1,
                Some(r) if (0.0..=1.0).contains(&r) => r,
                Some(r) => {
                    self.problem(
                        "reliable.retry_budget_ratio",
                        format!("{r} is out of range 0..=1 (retries per command)"),
                    );
                    0.1
                }
            },
            retry_budget_min: self.int_in(
                "reliable.retry_budget_min",
                raw.retry_budget_min,
                10,
                0,
                1_000_000,
            ) as u32,
            retry_budget_window: self.positive_duration(
                "reliable.retry_budget_window",
                raw.retry_budget_window,
                Duration::from_secs(10),
            ),
            idle_timeout: self.positive_duration(
                "reliable.idle_timeout",
                raw.idle_timeout,
                Duration::from_secs(90),
            ),
        };
        let frame_max = max_frame_len + 5;
        if r.upstream_queue_bytes < 2 * frame_max {
            self.problem(
                "reliable.upstream_queue_bytes",
                format!("{} is below two of the largest frames protocol.max_frame_len allows ({} bytes)", r.upstream_queue_bytes, 2 * frame_max),
            );
        }
        // The whole retry budget must end inside the add-on's own wait, with one ack_timeout
        // left for the last attempt's reply; otherwise retries would only add load.
        let last = r.last_attempt_at();
        if last + r.ack_timeout > *command_deadline {
            self.problem(
                "reliable.max_attempts",
                format!(
                    "the last attempt can go out {:.2} s after the first; with ack_timeout {:.2} s that ends after protocol.command_deadline ({:.2} s); lower max_attempts, ack_timeout, backoff_multiplier or jitter",
                    last.as_secs_f64(),
                    r.ack_timeout.as_secs_f64(),
                    command_deadline.as_secs_f64()
                ),
            );
        }
        r
    }

    fn device_tls(&mut self, raw: RawDeviceTls) -> DeviceTls {
        let mode = self.choice(
            "device_tls.mode",
            raw.mode.as_deref(),
            DeviceTlsMode::Tls,
            &[("tls", DeviceTlsMode::Tls), ("plain", DeviceTlsMode::Plain)],
        );
        if raw.cert_file.is_some() != raw.key_file.is_some() {
            self.problem(
                "device_tls.cert_file",
                "cert_file and key_file must be given together (or both left out to generate a self-signed certificate)",
            );
        }
        let ciphers = raw
            .ciphers
            .unwrap_or_else(|| DEFAULT_DEVICE_CIPHERS.to_string());
        if ciphers.trim().is_empty() {
            self.problem("device_tls.ciphers", "must not be empty");
        }
        let min_version =
            self.tls_version("device_tls.min_version", raw.min_version, TlsVersion::Tls12);
        let max_version =
            self.tls_version("device_tls.max_version", raw.max_version, TlsVersion::Tls13);
        if max_version < min_version {
            self.problem("device_tls.max_version", "is below device_tls.min_version");
        }
        DeviceTls {
            mode,
            cert_file: raw.cert_file,
            key_file: raw.key_file,
            ciphers,
            min_version,
            max_version,
        }
    }

    fn tls_version(&mut self, key: &str, raw: Option<String>, default: TlsVersion) -> TlsVersion {
        self.choice(
            key,
            raw.as_deref(),
            default,
            &[
                ("tls1.0", TlsVersion::Tls10),
                ("tls1.1", TlsVersion::Tls11),
                ("tls1.2", TlsVersion::Tls12),
                ("tls1.3", TlsVersion::Tls13),
            ],
        )
    }

    fn upstream(&mut self, prefix: &str, raw: RawUpstream) -> Upstream {
        let address = self.host_port(&format!("{prefix}.address"), raw.address);
        #[derive(Clone, Copy)]
        enum Verify {
            None,
            Ca,
            Fingerprint,
        }
        let kind = self.choice(
            &format!("{prefix}.verify"),
            raw.verify.as_deref(),
            Verify::None,
            &[
                ("none", Verify::None),
                ("ca", Verify::Ca),
                ("fingerprint", Verify::Fingerprint),
            ],
        );
        let verify = match kind {
            Verify::None => UpstreamVerify::None,
            Verify::Ca => match raw.ca_file.clone() {
                Some(p) => UpstreamVerify::Ca(p),
                None => {
                    self.problem(
                        &format!("{prefix}.ca_file"),
                        "required when verify = \"ca\"",
                    );
                    UpstreamVerify::None
                }
            },
            Verify::Fingerprint => match raw.fingerprint_sha256.as_deref().map(parse_fingerprint) {
                Some(Ok(fp)) => UpstreamVerify::Fingerprint(fp),
                Some(Err(msg)) => {
                    self.problem(&format!("{prefix}.fingerprint_sha256"), msg);
                    UpstreamVerify::None
                }
                None => {
                    self.problem(
                        &format!("{prefix}.fingerprint_sha256"),
                        "required when verify = \"fingerprint\"",
                    );
                    UpstreamVerify::None
                }
            },
        };
        Upstream {
            address,
            tls: raw.tls.unwrap_or(true),
            verify,
            tls_session_reuse: raw.tls_session_reuse.unwrap_or(true),
            connect_timeout: self.positive_duration(
                &format!("{prefix}.connect_timeout"),
                raw.connect_timeout,
                Duration::from_secs(3),
            ),
            tcp_keepalive: self.duration(
                &format!("{prefix}.tcp_keepalive"),
                raw.tcp_keepalive,
                Duration::from_secs(60),
            ),
            source: self.source_address(prefix, raw.source_address, raw.source_pool),
            proxy_protocol: self.choice(
                &format!("{prefix}.proxy_protocol"),
                raw.proxy_protocol.as_deref(),
                ProxyProtocol::Off,
                &[
                    ("off", ProxyProtocol::Off),
                    ("v1", ProxyProtocol::V1),
                    ("v2", ProxyProtocol::V2),
                ],
            ),
        }
    }

    /// Addresses and ranges (`"10.0.0.0/8"`, `"192.168.1.5"`), each named when it is neither.
    fn networks(&mut self, key: &str, list: Option<Vec<String>>) -> Vec<ipnet::IpNet> {
        let mut out = Vec::new();
        for text in list.unwrap_or_default() {
            let t = text.trim();
            if let Ok(ip) = t.parse::<std::net::IpAddr>() {
                out.push(ipnet::IpNet::from(ip));
            } else if let Ok(net) = t.parse::<ipnet::IpNet>() {
                out.push(net);
            } else {
                self.problem(
                    key,
                    format!("{t:?} is neither an address nor a range like \"10.0.0.0/8\""),
                );
            }
        }
        out
    }

    /// The most addresses a pool may expand to.
    const MAX_POOL: usize = 65_536;

    fn source_address(
        &mut self,
        prefix: &str,
        mode: Option<String>,
        pool: Option<Vec<String>>,
    ) -> SourceAddress {
        let key = format!("{prefix}.source_address");
        let pool_key = format!("{prefix}.source_pool");
        match mode.as_deref().unwrap_or("gateway") {
            "gateway" => {
                if pool.is_some() {
                    self.problem(&pool_key, "is only used with source_address = \"pool\"");
                }
                SourceAddress::Gateway
            }
            "pool" => {
                let mut out = Vec::new();
                let mut bad = false;
                for text in pool.unwrap_or_default() {
                    let t = text.trim();
                    if let Ok(ip) = t.parse::<std::net::IpAddr>() {
                        out.push(ip);
                    } else if let Ok(net) = t.parse::<ipnet::IpNet>() {
                        // Network and broadcast addresses are left out where the net has them.
                        out.extend(net.hosts().take(Self::MAX_POOL + 1));
                    } else {
                        bad = true;
                        self.problem(
                            &pool_key,
                            format!(
                                "{t:?} is neither an address nor a range like \"127.1.0.0/24\""
                            ),
                        );
                    }
                }
                out.sort_unstable();
                out.dedup();
                if out.is_empty() && !bad {
                    self.problem(
                        &pool_key,
                        "source_address = \"pool\" needs addresses: e.g. [\"127.1.0.0/24\"] (loopback) or the host's own addresses",
                    );
                } else if out.len() > Self::MAX_POOL {
                    self.problem(
                        &pool_key,
                        format!(
                            "more than {} addresses: use a smaller range",
                            Self::MAX_POOL
                        ),
                    );
                }
                SourceAddress::Pool(out)
            }
            "transparent" => {
                if pool.is_some() {
                    self.problem(&pool_key, "is only used with source_address = \"pool\"");
                }
                if !cfg!(target_os = "linux") {
                    self.problem(
                        &key,
                        "\"transparent\" (IP_TRANSPARENT) is only available on Linux: use \"pool\" or \"gateway\"",
                    );
                }
                SourceAddress::Transparent
            }
            other => {
                self.problem(
                    &key,
                    format!("{other:?} is not one of gateway, pool, transparent"),
                );
                SourceAddress::Gateway
            }
        }
    }

    fn logging(&mut self, raw: RawLogging) -> Logging {
        let format = self.choice(
            "logging.format",
            raw.format.as_deref(),
            LogFormat::Auto,
            &[
                ("auto", LogFormat::Auto),
                ("json", LogFormat::Json),
                ("text", LogFormat::Text),
            ],
        );
        let level = raw.level.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            self.problem(
                "logging.level",
                format!("{level:?} is not a level or filter directive"),
            );
        }
        let file_rotation = self.choice(
            "logging.file_rotation",
            raw.file_rotation.as_deref(),
            Rotation::Daily,
            &[
                ("hourly", Rotation::Hourly),
                ("daily", Rotation::Daily),
                ("never", Rotation::Never),
            ],
        );
        Logging {
            format,
            level,
            file_dir: raw.file_dir,
            file_prefix: raw.file_prefix.unwrap_or_else(|| "cync-gateway.log".into()),
            file_rotation,
            commands: raw.commands.unwrap_or(false),
        }
    }
}

fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let cleaned: String = text.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&cleaned)
        .map_err(|_| format!("{text:?} is not hex (64 digits, colons allowed)"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{text:?} is not 32 bytes (a SHA-256 fingerprint)"))
}
