//! Configuration: the TOML file's raw serde shape and its validation into a typed [`Config`].
//!
//! One loader ([`Config::load`] / [`Config::parse`]) serves start-up, `check-config` and (later)
//! reload, so the three can never disagree about what is valid.
//!
//! Invariants:
//! - Validation collects *every* problem before failing ([`ConfigError::problems`]), so an
//!   operator fixes a file in one pass. Unknown keys are rejected like `deny_unknown_fields`
//!   would, but all of them are listed (collected with `serde_ignored`), not just the first.
//! - A [`Config`] only exists fully validated: addresses parsed, durations non-negative, limits
//!   in range, TLS files named consistently. Code that holds one never re-checks.
//! - Defaults live here, once, and are documented key by key in `config/gateway.toml`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::protocol::{DeviceId, DEFAULT_MAX_DATA_LEN};

/// One thing wrong with a configuration file, tied to its dotted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), list(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            Self::Read { path, source } => vec![Problem {
                key: path.display().to_string(),
                message: source.to_string(),
            }],
            Self::Invalid(p) => p.clone(),
        }
    }
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Raw shape, as written in the file. Every field is optional so that a missing key means "use
// the default" and validation, not serde, decides what is wrong.
// ---------------------------------------------------------------------------------------------

/// A duration written either as a humantime string (`"10s"`, `"250ms"`) or as seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Seconds(f64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    #[serde(default)]
    listen: RawListen,
    #[serde(default)]
    device_tls: RawDeviceTls,
    #[serde(default)]
    upstream: RawUpstreams,
    #[serde(default)]
    protocol: RawProtocol,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    logging: RawLogging,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    reliable: RawReliable,
    #[serde(default)]
    dark_launch: RawDarkLaunch,
    #[serde(default)]
    reload: RawReload,
    #[serde(default)]
    legacy: RawLegacy,
}

#[derive(Debug, Default, Deserialize)]
struct RawRouting {
    canary_percent: Option<f64>,
    force_new: Option<Vec<String>>,
    force_legacy: Option<Vec<String>>,
    rehome: Option<String>,
    rehome_rate: Option<f64>,
    drain_grace: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
struct RawDarkLaunch {
    mode: Option<String>,
    percent: Option<f64>,
    compare_window: Option<RawDuration>,
    mirror_queue_bytes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawReload {
    poll_interval: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
struct RawReliable {
    ack_timeout: Option<RawDuration>,
    max_attempts: Option<i64>,
    backoff_multiplier: Option<f64>,
    jitter: Option<RawDuration>,
    retry_until: Option<String>,
    dedup_capacity: Option<i64>,
    dedup_ttl: Option<RawDuration>,
    device_queue_bytes: Option<i64>,
    upstream_queue_bytes: Option<i64>,
    backpressure_timeout: Option<RawDuration>,
    stuck_timeout: Option<RawDuration>,
    resume_attempts: Option<i64>,
    resume_window: Option<RawDuration>,
    resume_hello_timeout: Option<RawDuration>,
    resume_stable_after: Option<RawDuration>,
    retry_budget_ratio: Option<f64>,
    retry_budget_min: Option<i64>,
    retry_budget_window: Option<RawDuration>,
    idle_timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
struct RawListen {
    devices: Option<String>,
    metrics: Option<String>,
    max_connections: Option<i64>,
    handshake_timeout: Option<RawDuration>,
    tls_handshake_timeout: Option<RawDuration>,
    max_pending: Option<i64>,
    max_pending_per_source: Option<i64>,
    tcp_keepalive: Option<RawDuration>,
    http_header_timeout: Option<RawDuration>,
    http_max_connections: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawLegacy {
    idle_timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
struct RawDeviceTls {
    mode: Option<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    ciphers: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawUpstreams {
    legacy: Option<RawUpstream>,
    shadow: Option<RawUpstream>,
}

#[derive(Debug, Default, Deserialize)]
struct RawUpstream {
    address: Option<String>,
    tls: Option<bool>,
    verify: Option<String>,
    ca_file: Option<PathBuf>,
    fingerprint_sha256: Option<String>,
    connect_timeout: Option<RawDuration>,
    tcp_keepalive: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
struct RawProtocol {
    max_frame_len: Option<i64>,
    command_deadline: Option<RawDuration>,
    reply_timeout: Option<RawDuration>,
    half_close_timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
struct RawShutdown {
    drain_timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
struct RawLogging {
    format: Option<String>,
    level: Option<String>,
    file_dir: Option<PathBuf>,
    file_prefix: Option<String>,
    file_rotation: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawMetrics {
    per_device: Option<bool>,
    per_device_max: Option<i64>,
    per_device_idle: Option<RawDuration>,
}

// ---------------------------------------------------------------------------------------------
// Validated shape.
// ---------------------------------------------------------------------------------------------

/// Upper bound of every duration setting.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The default device-side cipher list. The first four are the only suites every captured
/// device ClientHello offers (static RSA, AES-CBC); the ECDHE-RSA-GCM ones serve modern test
/// clients. ECDHE-ECDSA is left out because the generated and expected certificates are RSA.
pub const DEFAULT_DEVICE_CIPHERS: &str =
    "AES256-SHA256:AES256-SHA:AES128-SHA256:AES128-SHA:AES128-CCM:AES256-CCM:\
     ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: Listen,
    pub device_tls: DeviceTls,
    pub upstream_legacy: Upstream,
    pub protocol: Protocol,
    pub shutdown: Shutdown,
    pub logging: Logging,
    pub metrics: MetricsConfig,
    pub routing: Routing,
    pub reliable: Reliable,
    pub dark_launch: DarkLaunch,
    /// Where mirror mode replays device traffic; required for `dark_launch.mode = "mirror"`.
    pub upstream_shadow: Option<Upstream>,
    pub reload: Reload,
    pub legacy: LegacyPath,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Share of devices on the new path, 0–100 in steps of 0.01 (design decision 2).
    pub canary_percent: f64,
    /// Always on the new path (unless the rollback latch is set), whatever the percentage.
    pub force_new: BTreeSet<DeviceId>,
    /// Always on the legacy path; wins over `force_new`.
    pub force_legacy: BTreeSet<DeviceId>,
    pub rehome: Rehome,
    /// Connections re-homed per second at most.
    pub rehome_rate: f64,
    /// How long a re-homed connection may wait for its commands in flight.
    pub drain_grace: Duration,
}

/// Whether open connections follow a routing change (design decision 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rehome {
    Auto,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DarkMode {
    Off,
    /// Run the reliable-session logic on a copy of legacy traffic; write nothing.
    Observe,
    /// Also replay device frames to `upstream.shadow` and compare its answers.
    Mirror,
}

/// Dark launch (design decision 8).
#[derive(Debug, Clone, PartialEq)]
pub struct DarkLaunch {
    pub mode: DarkMode,
    /// Share of legacy devices shadowed, by a bucket independent of the canary's.
    pub percent: f64,
    /// A reply seen on one side and not the other within this is missing / extra.
    pub compare_window: Duration,
    pub mirror_queue_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reload {
    /// How often the file is checked for changes; zero disables polling (SIGHUP only).
    pub poll_interval: Duration,
}

/// What ends a command's retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryUntil {
    /// The device's `f9` reply (execution). A lone 0x7b proves receipt only (protocol §8).
    Reply,
    /// The 0x7b or the `f9` reply, whichever comes first.
    Ack,
}

/// Settings of the new path's reliable session (design decision 7).
#[derive(Debug, Clone, PartialEq)]
pub struct Reliable {
    pub ack_timeout: Duration,
    pub max_attempts: u32,
    pub backoff_multiplier: f64,
    pub jitter: Duration,
    pub retry_until: RetryUntil,
    pub dedup_capacity: usize,
    pub dedup_ttl: Duration,
    /// Bound of the device→upstream queue, bytes.
    pub device_queue_bytes: usize,
    /// Bound of the upstream→device queue, bytes.
    pub upstream_queue_bytes: usize,
    pub backpressure_timeout: Duration,
    /// A write to the device that has waited this long means it is not reading: the pair closes.
    pub stuck_timeout: Duration,
    pub resume_attempts: u32,
    pub resume_window: Duration,
    /// How long a redialled upstream may take to answer the replayed hello.
    pub resume_hello_timeout: Duration,
    /// An upstream that closes again sooner than this after a resumption closed on purpose.
    pub resume_stable_after: Duration,
    /// Retries per command allowed over `retry_budget_window` (the path's share).
    pub retry_budget_ratio: f64,
    /// Retries allowed per window whatever the share says (low traffic).
    pub retry_budget_min: u32,
    pub retry_budget_window: Duration,
    pub idle_timeout: Duration,
}

impl Reliable {
    /// When the last attempt goes out at the latest (jitter at its maximum every time).
    pub fn last_attempt_at(&self) -> Duration {
        let mut at = Duration::ZERO;
        for k in 1..self.max_attempts {
            at = at
                .saturating_add(self.backoff(k))
                .saturating_add(self.jitter);
        }
        at
    }

    /// The wait after attempt `k` (1-based) before the next one, without jitter.
    pub fn backoff(&self, k: u32) -> Duration {
        let exp = i32::try_from(k.saturating_sub(1)).unwrap_or(i32::MAX);
        let factor = self.backoff_multiplier.powi(exp).min(1e6);
        Duration::try_from_secs_f64(self.ack_timeout.as_secs_f64() * factor).unwrap_or(MAX_DURATION)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    pub devices: SocketAddr,
    pub metrics: SocketAddr,
    /// Routed device connections (past their hello) open at once.
    pub max_connections: usize,
    /// From accept to the device's first frame (TLS included).
    pub handshake_timeout: Duration,
    /// From accept to the end of the device-side TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Connections accepted that have not sent their hello yet, at once.
    pub max_pending: usize,
    /// Of those, from one source address.
    pub max_pending_per_source: usize,
    /// TCP keepalive idle time on device connections; zero disables.
    pub tcp_keepalive: Duration,
    pub http_header_timeout: Duration,
    pub http_max_connections: usize,
}

/// The legacy path's own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyPath {
    /// No device bytes for this long closes the pair (devices heartbeat after 21 s idle).
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeviceTlsMode {
    Plain,
    Tls,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceTls {
    pub mode: DeviceTlsMode,
    /// Both set, or both `None` (then a self-signed RSA certificate is generated at start).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub ciphers: String,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls10,
    Tls11,
    Tls12,
    Tls13,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamVerify {
    /// The add-on's certificate is self-signed and regenerated per image: skip verification.
    None,
    /// Verify the chain against this CA file (no host-name check: the add-on has no stable name).
    Ca(PathBuf),
    /// Accept exactly the certificate whose DER SHA-256 is this.
    Fingerprint([u8; 32]),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// `host:port`; resolved at each connect so a re-addressed add-on is followed.
    pub address: String,
    pub tls: bool,
    pub verify: UpstreamVerify,
    pub connect_timeout: Duration,
    /// TCP keepalive idle time on upstream connections; zero disables.
    pub tcp_keepalive: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Protocol {
    pub max_frame_len: usize,
    pub command_deadline: Duration,
    pub reply_timeout: Duration,
    /// How long a pair one side has half-closed (FIN) waits for the other to finish.
    pub half_close_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Shutdown {
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    Hourly,
    Daily,
    Never,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Logging {
    pub format: LogFormat,
    pub level: String,
    pub file_dir: Option<PathBuf>,
    pub file_prefix: String,
    pub file_rotation: Rotation,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub per_device: bool,
    /// Devices with their own series at most; the least recently seen make room.
    pub per_device_max: usize,
    /// A device's series are removed when it has not been seen for this long.
    pub per_device_idle: Duration,
}

/// The largest configuration file read (a reference file is ~15 KiB).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads a configuration (or secret) file: a regular file only — a FIFO, device or directory
/// at the path is refused before it is opened, and it is opened non-blocking besides, so a
/// path swapped for a FIFO can never hang the reader — and at most [`MAX_FILE_BYTES`].
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

/// Whether `path` can be read by others than its owner (`mask`: 0o044 group or others,
/// 0o004 others only).
fn readable_beyond_owner(path: &Path, mask: u32) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & mask != 0)
}

impl Config {
    /// What is valid but unwise, for `check-config` and the start-up log: secrets readable by
    /// others, device auth codes sent to an unverified shadow.
    pub fn warnings(&self, path: Option<&Path>) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(key) = &self.device_tls.key_file {
            if readable_beyond_owner(key, 0o044) {
                out.push(format!(
                    "device_tls.key_file {} is readable by group or others (chmod 600 it)",
                    key.display()
                ));
            }
        }
        if let Some(p) = path {
            if readable_beyond_owner(p, 0o004) {
                out.push(format!(
                    "the configuration {} is readable by others (chmod o-r it)",
                    p.display()
                ));
            }
        }
        if self.dark_launch.mode == DarkMode::Mirror {
            if let Some(u) = &self.upstream_shadow {
                if !u.tls || u.verify == UpstreamVerify::None {
                    out.push(
                        "dark_launch.mode = \"mirror\" sends every shadowed device's hello, auth code included, to upstream.shadow, whose identity is not verified: set upstream.shadow.tls = true and verify = \"ca\" or \"fingerprint\"".into(),
                    );
                }
            }
        }
        out
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = read_regular(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        Self::parse(&text)
    }

    /// Validates TOML text, collecting every problem.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut unknown = Vec::new();
        let de = toml::Deserializer::new(text);
        let raw: RawConfig = match serde_ignored::deserialize(de, |path| {
            // serde_ignored writes `?` for the step through an Option; it means nothing to a user.
            unknown.push(path.to_string().replace(".?", "").replace("?.", ""));
        }) {
            Ok(raw) => raw,
            Err(e) => {
                // Nothing past a syntax error can be judged: report it alone, not the
                // "missing" keys the unparsed file seems to lack.
                return Err(ConfigError::Invalid(vec![Problem {
                    key: "(file)".into(),
                    message: e.to_string().trim().replace('\n', " "),
                }]));
            }
        };
        for key in unknown {
            problems.push(Problem {
                key,
                message: "unknown key".into(),
            });
        }
        let mut v = Validator {
            problems: &mut problems,
        };
        let config = v.config(raw);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

struct Validator<'a> {
    problems: &'a mut Vec<Problem>,
}

impl Validator<'_> {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
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

    fn int_in(&mut self, key: &str, raw: Option<i64>, default: usize, lo: i64, hi: i64) -> usize {
        let Some(v) = raw else { return default };
        if v < lo || v > hi {
            self.problem(key, format!("{v} is out of range {lo}..={hi}"));
            return default;
        }
        usize::try_from(v).unwrap_or(default)
    }

    fn config(&mut self, raw: RawConfig) -> Config {
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
        };
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
            reload: Reload {
                poll_interval: self.duration(
                    "reload.poll_interval",
                    raw.reload.poll_interval,
                    Duration::from_secs(1),
                ),
            },
            reliable: self.reliable(raw.reliable, &protocol_deadline, protocol_frame_len),
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
        let rehome = match raw.rehome.as_deref().unwrap_or("auto") {
            "auto" => Rehome::Auto,
            "never" => Rehome::Never,
            other => {
                self.problem(
                    "routing.rehome",
                    format!("{other:?} is not \"auto\" or \"never\""),
                );
                Rehome::Auto
            }
        };
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
        let mode = match raw.mode.as_deref().unwrap_or("off") {
            "off" => DarkMode::Off,
            "observe" => DarkMode::Observe,
            "mirror" => DarkMode::Mirror,
            other => {
                self.problem(
                    "dark_launch.mode",
                    format!("{other:?} is not \"off\", \"observe\" or \"mirror\""),
                );
                DarkMode::Off
            }
        };
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
        let retry_until = match raw.retry_until.as_deref().unwrap_or("reply") {
            "reply" => RetryUntil::Reply,
            "ack" => RetryUntil::Ack,
            other => {
                self.problem(
                    "reliable.retry_until",
                    format!("{other:?} is not \"reply\" or \"ack\""),
                );
                RetryUntil::Reply
            }
        };
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
        let mode = match raw.mode.as_deref().unwrap_or("tls") {
            "tls" => DeviceTlsMode::Tls,
            "plain" => DeviceTlsMode::Plain,
            other => {
                self.problem(
                    "device_tls.mode",
                    format!("{other:?} is not \"tls\" or \"plain\""),
                );
                DeviceTlsMode::Tls
            }
        };
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
        let min_version = self.tls_version("device_tls.min_version", raw.min_version, "tls1.2");
        let max_version = self.tls_version("device_tls.max_version", raw.max_version, "tls1.3");
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

    fn tls_version(&mut self, key: &str, raw: Option<String>, default: &str) -> TlsVersion {
        match raw.as_deref().unwrap_or(default) {
            "tls1.0" => TlsVersion::Tls10,
            "tls1.1" => TlsVersion::Tls11,
            "tls1.2" => TlsVersion::Tls12,
            "tls1.3" => TlsVersion::Tls13,
            other => {
                self.problem(
                    key,
                    format!(
                        "{other:?} is not one of \"tls1.0\", \"tls1.1\", \"tls1.2\", \"tls1.3\""
                    ),
                );
                TlsVersion::Tls12
            }
        }
    }

    fn upstream(&mut self, prefix: &str, raw: RawUpstream) -> Upstream {
        let address = self.host_port(&format!("{prefix}.address"), raw.address);
        let verify = match raw.verify.as_deref().unwrap_or("none") {
            "none" => UpstreamVerify::None,
            "ca" => match raw.ca_file.clone() {
                Some(p) => UpstreamVerify::Ca(p),
                None => {
                    self.problem(
                        &format!("{prefix}.ca_file"),
                        "required when verify = \"ca\"",
                    );
                    UpstreamVerify::None
                }
            },
            "fingerprint" => match raw.fingerprint_sha256.as_deref().map(parse_fingerprint) {
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
            other => {
                self.problem(
                    &format!("{prefix}.verify"),
                    format!("{other:?} is not one of \"none\", \"ca\", \"fingerprint\""),
                );
                UpstreamVerify::None
            }
        };
        Upstream {
            address,
            tls: raw.tls.unwrap_or(true),
            verify,
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
        }
    }

    fn logging(&mut self, raw: RawLogging) -> Logging {
        let format = match raw.format.as_deref().unwrap_or("auto") {
            "auto" => LogFormat::Auto,
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => {
                self.problem(
                    "logging.format",
                    format!("{other:?} is not \"auto\", \"json\" or \"text\""),
                );
                LogFormat::Auto
            }
        };
        let level = raw.level.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            self.problem(
                "logging.level",
                format!("{level:?} is not a level or filter directive"),
            );
        }
        let file_rotation = match raw.file_rotation.as_deref().unwrap_or("daily") {
            "hourly" => Rotation::Hourly,
            "daily" => Rotation::Daily,
            "never" => Rotation::Never,
            other => {
                self.problem(
                    "logging.file_rotation",
                    format!("{other:?} is not \"hourly\", \"daily\" or \"never\""),
                );
                Rotation::Daily
            }
        };
        Logging {
            format,
            level,
            file_dir: raw.file_dir,
            file_prefix: raw.file_prefix.unwrap_or_else(|| "cync-gateway.log".into()),
            file_rotation,
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

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[upstream.legacy]\naddress = \"127.0.0.1:23780\"\n";

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.listen.devices, "0.0.0.0:23779".parse().expect("addr"));
        assert_eq!(c.listen.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.device_tls.mode, DeviceTlsMode::Tls);
        assert!(c.upstream_legacy.tls);
        assert_eq!(c.upstream_legacy.verify, UpstreamVerify::None);
        assert_eq!(c.protocol.max_frame_len, 4096);
        assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(30));
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let text = r#"
[listen]
devices = "not-an-address"
handshake_timeout = -5
bogus = 1
[upstream.legacy]
address = "127.0.0.1:23780"
colour = "red"
connect_timeout = "-2s"
"#;
        let err = Config::parse(text).expect_err("invalid");
        let keys: Vec<String> = err.problems().into_iter().map(|p| p.key).collect();
        for k in [
            "listen.devices",
            "listen.handshake_timeout",
            "listen.bogus",
            "upstream.legacy.colour",
            "upstream.legacy.connect_timeout",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn a_syntax_error_is_reported_alone() {
        let err = Config::parse("[upstream.legacy\naddress = \"127.0.0.1:1\"\n").expect_err("bad");
        let p = err.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "(file)");
        assert!(!p[0].message.contains("required"), "{p:?}");
    }

    #[test]
    fn durations_accept_text_and_seconds() {
        let text =
            format!("{MINIMAL}[protocol]\ncommand_deadline = \"1500ms\"\nreply_timeout = 2.5\n[reliable]\nmax_attempts = 2\n");
        let c = Config::parse(&text).expect("valid");
        assert_eq!(c.protocol.command_deadline, Duration::from_millis(1500));
        assert_eq!(c.protocol.reply_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn reliable_defaults_fit_inside_the_command_deadline() {
        let c = Config::parse(MINIMAL).expect("valid");
        let r = &c.reliable;
        assert_eq!(r.ack_timeout, Duration::from_millis(400));
        assert_eq!(r.max_attempts, 4);
        assert_eq!(r.retry_until, RetryUntil::Reply);
        assert_eq!(r.idle_timeout, Duration::from_secs(90));
        assert_eq!(
            (r.dedup_capacity, r.dedup_ttl),
            (1000, Duration::from_secs(300))
        );
        // 0.4 + 0.8 + 1.6 s of backoff plus three 0.1 s jitters.
        assert_eq!(r.last_attempt_at(), Duration::from_millis(3100));
        assert!(r.last_attempt_at() + r.ack_timeout <= c.protocol.command_deadline);
        assert_eq!(c.routing.canary_percent, 0.0);
    }

    #[test]
    fn retry_budget_beyond_the_deadline_and_bad_percent_are_rejected() {
        let text = format!(
            "{MINIMAL}[reliable]\nmax_attempts = 6\nretry_until = \"never\"\n[routing]\ncanary_percent = 150\n"
        );
        let keys: Vec<String> = Config::parse(&text)
            .expect_err("invalid")
            .problems()
            .into_iter()
            .map(|p| p.key)
            .collect();
        for k in [
            "reliable.max_attempts",
            "reliable.retry_until",
            "routing.canary_percent",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
        let fine = format!("{MINIMAL}[routing]\ncanary_percent = 12.34\n");
        assert_eq!(
            Config::parse(&fine).expect("valid").routing.canary_percent,
            12.34
        );
        let too_fine = format!("{MINIMAL}[routing]\ncanary_percent = 12.345\n");
        assert!(Config::parse(&too_fine).is_err());
    }

    #[test]
    fn fingerprint_and_verify_modes() {
        let fp = "ab".repeat(32);
        let text = format!(
            "[upstream.legacy]\naddress = \"addon.local:23779\"\nverify = \"fingerprint\"\nfingerprint_sha256 = \"{fp}\"\n"
        );
        let c = Config::parse(&text).expect("valid");
        assert_eq!(
            c.upstream_legacy.verify,
            UpstreamVerify::Fingerprint([0xab; 32])
        );
        let bad = "[upstream.legacy]\naddress = \"addon.local:23779\"\nverify = \"ca\"\n";
        let err = Config::parse(bad).expect_err("ca_file missing");
        assert_eq!(err.problems()[0].key, "upstream.legacy.ca_file");
    }

    #[test]
    fn missing_upstream_and_bad_tls_pair_are_named() {
        let text = "[device_tls]\ncert_file = \"/x.pem\"\n";
        let keys: Vec<String> = Config::parse(text)
            .expect_err("invalid")
            .problems()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert!(keys.contains(&"upstream.legacy".to_string()), "{keys:?}");
        assert!(
            keys.contains(&"device_tls.cert_file".to_string()),
            "{keys:?}"
        );
    }

    #[test]
    fn bad_upstream_addresses_are_rejected() {
        for addr in ["localhost", "host:0", "host:70000", ":23779", "a b:1"] {
            let text = format!("[upstream.legacy]\naddress = \"{addr}\"\n");
            assert!(Config::parse(&text).is_err(), "{addr} accepted");
        }
        for addr in ["localhost:1", "[::1]:23779", "10.0.0.2:23779"] {
            let text = format!("[upstream.legacy]\naddress = \"{addr}\"\n");
            assert!(Config::parse(&text).is_ok(), "{addr} rejected");
        }
    }
}
