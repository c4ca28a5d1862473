//! The metric series whose label values the layers above telemetry own (close and routing
//! reasons, dial and decode errors, shadow comparisons, the controller's results and reasons,
//! state problems, webhook results, audit actions), created at 0 when the gateway starts.
//!
//! Why: a counter series that first appears at its first event makes `rate()` and
//! `increase()` blind to that event, and a dashboard panel or an alert that selects it has
//! nothing to show until it happens. Telemetry zeroes the families whose labels it owns
//! itself ([`Metrics::new`]).
//!
//! Invariant: every value listed comes from the enum that labels the series (strum), never a
//! hand-written spelling, except the audit actions, which are the control task's own words.

use strum::{IntoEnumIterator, VariantNames};

use super::apply::{WebhookQueue, AUDIT_ACTIONS};
use super::judge::CheckResult;
use super::slo_task::{StateFile, StateProblem};
use super::RollbackCause;
use crate::conn::close::CloseReason;
use crate::conn::shadow::compare::{Comparator, Comparison};
use crate::conn::upstream::DialError;
use crate::conn::RouteReason;
use crate::protocol::{DecodeError, PacketType};
use crate::telemetry::labels::Label;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::names;

fn all<T: Label + IntoEnumIterator>() -> Vec<&'static str> {
    T::iter().map(Label::label).collect()
}

/// Creates every series listed above at 0.
pub fn zero(m: &Metrics) {
    m.zero_series(
        names::CONNECTION_CLOSES_TOTAL,
        true,
        &[&all::<CloseReason>()],
    );
    m.zero_series(
        names::ROUTING_DECISIONS_TOTAL,
        true,
        &[&all::<RouteReason>()],
    );
    m.zero_series(
        names::UPSTREAM_CONNECT_ERRORS_TOTAL,
        true,
        &[DialError::VARIANTS],
    );
    m.zero_series(
        names::DECODE_ERRORS_TOTAL,
        true,
        &[&["dev_to_srv", "srv_to_dev"], DecodeError::REASONS],
    );
    let replies: Vec<&'static str> = PacketType::ALL
        .into_iter()
        .filter(|t| Comparator::compared(*t))
        .map(Label::label)
        .collect();
    m.zero_series(
        names::SHADOW_COMPARISONS_TOTAL,
        false,
        &[&all::<Comparison>(), &replies],
    );
    m.zero_series(
        names::ROLLBACK_CHECKS_TOTAL,
        false,
        &[&all::<CheckResult>()],
    );
    m.zero_series(names::ROLLBACKS_TOTAL, false, &[&all::<RollbackCause>()]);
    m.zero_series(
        names::STATE_ERRORS_TOTAL,
        false,
        &[&all::<StateFile>(), &all::<StateProblem>()],
    );
    let mut webhook: Vec<&'static str> = crate::control::webhook::Delivery::VARIANTS.to_vec();
    webhook.extend(all::<WebhookQueue>());
    m.zero_series(names::WEBHOOK_DELIVERIES_TOTAL, false, &[&webhook]);
    m.zero_series(names::AUDIT_ENTRIES_TOTAL, false, &[AUDIT_ACTIONS]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_a_dashboard_or_alert_selects_has_its_series_before_any_event() {
        let m = Metrics::new(false).expect("metrics");
        zero(&m);
        let page = m.render().expect("render");
        for series in [
            r#"tcp_comm_packet_sent_total{outcome="timeout",transport="new"} 0"#,
            r#"tcp_comm_packet_latency_seconds_count{transport="legacy"} 0"#,
            r#"tcp_comm_connection_closes_total{reason="rehomed",transport="new"} 0"#,
            r#"tcp_comm_routing_decisions_total{reason="rollback",transport="legacy"} 0"#,
            r#"tcp_comm_upstream_connect_errors_total{reason="tls",transport="shadow"} 0"#,
            r#"tcp_comm_decode_errors_total{direction="srv_to_dev",reason="checksum_mismatch",transport="new"} 0"#,
            r#"tcp_comm_shadow_comparisons_total{packet_type="0x78",result="mismatch"} 0"#,
            r#"tcp_comm_rollback_checks_total{result="inconclusive"} 0"#,
            r#"tcp_comm_rollbacks_total{reason="operator"} 0"#,
            r#"tcp_comm_state_errors_total{error="write",file="latch"} 0"#,
            r#"tcp_comm_webhook_deliveries_total{result="dropped"} 0"#,
            r#"tcp_comm_webhook_deliveries_total{result="failed"} 0"#,
            r#"tcp_comm_audit_entries_total{action="resume"} 0"#,
            r#"tcp_comm_queue_full_total{action="reject",direction="srv_to_dev",transport="new"} 0"#,
            r#"tcp_comm_resumptions_total{outcome="mid_frame",transport="new"} 0"#,
            r#"tcp_comm_rehomes_total{from="new",to="legacy"} 0"#,
            r#"tcp_comm_config_reloads_total{result="error"} 0"#,
        ] {
            assert!(
                page.lines().any(|l| l == series),
                "missing before any event: {series}"
            );
        }
        // Only the queue/action pairs that can happen.
        assert!(!page.contains(r#"action="shed",direction="srv_to_dev""#));
    }

    #[test]
    fn per_device_series_are_not_invented() {
        let m = Metrics::new(true).expect("metrics");
        zero(&m);
        let page = m.render().expect("render");
        assert!(!page.contains("tcp_comm_packet_sent_total{"), "{page}");
    }
}
