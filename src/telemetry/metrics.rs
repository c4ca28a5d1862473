//! Prometheus metrics: one [`Metrics`] struct on its own [`Registry`], passed to whoever records.
//!
//! Names are in [`super::names`]; every family that describes traffic carries a `transport` label
//! (`legacy`, `new`, `shadow`). `docs/metrics.md` lists every family.
//!
//! Invariants:
//! - No globals: tests build as many independent `Metrics` as they like.
//! - A `device_id` label exists only when `metrics.per_device = true`, and only on the command
//!   families, because per-device series do not scale to fleets of thousands.
//! - Recording never fails and cannot be miscalled: families are private and recorded through
//!   typed methods, one per family, whose parameters are the family's labels (label values
//!   from [`super::labels`]), so neither a label's arity nor its spelling can be wrong at a call
//!   site; family registration errors surface once, at construction.

use std::sync::OnceLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use thiserror::Error;

use super::labels::{
    AckOutcome, CommandOutcome, Direction, DropReason, HeartbeatOutcome, Label, MqttCommand,
    MqttCommandResult, MqttMessage, Queue, QueueAction, Reject, ReloadResult, ReplyOutcome,
    ResumeFrame, ResumeOutcome, RetrySkip, ShadowLoss, SourceCollision, TlsHandshake, Transport,
};
use super::names;
use super::slo_feed::Feeds;
use crate::protocol::{DeviceId, PacketType};

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("registering metric family: {0}")]
    Register(#[from] prometheus::Error),
    #[error("encoding metrics: {0}")]
    Encode(String),
}

/// Command latency buckets. 0.8 s and 1.5 s are SLO thresholds and must stay bucket bounds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
];

/// The devices that have their own series (`metrics.per_device`), least recently seen first.
struct DeviceSeries {
    seen: lru::LruCache<DeviceId, tokio::time::Instant>,
    idle: std::time::Duration,
    last_sweep: Option<tokio::time::Instant>,
}

/// Every label of an enum, in declaration order.
fn all<T: Label + strum::IntoEnumIterator>() -> Vec<&'static str> {
    T::iter().map(Label::label).collect()
}

/// Creates (at 0) the series for every combination of `lists`, one list per label.
fn cross(v: &IntCounterVec, lists: &[&[&str]]) {
    let mut combo = Vec::with_capacity(lists.len());
    fn go<'a>(v: &IntCounterVec, lists: &[&[&'a str]], combo: &mut Vec<&'a str>) {
        match lists.split_first() {
            None => {
                // A wrong number of labels is an error here, not a panic; the unit test that
                // renders every zeroed family catches one.
                let _ = v.get_metric_with_label_values(combo);
            }
            Some((first, rest)) => {
                for x in first.iter() {
                    combo.push(x);
                    go(v, rest, combo);
                    combo.pop();
                }
            }
        }
    }
    go(v, lists, &mut combo);
}

const TRANSPORTS: usize = 3;
const DIRECTIONS: usize = 2;

/// One family's counters, each resolved on its first use and kept: `with_label_values`
/// hashes every label and takes the family's lock, and the byte and packet counters are
/// counted on every read and every frame of every connection. Resolving on first use (not
/// at start) keeps the exposition unchanged: a series still appears when first counted.
/// The same for the per-command series (outcome counters, latency histograms), where a
/// command's end cost two such lookups, each reply and each device ack two more, each
/// heartbeat one.
struct Hot<const N: usize, T = IntCounter>([OnceLock<T>; N]);

impl<const N: usize, T> Hot<N, T> {
    fn new() -> Self {
        Hot(std::array::from_fn(|_| OnceLock::new()))
    }

    fn get(&self, i: usize, make: impl FnOnce() -> T) -> &T {
        self.0[i].get_or_init(make)
    }
}

const COMMAND_OUTCOMES: usize = 3;
const REPLY_OUTCOMES: usize = 4;
// The hot indexes are the variants' discriminants: a variant added must grow these.
const _: () = assert!(CommandOutcome::Abandoned as usize == COMMAND_OUTCOMES - 1);
const _: () = assert!(ReplyOutcome::Local as usize == REPLY_OUTCOMES - 1);
const ACK_OUTCOMES: usize = 3;
const HEARTBEAT_OUTCOMES: usize = 4;
const _: () = assert!(AckOutcome::Unmatched as usize == ACK_OUTCOMES - 1);
const _: () = assert!(HeartbeatOutcome::Local as usize == HEARTBEAT_OUTCOMES - 1);

pub struct Metrics {
    registry: Registry,
    /// Every family registered, whether or not it has series yet.
    names: Vec<String>,
    per_device: bool,
    devices: std::sync::Mutex<DeviceSeries>,
    device_series_evicted: prometheus::IntCounter,
    http_rejected: prometheus::IntCounter,
    connections_active: IntGaugeVec,
    connections_total: IntCounterVec,
    connections_rejected: IntCounterVec,
    connection_closes: IntCounterVec,
    bytes: IntCounterVec,
    bytes_hot: Hot<{ TRANSPORTS * DIRECTIONS }>,
    packets: IntCounterVec,
    packets_hot: Hot<{ TRANSPORTS * DIRECTIONS * PacketType::ALL.len() }>,
    decode_errors: IntCounterVec,
    unframed_bytes: IntCounterVec,
    close_dropped_bytes: IntCounterVec,
    retries_skipped: IntCounterVec,
    routing_decisions: IntCounterVec,
    upstream_connect_errors: IntCounterVec,
    source_pool_collisions: IntCounterVec,
    upstream_tls_handshakes: IntCounterVec,
    mqtt_connected: IntGauge,
    mqtt_messages: IntCounterVec,
    mqtt_commands: IntCounterVec,
    packet_sent: IntCounterVec,
    packet_sent_hot: Hot<{ TRANSPORTS * COMMAND_OUTCOMES }>,
    packet_latency: HistogramVec,
    packet_latency_hot: Hot<TRANSPORTS, prometheus::Histogram>,
    ack_received: IntCounterVec,
    acks_hot: Hot<{ TRANSPORTS * ACK_OUTCOMES }>,
    ack_latency: HistogramVec,
    ack_latency_hot: Hot<TRANSPORTS, prometheus::Histogram>,
    replies: IntCounterVec,
    replies_hot: Hot<{ TRANSPORTS * PacketType::ALL.len() * REPLY_OUTCOMES }>,
    reply_latency: HistogramVec,
    reply_latency_hot: Hot<{ TRANSPORTS * PacketType::ALL.len() }, prometheus::Histogram>,
    heartbeats: IntCounterVec,
    heartbeats_hot: Hot<{ TRANSPORTS * HEARTBEAT_OUTCOMES }>,
    retransmits: IntCounterVec,
    commands_late: IntCounterVec,
    idempotent_drops: IntCounterVec,
    queue_full: IntCounterVec,
    queue_bytes: IntGaugeVec,
    resumptions: IntCounterVec,
    resume_frames: IntCounterVec,
    canary_percent: prometheus::Gauge,
    canary_effective_percent: prometheus::Gauge,
    config_reloads: IntCounterVec,
    config_restart_required: IntGauge,
    rehomes: IntCounterVec,
    shadow_comparisons: IntCounterVec,
    shadow_lost: IntCounterVec,
    mirror_dropped_bytes: prometheus::IntCounter,
    ready: IntGauge,
    draining: IntGauge,
    /// The SLO engine's feed, bumped by the same record methods (one sink).
    feeds: Feeds,
    slo_sli: prometheus::GaugeVec,
    slo_budget: prometheus::GaugeVec,
    slo_burn: prometheus::GaugeVec,
    slo_target: prometheus::GaugeVec,
    rollback_checks: IntCounterVec,
    rollbacks: IntCounterVec,
    rollback_active: IntGauge,
    state_errors: IntCounterVec,
    rollout_stage: prometheus::Gauge,
    tracer: super::trace::Tracer,
    promotion_ready: IntGauge,
    webhook_deliveries: IntCounterVec,
    audit_entries: IntCounterVec,
}

fn gauge(
    r: &Registry,
    names: &mut Vec<String>,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<prometheus::GaugeVec, MetricsError> {
    let g = prometheus::GaugeVec::new(Opts::new(name, help), labels)?;
    register(r, names, Box::new(g.clone()))?;
    Ok(g)
}

/// Registers `c`, noting its family names (families without series are not rendered, and the
/// documentation test must still see them).
fn register(
    r: &Registry,
    names: &mut Vec<String>,
    c: Box<dyn prometheus::core::Collector>,
) -> Result<(), MetricsError> {
    names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
    r.register(c)?;
    Ok(())
}

fn counter(
    r: &Registry,
    names: &mut Vec<String>,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    register(r, names, Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    r: &Registry,
    names: &mut Vec<String>,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<HistogramVec, MetricsError> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )?;
    register(r, names, Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// With the default per-device limits (256 devices, evicted after an hour unseen).
    pub fn new(per_device: bool) -> Result<Metrics, MetricsError> {
        Self::with_device_limits(per_device, 256, std::time::Duration::from_secs(3600))
    }

    /// `per_device_max` devices at most have their own series; one unseen for `idle` loses
    /// them, and the least recently seen makes room for a new one. Evictions are counted.
    pub fn with_device_limits(
        per_device: bool,
        per_device_max: usize,
        idle: std::time::Duration,
    ) -> Result<Metrics, MetricsError> {
        let r = Registry::new();
        let mut names = Vec::new();
        let cmd_labels: &[&str] = if per_device {
            &["transport", "outcome", "device_id"]
        } else {
            &["transport", "outcome"]
        };
        let lat_labels: &[&str] = if per_device {
            &["transport", "device_id"]
        } else {
            &["transport"]
        };
        let connections_active = IntGaugeVec::new(
            Opts::new(names::CONNECTIONS_ACTIVE, "Device connections open now"),
            &["transport"],
        )?;
        register(&r, &mut names, Box::new(connections_active.clone()))?;
        let mqtt_connected = IntGauge::new(
            names::MQTT_CONNECTED,
            "1 while the MQTT bridge is connected to the broker",
        )?;
        register(&r, &mut names, Box::new(mqtt_connected.clone()))?;
        let ready = IntGauge::new(names::READY, "1 while /readyz reports ready")?;
        register(&r, &mut names, Box::new(ready.clone()))?;
        let draining = IntGauge::new(names::DRAINING, "1 while shutting down")?;
        register(&r, &mut names, Box::new(draining.clone()))?;
        let queue_bytes = IntGaugeVec::new(
            Opts::new(
                names::QUEUE_BYTES,
                "Bytes queued inside the gateway, summed over connections",
            ),
            &["transport", "direction"],
        )?;
        register(&r, &mut names, Box::new(queue_bytes.clone()))?;
        let canary_percent = prometheus::Gauge::new(
            names::CANARY_PERCENTAGE,
            "Configured share of devices routed to the new path (percent)",
        )?;
        register(&r, &mut names, Box::new(canary_percent.clone()))?;
        let canary_effective_percent = prometheus::Gauge::new(
            names::CANARY_EFFECTIVE_PERCENTAGE,
            "Share of devices routed to the new path now: the configured one, or 0 while the rollback latch is set",
        )?;
        register(&r, &mut names, Box::new(canary_effective_percent.clone()))?;
        let config_restart_required = IntGauge::new(
            names::CONFIG_RESTART_REQUIRED,
            "1 while the config file changes settings that only a restart applies",
        )?;
        register(&r, &mut names, Box::new(config_restart_required.clone()))?;
        let mirror_dropped_bytes = prometheus::IntCounter::new(
            names::MIRROR_DROPPED_BYTES_TOTAL,
            "Dark launch (mirror): bytes of device reads not replayed to the shadow upstream (queue full, or waiting for a frame boundary after that)",
        )?;
        register(&r, &mut names, Box::new(mirror_dropped_bytes.clone()))?;
        let build = IntGaugeVec::new(
            Opts::new(names::BUILD_INFO, "Build information; always 1"),
            &["version"],
        )?;
        register(&r, &mut names, Box::new(build.clone()))?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let device_series_evicted = prometheus::IntCounter::new(
            names::DEVICE_SERIES_EVICTED_TOTAL,
            "Devices whose per-device series were removed (metrics.per_device_max reached, or unseen for metrics.per_device_idle)",
        )?;
        register(&r, &mut names, Box::new(device_series_evicted.clone()))?;
        let http_rejected = prometheus::IntCounter::new(
            names::HTTP_REJECTED_TOTAL,
            "HTTP connections to /metrics, /healthz, /readyz closed at accept because listen.http_max_connections were open",
        )?;
        register(&r, &mut names, Box::new(http_rejected.clone()))?;
        let cap =
            std::num::NonZeroUsize::new(per_device_max).unwrap_or(std::num::NonZeroUsize::MIN);

        let m = Metrics {
            per_device,
            devices: std::sync::Mutex::new(DeviceSeries {
                seen: lru::LruCache::new(cap),
                idle,
                last_sweep: None,
            }),
            device_series_evicted,
            http_rejected,
            connections_active,
            connections_total: counter(
                &r,
                &mut names,
                names::CONNECTIONS_TOTAL,
                "Device connections routed, by path",
                &["transport"],
            )?,
            connections_rejected: counter(
                &r,
                &mut names,
                names::CONNECTIONS_REJECTED_TOTAL,
                "Device connections refused before routing",
                &["reason"],
            )?,
            connection_closes: counter(
                &r,
                &mut names,
                names::CONNECTION_CLOSES_TOTAL,
                "Device connections ended, by why",
                &["transport", "reason"],
            )?,
            bytes: counter(
                &r,
                &mut names,
                names::BYTES_TOTAL,
                "Bytes forwarded",
                &["transport", "direction"],
            )?,
            bytes_hot: Hot::new(),
            packets: counter(
                &r,
                &mut names,
                names::PACKETS_TOTAL,
                "Packets decoded from forwarded traffic",
                &["transport", "direction", "packet_type"],
            )?,
            packets_hot: Hot::new(),
            packet_sent_hot: Hot::new(),
            packet_latency_hot: Hot::new(),
            replies_hot: Hot::new(),
            reply_latency_hot: Hot::new(),
            acks_hot: Hot::new(),
            ack_latency_hot: Hot::new(),
            heartbeats_hot: Hot::new(),
            decode_errors: counter(
                &r,
                &mut names,
                names::DECODE_ERRORS_TOTAL,
                "Frames the decoder rejected (still forwarded on the legacy path)",
                &["transport", "direction", "reason"],
            )?,
            unframed_bytes: counter(
                &r,
                &mut names,
                names::UNFRAMED_BYTES_TOTAL,
                "Bytes that could not be framed (stray bytes, junk headers, frames cut short), forwarded verbatim",
                &["transport", "direction"],
            )?,
            close_dropped_bytes: counter(
                &r,
                &mut names,
                names::CLOSE_DROPPED_BYTES_TOTAL,
                "Bytes read from one side but not delivered to the other because the pair closed",
                &["transport", "direction"],
            )?,
            retries_skipped: counter(
                &r,
                &mut names,
                names::RETRIES_SKIPPED_TOTAL,
                "Command retries that were due but not sent, by why",
                &["transport", "reason"],
            )?,
            routing_decisions: counter(
                &r,
                &mut names,
                names::ROUTING_DECISIONS_TOTAL,
                "Routing decisions, by path and reason",
                &["transport", "reason"],
            )?,
            upstream_connect_errors: counter(
                &r,
                &mut names,
                names::UPSTREAM_CONNECT_ERRORS_TOTAL,
                "Failed upstream connects",
                &["transport", "reason"],
            )?,
            mqtt_connected,
            mqtt_messages: counter(
                &r,
                &mut names,
                names::MQTT_MESSAGES_TOTAL,
                "MQTT messages for the broker, published or dropped",
                &["outcome"],
            )?,
            mqtt_commands: counter(
                &r,
                &mut names,
                names::MQTT_COMMANDS_TOTAL,
                "Commands received over MQTT, by control and result",
                &["command", "result"],
            )?,
            upstream_tls_handshakes: counter(
                &r,
                &mut names,
                names::UPSTREAM_TLS_HANDSHAKES_TOTAL,
                "Completed TLS handshakes with an upstream, full or resumed",
                &["transport", "handshake"],
            )?,
            source_pool_collisions: counter(
                &r,
                &mut names,
                names::SOURCE_POOL_COLLISIONS_TOTAL,
                "Device connections whose preferred source pool address another device held",
                &["transport", "outcome"],
            )?,
            packet_sent: counter(
                &r,
                &mut names,
                names::PACKET_SENT_TOTAL,
                "Commands (srv->dev 0x73 f8) by outcome",
                cmd_labels,
            )?,
            packet_latency: histogram(
                &r,
                &mut names,
                names::PACKET_LATENCY_SECONDS,
                "Command latency: first forward to the device's f9 reply",
                lat_labels,
            )?,
            ack_received: counter(
                &r,
                &mut names,
                names::ACK_RECEIVED_TOTAL,
                "0x7b acknowledgements of srv->dev 0x73, by outcome",
                &["transport", "outcome"],
            )?,
            ack_latency: histogram(
                &r,
                &mut names,
                names::ACK_LATENCY_SECONDS,
                "srv->dev 0x73 to the device's 0x7b",
                &["transport"],
            )?,
            replies: counter(
                &r,
                &mut names,
                names::REPLIES_TOTAL,
                "Request/reply pairs by request type and outcome",
                &["transport", "request_type", "outcome"],
            )?,
            reply_latency: histogram(
                &r,
                &mut names,
                names::REPLY_LATENCY_SECONDS,
                "Request to reply latency by request type",
                &["transport", "request_type"],
            )?,
            heartbeats: counter(
                &r,
                &mut names,
                names::HEARTBEATS_TOTAL,
                "Device heartbeats (0xd3) by outcome",
                &["transport", "outcome"],
            )?,
            retransmits: counter(
                &r,
                &mut names,
                names::PACKET_RETRANSMIT_TOTAL,
                "Commands re-sent to the device because no reply came within ack_timeout",
                &["transport"],
            )?,
            commands_late: counter(
                &r,
                &mut names,
                names::COMMANDS_LATE_TOTAL,
                "Commands that passed slo.latency_threshold unanswered, counted when it passed",
                &["transport"],
            )?,
            idempotent_drops: counter(
                &r,
                &mut names,
                names::IDEMPOTENT_DROPS_TOTAL,
                "Device frames not forwarded because upstream already had one for that command",
                &["transport", "packet_type", "reason"],
            )?,
            queue_full: counter(
                &r,
                &mut names,
                names::QUEUE_FULL_TOTAL,
                "Frames that met a full queue, by what was done about it",
                &["transport", "direction", "action"],
            )?,
            queue_bytes,
            resumptions: counter(
                &r,
                &mut names,
                names::RESUMPTIONS_TOTAL,
                "Upstream connections lost under a live device, by how resuming ended",
                &["transport", "outcome"],
            )?,
            resume_frames: counter(
                &r,
                &mut names,
                names::RESUME_FRAMES_TOTAL,
                "Frames the session handled itself around an upstream resumption",
                &["transport", "action"],
            )?,
            canary_percent,
            canary_effective_percent,
            config_reloads: counter(
                &r,
                &mut names,
                names::CONFIG_RELOADS_TOTAL,
                "Configuration reloads by result",
                &["result"],
            )?,
            config_restart_required,
            rehomes: counter(
                &r,
                &mut names,
                names::REHOMES_TOTAL,
                "Open connections closed so the device redials onto its new path",
                &["from", "to"],
            )?,
            shadow_comparisons: counter(
                &r,
                &mut names,
                names::SHADOW_COMPARISONS_TOTAL,
                "Dark launch (mirror): the shadow upstream's replies compared with the legacy upstream's",
                &["result", "packet_type"],
            )?,
            shadow_lost: counter(
                &r,
                &mut names,
                names::SHADOW_UPSTREAM_LOST_TOTAL,
                "Dark launch (mirror): shadow upstream connections lost, by why",
                &["reason"],
            )?,
            mirror_dropped_bytes,
            ready,
            draining,
            feeds: Feeds::default(),
            slo_sli: gauge(
                &r,
                &mut names,
                names::SLO_SLI,
                "Service level indicator over a window: the good share (churn: closes per device-hour); NaN with no events",
                &["transport", "slo", "window"],
            )?,
            slo_budget: gauge(
                &r,
                &mut names,
                names::SLO_ERROR_BUDGET_REMAINING,
                "Share of the error budget left over the SLO's period, 0-1",
                &["transport", "slo"],
            )?,
            slo_burn: gauge(
                &r,
                &mut names,
                names::SLO_BURN_RATE,
                "Error budget burn rate over a window (1 = spending exactly the budget)",
                &["transport", "slo", "window"],
            )?,
            slo_target: gauge(
                &r,
                &mut names,
                names::SLO_TARGET,
                "Each SLO's target (churn: the most closes per device-hour)",
                &["slo"],
            )?,
            rollback_checks: counter(
                &r,
                &mut names,
                names::ROLLBACK_CHECKS_TOTAL,
                "Rollback controller checks of the new path, by result",
                &["result"],
            )?,
            rollbacks: counter(
                &r,
                &mut names,
                names::ROLLBACKS_TOTAL,
                "Times the rollback latch was set, by reason",
                &["reason"],
            )?,
            rollback_active: {
                let g = IntGauge::new(
                    names::ROLLBACK_ACTIVE,
                    "1 while the rollback latch is set (every device on legacy)",
                )?;
                register(&r, &mut names, Box::new(g.clone()))?;
                g
            },
            tracer: super::trace::Tracer::default(),
            rollout_stage: {
                let g = prometheus::Gauge::new(
                    names::ROLLOUT_STAGE,
                    "The rollout stage reached: the highest of rollout.stages at or below the configured percentage (0 before the first)",
                )?;
                register(&r, &mut names, Box::new(g.clone()))?;
                g
            },
            promotion_ready: {
                let g = IntGauge::new(
                    names::ROLLOUT_PROMOTION_READY,
                    "1 while a promotion is due but the configuration file could not be written",
                )?;
                register(&r, &mut names, Box::new(g.clone()))?;
                g
            },
            state_errors: counter(
                &r,
                &mut names,
                names::STATE_ERRORS_TOTAL,
                "Problems with the files in state_dir, by file and error",
                &["file", "error"],
            )?,
            webhook_deliveries: counter(
                &r,
                &mut names,
                names::WEBHOOK_DELIVERIES_TOTAL,
                "Rollback webhook deliveries, by result",
                &["result"],
            )?,
            audit_entries: counter(
                &r,
                &mut names,
                names::AUDIT_ENTRIES_TOTAL,
                "Entries appended to the audit log, by action",
                &["action"],
            )?,
            registry: r,
            names,
        };
        m.zero_own_series();
        Ok(m)
    }

    /// Every series whose label values this layer knows, created at 0: a counter that first
    /// appears at its first event makes `rate()` and `increase()` miss that event, and a
    /// dashboard or alert that selects it finds nothing to show until then.
    fn zero_own_series(&self) {
        let t = all::<Transport>();
        let dirs = all::<Direction>();
        if !self.per_device {
            cross(&self.packet_sent, &[&t, &all::<CommandOutcome>()]);
            for tr in &t {
                let _ = self.packet_latency.with_label_values(&[tr]);
            }
        }
        cross(&self.connections_total, &[&t]);
        cross(&self.bytes, &[&t, &dirs]);
        cross(&self.unframed_bytes, &[&t, &dirs]);
        cross(&self.close_dropped_bytes, &[&t, &dirs]);
        cross(&self.connections_rejected, &[&all::<Reject>()]);
        cross(
            &self.source_pool_collisions,
            &[&t, &all::<SourceCollision>()],
        );
        cross(&self.upstream_tls_handshakes, &[&t, &all::<TlsHandshake>()]);
        cross(&self.mqtt_messages, &[&all::<MqttMessage>()]);
        cross(
            &self.mqtt_commands,
            &[&all::<MqttCommand>(), &all::<MqttCommandResult>()],
        );
        cross(&self.ack_received, &[&t, &all::<AckOutcome>()]);
        for tr in &t {
            let _ = self.ack_latency.with_label_values(&[tr]);
            let _ = self.connections_active.with_label_values(&[tr]);
        }
        cross(&self.heartbeats, &[&t, &all::<HeartbeatOutcome>()]);
        cross(&self.retransmits, &[&t]);
        cross(&self.commands_late, &[&t]);
        cross(&self.retries_skipped, &[&t, &all::<RetrySkip>()]);
        cross(
            &self.idempotent_drops,
            &[&t, &["0x73", "0x7b"], &all::<DropReason>()],
        );
        // Only the combinations that happen (see QueueAction).
        for (q, a) in [
            (Queue::DevToSrv, QueueAction::Shed),
            (Queue::DevToSrv, QueueAction::Close),
            (Queue::SrvToDev, QueueAction::Reject),
            (Queue::Mirror, QueueAction::Drop),
        ] {
            cross(&self.queue_full, &[&t, &[q.label()], &[a.label()]]);
        }
        cross(&self.resumptions, &[&t, &all::<ResumeOutcome>()]);
        cross(&self.resume_frames, &[&t, &all::<ResumeFrame>()]);
        cross(&self.config_reloads, &[&all::<ReloadResult>()]);
        cross(&self.shadow_lost, &[&all::<ShadowLoss>()]);
        for (from, to) in [
            (Transport::Legacy, Transport::New),
            (Transport::New, Transport::Legacy),
        ] {
            let _ = self.rehomes.with_label_values(&[from.label(), to.label()]);
        }
    }

    /// Creates at 0 the series of a family whose label values a layer above owns (close and
    /// routing reasons, dial errors, decode errors, comparisons, rollback reasons and results,
    /// state problems, webhook results, audit actions): every combination of `values`, one
    /// list per label, in the family's label order; with `per_transport`, the `transport`
    /// label comes first and takes every path. A family not listed here is ignored.
    pub fn zero_series(&self, family: &str, per_transport: bool, values: &[&[&'static str]]) {
        let v = match family {
            names::CONNECTION_CLOSES_TOTAL => &self.connection_closes,
            names::ROUTING_DECISIONS_TOTAL => &self.routing_decisions,
            names::UPSTREAM_CONNECT_ERRORS_TOTAL => &self.upstream_connect_errors,
            names::DECODE_ERRORS_TOTAL => &self.decode_errors,
            names::SHADOW_COMPARISONS_TOTAL => &self.shadow_comparisons,
            names::ROLLBACK_CHECKS_TOTAL => &self.rollback_checks,
            names::ROLLBACKS_TOTAL => &self.rollbacks,
            names::STATE_ERRORS_TOTAL => &self.state_errors,
            names::WEBHOOK_DELIVERIES_TOTAL => &self.webhook_deliveries,
            names::AUDIT_ENTRIES_TOTAL => &self.audit_entries,
            _ => return,
        };
        let t = all::<Transport>();
        let mut lists: Vec<&[&str]> = Vec::new();
        if per_transport {
            lists.push(&t);
        }
        lists.extend_from_slice(values);
        cross(v, &lists);
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The name of every family, rendered yet or not.
    pub fn family_names(&self) -> &[String] {
        &self.names
    }

    /// The text exposition format.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .map_err(|e| MetricsError::Encode(e.to_string()))?;
        String::from_utf8(buf).map_err(|e| MetricsError::Encode(e.to_string()))
    }

    /// Sum of a counter or gauge family's samples whose labels include all of `labels`
    /// (0 when absent). For summaries in the demo and in tests; not for hot paths.
    pub fn total(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.get_name() == name)
            .flat_map(|f| {
                let counter = f.get_field_type() == prometheus::proto::MetricType::COUNTER;
                f.get_metric().iter().map(move |m| (counter, m))
            })
            .filter(|(_, m)| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.get_name() == *k && l.get_value() == *v)
                })
            })
            .map(|(counter, m)| {
                if counter {
                    m.get_counter().get_value()
                } else {
                    m.get_gauge().get_value()
                }
            })
            // An empty f64 sum is -0.0; normalise so it prints as 0.
            .sum::<f64>()
            + 0.0
    }

    /// A connection started on `t`: counted, and active until [`Metrics::connection_ended`].
    pub fn connection_started(&self, t: Transport) {
        self.feeds.path(t).connection(true);
        self.connections_total.with_label_values(&[t.label()]).inc();
        self.connections_active
            .with_label_values(&[t.label()])
            .inc();
    }

    /// Device connections open now on `t` (the exposure the churn SLO integrates).
    pub fn active(&self, t: Transport) -> u64 {
        self.feeds.path(t).active()
    }

    pub fn connection_ended(&self, t: Transport) {
        self.feeds.path(t).connection(false);
        self.connections_active
            .with_label_values(&[t.label()])
            .dec();
    }

    /// A device connection closed before it was routed.
    pub fn rejected(&self, why: Reject) {
        self.connections_rejected
            .with_label_values(&[why.label()])
            .inc();
    }

    /// A connection was routed to `t` for `reason` (a `RouteReason`).
    pub fn routed(&self, t: Transport, reason: impl Label) {
        self.routing_decisions
            .with_label_values(&[t.label(), reason.label()])
            .inc();
    }

    /// A routed connection ended (`reason`: a `CloseReason`).
    pub fn closed(&self, t: Transport, reason: impl Label, requested: bool) {
        if !requested {
            self.feeds.path(t).churn_close();
        }
        self.connection_closes
            .with_label_values(&[t.label(), reason.label()])
            .inc();
    }

    /// A dial of an upstream failed (`reason`: a `DialError`).
    pub fn upstream_connect_error(&self, t: Transport, reason: impl Label) {
        self.upstream_connect_errors
            .with_label_values(&[t.label(), reason.label()])
            .inc();
    }

    pub fn set_mqtt_connected(&self, on: bool) {
        self.mqtt_connected.set(i64::from(on));
    }

    pub fn mqtt_message(&self, outcome: MqttMessage) {
        self.mqtt_messages
            .with_label_values(&[outcome.label()])
            .inc();
    }

    pub fn mqtt_command(&self, command: MqttCommand, result: MqttCommandResult) {
        self.mqtt_commands
            .with_label_values(&[command.label(), result.label()])
            .inc();
    }

    /// A device's preferred pool address was held by another device.
    /// A TLS handshake with an upstream completed (a plaintext connection counts nothing).
    pub fn upstream_tls_handshake(&self, t: Transport, how: TlsHandshake) {
        self.upstream_tls_handshakes
            .with_label_values(&[t.label(), how.label()])
            .inc();
    }

    pub fn source_pool_collision(&self, t: Transport, how: SourceCollision) {
        self.source_pool_collisions
            .with_label_values(&[t.label(), how.label()])
            .inc();
    }

    /// Bytes forwarded (or, for a shadow, observed) in `dir`.
    pub fn bytes(&self, t: Transport, dir: Direction, n: usize) {
        let i = t as usize * DIRECTIONS + dir as usize;
        self.bytes_hot
            .get(i, || {
                self.bytes.with_label_values(&[t.label(), dir.label()])
            })
            .inc_by(n as u64);
    }

    pub fn packet(&self, t: Transport, dir: Direction, ptype: PacketType) {
        self.feeds.path(t).frame();
        let i = (t as usize * DIRECTIONS + dir as usize) * PacketType::ALL.len() + ptype as usize;
        self.packets_hot
            .get(i, || {
                self.packets
                    .with_label_values(&[t.label(), dir.label(), ptype.label()])
            })
            .inc();
    }

    /// A frame the decoder rejected (`e`: a `DecodeError`).
    pub fn decode_error(&self, t: Transport, dir: Direction, e: impl Label) {
        self.feeds.path(t).decode_error();
        self.decode_errors
            .with_label_values(&[t.label(), dir.label(), e.label()])
            .inc();
    }

    /// Bytes that could not be framed: one decode error for the run, and its size.
    pub fn unframed(&self, t: Transport, dir: Direction, bytes: usize, reason: impl Label) {
        self.decode_error(t, dir, reason);
        self.unframed_bytes(t, dir, bytes);
    }

    /// More bytes of an unframed run already counted as one decode error.
    pub fn unframed_bytes(&self, t: Transport, dir: Direction, bytes: usize) {
        self.unframed_bytes
            .with_label_values(&[t.label(), dir.label()])
            .inc_by(bytes as u64);
    }

    /// Bytes lost because the pair closed before they could be delivered.
    pub fn close_dropped(&self, t: Transport, dir: Direction, bytes: usize) {
        if bytes > 0 {
            self.close_dropped_bytes
                .with_label_values(&[t.label(), dir.label()])
                .inc_by(bytes as u64);
        }
    }

    /// A command ended, not counted late before (see [`Metrics::command_ended`]): how tests
    /// feed outcomes; the data path reports through [`Metrics::command_ended`].
    #[cfg(test)]
    pub fn command(
        &self,
        t: Transport,
        outcome: CommandOutcome,
        latency: Option<std::time::Duration>,
        device: Option<DeviceId>,
    ) {
        self.command_ended(t, outcome, latency, device, false);
    }

    /// A command passed `slo.latency_threshold` unanswered: a latency miss now, whatever
    /// comes of it.
    pub fn command_late(&self, t: Transport) {
        self.feeds.path(t).late();
        self.commands_late.with_label_values(&[t.label()]).inc();
    }

    /// A command ended; `counted_late` when [`Metrics::command_late`] already counted it. Every
    /// command is one latency event at most: in time, or late once (a timeout, or an answer
    /// past the threshold that beat the tracker's timer, is late here); an abandoned command
    /// not yet late is neither.
    pub fn command_ended(
        &self,
        t: Transport,
        outcome: CommandOutcome,
        latency: Option<std::time::Duration>,
        device: Option<DeviceId>,
        counted_late: bool,
    ) {
        let success = outcome == CommandOutcome::Success;
        let feed = self.feeds.path(t);
        feed.command(success);
        if !counted_late {
            let threshold = self.feeds.latency_threshold();
            match (outcome, latency) {
                (CommandOutcome::Success, Some(l)) if threshold.within(l) => feed.in_time(),
                (CommandOutcome::Abandoned, _) => {}
                _ => self.command_late(t),
            }
        }
        if self.per_device {
            let dev = device.map(|d| d.to_hex()).unwrap_or_default();
            if let Some(d) = device {
                self.device_seen(d);
            }
            self.packet_sent
                .with_label_values(&[t.label(), outcome.label(), &dev])
                .inc();
            if let Some(l) = latency {
                self.packet_latency
                    .with_label_values(&[t.label(), &dev])
                    .observe(l.as_secs_f64());
            }
        } else {
            self.packet_sent_hot
                .get(t as usize * COMMAND_OUTCOMES + outcome as usize, || {
                    self.packet_sent
                        .with_label_values(&[t.label(), outcome.label()])
                })
                .inc();
            if let Some(l) = latency {
                self.packet_latency_hot
                    .get(t as usize, || {
                        self.packet_latency.with_label_values(&[t.label()])
                    })
                    .observe(l.as_secs_f64());
            }
        }
    }

    /// The `q` quantile (0-1) of `t`'s command latency since start, in seconds, estimated
    /// from the histogram's buckets as PromQL's `histogram_quantile` does (linear within the
    /// bucket); `None` before the first answered command, and with per-device series (the
    /// path's histogram is then split by device).
    pub fn command_quantile(&self, t: Transport, q: f64) -> Option<f64> {
        use prometheus::core::Metric as _;
        if self.per_device {
            return None;
        }
        let h = self
            .packet_latency
            .get_metric_with_label_values(&[t.label()])
            .ok()?
            .metric();
        let h = h.get_histogram();
        let total = h.get_sample_count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut lower = (0.0, 0u64);
        for b in h.get_bucket() {
            let (upper, count) = (b.get_upper_bound(), b.get_cumulative_count());
            if count as f64 >= rank {
                let inside = (count - lower.1) as f64;
                let at = if inside > 0.0 {
                    (rank - lower.1 as f64) / inside
                } else {
                    1.0
                };
                return Some(lower.0 + (upper - lower.0) * at);
            }
            lower = (upper, count);
        }
        // Above the last bound: say the last bound, as histogram_quantile does.
        Some(lower.0)
    }

    /// A device's 0x7b for a server 0x73.
    pub fn ack(&self, t: Transport, outcome: AckOutcome, latency: Option<std::time::Duration>) {
        self.acks_hot
            .get(t as usize * ACK_OUTCOMES + outcome as usize, || {
                self.ack_received
                    .with_label_values(&[t.label(), outcome.label()])
            })
            .inc();
        if let Some(l) = latency {
            self.ack_latency_hot
                .get(t as usize, || {
                    self.ack_latency.with_label_values(&[t.label()])
                })
                .observe(l.as_secs_f64());
        }
    }

    /// A request/reply pair (`request`: its `PacketType`).
    pub fn reply(
        &self,
        t: Transport,
        request: PacketType,
        outcome: ReplyOutcome,
        latency: Option<std::time::Duration>,
    ) {
        let r = t as usize * PacketType::ALL.len() + request as usize;
        self.replies_hot
            .get(r * REPLY_OUTCOMES + outcome as usize, || {
                self.replies
                    .with_label_values(&[t.label(), request.label(), outcome.label()])
            })
            .inc();
        if let Some(l) = latency {
            self.reply_latency_hot
                .get(r, || {
                    self.reply_latency
                        .with_label_values(&[t.label(), request.label()])
                })
                .observe(l.as_secs_f64());
        }
    }

    pub fn heartbeat(&self, t: Transport, outcome: HeartbeatOutcome) {
        self.heartbeats_hot
            .get(t as usize * HEARTBEAT_OUTCOMES + outcome as usize, || {
                self.heartbeats
                    .with_label_values(&[t.label(), outcome.label()])
            })
            .inc();
    }

    /// A command re-sent to the device.
    pub fn retransmit(&self, t: Transport) {
        self.feeds.path(t).retransmit();
        self.retransmits.with_label_values(&[t.label()]).inc();
    }

    /// `n` due retries not sent.
    pub fn retries_skipped(&self, t: Transport, why: RetrySkip, n: u32) {
        if n > 0 {
            self.retries_skipped
                .with_label_values(&[t.label(), why.label()])
                .inc_by(u64::from(n));
        }
    }

    /// A device frame of type `ptype` not forwarded.
    pub fn idempotent_drop(&self, t: Transport, ptype: impl Label, why: DropReason) {
        self.idempotent_drops
            .with_label_values(&[t.label(), ptype.label(), why.label()])
            .inc();
    }

    /// `n` frames met a full `queue` and this was done about them.
    pub fn queue_full(&self, t: Transport, queue: Queue, action: QueueAction, n: usize) {
        self.feeds.path(t).queue_full(n as u64);
        self.queue_full
            .with_label_values(&[t.label(), queue.label(), action.label()])
            .inc_by(n as u64);
    }

    /// The depth gauge of one kind of queue, summed over connections; a queue adds and
    /// removes its own bytes.
    pub fn queue_gauge(&self, t: Transport, queue: Queue) -> IntGauge {
        self.queue_bytes
            .with_label_values(&[t.label(), queue.label()])
    }

    pub fn resumption(&self, t: Transport, outcome: ResumeOutcome) {
        self.resumptions
            .with_label_values(&[t.label(), outcome.label()])
            .inc();
    }

    pub fn resume_frame(&self, t: Transport, action: ResumeFrame) {
        self.resume_frames
            .with_label_values(&[t.label(), action.label()])
            .inc();
    }

    /// The routing gauges: the configured canary percentage and the one in force.
    pub fn canary(&self, configured: f64, effective: f64) {
        self.canary_percent.set(configured);
        self.canary_effective_percent.set(effective);
    }

    pub fn config_reload(&self, result: ReloadResult) {
        self.config_reloads
            .with_label_values(&[result.label()])
            .inc();
    }

    /// Whether the file on disk changes settings only a restart applies.
    pub fn restart_required(&self, needed: bool) {
        self.config_restart_required.set(i64::from(needed));
    }

    /// An open connection asked to close so its device redials onto `to`.
    pub fn rehomed(&self, from: Transport, to: Transport) {
        self.rehomes
            .with_label_values(&[from.label(), to.label()])
            .inc();
    }

    /// One mirror comparison (`result`: a `Comparison`) of a reply of type `ptype`.
    pub fn shadow_comparison(&self, result: impl Label, ptype: impl Label) {
        self.shadow_comparisons
            .with_label_values(&[result.label(), ptype.label()])
            .inc();
    }

    pub fn shadow_lost(&self, why: ShadowLoss) {
        self.shadow_lost.with_label_values(&[why.label()]).inc();
    }

    /// Bytes of a device read the mirror did not replay.
    pub fn mirror_dropped(&self, bytes: usize) {
        self.mirror_dropped_bytes.inc_by(bytes as u64);
    }

    /// An HTTP connection closed at accept (all slots taken).
    pub fn http_rejected(&self) {
        self.http_rejected.inc();
    }

    /// The SLO engine's feed (read by the sampler; the latency threshold set on reload).
    pub fn feeds(&self) -> &Feeds {
        &self.feeds
    }

    /// One SLI over `window` (a label like `5m`).
    pub fn slo_sli(&self, t: Transport, slo: impl Label, window: &str, v: f64) {
        self.slo_sli
            .with_label_values(&[t.label(), slo.label(), window])
            .set(v);
    }

    pub fn slo_budget(&self, t: Transport, slo: impl Label, v: f64) {
        self.slo_budget
            .with_label_values(&[t.label(), slo.label()])
            .set(v);
    }

    pub fn slo_burn(&self, t: Transport, slo: impl Label, window: &str, v: f64) {
        self.slo_burn
            .with_label_values(&[t.label(), slo.label(), window])
            .set(v);
    }

    pub fn slo_target(&self, slo: impl Label, v: f64) {
        self.slo_target.with_label_values(&[slo.label()]).set(v);
    }

    /// One rollback check (`result`: a `CheckResult`).
    pub fn rollback_check(&self, result: impl Label) {
        self.rollback_checks
            .with_label_values(&[result.label()])
            .inc();
    }

    /// The latch was set (`reason`: a `RollbackReason`).
    pub fn rollback(&self, reason: impl Label) {
        self.rollbacks.with_label_values(&[reason.label()]).inc();
    }

    /// Where command events go (logged, and followed by `cync-gateway trace`).
    pub fn tracer(&self) -> &super::trace::Tracer {
        &self.tracer
    }

    pub fn set_rollout_stage(&self, percent: f64) {
        self.rollout_stage.set(percent);
    }

    pub fn set_promotion_ready(&self, ready: bool) {
        self.promotion_ready.set(i64::from(ready));
    }

    pub fn set_rollback_active(&self, on: bool) {
        self.rollback_active.set(i64::from(on));
    }

    /// A problem with a file in `state_dir` (`file`: a `StateFile`, `error`: a `StateProblem`).
    pub fn state_error(&self, file: impl Label, error: impl Label) {
        self.state_errors
            .with_label_values(&[file.label(), error.label()])
            .inc();
    }

    /// A webhook delivery ended (`result`: a `Delivery`'s label).
    pub fn webhook_delivery(&self, result: impl Label) {
        self.webhook_deliveries
            .with_label_values(&[result.label()])
            .inc();
    }

    /// An audit entry written (`action`: its action label).
    pub fn audit_entry(&self, action: &'static str) {
        self.audit_entries.with_label_values(&[action]).inc();
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.set(i64::from(draining));
    }

    /// Keeps `d`'s series within the limits: refreshes it, makes room by evicting the least
    /// recently seen device, and at most once a minute drops devices unseen for too long.
    fn device_seen(&self, d: DeviceId) {
        let now = tokio::time::Instant::now();
        let mut evict = Vec::new();
        {
            let mut ds = self.devices.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((old, _)) = ds.seen.push(d, now) {
                if old != d {
                    evict.push(old);
                }
            }
            let sweep = ds.last_sweep.is_none_or(|t| {
                now.saturating_duration_since(t) >= std::time::Duration::from_secs(60)
            });
            if sweep {
                ds.last_sweep = Some(now);
                let idle = ds.idle;
                while let Some((_, at)) = ds.seen.peek_lru() {
                    if now.saturating_duration_since(*at) < idle {
                        break;
                    }
                    if let Some((old, _)) = ds.seen.pop_lru() {
                        evict.push(old);
                    }
                }
            }
        }
        for old in evict {
            let hex = old.to_hex();
            for t in [Transport::Legacy, Transport::New, Transport::Shadow] {
                for o in [
                    CommandOutcome::Success,
                    CommandOutcome::Timeout,
                    CommandOutcome::Abandoned,
                ] {
                    let _ = self
                        .packet_sent
                        .remove_label_values(&[t.label(), o.label(), &hex]);
                }
                let _ = self.packet_latency.remove_label_values(&[t.label(), &hex]);
            }
            self.device_series_evicted.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_transport_label() {
        let m = Metrics::new(false).expect("metrics");
        m.command(
            Transport::Legacy,
            CommandOutcome::Success,
            Some(std::time::Duration::from_millis(30)),
            None,
        );
        let text = m.render().expect("render");
        assert!(
            text.contains("tcp_comm_packet_sent_total{outcome=\"success\",transport=\"legacy\"} 1"),
            "{text}"
        );
        assert!(text
            .contains("tcp_comm_packet_latency_seconds_bucket{transport=\"legacy\",le=\"0.8\"} 1"));
        assert!(text.contains("le=\"1.5\""));
    }

    #[test]
    fn per_device_adds_device_label() {
        let m = Metrics::new(true).expect("metrics");
        m.command(
            Transport::New,
            CommandOutcome::Timeout,
            None,
            Some(DeviceId([0x38, 0xe8, 0xcf, 0x46])),
        );
        let text = m.render().expect("render");
        assert!(text.contains("device_id=\"38e8cf46\""), "{text}");
    }

    #[test]
    fn every_byte_and_packet_series_counts_apart_and_appears_only_once_counted() {
        use strum::IntoEnumIterator;
        assert_eq!(Transport::iter().count(), TRANSPORTS);
        assert_eq!(Direction::iter().count(), DIRECTIONS);
        let m = Metrics::new(false).expect("metrics");
        let before = m.render().expect("render");
        assert!(!before.contains("tcp_comm_packets_total{"), "{before}");
        // Each combination counted a different number of times, so two combinations sharing
        // a slot would show up as a wrong count.
        let mut n = 0u64;
        let mut want = Vec::new();
        for t in Transport::iter() {
            for d in Direction::iter() {
                for p in PacketType::ALL {
                    n += 1;
                    for _ in 0..n {
                        m.packet(t, d, p);
                    }
                    want.push(format!(
                        "tcp_comm_packets_total{{direction=\"{}\",packet_type=\"{}\",transport=\"{}\"}} {n}",
                        d.label(),
                        p.label(),
                        t.label()
                    ));
                }
                m.bytes(t, d, n as usize);
                want.push(format!(
                    "tcp_comm_bytes_total{{direction=\"{}\",transport=\"{}\"}} {n}",
                    d.label(),
                    t.label()
                ));
            }
        }
        let text = m.render().expect("render");
        for w in want {
            assert!(text.lines().any(|l| l == w), "missing {w}");
        }
    }
}

#[cfg(test)]
mod device_series_tests {
    use super::*;

    fn series(m: &Metrics) -> usize {
        m.render()
            .expect("render")
            .lines()
            .filter(|l| l.starts_with("tcp_comm_packet_sent_total{"))
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn per_device_series_are_capped_and_idle_ones_evicted() {
        let m = Metrics::with_device_limits(true, 10, std::time::Duration::from_secs(3600))
            .expect("metrics");
        // 150 made-up device ids: at most 10 devices keep series.
        for i in 0..150u32 {
            m.command(
                Transport::Legacy,
                CommandOutcome::Success,
                None,
                Some(DeviceId(i.to_be_bytes())),
            );
        }
        assert_eq!(series(&m), 10);
        assert_eq!(m.device_series_evicted.get(), 140);
        // An hour later the sweep drops the idle ones when another device records.
        tokio::time::advance(std::time::Duration::from_secs(3601)).await;
        m.command(
            Transport::New,
            CommandOutcome::Success,
            None,
            Some(DeviceId([9, 9, 9, 9])),
        );
        assert_eq!(series(&m), 1);
        assert_eq!(m.device_series_evicted.get(), 150);
    }
}
