//! Upstream resumption: what a reliable session does when the add-on connection drops while
//! the device stays (design decision 7, protocol §14.8).
//!
//! The session redials (at most `resume_attempts` tries spread over `resume_window`), replays
//! the device's cached 0x23, swallows the 0x28 that answers it (the device already had one),
//! and meanwhile answers the device's 0xd3 itself. Those heartbeats are still forwarded once
//! the upstream is back, so the upstream's 0xd8 for them is a second answer and is dropped.
//!
//! Invariants:
//! - Pure state plus one async dial loop; every state call takes `now`.
//! - A 0xd8 is dropped only while a local answer is owed one, and an owed drop expires after
//!   `drop_window`, so an upstream that never answers the replayed heartbeats cannot make the
//!   session swallow a later, real 0xd8.
//! - Exactly one 0x28 is swallowed per resumption, and only before the resumption completes.
//! - The attempt budget belongs to one outage: an upstream that drops again before it has
//!   acknowledged the replayed hello, or within `window` after doing so, uses up the same
//!   budget, so a flapping add-on cannot keep a session redialling in a tight loop.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::tls::Stream;
use crate::upstream::{DialError, Dialer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The upstream is up and has acknowledged the hello.
    Connected,
    /// No upstream; redialling.
    Redialing,
    /// Redialled and the hello replayed; its 0x28 has not come back yet.
    AwaitingHelloAck,
}

#[derive(Debug)]
pub struct Resume {
    phase: Phase,
    attempts: u32,
    window: Duration,
    /// Attempts used in the current outage.
    used: u32,
    outage_started: Option<Instant>,
    /// When the last resumption completed.
    resumed_at: Option<Instant>,
    owed_drops: VecDeque<Instant>,
    drop_window: Duration,
}

impl Resume {
    pub fn new(attempts: u32, window: Duration, drop_window: Duration) -> Self {
        Self {
            phase: Phase::Connected,
            attempts,
            window,
            used: 0,
            outage_started: None,
            resumed_at: None,
            owed_drops: VecDeque::new(),
            drop_window,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// While not connected the session answers heartbeats itself.
    pub fn answers_locally(&self) -> bool {
        self.phase != Phase::Connected
    }

    /// The upstream dropped. Returns the attempts and time left for redialling, or `None` when
    /// the outage's budget is spent (the session then closes the device side).
    pub fn lost(&mut self, now: Instant) -> Option<(u32, Duration)> {
        if self.phase == Phase::Connected {
            let flapping = self
                .resumed_at
                .is_some_and(|t| now.saturating_duration_since(t) < self.window);
            if !flapping {
                self.used = 0;
            }
            self.outage_started = Some(now);
        }
        let started = *self.outage_started.get_or_insert(now);
        self.phase = Phase::Redialing;
        let left = self.attempts.saturating_sub(self.used);
        let time_left = self
            .window
            .saturating_sub(now.saturating_duration_since(started));
        (left > 0 && !time_left.is_zero()).then_some((left, time_left))
    }

    /// Records attempts spent by a redial.
    pub fn spent(&mut self, attempts: u32) {
        self.used += attempts;
    }

    /// A redial succeeded and the hello is about to be replayed.
    pub fn redialed(&mut self) {
        self.phase = Phase::AwaitingHelloAck;
    }

    /// An upstream 0x28: true if it answers the replayed hello and must be swallowed. Its
    /// arrival completes the resumption; the budget is renewed once the upstream has then
    /// stayed up for `window`.
    pub fn take_hello_ack(&mut self, now: Instant) -> bool {
        if self.phase != Phase::AwaitingHelloAck {
            return false;
        }
        self.phase = Phase::Connected;
        self.outage_started = None;
        self.resumed_at = Some(now);
        true
    }

    /// The upstream is gone: answers it owed will never come, so nothing is owed any more.
    pub fn clear_owed(&mut self) {
        self.owed_drops.clear();
    }

    /// A device 0xd3 that was answered locally has just been written upstream.
    pub fn owe_drop(&mut self, now: Instant) {
        self.owed_drops.push_back(now);
    }

    /// An upstream 0xd8: true if it is the second answer to a locally answered heartbeat.
    pub fn take_late_heartbeat_ack(&mut self, now: Instant) -> bool {
        self.expire(now);
        self.owed_drops.pop_front().is_some()
    }

    pub fn expire(&mut self, now: Instant) {
        while self
            .owed_drops
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.drop_window)
        {
            self.owed_drops.pop_front();
        }
    }
}

/// When each of `attempts` dials starts, relative to the first. The first goes at once and
/// the gaps grow fourfold up to the last at half the window (0, 250 ms, 1 s for three in 2 s):
/// an add-on that restarts quickly is back within a few hundred milliseconds, one that takes
/// longer still gets a late try, and the last dial has the rest of the window to connect.
pub fn schedule(attempts: u32, window: Duration) -> Vec<Duration> {
    (0..attempts)
        .map(|k| {
            if k == 0 {
                Duration::ZERO
            } else {
                let steps = i32::try_from(attempts - 1 - k).unwrap_or(i32::MAX);
                (window / 2).mul_f64(0.25f64.powi(steps))
            }
        })
        .collect()
}

/// Dials up to `attempts` times within `window`. Returns the stream, or the last error, and
/// how many attempts were made.
pub async fn redial(
    dialer: &Dialer,
    attempts: u32,
    window: Duration,
) -> (Result<Stream, DialError>, u32) {
    let start = Instant::now();
    let slots = schedule(attempts, window);
    let mut last = None;
    for (i, offset) in slots.iter().enumerate() {
        tokio::time::sleep_until(start + *offset).await;
        let until = slots.get(i + 1).copied().unwrap_or(window);
        let budget = (start + until).saturating_duration_since(Instant::now());
        match tokio::time::timeout(budget.max(Duration::from_millis(50)), dialer.dial()).await {
            Ok(Ok(s)) => return (Ok(s), u32::try_from(i + 1).unwrap_or(attempts)),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(DialError::Timeout {
                    addr: dialer.address().to_string(),
                    after: budget,
                })
            }
        }
    }
    let err = last.unwrap_or(DialError::Timeout {
        addr: dialer.address().to_string(),
        after: window,
    });
    (Err(err), attempts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn three_attempts_spread_over_two_seconds() {
        let s = schedule(3, Duration::from_secs(2));
        assert_eq!(
            s,
            vec![
                Duration::ZERO,
                Duration::from_millis(250),
                Duration::from_secs(1)
            ]
        );
        assert_eq!(schedule(1, Duration::from_secs(2)), vec![Duration::ZERO]);
    }

    #[tokio::test(start_paused = true)]
    async fn owed_heartbeat_drops_expire() {
        let mut r = Resume::new(3, Duration::from_secs(2), Duration::from_secs(10));
        r.lost(Instant::now());
        assert!(r.answers_locally());
        r.owe_drop(Instant::now());
        r.owe_drop(Instant::now());
        assert!(r.take_late_heartbeat_ack(Instant::now()));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            !r.take_late_heartbeat_ack(Instant::now()),
            "expired: a real 0xd8 is not swallowed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_hello_ack_is_swallowed_and_the_budget_spans_the_outage() {
        let mut r = Resume::new(3, Duration::from_secs(2), Duration::from_secs(10));
        assert!(
            !r.take_hello_ack(Instant::now()),
            "nothing to swallow while connected"
        );
        assert_eq!(r.lost(Instant::now()), Some((3, Duration::from_secs(2))));
        r.spent(1);
        r.redialed();
        tokio::time::advance(Duration::from_millis(500)).await;
        // Dropped again before acknowledging the hello: the same outage, fewer attempts left.
        assert_eq!(
            r.lost(Instant::now()),
            Some((2, Duration::from_millis(1500)))
        );
        r.spent(2);
        assert_eq!(r.lost(Instant::now()), None);
        // A completed resumption renews the budget once the upstream has stayed up a while.
        let mut r = Resume::new(3, Duration::from_secs(2), Duration::from_secs(10));
        r.lost(Instant::now());
        r.spent(3);
        r.redialed();
        assert!(r.take_hello_ack(Instant::now()));
        assert!(!r.take_hello_ack(Instant::now()));
        assert_eq!(r.phase(), Phase::Connected);
        assert_eq!(
            r.lost(Instant::now()),
            None,
            "dropped again at once: flapping"
        );
        let mut r = Resume::new(3, Duration::from_secs(2), Duration::from_secs(10));
        r.lost(Instant::now());
        r.spent(3);
        r.redialed();
        assert!(r.take_hello_ack(Instant::now()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(r.lost(Instant::now()), Some((3, Duration::from_secs(2))));
    }

    #[tokio::test(start_paused = true)]
    async fn redial_gives_up_after_its_attempts_within_the_window() {
        // A port with nothing listening: every dial is refused at once.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let text = format!("[upstream.legacy]\naddress = \"127.0.0.1:{port}\"\ntls = false\n");
        let cfg = Config::parse(&text).expect("config");
        let dialer = Dialer::new(&cfg.upstream_legacy).expect("dialer");
        let start = Instant::now();
        let (r, used) = redial(&dialer, 3, Duration::from_secs(2)).await;
        assert!(r.is_err());
        assert_eq!(used, 3);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
}
