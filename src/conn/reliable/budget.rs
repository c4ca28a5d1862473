//! The retry budget of one path: copies may be at most a share of the commands sent over a
//! sliding window, as Envoy's and Finagle's retry budgets bound retries.
//!
//! Retries help against loss and hurt under overload: when a device or its link is slow, every
//! copy is more work for a device that is already behind, and a path that retries without a
//! bound can collapse where one that does not would have coped. The budget keeps retries from
//! ever multiplying load by more than `1 + ratio`, whatever the timeouts say.
//!
//! Invariants:
//! - Pure: every call takes `now` (tokio's clock in the daemon, paused time in tests).
//! - Over any window, retries granted ≤ `max(min_retries, ratio × commands)`; a retry that
//!   does not fit is refused (the caller counts it and does not send it).
//! - Memory is fixed: [`BUCKETS`] counters whatever the traffic.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Resolution of the sliding window.
pub const BUCKETS: usize = 10;

#[derive(Debug)]
struct Ring {
    /// (commands, retries) per bucket; `head` is the bucket that began at `head_start`.
    buckets: [(u64, u64); BUCKETS],
    head: usize,
    head_start: Instant,
}

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_retries: u64,
    width: Duration,
    ring: Mutex<Ring>,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_retries: u64, window: Duration, now: Instant) -> Self {
        let width = (window / BUCKETS as u32).max(Duration::from_millis(1));
        Self {
            ratio,
            min_retries,
            width,
            ring: Mutex::new(Ring {
                buckets: [(0, 0); BUCKETS],
                head: 0,
                head_start: now,
            }),
        }
    }

    fn ring(&self, now: Instant) -> std::sync::MutexGuard<'_, Ring> {
        let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        // Move the head to the bucket holding `now`, clearing the buckets passed over.
        let mut steps = 0;
        while now.saturating_duration_since(r.head_start) >= self.width && steps <= BUCKETS {
            r.head = (r.head + 1) % BUCKETS;
            let h = r.head;
            r.buckets[h] = (0, 0);
            r.head_start += self.width;
            steps += 1;
        }
        if steps > BUCKETS {
            // Idle for longer than the window: everything is stale.
            r.buckets = [(0, 0); BUCKETS];
            r.head_start = now;
        }
        r
    }

    /// A command was sent (its first send).
    pub fn deposit(&self, now: Instant) {
        let mut r = self.ring(now);
        let h = r.head;
        r.buckets[h].0 += 1;
    }

    /// Asks for one retry; true when it fits the budget (and is then counted).
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let mut r = self.ring(now);
        let (commands, retries) = r
            .buckets
            .iter()
            .fold((0, 0), |(c, x), (bc, bx)| (c + bc, x + bx));
        let allowed = ((commands as f64 * self.ratio).floor() as u64).max(self.min_retries);
        if retries >= allowed {
            return false;
        }
        let h = r.head;
        r.buckets[h].1 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_commands_with_a_floor() {
        let b = RetryBudget::new(0.1, 2, Duration::from_secs(10), Instant::now());
        // No commands yet: the floor still allows two.
        assert!(b.try_withdraw(Instant::now()));
        assert!(b.try_withdraw(Instant::now()));
        assert!(!b.try_withdraw(Instant::now()));
        // 50 commands allow 5 retries in all; 2 are spent.
        for _ in 0..50 {
            b.deposit(Instant::now());
        }
        let granted = (0..10).filter(|_| b.try_withdraw(Instant::now())).count();
        assert_eq!(granted, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn spent_retries_leave_the_window_too() {
        // No commands, a floor of one: one retry per window.
        let b = RetryBudget::new(0.1, 1, Duration::from_secs(10), Instant::now());
        assert!(b.try_withdraw(Instant::now()));
        assert!(!b.try_withdraw(Instant::now()));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!b.try_withdraw(Instant::now()), "still in the window");
        // 11 s after it was spent, the spent retry is out of the window: one again.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(b.try_withdraw(Instant::now()));
        assert!(!b.try_withdraw(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides() {
        let b = RetryBudget::new(0.5, 0, Duration::from_secs(10), Instant::now());
        for _ in 0..10 {
            b.deposit(Instant::now());
        }
        assert_eq!(
            (0..10).filter(|_| b.try_withdraw(Instant::now())).count(),
            5
        );
        // 9.9 s later the commands and retries are still in the window.
        tokio::time::advance(Duration::from_millis(9900)).await;
        assert!(!b.try_withdraw(Instant::now()));
        // Once they have left it, nothing is allowed (no commands, no floor)...
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(!b.try_withdraw(Instant::now()));
        // ...until new commands come.
        b.deposit(Instant::now());
        b.deposit(Instant::now());
        assert!(b.try_withdraw(Instant::now()));
        assert!(!b.try_withdraw(Instant::now()));
        // A long idle spell clears everything.
        tokio::time::advance(Duration::from_secs(3600)).await;
        for _ in 0..4 {
            b.deposit(Instant::now());
        }
        assert_eq!(
            (0..10).filter(|_| b.try_withdraw(Instant::now())).count(),
            2
        );
    }
}
