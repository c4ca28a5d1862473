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
use super::rollout::{self, RolloutCell};
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
        Origin::Alertmanager => "alertmanager",
        Origin::Controller => "controller",
        Origin::Mqtt => "mqtt",
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
    rollout: Option<RolloutCell>,
}

impl ControlTask {
    pub fn new(live: Arc<Live>, metrics: Arc<Metrics>, reloader: Option<Reloader>) -> Self {
        Self {
            live,
            metrics,
            reloader,
            settle: None,
            effects: None,
            rollout: None,
        }
    }

    /// Records promotions the file would not take (see [`super::rollout`]).
    pub fn with_rollout(mut self, cell: RolloutCell) -> Self {
        self.rollout = Some(cell);
        self
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
            Control::Resume { origin, reason } => self.latch(false, origin, None, reason).await,
            Control::Promote { origin, to, reason } => self.promote(origin, to, reason).await,
            Control::SetCanary { origin, to, reason } => self.set_canary(origin, to, reason).await,
        }
    }

    fn rollout_state(&self, f: impl FnOnce(&mut rollout::State)) {
        if let Some(cell) = &self.rollout {
            f(&mut cell.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// Writes `to` into the file and reloads it (audited as `set_canary`), unless latched: a
    /// percentage changed under the latch would be in force the moment someone resumes.
    async fn set_canary(&mut self, origin: Origin, to: f64, reason: String) {
        if self.live.latched() {
            warn!(
                origin = origin.label(),
                to, "canary percentage change refused: the rollback latch is set (resume first)"
            );
            return;
        }
        match self.write_canary(to, "canary percentage change").await {
            Some(Ok(())) => {
                info!(
                    origin = origin.label(),
                    to, "routing.canary_percent written to the file"
                );
                self.reload_as(Trigger::Signal, origin, "set_canary", reason)
                    .await;
            }
            Some(Err(e)) => {
                warn!(error = %e, origin = origin.label(), to, "canary percentage change not made")
            }
            None => {}
        }
    }

    /// Writes `to` as `routing.canary_percent` into the file the configuration came from;
    /// `None` (logged) when it came from none, or the edit task failed.
    async fn write_canary(
        &self,
        to: f64,
        what: &'static str,
    ) -> Option<Result<(), crate::config::edit::EditError>> {
        let Some(path) = self.reloader.as_ref().map(|r| r.path().to_path_buf()) else {
            warn!(
                what,
                "requested, but this gateway was not started from a configuration file"
            );
            return None;
        };
        match tokio::task::spawn_blocking(move || crate::config::edit::set_canary(&path, to)).await
        {
            Ok(r) => Some(r.map(|_| ())),
            Err(e) => {
                error!(error = %e, what, "the configuration edit task failed");
                None
            }
        }
    }

    /// Writes the next stage into the file and reloads it; a file that cannot be written
    /// leaves the promotion ready (audited once per target).
    async fn promote(&mut self, origin: Origin, to: f64, reason: String) {
        if self.live.latched() {
            warn!(
                origin = origin.label(),
                to, "promotion refused: the rollback latch is set"
            );
            self.rollout_state(|s| s.asked = None);
            return;
        }
        let from = self.live.config().routing.canary_percent;
        match self.write_canary(to, "promotion").await {
            Some(Ok(())) => {
                info!(
                    origin = origin.label(),
                    from, to, "promoting: routing.canary_percent written to the file"
                );
                self.metrics.set_promotion_ready(false);
                self.rollout_state(|s| s.ready = None);
                self.reload_as(Trigger::Signal, origin, "promote", reason)
                    .await;
            }
            Some(Err(e)) => {
                warn!(error = %e, from, to, "promotion ready, but the configuration file cannot be written: make it by hand (cync-gateway set-canary) or where the file comes from");
                self.metrics.set_promotion_ready(true);
                let at = self
                    .effects
                    .as_ref()
                    .map(|fx| fx.slo.clock().rfc3339(Instant::now()))
                    .unwrap_or_default();
                let mut first = false;
                self.rollout_state(|s| {
                    s.asked = None;
                    if s.ready.as_ref().map(|r| r.to) != Some(to) {
                        first = true;
                        s.ready = Some(rollout::Ready {
                            to,
                            at,
                            why: e.to_string(),
                        });
                    }
                });
                if first {
                    let change = Change {
                        key: "routing.canary_percent".into(),
                        old: json!(from),
                        new: json!(to),
                    };
                    self.audit(
                        origin,
                        "promotion_ready",
                        vec![change],
                        format!("{reason}; not written: {e}"),
                    )
                    .await;
                }
            }
            None => {}
        }
    }

    async fn reload(&mut self, trigger: Trigger, origin: Origin) {
        self.reload_as(trigger, origin, "reload", String::new())
            .await;
    }

    /// A reload audited as `action` with `reason` (a promotion is a reload of the file it
    /// wrote).
    async fn reload_as(
        &mut self,
        trigger: Trigger,
        origin: Origin,
        action: &'static str,
        reason: String,
    ) {
        let Some(reloader) = self.reloader.as_mut() else {
            warn!("reload requested, but this gateway was not started from a configuration file");
            return;
        };
        // systemd sees a reload asked for (SIGHUP, `systemctl reload`, the admin API); a
        // file poll that finds nothing new is not one.
        let told = origin != Origin::FilePoll;
        if told {
            crate::telemetry::systemd::reloading();
        }
        let outcome = reloader.check(trigger).await;
        if told {
            crate::telemetry::systemd::ready();
        }
        match outcome {
            Outcome::Settling => self.settle = Some(Instant::now() + reload::SETTLE),
            Outcome::Applied { changes, .. } if !changes.is_empty() => {
                self.audit(origin, action, changes, reason).await;
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
        let now = Instant::now();
        // The file first: a crash between the two must not restart unlatched after a rollback
        // it already acted on. A failed write still changes the latch in memory.
        let at = match &self.effects {
            Some(fx) => {
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
                at
            }
            None => String::new(),
        };
        self.live.set_latch(on);
        reload::publish(&self.metrics, &self.live);
        // The count before the gauge, so that once the latch shows, its rollback has been
        // counted (a scrape reads the two families one after the other, so a single page may
        // still hold the gauge with the count from before it).
        if on {
            self.metrics
                .rollback(cause.unwrap_or(RollbackCause::Operator));
        }
        self.metrics.set_rollback_active(on);
        if on {
            warn!(
                origin = origin.label(),
                reason, "rollback latch set: every device routes to legacy"
            );
        } else {
            info!(
                origin = origin.label(),
                "rollback latch cleared: the configured percentage is in force"
            );
        }
        if self.effects.is_none() {
            return;
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

/// The `action` of every audit entry the control task writes (`tcp_comm_audit_entries_total`).
pub const AUDIT_ACTIONS: &[&str] = &[
    "reload",
    "rollback",
    "resume",
    "promote",
    "promotion_ready",
    "set_canary",
];

/// The `result` label of a webhook notification dropped before any attempt (queue full).
#[derive(Clone, Copy, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum WebhookQueue {
    Dropped,
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::config::Config;
    use crate::control::audit;
    use crate::control::state;
    use crate::telemetry::wallclock::WallClock;

    struct Rig {
        task: ControlTask,
        live: Arc<Live>,
        metrics: Arc<Metrics>,
        file: PathBuf,
        dir: tempfile::TempDir,
    }

    fn text(dir: &Path, routing: &str) -> String {
        format!(
            "state_dir = {:?}\n[upstream.legacy]\naddress = \"127.0.0.1:1\"\n[routing]\n{routing}\n",
            dir.display().to_string()
        )
    }

    async fn rig() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, text(dir.path(), "canary_percent = 10")).expect("write");
        let live = Live::new(Config::load(&file).expect("config"));
        let metrics = Arc::new(Metrics::new(false).expect("metrics"));
        let slo = SloService::start(
            live.clone(),
            metrics.clone(),
            WallClock::at(Instant::now(), 1_796_083_200_000),
        )
        .await;
        let reloader = Reloader::new(&file, live.clone(), metrics.clone());
        let task =
            ControlTask::new(live.clone(), metrics.clone(), Some(reloader)).with_effects(Effects {
                slo,
                audit: AuditLog::new(dir.path(), 1 << 20, 2),
                notifier: None,
                instance: "test".into(),
            });
        Rig {
            task,
            live,
            metrics,
            file,
            dir,
        }
    }

    fn entries(r: &Rig) -> Vec<audit::Entry> {
        audit::read(r.dir.path(), None).expect("audit").entries
    }

    #[tokio::test]
    async fn a_reload_that_changes_routing_is_audited_with_its_old_and_new_values() {
        let mut r = rig().await;
        std::fs::write(&r.file, text(r.dir.path(), "canary_percent = 25")).expect("write");
        r.task
            .apply(Control::Reload {
                origin: Origin::Signal,
            })
            .await;
        assert_eq!(r.live.config().routing.canary_percent, 25.0);
        let e = entries(&r);
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].actor.as_str(), e[0].action.as_str()),
            ("signal", "reload")
        );
        assert_eq!(
            e[0].changes,
            vec![Change {
                key: "routing.canary_percent".into(),
                old: json!(10.0),
                new: json!(25.0),
            }]
        );
        // The clock the task stamps with starts at 2026-12-01T00:00:00Z (real time runs on).
        assert!(e[0].time.starts_with("2026-12-01T00:00:"), "{}", e[0].time);
        assert!(e[0].slo["new"].is_object(), "{}", e[0].slo);
    }

    #[tokio::test]
    async fn switching_the_automatic_rollback_off_is_audited() {
        let mut r = rig().await;
        let t = format!(
            "{}[rollback]\nenabled = false\n",
            text(r.dir.path(), "canary_percent = 10")
        );
        std::fs::write(&r.file, t).expect("write");
        r.task
            .apply(Control::Reload {
                origin: Origin::FilePoll,
            })
            .await;
        // A file poll settles first; the settled check applies it.
        r.task.reload(Trigger::Poll, Origin::FilePoll).await;
        let e = entries(&r);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].actor, "file");
        assert_eq!(
            e[0].changes,
            vec![Change {
                key: "rollback.enabled".into(),
                old: json!(true),
                new: json!(false),
            }]
        );
    }

    #[tokio::test]
    async fn an_unchanged_reload_and_a_non_routing_change_write_nothing() {
        let mut r = rig().await;
        r.task
            .apply(Control::Reload {
                origin: Origin::Signal,
            })
            .await;
        let t = format!(
            "{}[reliable]\nmax_attempts = 2\n",
            text(r.dir.path(), "canary_percent = 10")
        );
        std::fs::write(&r.file, t).expect("write");
        r.task
            .apply(Control::Reload {
                origin: Origin::Signal,
            })
            .await;
        assert_eq!(r.live.config().reliable.max_attempts, 2, "applied");
        assert!(entries(&r).is_empty());
    }

    #[tokio::test]
    async fn a_rollback_writes_the_latch_then_the_audit_entry_and_a_second_one_changes_nothing() {
        let mut r = rig().await;
        let rollback = Control::Rollback {
            origin: Origin::Controller,
            cause: RollbackCause::Success,
            reason: "3 failed checks".into(),
        };
        r.task.apply(rollback.clone()).await;
        assert!(r.live.latched());
        let latch = state::load_latch(r.dir.path());
        assert!(
            matches!(&latch, state::LatchLoad::Set(f) if f.actor == "controller" && f.reason == "3 failed checks"),
            "{latch:?}"
        );
        let e = entries(&r);
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].actor.as_str(), e[0].action.as_str()),
            ("controller", "rollback")
        );
        assert_eq!(e[0].changes[0].key, "rollback.latched");
        assert_eq!(
            (e[0].changes[1].old.clone(), e[0].changes[1].new.clone()),
            (json!(10.0), json!(0.0)),
            "the effective canary percentage"
        );
        assert_eq!(
            r.metrics
                .total("tcp_comm_rollbacks_total", &[("reason", "success")]),
            1.0
        );
        assert_eq!(r.metrics.total("tcp_comm_rollback_active", &[]), 1.0);

        r.task.apply(rollback).await;
        assert_eq!(entries(&r).len(), 1, "already latched: nothing written");
        assert_eq!(r.metrics.total("tcp_comm_rollbacks_total", &[]), 1.0);

        r.task
            .apply(Control::Resume {
                origin: Origin::Operator,
                reason: "fixed".into(),
            })
            .await;
        assert!(!r.live.latched());
        assert!(matches!(
            state::load_latch(r.dir.path()),
            state::LatchLoad::Clear(_)
        ));
        let e = entries(&r);
        assert_eq!(
            (e[1].actor.as_str(), e[1].action.as_str()),
            ("admin", "resume")
        );
        assert_eq!(r.metrics.total("tcp_comm_rollback_active", &[]), 0.0);
    }
}
