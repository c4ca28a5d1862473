//! The SLO engine's feed: cumulative per-path counts bumped by the same record methods that
//! count the Prometheus families ([`super::metrics::Metrics`]), read as [`Counts`] by the
//! sampler that feeds [`super::slo::Engine`].
//!
//! Invariants:
//! - One sink: nothing records an SLI event except a `Metrics` record method, so the SLO
//!   windows and the exported families can never disagree about what happened.
//! - Lock-free and allocation-free on the hot path (relaxed atomic adds); a reader may see one
//!   event's fields half-updated across counters (a success counted before its command), which
//!   the next read corrects — the windows are seconds wide, an event is nanoseconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::labels::Transport;
use super::slo::Counts;

/// Cumulative counts of one path.
#[derive(Debug, Default)]
pub struct Feed {
    commands: AtomicU64,
    successes: AtomicU64,
    within_latency: AtomicU64,
    late: AtomicU64,
    frames: AtomicU64,
    decode_errors: AtomicU64,
    queue_full: AtomicU64,
    retransmits: AtomicU64,
    churn_closes: AtomicU64,
    /// Connections open now (signed: an end may be seen before its start by a racing reader).
    active: std::sync::atomic::AtomicI64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Feed {
    /// A command ended; its latency event is counted apart ([`Feed::in_time`], [`Feed::late`]),
    /// because a late command is counted when its threshold passes, before it ends.
    pub fn command(&self, success: bool) {
        bump(&self.commands, 1);
        if success {
            bump(&self.successes, 1);
        }
    }
    /// A command was answered within the latency threshold.
    pub fn in_time(&self) {
        bump(&self.within_latency, 1);
    }
    /// A command passed the latency threshold unanswered (counted once per command).
    pub fn late(&self) {
        bump(&self.late, 1);
    }
    pub fn frame(&self) {
        bump(&self.frames, 1);
    }
    pub fn decode_error(&self) {
        bump(&self.decode_errors, 1);
    }
    pub fn queue_full(&self, n: u64) {
        bump(&self.queue_full, n);
    }
    pub fn retransmit(&self) {
        bump(&self.retransmits, 1);
    }
    pub fn churn_close(&self) {
        bump(&self.churn_closes, 1);
    }

    pub fn connection(&self, started: bool) {
        self.active
            .fetch_add(if started { 1 } else { -1 }, Ordering::Relaxed);
    }

    /// Connections open now.
    pub fn active(&self) -> u64 {
        u64::try_from(self.active.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// The totals so far; `device_ms` is the engine's to integrate, so it is 0 here.
    pub fn counts(&self) -> Counts {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            commands: r(&self.commands),
            successes: r(&self.successes),
            within_latency: r(&self.within_latency),
            late: r(&self.late),
            frames: r(&self.frames),
            decode_errors: r(&self.decode_errors),
            queue_full: r(&self.queue_full),
            retransmits: r(&self.retransmits),
            churn_closes: r(&self.churn_closes),
            device_ms: 0,
        }
    }
}

/// `slo.latency_threshold`, shared by the feeds and every connection's transaction tracker:
/// a reload reaches the connections already open, not only the ones opened after it.
#[derive(Debug, Clone)]
pub struct LatencyThreshold(Arc<AtomicU64>);

impl LatencyThreshold {
    pub fn new(d: Duration) -> LatencyThreshold {
        let t = LatencyThreshold(Arc::new(AtomicU64::new(0)));
        t.set(d);
        t
    }

    pub fn set(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.store(ns, Ordering::Relaxed);
    }

    pub fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }

    /// Whether a command answered after `latency` was in time (the threshold itself is).
    pub fn within(&self, latency: Duration) -> bool {
        latency <= self.get()
    }
}

impl Default for LatencyThreshold {
    fn default() -> Self {
        LatencyThreshold::new(Duration::from_millis(1500))
    }
}

/// One [`Feed`] per path, and the latency threshold the latency events use.
#[derive(Debug, Default)]
pub struct Feeds {
    paths: [Feed; 3],
    /// Set at start and on reload.
    latency_threshold: LatencyThreshold,
}

impl Feeds {
    pub fn path(&self, t: Transport) -> &Feed {
        &self.paths[match t {
            Transport::Legacy => 0,
            Transport::New => 1,
            Transport::Shadow => 2,
        }]
    }

    pub fn set_latency_threshold(&self, d: Duration) {
        self.latency_threshold.set(d);
    }

    /// The threshold every tracker reads, so a reload moves them all.
    pub fn latency_threshold(&self) -> &LatencyThreshold {
        &self.latency_threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_counts_toward_success_and_its_latency_event_apart() {
        let f = Feeds::default();
        let p = f.path(Transport::New);
        p.command(true);
        p.in_time();
        p.command(true);
        p.late();
        p.command(false);
        let c = p.counts();
        assert_eq!(
            (c.commands, c.successes, c.within_latency, c.late),
            (3, 2, 1, 1)
        );
        assert_eq!(f.path(Transport::Legacy).counts(), Counts::default());
    }

    #[test]
    fn the_threshold_is_shared_so_a_reload_reaches_every_holder_and_is_inclusive() {
        let f = Feeds::default();
        let held = f.latency_threshold().clone();
        assert!(held.within(Duration::from_millis(1500)));
        f.set_latency_threshold(Duration::from_millis(100));
        assert_eq!(held.get(), Duration::from_millis(100));
        assert!(held.within(Duration::from_millis(100)));
        assert!(!held.within(Duration::from_millis(101)));
    }
}
