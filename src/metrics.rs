//! Prometheus metrics: one [`Metrics`] struct on its own [`Registry`], passed to whoever records.
//!
//! Names keep the seed project's `tcp_comm_` prefix so the original SLO queries keep working
//! (design decision 13); every family that describes traffic carries a `transport` label
//! (`legacy`, `new`, `shadow`). `docs/metrics.md` lists every family.
//!
//! Invariants:
//! - No globals: tests build as many independent `Metrics` as they like.
//! - A `device_id` label exists only when `metrics.per_device = true`, and only on the command
//!   families, because per-device series do not scale to fleets of thousands.
//! - Recording never fails: label sets are fixed here, so `with_label_values` cannot panic on
//!   arity; family registration errors surface once, at construction.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use thiserror::Error;

use crate::protocol::{DecodeError, DeviceId, PacketType};
use crate::transactions::{CommandOutcome, Direction, Event, ReplyOutcome};

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("registering metric family: {0}")]
    Register(#[from] prometheus::Error),
    #[error("encoding metrics: {0}")]
    Encode(String),
}

/// The path a connection takes; the `transport` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Legacy,
    New,
    Shadow,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::New => "new",
            Self::Shadow => "shadow",
        }
    }
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

pub struct Metrics {
    registry: Registry,
    /// Every family registered, whether or not it has series yet.
    names: Vec<String>,
    per_device: bool,
    devices: std::sync::Mutex<DeviceSeries>,
    pub device_series_evicted: prometheus::IntCounter,
    pub http_rejected: prometheus::IntCounter,
    pub connections_active: IntGaugeVec,
    pub connections_total: IntCounterVec,
    pub connections_rejected: IntCounterVec,
    pub connection_closes: IntCounterVec,
    pub bytes: IntCounterVec,
    pub packets: IntCounterVec,
    pub decode_errors: IntCounterVec,
    pub unframed_bytes: IntCounterVec,
    pub close_dropped_bytes: IntCounterVec,
    pub retries_skipped: IntCounterVec,
    pub routing_decisions: IntCounterVec,
    pub upstream_connect_errors: IntCounterVec,
    packet_sent: IntCounterVec,
    packet_latency: HistogramVec,
    pub ack_received: IntCounterVec,
    pub ack_latency: HistogramVec,
    pub replies: IntCounterVec,
    pub reply_latency: HistogramVec,
    pub heartbeats: IntCounterVec,
    pub retransmits: IntCounterVec,
    pub idempotent_drops: IntCounterVec,
    pub queue_full: IntCounterVec,
    pub queue_bytes: IntGaugeVec,
    pub resumptions: IntCounterVec,
    pub resume_frames: IntCounterVec,
    pub canary_percent: prometheus::Gauge,
    pub canary_effective_percent: prometheus::Gauge,
    pub config_reloads: IntCounterVec,
    pub config_restart_required: IntGauge,
    pub rehomes: IntCounterVec,
    pub shadow_comparisons: IntCounterVec,
    pub shadow_lost: IntCounterVec,
    pub mirror_dropped_bytes: prometheus::IntCounter,
    pub ready: IntGauge,
    pub draining: IntGauge,
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
            Opts::new("tcp_comm_connections_active", "Device connections open now"),
            &["transport"],
        )?;
        register(&r, &mut names, Box::new(connections_active.clone()))?;
        let ready = IntGauge::new("tcp_comm_ready", "1 while /readyz reports ready")?;
        register(&r, &mut names, Box::new(ready.clone()))?;
        let draining = IntGauge::new("tcp_comm_draining", "1 while shutting down")?;
        register(&r, &mut names, Box::new(draining.clone()))?;
        let queue_bytes = IntGaugeVec::new(
            Opts::new(
                "tcp_comm_queue_bytes",
                "Bytes queued inside the gateway, summed over connections",
            ),
            &["transport", "direction"],
        )?;
        register(&r, &mut names, Box::new(queue_bytes.clone()))?;
        let canary_percent = prometheus::Gauge::new(
            "tcp_comm_canary_percentage",
            "Configured share of devices routed to the new path (percent)",
        )?;
        register(&r, &mut names, Box::new(canary_percent.clone()))?;
        let canary_effective_percent = prometheus::Gauge::new(
            "tcp_comm_canary_effective_percentage",
            "Share of devices routed to the new path now: the configured one, or 0 while the rollback latch is set",
        )?;
        register(&r, &mut names, Box::new(canary_effective_percent.clone()))?;
        let config_restart_required = IntGauge::new(
            "tcp_comm_config_restart_required",
            "1 while the config file changes settings that only a restart applies",
        )?;
        register(&r, &mut names, Box::new(config_restart_required.clone()))?;
        let mirror_dropped_bytes = prometheus::IntCounter::new(
            "tcp_comm_mirror_dropped_bytes_total",
            "Dark launch (mirror): bytes of device reads not replayed to the shadow upstream (queue full, or waiting for a frame boundary after that)",
        )?;
        register(&r, &mut names, Box::new(mirror_dropped_bytes.clone()))?;
        let build = IntGaugeVec::new(
            Opts::new("tcp_comm_build_info", "Build information; always 1"),
            &["version"],
        )?;
        register(&r, &mut names, Box::new(build.clone()))?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let device_series_evicted = prometheus::IntCounter::new(
            "tcp_comm_device_series_evicted_total",
            "Devices whose per-device series were removed (metrics.per_device_max reached, or unseen for metrics.per_device_idle)",
        )?;
        register(&r, &mut names, Box::new(device_series_evicted.clone()))?;
        let http_rejected = prometheus::IntCounter::new(
            "tcp_comm_http_rejected_total",
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
                "tcp_comm_connections_total",
                "Device connections routed, by path",
                &["transport"],
            )?,
            connections_rejected: counter(
                &r,
                &mut names,
                "tcp_comm_connections_rejected_total",
                "Device connections refused before routing",
                &["reason"],
            )?,
            connection_closes: counter(
                &r,
                &mut names,
                "tcp_comm_connection_closes_total",
                "Device connections ended, by why",
                &["transport", "reason"],
            )?,
            bytes: counter(
                &r,
                &mut names,
                "tcp_comm_bytes_total",
                "Bytes forwarded",
                &["transport", "direction"],
            )?,
            packets: counter(
                &r,
                &mut names,
                "tcp_comm_packets_total",
                "Packets decoded from forwarded traffic",
                &["transport", "direction", "packet_type"],
            )?,
            decode_errors: counter(
                &r,
                &mut names,
                "tcp_comm_decode_errors_total",
                "Frames the decoder rejected (still forwarded on the legacy path)",
                &["transport", "direction", "reason"],
            )?,
            unframed_bytes: counter(
                &r,
                &mut names,
                "tcp_comm_unframed_bytes_total",
                "Bytes that could not be framed (stray bytes, junk headers, frames cut short), forwarded verbatim",
                &["transport", "direction"],
            )?,
            close_dropped_bytes: counter(
                &r,
                &mut names,
                "tcp_comm_close_dropped_bytes_total",
                "Bytes read from one side but not delivered to the other because the pair closed",
                &["transport", "direction"],
            )?,
            retries_skipped: counter(
                &r,
                &mut names,
                "tcp_comm_retries_skipped_total",
                "Command retries that were due but not sent, by why",
                &["transport", "reason"],
            )?,
            routing_decisions: counter(
                &r,
                &mut names,
                "tcp_comm_routing_decisions_total",
                "Routing decisions, by path and reason",
                &["transport", "reason"],
            )?,
            upstream_connect_errors: counter(
                &r,
                &mut names,
                "tcp_comm_upstream_connect_errors_total",
                "Failed upstream connects",
                &["transport", "reason"],
            )?,
            packet_sent: counter(
                &r,
                &mut names,
                "tcp_comm_packet_sent_total",
                "Commands (srv->dev 0x73 f8) by outcome",
                cmd_labels,
            )?,
            packet_latency: histogram(
                &r,
                &mut names,
                "tcp_comm_packet_latency_seconds",
                "Command latency: first forward to the device's f9 reply",
                lat_labels,
            )?,
            ack_received: counter(
                &r,
                &mut names,
                "tcp_comm_ack_received_total",
                "0x7b acknowledgements of srv->dev 0x73, by outcome",
                &["transport", "outcome"],
            )?,
            ack_latency: histogram(
                &r,
                &mut names,
                "tcp_comm_ack_latency_seconds",
                "srv->dev 0x73 to the device's 0x7b",
                &["transport"],
            )?,
            replies: counter(
                &r,
                &mut names,
                "tcp_comm_replies_total",
                "Request/reply pairs by request type and outcome",
                &["transport", "request_type", "outcome"],
            )?,
            reply_latency: histogram(
                &r,
                &mut names,
                "tcp_comm_reply_latency_seconds",
                "Request to reply latency by request type",
                &["transport", "request_type"],
            )?,
            heartbeats: counter(
                &r,
                &mut names,
                "tcp_comm_heartbeats_total",
                "Device heartbeats (0xd3) by outcome",
                &["transport", "outcome"],
            )?,
            retransmits: counter(
                &r,
                &mut names,
                "tcp_comm_packet_retransmit_total",
                "Commands re-sent to the device because no reply came within ack_timeout",
                &["transport"],
            )?,
            idempotent_drops: counter(
                &r,
                &mut names,
                "tcp_comm_idempotent_drops_total",
                "Device frames not forwarded because upstream already had one for that command",
                &["transport", "packet_type", "reason"],
            )?,
            queue_full: counter(
                &r,
                &mut names,
                "tcp_comm_queue_full_total",
                "Frames that met a full queue, by what was done about it",
                &["transport", "direction", "action"],
            )?,
            queue_bytes,
            resumptions: counter(
                &r,
                &mut names,
                "tcp_comm_resumptions_total",
                "Upstream connections lost under a live device, by how resuming ended",
                &["transport", "outcome"],
            )?,
            resume_frames: counter(
                &r,
                &mut names,
                "tcp_comm_resume_frames_total",
                "Frames the session handled itself around an upstream resumption",
                &["transport", "action"],
            )?,
            canary_percent,
            canary_effective_percent,
            config_reloads: counter(
                &r,
                &mut names,
                "tcp_comm_config_reloads_total",
                "Configuration reloads by result",
                &["result"],
            )?,
            config_restart_required,
            rehomes: counter(
                &r,
                &mut names,
                "tcp_comm_rehomes_total",
                "Open connections closed so the device redials onto its new path",
                &["from", "to"],
            )?,
            shadow_comparisons: counter(
                &r,
                &mut names,
                "tcp_comm_shadow_comparisons_total",
                "Dark launch (mirror): the shadow upstream's replies compared with the legacy upstream's",
                &["result", "packet_type"],
            )?,
            shadow_lost: counter(
                &r,
                &mut names,
                "tcp_comm_shadow_upstream_lost_total",
                "Dark launch (mirror): shadow upstream connections lost, by why",
                &["reason"],
            )?,
            mirror_dropped_bytes,
            ready,
            draining,
            registry: r,
            names,
        };
        Ok(m)
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
        self.connections_total.with_label_values(&[t.label()]).inc();
        self.connections_active
            .with_label_values(&[t.label()])
            .inc();
    }

    pub fn connection_ended(&self, t: Transport) {
        self.connections_active
            .with_label_values(&[t.label()])
            .dec();
    }

    pub fn packet(&self, t: Transport, dir: Direction, ptype: PacketType) {
        self.packets
            .with_label_values(&[t.label(), dir.label(), ptype.label()])
            .inc();
    }

    pub fn decode_error(&self, t: Transport, dir: Direction, e: &DecodeError) {
        self.decode_errors
            .with_label_values(&[t.label(), dir.label(), e.reason()])
            .inc();
    }

    /// Bytes that could not be framed: one decode error for the run, and its size.
    pub fn unframed(&self, t: Transport, dir: Direction, bytes: usize, reason: &DecodeError) {
        self.decode_error(t, dir, reason);
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

    pub fn command(
        &self,
        t: Transport,
        outcome: CommandOutcome,
        latency: Option<std::time::Duration>,
        device: Option<DeviceId>,
    ) {
        let dev = device.map(|d| d.to_hex()).unwrap_or_default();
        if self.per_device {
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
            self.packet_sent
                .with_label_values(&[t.label(), outcome.label()])
                .inc();
            if let Some(l) = latency {
                self.packet_latency
                    .with_label_values(&[t.label()])
                    .observe(l.as_secs_f64());
            }
        }
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
            let sweep = ds.last_sweep.map_or(true, |t| {
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

    /// Records what a [`crate::transactions::Tracker`] concluded.
    pub fn record(&self, t: Transport, device: Option<DeviceId>, events: &[Event]) {
        for e in events {
            match e {
                Event::Command {
                    outcome, latency, ..
                } => self.command(t, *outcome, *latency, device),
                Event::Reply {
                    request,
                    outcome,
                    latency,
                } => {
                    if *request == PacketType::Data {
                        let label = match outcome {
                            ReplyOutcome::Matched | ReplyOutcome::Local => "received",
                            ReplyOutcome::Timeout => "timeout",
                            ReplyOutcome::Unmatched => "unmatched",
                        };
                        self.ack_received
                            .with_label_values(&[t.label(), label])
                            .inc();
                        if let Some(l) = latency {
                            self.ack_latency
                                .with_label_values(&[t.label()])
                                .observe(l.as_secs_f64());
                        }
                        continue;
                    }
                    self.replies
                        .with_label_values(&[t.label(), request.label(), outcome.label()])
                        .inc();
                    if let Some(l) = latency {
                        self.reply_latency
                            .with_label_values(&[t.label(), request.label()])
                            .observe(l.as_secs_f64());
                    }
                    if *request == PacketType::Heartbeat {
                        let label = match outcome {
                            ReplyOutcome::Matched => "acked",
                            ReplyOutcome::Local => "local",
                            ReplyOutcome::Timeout => "missed",
                            ReplyOutcome::Unmatched => "unmatched",
                        };
                        self.heartbeats.with_label_values(&[t.label(), label]).inc();
                    }
                }
            }
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
