//! The control plane's one event stream: every change to what runs — a reload, the rollback
//! latch set or cleared, and (with the issues that build on this) a promotion or a new canary
//! percentage — is a [`Control`] sent on one channel to the one control task that applies it
//! ([`super::apply`]).
//!
//! Invariants:
//! - Sources only send: SIGHUP, the file poll, the rollback controller and the admin API never
//!   touch the configuration in force themselves, so changes are applied one at a time, in the
//!   order they were sent, by a single writer (the one an audit log hangs on).
//! - The channel is bounded. Sources that must not lose an event await room
//!   ([`ControlTx::send`]); the file poll, which says the same thing every time, skips a tick
//!   when the queue is full ([`ControlTx::offer`]).

use thiserror::Error;
use tokio::sync::mpsc;

/// Events queued for the control task at most.
pub const CAPACITY: usize = 64;

/// Who asked for a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Origin {
    /// SIGHUP.
    Signal,
    /// The configuration file's content changed (`reload.poll_interval`).
    FilePoll,
    /// A person, through a runbook command or the admin API.
    Operator,
    /// Alertmanager, through the admin API's receiver (a fleet-wide rule fired).
    Alertmanager,
    /// The automatic rollback controller.
    Controller,
    /// Home Assistant, through the MQTT bridge's controls (`mqtt.allow_control`).
    Mqtt,
}

/// Why the rollback latch was set; the `reason` label of `tcp_comm_rollbacks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum RollbackCause {
    /// The controller: the new path's command success fell below the floor.
    Success,
    /// The controller: too few commands answered within the latency threshold.
    Latency,
    DecodeErrors,
    QueueFull,
    /// The controller: the success budget burnt faster than `rollback.max_burn_rate`.
    BurnRate,
    /// A person asked for it.
    Operator,
    /// An alert labelled `cync_rollback="true"` reached the admin API's Alertmanager receiver.
    Alert,
    /// The latch file existed at start but could not be read: set, to fail safe.
    LatchUnreadable,
}

/// A change to what runs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Control {
    /// Re-read the configuration file and apply it if it is valid. A file poll's change is
    /// applied once it has settled; any other origin's at once.
    Reload { origin: Origin },
    /// Set the rollback latch: every device routes to legacy and new-path connections are
    /// re-homed, whatever the configured percentage, until [`Control::Resume`].
    Rollback {
        origin: Origin,
        cause: RollbackCause,
        /// What a person reads in the log, the audit entry and the webhook.
        reason: String,
    },
    /// Set `routing.canary_percent` to `to` in the configuration file and reload it: the next
    /// rollout stage, its gates checked by the sender. Refused while latched; a file that
    /// cannot be written leaves the promotion ready (see [`super::rollout`]).
    Promote {
        origin: Origin,
        to: f64,
        /// Why, for the log and the audit entry.
        reason: String,
    },
    /// Set `routing.canary_percent` to `to` in the configuration file and reload it, as
    /// `cync-gateway set-canary` does; refused while latched.
    SetCanary {
        origin: Origin,
        to: f64,
        /// Why, for the log and the audit entry.
        reason: String,
    },
    /// Clear the rollback latch: the configured percentage is in force again.
    Resume {
        origin: Origin,
        /// Why, for the log and the audit entry.
        reason: String,
    },
}

impl Control {
    pub fn origin(&self) -> Origin {
        match self {
            Control::Reload { origin }
            | Control::Rollback { origin, .. }
            | Control::Resume { origin, .. }
            | Control::Promote { origin, .. }
            | Control::SetCanary { origin, .. } => *origin,
        }
    }
}

/// The control task has stopped (the gateway is shutting down).
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the control task has stopped")]
pub struct Stopped;

/// The sending side of the control channel; cloned by every source.
#[derive(Debug, Clone)]
pub struct ControlTx(mpsc::Sender<Control>);

/// The control task's side.
pub type ControlRx = mpsc::Receiver<Control>;

/// A new control channel.
pub fn channel() -> (ControlTx, ControlRx) {
    let (tx, rx) = mpsc::channel(CAPACITY);
    (ControlTx(tx), rx)
}

impl ControlTx {
    /// Queues `event`, waiting for room.
    pub async fn send(&self, event: Control) -> Result<(), Stopped> {
        self.0.send(event).await.map_err(|_| Stopped)
    }

    /// Queues `event` if there is room now; `false` when it was not queued.
    pub fn offer(&self, event: Control) -> bool {
        self.0.try_send(event).is_ok()
    }
}
