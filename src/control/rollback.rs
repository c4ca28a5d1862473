//! The rollback controller: every `rollback.check_interval` it judges the new path against
//! legacy over `rollback.window` ([`super::judge`]), and after `rollback.max_violations`
//! failed checks in a row it asks the control task to set the latch.
//!
//! Invariants:
//! - It only sends: the latch, its file, the audit entry, the re-homing and the webhook all
//!   follow from the one [`Control::Rollback`] event the control task applies.
//! - A streak is consecutive *conclusive* failures: a pass resets it, and so does an
//!   inconclusive check (too few commands), so thin traffic can never add up to a rollback.
//! - While the latch is set, or with `rollback.enabled = false`, nothing is judged (the new
//!   path has no traffic to judge) and the streak is zero.
//! - Reads its settings from the configuration in force at every check: `[rollback]` is
//!   reloadable.

use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::event::{Control, ControlTx, Origin, RollbackCause};
use super::judge::{self, Check, CheckResult, Rules, Verdict};
use super::live::Live;
use super::slo_task::SloService;
use crate::config::Config;
use crate::telemetry::labels::{Label, Transport};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::slo::Slo;

/// The judge's rules from the configuration in force.
pub fn rules(cfg: &Config) -> Rules {
    let r = &cfg.rollback;
    Rules {
        min_events: r.min_events,
        success_floor: r.success_floor,
        latency_floor: r.latency_floor,
        decode_error_max: cfg.slo.decode_error_max,
        queue_full_max: cfg.slo.queue_full_max,
        max_burn_rate: r.max_burn_rate,
        success_target: cfg.slo.success_target,
        compare_to_legacy: r.compare_to_legacy,
        confidence: r.confidence,
    }
}

/// The last check, for `status` and the tests.
#[derive(Debug, Clone)]
pub struct LastCheck {
    pub at: String,
    pub verdict: Verdict,
    /// Consecutive failures including this check.
    pub streak: u32,
}

/// Shared view of the controller's last check.
pub type LastCheckCell = Arc<Mutex<Option<LastCheck>>>;

pub struct Controller {
    slo: Arc<SloService>,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    control: ControlTx,
    streak: u32,
    last: LastCheckCell,
}

/// Which counted finding names the rollback: the first one, in the judge's order.
fn cause(v: &Verdict) -> RollbackCause {
    let first = v.findings.iter().find(|f| f.counted);
    match first.map(|f| (f.slo, f.check)) {
        Some((_, Check::Burn)) => RollbackCause::BurnRate,
        Some((Slo::Latency, _)) => RollbackCause::Latency,
        Some((Slo::DecodeErrors, _)) => RollbackCause::DecodeErrors,
        Some((Slo::QueueFull, _)) => RollbackCause::QueueFull,
        _ => RollbackCause::Success,
    }
}

impl Controller {
    pub fn new(
        slo: Arc<SloService>,
        live: Arc<Live>,
        metrics: Arc<Metrics>,
        control: ControlTx,
    ) -> Controller {
        Controller {
            slo,
            live,
            metrics,
            control,
            streak: 0,
            last: Arc::default(),
        }
    }

    /// The cell the last check is kept in.
    pub fn last_check(&self) -> LastCheckCell {
        self.last.clone()
    }

    /// One check at `now`: the event to send, if this check completes a streak.
    pub fn check(&mut self, now: Instant) -> Option<Control> {
        let cfg = self.live.config();
        if !cfg.rollback.enabled || self.live.latched() {
            self.streak = 0;
            return None;
        }
        self.slo.observe(now);
        let window = cfg.rollback.window;
        let new = self.slo.window(now, Transport::New, window);
        let legacy = self.slo.window(now, Transport::Legacy, window);
        let verdict = judge::judge(&new, &legacy, &rules(&cfg));
        self.metrics.rollback_check(verdict.result);
        self.streak = match verdict.result {
            CheckResult::Fail => self.streak + 1,
            CheckResult::Pass | CheckResult::Inconclusive => 0,
        };
        let streak = self.streak;
        match verdict.result {
            CheckResult::Fail => warn!(
                streak,
                max_violations = cfg.rollback.max_violations,
                verdict = %verdict,
                "rollback check failed"
            ),
            CheckResult::Pass => info!(verdict = %verdict, "rollback check passed"),
            CheckResult::Inconclusive => info!(verdict = %verdict, "rollback check inconclusive"),
        }
        let event = (streak >= cfg.rollback.max_violations).then(|| {
            let cause = cause(&verdict);
            let reason = format!(
                "{} failed rollback checks in a row over {}: {verdict}",
                streak,
                humantime::format_duration(window)
            );
            error!(
                cause = cause.label(),
                slo = %self.slo.snapshot(now, window),
                reason,
                "rolling back: every device goes to legacy"
            );
            self.streak = 0;
            Control::Rollback {
                origin: Origin::Controller,
                cause,
                reason,
            }
        });
        if let Ok(mut cell) = self.last.lock() {
            *cell = Some(LastCheck {
                at: self.slo.clock().rfc3339(now),
                verdict,
                streak,
            });
        }
        event
    }

    /// Checks every `rollback.check_interval` until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let every = self.live.config().rollback.check_interval;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Some(event) = self.check(Instant::now()) {
                if self.control.send(event).await.is_err() {
                    return;
                }
            }
        }
    }
}
