//! Every metric family's name, in one place: the record methods in [`super::metrics`] build
//! their families from these, `docs/metrics.md` documents each (a test compares the two), and
//! dashboards and alert rules query them.
//!
//! Names keep the seed project's `tcp_comm_` prefix so the original SLO queries keep working
//! (design decision 13). Adding one: see `CONTRIBUTING.md`, "Add a metric".

pub const CONNECTIONS_ACTIVE: &str = "tcp_comm_connections_active";
pub const READY: &str = "tcp_comm_ready";
pub const DRAINING: &str = "tcp_comm_draining";
pub const QUEUE_BYTES: &str = "tcp_comm_queue_bytes";
pub const CANARY_PERCENTAGE: &str = "tcp_comm_canary_percentage";
pub const CANARY_EFFECTIVE_PERCENTAGE: &str = "tcp_comm_canary_effective_percentage";
pub const CONFIG_RESTART_REQUIRED: &str = "tcp_comm_config_restart_required";
pub const MIRROR_DROPPED_BYTES_TOTAL: &str = "tcp_comm_mirror_dropped_bytes_total";
pub const BUILD_INFO: &str = "tcp_comm_build_info";
pub const DEVICE_SERIES_EVICTED_TOTAL: &str = "tcp_comm_device_series_evicted_total";
pub const HTTP_REJECTED_TOTAL: &str = "tcp_comm_http_rejected_total";
pub const CONNECTIONS_TOTAL: &str = "tcp_comm_connections_total";
pub const CONNECTIONS_REJECTED_TOTAL: &str = "tcp_comm_connections_rejected_total";
pub const CONNECTION_CLOSES_TOTAL: &str = "tcp_comm_connection_closes_total";
pub const BYTES_TOTAL: &str = "tcp_comm_bytes_total";
pub const PACKETS_TOTAL: &str = "tcp_comm_packets_total";
pub const DECODE_ERRORS_TOTAL: &str = "tcp_comm_decode_errors_total";
pub const UNFRAMED_BYTES_TOTAL: &str = "tcp_comm_unframed_bytes_total";
pub const CLOSE_DROPPED_BYTES_TOTAL: &str = "tcp_comm_close_dropped_bytes_total";
pub const RETRIES_SKIPPED_TOTAL: &str = "tcp_comm_retries_skipped_total";
pub const ROUTING_DECISIONS_TOTAL: &str = "tcp_comm_routing_decisions_total";
pub const UPSTREAM_CONNECT_ERRORS_TOTAL: &str = "tcp_comm_upstream_connect_errors_total";
pub const UPSTREAM_TLS_HANDSHAKES_TOTAL: &str = "tcp_comm_upstream_tls_handshakes_total";
pub const SOURCE_POOL_COLLISIONS_TOTAL: &str = "tcp_comm_source_pool_collisions_total";
pub const PACKET_SENT_TOTAL: &str = "tcp_comm_packet_sent_total";
pub const PACKET_LATENCY_SECONDS: &str = "tcp_comm_packet_latency_seconds";
pub const ACK_RECEIVED_TOTAL: &str = "tcp_comm_ack_received_total";
pub const ACK_LATENCY_SECONDS: &str = "tcp_comm_ack_latency_seconds";
pub const REPLIES_TOTAL: &str = "tcp_comm_replies_total";
pub const REPLY_LATENCY_SECONDS: &str = "tcp_comm_reply_latency_seconds";
pub const HEARTBEATS_TOTAL: &str = "tcp_comm_heartbeats_total";
pub const PACKET_RETRANSMIT_TOTAL: &str = "tcp_comm_packet_retransmit_total";
pub const COMMANDS_LATE_TOTAL: &str = "tcp_comm_commands_late_total";
pub const IDEMPOTENT_DROPS_TOTAL: &str = "tcp_comm_idempotent_drops_total";
pub const QUEUE_FULL_TOTAL: &str = "tcp_comm_queue_full_total";
pub const RESUMPTIONS_TOTAL: &str = "tcp_comm_resumptions_total";
pub const RESUME_FRAMES_TOTAL: &str = "tcp_comm_resume_frames_total";
pub const CONFIG_RELOADS_TOTAL: &str = "tcp_comm_config_reloads_total";
pub const REHOMES_TOTAL: &str = "tcp_comm_rehomes_total";
pub const SHADOW_COMPARISONS_TOTAL: &str = "tcp_comm_shadow_comparisons_total";
pub const SHADOW_UPSTREAM_LOST_TOTAL: &str = "tcp_comm_shadow_upstream_lost_total";
pub const SLO_SLI: &str = "tcp_comm_slo_sli";
pub const SLO_ERROR_BUDGET_REMAINING: &str = "tcp_comm_slo_error_budget_remaining";
pub const SLO_BURN_RATE: &str = "tcp_comm_slo_burn_rate";
pub const SLO_TARGET: &str = "tcp_comm_slo_target";
pub const ROLLBACK_CHECKS_TOTAL: &str = "tcp_comm_rollback_checks_total";
pub const ROLLBACKS_TOTAL: &str = "tcp_comm_rollbacks_total";
pub const ROLLBACK_ACTIVE: &str = "tcp_comm_rollback_active";
pub const STATE_ERRORS_TOTAL: &str = "tcp_comm_state_errors_total";
pub const WEBHOOK_DELIVERIES_TOTAL: &str = "tcp_comm_webhook_deliveries_total";
pub const AUDIT_ENTRIES_TOTAL: &str = "tcp_comm_audit_entries_total";
pub const ROLLOUT_STAGE: &str = "tcp_comm_rollout_stage_percent";
pub const ROLLOUT_PROMOTION_READY: &str = "tcp_comm_rollout_promotion_ready";
pub const MQTT_CONNECTED: &str = "tcp_comm_mqtt_connected";
pub const MQTT_MESSAGES_TOTAL: &str = "tcp_comm_mqtt_messages_total";
pub const MQTT_COMMANDS_TOTAL: &str = "tcp_comm_mqtt_commands_total";
