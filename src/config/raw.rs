//! The configuration file's raw shape: what serde reads, before anything is judged.
//!
//! Invariants:
//! - Every field is optional here, so a file with mistakes still parses far enough for the
//!   validator ([`super::validate`]) to report every problem at once; defaults and ranges are
//!   the validator's business, never serde's.
//! - Nothing outside [`crate::config`] sees these types.

use std::path::PathBuf;

use serde::Deserialize;

/// A duration written either as a humantime string (`"10s"`, `"250ms"`) or as seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum RawDuration {
    Seconds(f64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawConfig {
    pub(super) state_dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) listen: RawListen,
    #[serde(default)]
    pub(super) device_tls: RawDeviceTls,
    #[serde(default)]
    pub(super) upstream: RawUpstreams,
    #[serde(default)]
    pub(super) protocol: RawProtocol,
    #[serde(default)]
    pub(super) shutdown: RawShutdown,
    #[serde(default)]
    pub(super) logging: RawLogging,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
    #[serde(default)]
    pub(super) routing: RawRouting,
    #[serde(default)]
    pub(super) reliable: RawReliable,
    #[serde(default)]
    pub(super) dark_launch: RawDarkLaunch,
    #[serde(default)]
    pub(super) reload: RawReload,
    #[serde(default)]
    pub(super) legacy: RawLegacy,
    #[serde(default)]
    pub(super) slo: RawSlo,
    #[serde(default)]
    pub(super) rollback: RawRollback,
    #[serde(default)]
    pub(super) audit: RawAudit,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) rollout: RawRollout,
    #[serde(default)]
    pub(super) mqtt: RawMqtt,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawMqtt {
    pub(super) enabled: Option<bool>,
    pub(super) broker: Option<String>,
    pub(super) tls: Option<bool>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) client_id: Option<String>,
    pub(super) instance: Option<String>,
    pub(super) discovery_prefix: Option<String>,
    pub(super) base_topic: Option<String>,
    pub(super) allow_control: Option<bool>,
    pub(super) publish_interval: Option<RawDuration>,
    pub(super) keep_alive: Option<RawDuration>,
    pub(super) queue: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawRollout {
    pub(super) stages: Option<Vec<f64>>,
    pub(super) bake_time: Option<RawDuration>,
    pub(super) min_budget: Option<f64>,
    pub(super) auto_promote: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawAdmin {
    pub(super) socket: Option<PathBuf>,
    pub(super) listen: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) allow_remote: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawSlo {
    pub(super) success_target: Option<f64>,
    pub(super) latency_threshold: Option<RawDuration>,
    pub(super) latency_target: Option<f64>,
    pub(super) decode_error_max: Option<f64>,
    pub(super) queue_full_max: Option<f64>,
    pub(super) retransmit_max: Option<f64>,
    pub(super) churn_max_per_device_hour: Option<f64>,
    pub(super) persist_interval: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawRollback {
    pub(super) enabled: Option<bool>,
    pub(super) check_interval: Option<RawDuration>,
    pub(super) window: Option<RawDuration>,
    pub(super) min_events: Option<i64>,
    pub(super) max_violations: Option<i64>,
    pub(super) success_floor: Option<f64>,
    pub(super) latency_floor: Option<f64>,
    pub(super) max_burn_rate: Option<f64>,
    pub(super) compare_to_legacy: Option<bool>,
    pub(super) confidence: Option<f64>,
    pub(super) webhook_url: Option<String>,
    pub(super) webhook_token_file: Option<PathBuf>,
    pub(super) webhook_timeout: Option<RawDuration>,
    pub(super) webhook_attempts: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawAudit {
    pub(super) max_bytes: Option<i64>,
    pub(super) keep: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawRouting {
    pub(super) canary_percent: Option<f64>,
    pub(super) force_new: Option<Vec<String>>,
    pub(super) force_legacy: Option<Vec<String>>,
    pub(super) rehome: Option<String>,
    pub(super) rehome_rate: Option<f64>,
    pub(super) drain_grace: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawDarkLaunch {
    pub(super) mode: Option<String>,
    pub(super) percent: Option<f64>,
    pub(super) compare_window: Option<RawDuration>,
    pub(super) mirror_queue_bytes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawReload {
    pub(super) poll_interval: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawReliable {
    pub(super) ack_timeout: Option<RawDuration>,
    pub(super) max_attempts: Option<i64>,
    pub(super) backoff_multiplier: Option<f64>,
    pub(super) jitter: Option<RawDuration>,
    pub(super) retry_until: Option<String>,
    pub(super) dedup_capacity: Option<i64>,
    pub(super) dedup_ttl: Option<RawDuration>,
    pub(super) device_queue_bytes: Option<i64>,
    pub(super) upstream_queue_bytes: Option<i64>,
    pub(super) backpressure_timeout: Option<RawDuration>,
    pub(super) stuck_timeout: Option<RawDuration>,
    pub(super) resume_attempts: Option<i64>,
    pub(super) resume_window: Option<RawDuration>,
    pub(super) resume_hello_timeout: Option<RawDuration>,
    pub(super) resume_stable_after: Option<RawDuration>,
    pub(super) retry_budget_ratio: Option<f64>,
    pub(super) retry_budget_min: Option<i64>,
    pub(super) retry_budget_window: Option<RawDuration>,
    pub(super) idle_timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawListen {
    pub(super) devices: Option<String>,
    pub(super) metrics: Option<String>,
    pub(super) max_connections: Option<i64>,
    pub(super) handshake_timeout: Option<RawDuration>,
    pub(super) tls_handshake_timeout: Option<RawDuration>,
    pub(super) max_pending: Option<i64>,
    pub(super) max_pending_per_source: Option<i64>,
    pub(super) backlog: Option<i64>,
    pub(super) tcp_keepalive: Option<RawDuration>,
    pub(super) http_header_timeout: Option<RawDuration>,
    pub(super) http_max_connections: Option<i64>,
    pub(super) accept_proxy_protocol: Option<bool>,
    pub(super) proxy_header_timeout: Option<RawDuration>,
    pub(super) proxy_protocol_sources: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawLegacy {
    pub(super) idle_timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawDeviceTls {
    pub(super) mode: Option<String>,
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) ciphers: Option<String>,
    pub(super) min_version: Option<String>,
    pub(super) max_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawUpstreams {
    pub(super) legacy: Option<RawUpstream>,
    pub(super) new: Option<RawUpstream>,
    pub(super) shadow: Option<RawUpstream>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawUpstream {
    pub(super) address: Option<String>,
    pub(super) tls: Option<bool>,
    pub(super) verify: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) fingerprint_sha256: Option<String>,
    pub(super) tls_session_reuse: Option<bool>,
    pub(super) connect_timeout: Option<RawDuration>,
    pub(super) tcp_keepalive: Option<RawDuration>,
    pub(super) proxy_protocol: Option<String>,
    pub(super) source_address: Option<String>,
    pub(super) source_pool: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawProtocol {
    pub(super) max_frame_len: Option<i64>,
    pub(super) command_deadline: Option<RawDuration>,
    pub(super) reply_timeout: Option<RawDuration>,
    pub(super) half_close_timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawShutdown {
    pub(super) drain_timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawLogging {
    pub(super) format: Option<String>,
    pub(super) level: Option<String>,
    pub(super) file_dir: Option<PathBuf>,
    pub(super) file_prefix: Option<String>,
    pub(super) file_rotation: Option<String>,
    pub(super) commands: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawMetrics {
    pub(super) per_device: Option<bool>,
    pub(super) per_device_max: Option<i64>,
    pub(super) per_device_idle: Option<RawDuration>,
}

// ---------------------------------------------------------------------------------------------
// Validated shape.
// ---------------------------------------------------------------------------------------------
