//! Graceful shutdown: one cancellation token for "stop", one task tracker for "what is still
//! running", and a drain bounded by a deadline.
//!
//! Invariants:
//! - Cancelling is idempotent and one-way.
//! - [`Shutdown::drain`] never waits longer than the deadline it is given; what is still running
//!   then is reported (and dropped with the runtime), never waited for.
//! - Signals: the first SIGTERM/SIGINT starts the drain; a second one exits at once (code 130),
//!   for an operator who does not want to wait — through the daemon's return path, so its log
//!   lines (the reason included) are flushed first. SIGHUP is sent to the control task as a reload. The handlers
//!   are installed before the gateway listens, so no signal ever meets the default action.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::control::{Control, ControlTx, Origin};
use crate::telemetry::tasks::Tasks;

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tasks: Tasks,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection finished.
    Clean,
    /// The deadline passed with this many tasks still running.
    TimedOut { remaining: usize },
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// The tracker drain waits for: every connection and background task.
    pub fn tasks(&self) -> Tasks {
        self.tasks.clone()
    }

    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Stops everything and waits up to `deadline` for tracked tasks.
    pub async fn drain(&self, deadline: Duration) -> DrainOutcome {
        self.token.cancel();
        self.tasks.close();
        match tokio::time::timeout(deadline, self.tasks.wait()).await {
            Ok(()) => DrainOutcome::Clean,
            Err(_) => DrainOutcome::TimedOut {
                remaining: self.tasks.len(),
            },
        }
    }
}

/// The daemon's signal streams. Creating them replaces the default actions at once, so this is
/// done before the gateway starts listening: a SIGHUP that arrives early must reload (or be
/// ignored), never kill the process.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Errors only if the handlers cannot be installed.
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// SIGTERM/SIGINT drain; a second one fires `exit_now` (the daemon then returns 130 after
    /// flushing its logs); SIGHUP becomes a [`Control::Reload`] on `control`. Runs on the
    /// shutdown tracker, as the task `signals`, until the gateway is gone.
    pub fn spawn(
        self,
        shutdown: Shutdown,
        control: ControlTx,
        exit_now: std::sync::Arc<tokio::sync::Notify>,
    ) {
        let Signals {
            mut term,
            mut int,
            mut hup,
        } = self;
        // Not stopped by the shutdown token: a second signal must still be heard during the
        // drain. It is on its own tracker, which nobody waits for.
        Tasks::default().spawn("signals", async move {
            let mut seen = 0u32;
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                    _ = hup.recv() => {
                        if control.send(Control::Reload { origin: Origin::Signal }).await.is_err() {
                            warn!("SIGHUP: the control task has stopped; not reloading");
                        }
                        continue;
                    }
                };
                seen += 1;
                if seen == 1 {
                    info!(
                        signal = name,
                        "shutting down: no new connections, draining open ones"
                    );
                    shutdown.trigger();
                } else {
                    warn!(
                        signal = name,
                        "second signal: exiting now without waiting for the drain"
                    );
                    exit_now.notify_one();
                }
            }
        });
    }
}
