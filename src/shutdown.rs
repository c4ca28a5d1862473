//! Graceful shutdown: one cancellation token for "stop", one task tracker for "what is still
//! running", and a drain bounded by a deadline.
//!
//! Invariants:
//! - Cancelling is idempotent and one-way.
//! - [`Shutdown::drain`] never waits longer than the deadline it is given; what is still running
//!   then is reported (and dropped with the runtime), never waited for.
//! - Signals: the first SIGTERM/SIGINT starts the drain; a second one exits at once (code 130),
//!   for an operator who does not want to wait — through the daemon's return path, so its log
//!   lines (the reason included) are flushed first. SIGHUP is handed to the reloader. The handlers
//!   are installed before the gateway listens, so no signal ever meets the default action.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tasks: TaskTracker,
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

    pub fn tasks(&self) -> TaskTracker {
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
    /// flushing its logs); SIGHUP is forwarded to `on_hup`.
    pub fn spawn(
        self,
        shutdown: Shutdown,
        on_hup: tokio::sync::mpsc::UnboundedSender<()>,
        exit_now: std::sync::Arc<tokio::sync::Notify>,
    ) {
        let Signals {
            mut term,
            mut int,
            mut hup,
        } = self;
        tokio::spawn(async move {
            let mut seen = 0u32;
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                    _ = hup.recv() => {
                        let _ = on_hup.send(());
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
