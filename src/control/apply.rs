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

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::event::{Control, ControlRx, Origin};
use super::live::Live;
use super::reload::{self, Outcome, Reloader, Trigger};
use crate::telemetry::labels::Label;
use crate::telemetry::metrics::Metrics;

/// The control task's state.
pub struct ControlTask {
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    /// The file the configuration came from; `None` when it was given in memory.
    reloader: Option<Reloader>,
    /// A polled change seen once, to be checked again at this instant.
    settle: Option<Instant>,
}

impl ControlTask {
    pub fn new(live: Arc<Live>, metrics: Arc<Metrics>, reloader: Option<Reloader>) -> Self {
        Self {
            live,
            metrics,
            reloader,
            settle: None,
        }
    }

    /// Applies events until shutdown or until every sender is gone.
    pub async fn run(mut self, mut rx: ControlRx, shutdown: CancellationToken) {
        loop {
            let settle = self.settle;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(settle.unwrap_or_else(Instant::now)), if settle.is_some() => {
                    self.settle = None;
                    self.reload(Trigger::Poll).await;
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
                    self.reload(Trigger::Poll).await;
                }
            }
            Control::Reload { origin } => {
                info!(origin = origin.label(), "reloading the configuration");
                self.reload(Trigger::Signal).await;
            }
            Control::Rollback { origin, reason } => {
                warn!(
                    origin = origin.label(),
                    reason, "rollback latch set: every device routes to legacy"
                );
                self.live.set_latch(true);
                reload::publish(&self.metrics, &self.live);
            }
            Control::Resume { origin } => {
                info!(
                    origin = origin.label(),
                    "rollback latch cleared: the configured percentage is in force"
                );
                self.live.set_latch(false);
                reload::publish(&self.metrics, &self.live);
            }
        }
    }

    async fn reload(&mut self, trigger: Trigger) {
        let Some(reloader) = self.reloader.as_mut() else {
            warn!("reload requested, but this gateway was not started from a configuration file");
            return;
        };
        if reloader.check(trigger).await == Outcome::Settling {
            self.settle = Some(Instant::now() + reload::SETTLE);
        }
    }
}
