//! The typed configuration: what the rest of the crate reads. Values here are always valid
//! (only the validator builds them), so code that holds a [`Config`] never re-checks.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::protocol::DeviceId;

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

/// Upper bound of every duration setting.
/// Where state lives unless `state_dir` says otherwise (systemd's `StateDirectory=`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cync-gateway";

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
    /// Where the new path's connections go (a rewritten server, a second instance: the
    /// strangler's new side); `None`: the legacy upstream, like the legacy path.
    pub upstream_new: Option<Upstream>,
    pub reload: Reload,
    pub legacy: LegacyPath,
    /// Where the SLO state, the rollback latch and the audit log live.
    pub state_dir: PathBuf,
    pub slo: SloConfig,
    pub rollback: RollbackConfig,
    pub audit: AuditConfig,
    pub admin: AdminConfig,
    pub rollout: Rollout,
    pub mqtt: MqttConfig,
}

/// `[mqtt]`: the gateway as a Home Assistant device, over the household's MQTT broker.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub enabled: bool,
    /// `host:port`.
    pub broker: String,
    pub tls: bool,
    /// PEM CA to verify the broker with (`None`: the system's roots).
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    /// The password, first line of this file.
    pub password_file: Option<PathBuf>,
    /// Names the Home Assistant device ("Cync gateway `<instance>`") and its ids; `None`: the
    /// host name, made id-safe.
    pub instance: Option<String>,
    /// `None`: `cync-gateway-<instance>`.
    pub client_id: Option<String>,
    pub discovery_prefix: String,
    /// `None`: `cync-gateway/<instance>`.
    pub base_topic: Option<String>,
    /// Whether the number and the buttons exist (and commands are heeded).
    pub allow_control: bool,
    /// State is published on change and at least this often.
    pub publish_interval: Duration,
    pub keep_alive: Duration,
    /// Messages waiting for the broker at most; more are dropped, counted.
    pub queue: usize,
}

/// `[admin]`: where the runbook commands reach the daemon.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// The Unix socket (mode 0600: its permissions are the authentication).
    pub socket: PathBuf,
    /// The API on TCP too, for tools that cannot reach a socket (Alertmanager's receiver);
    /// every mutation there needs the bearer token in `token_file`.
    pub listen: Option<SocketAddr>,
    pub token_file: Option<PathBuf>,
    /// A `listen` address other hosts can reach is refused unless this is set.
    pub allow_remote: bool,
}

/// `[rollout]`: the stages `routing.canary_percent` goes through, and when the next one may
/// be taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Strictly increasing percentages, each in (0, 100] with two decimals at most.
    pub stages: Vec<f64>,
    /// How long a stage must have been in force before the next.
    pub bake_time: Duration,
    /// The new path's success error budget left (0-1) that the next stage needs.
    pub min_budget: f64,
    /// Promote by itself once every gate is met (by editing the configuration file).
    pub auto_promote: bool,
}

/// `[slo]`: the objectives each path is measured against.
#[derive(Debug, Clone, PartialEq)]
pub struct SloConfig {
    /// Share of commands answered within `protocol.command_deadline`.
    pub success_target: f64,
    pub latency_threshold: Duration,
    /// Share of commands answered within `latency_threshold`; one unanswered when it passes is
    /// late at once.
    pub latency_target: f64,
    pub decode_error_max: f64,
    pub queue_full_max: f64,
    pub retransmit_max: f64,
    pub churn_max_per_device_hour: f64,
    /// How often the SLO state is written to `state_dir` (and always at shutdown).
    pub persist_interval: Duration,
}

/// `[rollback]`: the automatic rollback controller.
#[derive(Debug, Clone, PartialEq)]
pub struct RollbackConfig {
    pub enabled: bool,
    pub check_interval: Duration,
    pub window: Duration,
    pub min_events: u64,
    pub max_violations: u32,
    pub success_floor: f64,
    pub latency_floor: f64,
    pub max_burn_rate: f64,
    pub compare_to_legacy: bool,
    pub confidence: f64,
    pub webhook_url: Option<String>,
    pub webhook_token_file: Option<PathBuf>,
    pub webhook_timeout: Duration,
    pub webhook_attempts: u32,
}

/// `[audit]`: the audit log's size bound.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    pub max_bytes: u64,
    pub keep: usize,
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

/// The device listener's default accept queue, HAProxy's at its default `maxconn` (both capped
/// by `net.core.somaxconn`, 4,096 on current kernels). The standard library's 128 overflowed
/// when a thousand devices reconnected at once: the kernel dropped the handshakes it had no
/// room for and those devices waited a second or more for their retransmission
/// (docs/benchmarks.md, the 1k TLS burst).
pub const DEFAULT_BACKLOG: u32 = 4096;

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
    /// The device listener's accept queue: connections the kernel has completed and holds
    /// until the accept loop takes them (capped by `net.core.somaxconn`).
    pub backlog: u32,
    /// TCP keepalive idle time on device connections; zero disables.
    pub tcp_keepalive: Duration,
    pub http_header_timeout: Duration,
    pub http_max_connections: usize,
    /// Device connections start with a PROXY header (v1 or v2) from a fronting balancer.
    pub accept_proxy_protocol: bool,
    /// From accept to the end of that header.
    pub proxy_header_timeout: Duration,
    /// The sources that must send one; empty: every connection. Others connect directly.
    pub proxy_protocol_sources: Vec<ipnet::IpNet>,
}

impl Listen {
    /// Whether a connection from `peer` must start with a PROXY header.
    pub fn expects_proxy_header(&self, peer: std::net::IpAddr) -> bool {
        self.accept_proxy_protocol
            && (self.proxy_protocol_sources.is_empty()
                || self
                    .proxy_protocol_sources
                    .iter()
                    .any(|n| n.contains(&peer)))
    }
}

/// The legacy path's own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyPath {
    /// No device bytes for this long closes the pair (devices heartbeat after 21 s idle).
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Offer the add-on's last TLS session again on the next connection (an abbreviated
    /// handshake when it still knows it).
    pub tls_session_reuse: bool,
    pub connect_timeout: Duration,
    /// TCP keepalive idle time on upstream connections; zero disables.
    pub tcp_keepalive: Duration,
    /// A PROXY protocol header carrying the device's address, sent first on every connection.
    pub proxy_protocol: ProxyProtocol,
    /// The local address upstream connections are made from.
    pub source: SourceAddress,
}

/// `source_address` of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAddress {
    /// The host's choice (one address for every device).
    Gateway,
    /// One address of the pool per device, chosen stably from its id.
    Pool(Vec<std::net::IpAddr>),
    /// The device's own address (`IP_TRANSPARENT`; IPv4), for servers that must see it.
    Transparent,
}

/// `proxy_protocol` of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    Off,
    /// The text header (`PROXY TCP4 … \r\n`).
    V1,
    /// The binary header.
    V2,
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
    /// One log line per command, successes too (failures are always logged).
    pub commands: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub per_device: bool,
    /// Devices with their own series at most; the least recently seen make room.
    pub per_device_max: usize,
    /// A device's series are removed when it has not been seen for this long.
    pub per_device_idle: Duration,
}
