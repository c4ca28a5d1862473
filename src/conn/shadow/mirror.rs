//! Dark launch, mirror mode: the task that replays one legacy connection's device reads to
//! the shadow upstream and feeds the shadow's answers to the shadow core and the comparator.
//!
//! Invariants:
//! - It holds no reference to the device socket, and the legacy path never waits on it: it
//!   reads from a bounded queue the legacy path offers to without blocking.
//! - A shadow upstream that fails or goes away ends this connection's mirror only; the loss is
//!   counted by reason and logged at most every [`LOSS_LOG_EVERY`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::compare::{Comparator, Comparison, ReplyFrom};
use crate::conn::reliable::core::Core;
use crate::conn::reliable::queue::BoundedQueue;
use crate::conn::upstream::{count_handshake, Dialer};
use crate::conn::Transport;
use crate::protocol::PacketType;
use crate::protocol::Tap;
use crate::telemetry::labels::{Label, ShadowLoss};
use crate::telemetry::logging::LogLimit;
use crate::telemetry::metrics::Metrics;

const SHADOW: Transport = Transport::Shadow;

/// A poisoned lock only means a panic elsewhere mid-update; the shadow carries on.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts comparisons (drained from `out`).
pub(super) fn record(metrics: &Metrics, out: &mut Vec<(Comparison, PacketType)>) {
    for (c, t) in out.drain(..) {
        metrics.shadow_comparison(c, t);
    }
}

/// Minimum spacing of "shadow upstream lost" log lines across all connections.
pub const LOSS_LOG_EVERY: Duration = Duration::from_secs(10);

/// The mirror of one legacy connection to the shadow upstream.
pub(super) struct Mirror {
    pub(super) queue: Mutex<BoundedQueue>,
    pub(super) ready: Notify,
    /// The shadow upstream is connected and being written.
    pub(super) alive: AtomicBool,
    /// Ended for good (dial failed or the shadow upstream went away).
    pub(super) dead: AtomicBool,
    pub(super) cmp: Mutex<Comparator>,
    pub(super) stop: CancellationToken,
}

/// What one mirror task needs.
pub(super) struct MirrorTask {
    pub(super) m: Arc<Mirror>,
    pub(super) dialer: Dialer,
    pub(super) metrics: Arc<Metrics>,
    pub(super) core: Arc<Mutex<Core>>,
    pub(super) rearm: Arc<Notify>,
    pub(super) log: Arc<LogLimit>,
    pub(super) max_frame_len: usize,
}

/// Why a mirror's shadow upstream went away; the `reason` label.
fn lost(t: &MirrorTask, reason: ShadowLoss) {
    end(&t.m, &t.metrics, &t.log, reason);
}

/// Ends a mirror for good: counted by `reason`, logged (rate-limited), its pending comparisons
/// concluded, its task stopped.
fn end(m: &Mirror, metrics: &Metrics, log: &LogLimit, reason: ShadowLoss) {
    if m.dead.swap(true, Ordering::SeqCst) {
        return;
    }
    m.stop.cancel();
    metrics.shadow_lost(reason);
    let mut out = Vec::new();
    lock(&m.cmp).shadow_gone(&mut out);
    record(metrics, &mut out);
    if log.allow(Instant::now(), LOSS_LOG_EVERY) {
        warn!(
            reason = reason.label(),
            "shadow upstream lost; mirroring stopped for this connection (replies it cannot compare are counted uncompared)"
        );
    }
}

pub(super) async fn run(t: MirrorTask) {
    let stream = tokio::select! {
        _ = t.m.stop.cancelled() => return,
        r = t.dialer.dial() => r,
    };
    let stream = match stream {
        Ok(s) => {
            count_handshake(&t.metrics, SHADOW, &s);
            s
        }
        Err(e) => {
            t.metrics.upstream_connect_error(SHADOW, &e);
            lost(&t, ShadowLoss::ConnectFailed);
            while lock(&t.m.queue).pop().is_some() {}
            return;
        }
    };
    t.m.alive.store(true, Ordering::SeqCst);
    t.metrics.connection_started(SHADOW);
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = async {
        loop {
            let next = lock(&t.m.queue).pop();
            match next {
                Some(item) => {
                    if w.write_all(&item.bytes).await.is_err() {
                        return ShadowLoss::WriteFailed;
                    }
                }
                None => t.m.ready.notified().await,
            }
        }
    };
    let reader = async {
        let mut tap = Tap::new(t.max_frame_len);
        let mut buf = vec![0u8; 16 * 1024];
        let mut out = Vec::new();
        loop {
            let n = match r.read(&mut buf).await {
                Ok(n) if n > 0 => n,
                Ok(_) => return ShadowLoss::Closed,
                Err(_) => return ShadowLoss::ReadFailed,
            };
            let now = Instant::now();
            // The new path's logic hears the shadow upstream, as it would on the new path.
            {
                let mut core = lock(&t.core);
                if core.upstream_read(&buf[..n], now) {
                    t.rearm.notify_one();
                }
                while core.pop_for_device().is_some() {}
            }
            let tapped = tap.feed(&buf[..n]);
            let mut cmp = lock(&t.m.cmp);
            for p in tapped.frames().filter_map(|f| f.packet.as_ref().ok()) {
                cmp.on_frame(ReplyFrom::Shadow, p, now, &mut out);
            }
            drop(cmp);
            record(&t.metrics, &mut out);
        }
    };
    let why = tokio::select! {
        _ = t.m.stop.cancelled() => None,
        why = writer => Some(why),
        why = reader => Some(why),
    };
    t.m.alive.store(false, Ordering::SeqCst);
    t.metrics.connection_ended(SHADOW);
    if let Some(why) = why {
        lost(&t, why);
    }
    // Anything still queued for a dead mirror is released (and leaves the depth gauge).
    while lock(&t.m.queue).pop().is_some() {}
}
