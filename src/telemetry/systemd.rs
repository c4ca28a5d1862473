//! Telling systemd how the daemon is doing (`Type=notify`): ready once everything answers,
//! reloading around a reload, stopping when the drain starts, and the watchdog's heartbeat.
//!
//! Invariants:
//! - A no-op outside systemd (`NOTIFY_SOCKET` unset), so the same binary runs anywhere; a
//!   failed notification is logged once at debug and never fails the daemon.
//! - `RELOADING=1` carries `MONOTONIC_USEC` (systemd 253 and later require it).
//! - The watchdog is fed from a task on the daemon's runtime at half `WatchdogSec`: a runtime
//!   that stops making progress stops feeding it, and systemd restarts the service.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::debug;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "systemd notification failed");
    }
}

/// The device listener, /metrics and the admin socket answer.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// A reload starts (call [`ready`] when it is done).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The drain starts.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// A one-line status for `systemctl status`.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// Feeds systemd's watchdog until `stop`, when `WatchdogSec=` is set for this process.
pub async fn watchdog(stop: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval((period / 2).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => send(&[NotifyState::Watchdog]),
        }
    }
}
