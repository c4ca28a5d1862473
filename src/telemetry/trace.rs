//! Command traces: each command's life as one structured event — a correlation id, the device,
//! the path, its inner seq and msg_id, how many times it was sent, how it ended, and how long
//! the device took to acknowledge it (0x7b) and to answer it (`f9`).
//!
//! Invariants:
//! - One event per command, emitted where its outcome is recorded (the same place the metrics
//!   and the SLO feed learn of it), so the trace, the log line and the counters agree.
//! - Logged as one line: failures always (`info`), successes only with `logging.commands`
//!   (`debug` otherwise). Followers (`cync-gateway trace`) get every event through a bounded
//!   broadcast: a follower that falls behind loses the oldest events and is told how many;
//!   nobody waits for a follower.
//! - The correlation id is unique within the process, in order of completion.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::{debug, info};

use crate::protocol::{DeviceId, MsgId};

/// Events a follower may fall behind by before it loses the oldest.
pub const FOLLOW_BUFFER: usize = 1024;

/// One finished command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandEvent {
    pub id: u64,
    /// Device id (8 hex digits), when the connection has one.
    pub device: Option<String>,
    pub path: String,
    pub seq: u8,
    /// The command's msg_id (6 hex digits).
    pub msg_id: Option<String>,
    /// Times it went to the device (1 on the legacy path, which never copies).
    pub attempts: u32,
    /// `success`, `timeout` or `abandoned`.
    pub outcome: String,
    /// From the first forward to the device's 0x7b for it, milliseconds, when the 0x7b came
    /// before the command ended (a device may acknowledge after answering).
    pub ack_ms: Option<f64>,
    /// From the first forward to its `f9` reply, milliseconds (successes only).
    pub reply_ms: Option<f64>,
}

/// Where command events go.
#[derive(Debug)]
pub struct Tracer {
    tx: broadcast::Sender<CommandEvent>,
    next: AtomicU64,
    log_all: AtomicBool,
}

impl Default for Tracer {
    fn default() -> Self {
        Tracer {
            tx: broadcast::channel(FOLLOW_BUFFER).0,
            next: AtomicU64::new(1),
            log_all: AtomicBool::new(false),
        }
    }
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

impl Tracer {
    /// Log every command, not only failures (`logging.commands`).
    pub fn set_log_all(&self, on: bool) {
        self.log_all.store(on, Ordering::Relaxed);
    }

    /// Follow every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<CommandEvent> {
        self.tx.subscribe()
    }

    /// Emits one event; `ack` and `reply` are from the first forward.
    ///
    /// Nothing is formatted or allocated for a success nobody reads (no follower, no
    /// `logging.commands`, no debug log): that is every command of a healthy fleet, on the
    /// path whose CPU per command is measured against HAProxy's.
    #[allow(clippy::too_many_arguments)]
    pub fn command(
        &self,
        device: Option<DeviceId>,
        path: &'static str,
        seq: u8,
        msg_id: Option<MsgId>,
        attempts: u32,
        outcome: &'static str,
        ack: Option<Duration>,
        reply: Option<Duration>,
    ) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let failed = outcome != "success";
        let log_all = self.log_all.load(Ordering::Relaxed);
        if !failed
            && !log_all
            && self.tx.receiver_count() == 0
            && !tracing::enabled!(tracing::Level::DEBUG)
        {
            return;
        }
        let ev = CommandEvent {
            id,
            device: device.map(|d| d.to_hex()),
            path: path.into(),
            seq,
            msg_id: msg_id.map(|m| hex::encode(m.0)),
            attempts,
            outcome: outcome.into(),
            ack_ms: ms(ack),
            reply_ms: ms(reply),
        };
        if failed || log_all {
            info!(
                id = ev.id,
                device = ev.device.as_deref().unwrap_or("-"),
                path = %ev.path,
                seq = ev.seq,
                msg_id = ev.msg_id.as_deref().unwrap_or("-"),
                attempts = ev.attempts,
                outcome = %ev.outcome,
                ack_ms = ev.ack_ms,
                reply_ms = ev.reply_ms,
                "command"
            );
        } else {
            debug!(id = ev.id, path = %ev.path, seq = ev.seq, outcome = %ev.outcome, "command");
        }
        // No follower is no error.
        let _ = self.tx.send(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_every_event_with_ids_in_order_and_milliseconds() {
        let t = Tracer::default();
        let mut rx = t.subscribe();
        t.command(
            Some(DeviceId([0x38, 0xe8, 0xcf, 0x46])),
            "new",
            7,
            Some(MsgId([0, 0, 0])),
            2,
            "success",
            Some(Duration::from_micros(12_345)),
            Some(Duration::from_millis(95)),
        );
        t.command(None, "legacy", 8, None, 1, "timeout", None, None);
        let a = rx.recv().await.expect("first");
        let b = rx.recv().await.expect("second");
        assert_eq!((a.id, b.id), (1, 2));
        assert_eq!(a.device.as_deref(), Some("38e8cf46"));
        assert_eq!(a.msg_id.as_deref(), Some("000000"));
        assert_eq!(a.ack_ms, Some(12.345));
        assert_eq!(a.reply_ms, Some(95.0));
        assert_eq!((a.attempts, a.outcome.as_str()), (2, "success"));
        assert_eq!((b.path.as_str(), b.outcome.as_str()), ("legacy", "timeout"));
    }
}
