//! The control task: the single writer of the configuration in force and the rollback latch.
//! It takes [`Control`] events off the one channel, in order, and applies each.
//!
//! Invariants:
//! - Nothing else writes [`Live`]: its writers are private to the control plane, and only this
//!   task calls them. Re-homing follows from the change (it watches [`Live`]), not from the
//!   event.
//! - A file poll's change is applied only after it has settled ([`reload::SETTLE`]); while a
//!   settle is pending further polls are ignored (the settle check reads the file anyway),
//!   while a reload of any other origin is applied at once.
//! - A reload requested when no configuration file is known is refused and logged, never a
//!   silent no-op.
//! - Every routing change it applies is audited (an unchanged reload writes nothing), and a
//!   latch change is on disk before the next event is taken: the latch file first, then the
//!   audit entry. The webhook is only queued here ([`Notifier::notify`] never waits), so a dead
//!   webhook cannot delay a rollback.
//! - Setting a latch that is set, or clearing one that is clear, changes nothing and writes
//!   nothing.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use serde_json::{json, Value};

use super::audit::{AuditLog, Change, Entry};
use super::event::{Control, ControlRx, Origin, RollbackCause};
use super::latch;
use super::live::Live;
use super::reload::{self, Outcome, Reloader, Trigger};
use super::router;
use super::slo_task::{SloService, StateFile, StateProblem};
use super::state::{LatchFile, LATCH_VERSION};
use super::webhook::Notifier;
use crate::telemetry::labels::Label;
use crate::telemetry::metrics::Metrics;

/// What a change leaves behind besides the change itself: the latch file, the audit log, the
/// webhook. Tests that only route may run without them.
pub struct Effects {
    pub slo: Arc<SloService>,
    pub audit: AuditLog,
    pub notifier: Option<Notifier>,
    /// Names this gateway in webhook bodies (the host name).
    pub instance: String,
}

/// The audit log's `actor` for an origin.
fn actor(o: Origin) -> &'static str {
    match o {
        Origin::Signal => "signal",
        Origin::FilePoll => "file",
        Origin::Operator => "admin",
        Origin::Controller => "controller",
    }
}

/// The control task's state.
pub struct ControlTask {
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    /// The file the configuration came from; `None` when it was given in memory.
    reloader: Option<Reloader>,
    /// A polled change seen once, to be checked again at this instant.
    settle: Option<Instant>,
    effects: Option<Effects>,
}

impl ControlTask {
    pub fn new(live: Arc<Live>, metrics: Arc<Metrics>, reloader: Option<Reloader>) -> Self {
        Self {
            live,
            metrics,
            reloader,
            settle: None,
            effects: None,
        }
    }

    /// Persists, audits and notifies what it applies.
    pub fn with_effects(mut self, effects: Effects) -> Self {
        self.effects = Some(effects);
        self
    }

    /// Applies events until shutdown or until every sender is gone.
    pub async fn run(mut self, mut rx: ControlRx, shutdown: CancellationToken) {
        loop {
            let settle = self.settle;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(settle.unwrap_or_else(Instant::now)), if settle.is_some() => {
                    self.settle = None;
                    self.reload(Trigger::Poll, Origin::FilePoll).await;
                }
                event = rx.recv() => match event {
                    Some(event) => self.apply(event).await,
                    None => return,
                },
            }
        }
    }

    /// Applies one event.
    pub async fn apply(&mut self, event: Control) {
        match event {
            Control::Reload {
                origin: Origin::FilePoll,
            } => {
                if self.settle.is_none() {
                    self.reload(Trigger::Poll, Origin::FilePoll).await;
                }
            }
            Control::Reload { origin } => {
                info!(origin = origin.label(), "reloading the configuration");
                self.reload(Trigger::Signal, origin).await;
            }
            Control::Rollback {
                origin,
                cause,
                reason,
            } => self.latch(true, origin, Some(cause), reason).await,
            Control::Resume { origin } => {
                self.latch(false, origin, None, "resumed by an operator".into())
                    .await
            }
        }
    }

    async fn reload(&mut self, trigger: Trigger, origin: Origin) {
        let Some(reloader) = self.reloader.as_mut() else {
            warn!("reload requested, but this gateway was not started from a configuration file");
            return;
        };
        match reloader.check(trigger).await {
            Outcome::Settling => self.settle = Some(Instant::now() + reload::SETTLE),
            Outcome::Applied { changes, .. } if !changes.is_empty() => {
                self.audit(origin, "reload", changes, String::new()).await;
            }
            _ => {}
        }
    }

    /// Sets or clears the latch, then writes its file and the audit entry and queues the
    /// webhook.
    async fn latch(
        &mut self,
        on: bool,
        origin: Origin,
        cause: Option<RollbackCause>,
        reason: String,
    ) {
        if self.live.latched() == on {
            info!(
                origin = origin.label(),
                latched = on,
                "rollback latch already in that state; nothing to do"
            );
            return;
        }
        let before = router::effective_percent(&self.live.config().routing, !on);
        self.live.set_latch(on);
        reload::publish(&self.metrics, &self.live);
        self.metrics.set_rollback_active(on);
        if on {
            warn!(
                origin = origin.label(),
                reason, "rollback latch set: every device routes to legacy"
            );
            self.metrics
                .rollback(cause.unwrap_or(RollbackCause::Operator));
        } else {
            info!(
                origin = origin.label(),
                "rollback latch cleared: the configured percentage is in force"
            );
        }
        let Some(fx) = &self.effects else { return };
        let now = Instant::now();
        let at = fx.slo.clock().rfc3339(now);
        let file = LatchFile {
            version: LATCH_VERSION,
            latched: on,
            reason: reason.clone(),
            actor: actor(origin).into(),
            at: at.clone(),
        };
        if let Err(e) = latch::save(fx.slo.dir(), file).await {
            error!(error = %e, "cannot write the latch file: the latch holds in memory, but a restart would not keep it");
            self.metrics
                .state_error(StateFile::Latch, StateProblem::Write);
        }
        let after = router::effective_percent(&self.live.config().routing, on);
        let changes = vec![
            Change {
                key: "rollback.latched".into(),
                old: json!(!on),
                new: json!(on),
            },
            Change {
                key: "canary_effective_percent".into(),
                old: json!(before),
                new: json!(after),
            },
        ];
        let action = if on { "rollback" } else { "resume" };
        self.audit(origin, action, changes, reason.clone()).await;
        if let Some(fx) = &self.effects {
            if let Some(n) = &fx.notifier {
                let window = self.live.config().rollback.window;
                let body = json!({
                    "event": action,
                    "cause": cause.map(Label::label),
                    "reason": reason,
                    "actor": actor(origin),
                    "time": at,
                    "instance": fx.instance,
                    "slo": fx.slo.snapshot(now, window),
                });
                if !n.notify(body) {
                    warn!("webhook queue full; this notification is dropped");
                    self.metrics.webhook_delivery(WebhookQueue::Dropped);
                }
            }
        }
    }

    /// Appends one audit entry (on the blocking pool); a failure is logged and counted.
    async fn audit(
        &self,
        origin: Origin,
        action: &'static str,
        changes: Vec<Change>,
        reason: String,
    ) {
        let Some(fx) = &self.effects else { return };
        let now = Instant::now();
        let slo: Value = fx.slo.snapshot(now, self.live.config().rollback.window);
        let entry = Entry {
            time: fx.slo.clock().rfc3339(now),
            actor: actor(origin).into(),
            action: action.into(),
            changes,
            reason,
            slo,
        };
        let log = fx.audit.clone();
        let res = tokio::task::spawn_blocking(move || log.append(&entry)).await;
        match res {
            Ok(Ok(())) => self.metrics.audit_entry(action),
            Ok(Err(e)) => {
                error!(error = %e, action, "cannot append to the audit log");
                self.metrics
                    .state_error(StateFile::Audit, StateProblem::Write);
            }
            Err(e) => {
                error!(error = %e, action, "audit task failed");
                self.metrics
                    .state_error(StateFile::Audit, StateProblem::Write);
            }
        }
    }
}

/// The `result` label of a webhook notification dropped before any attempt (queue full).
#[derive(Clone, Copy, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
enum WebhookQueue {
    Dropped,
}
