//! How one connection is asked to finish, and how it gets there: the single mechanism shared
//! by drain (shutdown) and re-homing (design decision 4).
//!
//! Invariants:
//! - A connection has exactly one way of being asked to finish: its [`ConnStop`], a child of
//!   the shutdown token, cancelled by shutdown or by [`ConnStop::rehome`].
//! - [`Finishing`] closes between frames: at once when no command awaits its reply; a drain
//!   otherwise when the last one is answered (the daemon's drain deadline bounds that); a
//!   re-home at the latest after `routing.drain_grace`, and only when the [`ClosePacer`] grants
//!   a slot, so at most `routing.rehome_rate` re-homed connections close per second.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::close::CloseReason;

/// Paces the closes of re-homed connections to `routing.rehome_rate` per second: it is the
/// close (and the redial it causes) that loads the add-on, so closes are what is paced, not
/// the requests — a connection waiting for its last reply would otherwise close in a bunch
/// with others asked later.
#[derive(Debug)]
pub struct ClosePacer {
    /// (earliest next close, closes per second)
    state: Mutex<(Option<Instant>, f64)>,
}

impl ClosePacer {
    pub fn new(rate: f64) -> Self {
        Self {
            state: Mutex::new((None, rate)),
        }
    }

    pub fn set_rate(&self, rate: f64) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = rate;
    }

    /// One close slot, if one is free now; the next is `1 / rate` later.
    pub fn try_take(&self, now: Instant) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0.is_some_and(|t| now < t) {
            return false;
        }
        let gap = Duration::try_from_secs_f64(1.0 / st.1).unwrap_or(Duration::ZERO);
        st.0 = Some(now + gap);
        true
    }
}

/// How one connection is asked to finish: shutdown, or re-homing with a grace period.
#[derive(Debug)]
pub struct ConnStop {
    token: CancellationToken,
    rehome: AtomicBool,
    grace: Duration,
    pacer: Arc<ClosePacer>,
}

impl ConnStop {
    pub fn new(
        shutdown: &CancellationToken,
        grace: Duration,
        pacer: Arc<ClosePacer>,
    ) -> Arc<ConnStop> {
        Arc::new(ConnStop {
            token: shutdown.child_token(),
            rehome: AtomicBool::new(false),
            grace,
            pacer,
        })
    }

    /// Cancelled when the connection should finish (shutdown or re-homing).
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn rehome(&self) {
        self.rehome.store(true, Ordering::SeqCst);
        self.token.cancel();
    }

    /// Whether the stop is a re-homing (then it has a deadline of its own).
    pub fn is_rehome(&self) -> bool {
        self.rehome.load(Ordering::SeqCst)
    }

    /// How long a re-homed connection may wait for its commands.
    pub fn grace(&self) -> Duration {
        self.grace
    }
}

/// A connection's way to its end once asked to finish: at once when no command awaits its
/// reply; for a shutdown otherwise when the last one is answered (the daemon's drain deadline
/// bounds that); for a re-homing at the latest after the grace period, and in either case only
/// when the close pacer has a slot (a shutdown is not paced: the drain deadline rules).
#[derive(Debug)]
pub struct Finishing<'a> {
    stop: &'a ConnStop,
    requested: bool,
    deadline: Option<Instant>,
    /// While finishing and not yet free to close: when to look again.
    next_look: Option<Instant>,
}

/// How often a finishing connection waiting for its commands (or for a close slot) looks
/// again.
const LOOK_EVERY: Duration = Duration::from_millis(50);

impl<'a> Finishing<'a> {
    pub fn new(stop: &'a ConnStop) -> Self {
        Self {
            stop,
            requested: false,
            deadline: None,
            next_look: None,
        }
    }

    /// Whether the stop token has fired and [`Finishing::begin`] ran.
    pub fn requested(&self) -> bool {
        self.requested
    }

    fn reason(&self) -> CloseReason {
        if self.stop.is_rehome() {
            CloseReason::Rehomed
        } else {
            CloseReason::Drained
        }
    }

    /// The stop token fired. `Some` when the connection may close now.
    pub fn begin(&mut self, pending_commands: usize, now: Instant) -> Option<CloseReason> {
        self.requested = true;
        if self.stop.is_rehome() {
            self.deadline = Some(now + self.stop.grace());
        }
        self.check(pending_commands, now)
    }

    /// Re-checked while finishing. `Some` when the connection may close now (a re-homed one
    /// has then taken its close slot); otherwise the next look is set `LOOK_EVERY` (50 ms) on.
    pub fn check(&mut self, pending_commands: usize, now: Instant) -> Option<CloseReason> {
        let ready = self.ready(pending_commands, now);
        self.next_look = match ready {
            None if self.requested => Some(now + LOOK_EVERY),
            _ => None,
        };
        ready
    }

    fn ready(&self, pending_commands: usize, now: Instant) -> Option<CloseReason> {
        let overdue = self.deadline.is_some_and(|t| now >= t);
        if !(self.requested && (pending_commands == 0 || overdue)) {
            return None;
        }
        let reason = self.reason();
        if reason == CloseReason::Rehomed && !self.stop.pacer.try_take(now) {
            return None;
        }
        Some(reason)
    }

    /// When the connection should next call [`Finishing::check`]: `None` before the stop and
    /// once it may close. The connection's one timer includes it.
    pub fn next_look(&self) -> Option<Instant> {
        self.next_look
    }

    /// Whether the next look is due at `now`.
    pub fn look_due(&self, now: Instant) -> bool {
        self.next_look.is_some_and(|t| now >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pacer_spaces_closes_by_the_rate() {
        let p = ClosePacer::new(5.0);
        assert!(p.try_take(Instant::now()));
        assert!(!p.try_take(Instant::now()));
        tokio::time::advance(Duration::from_millis(199)).await;
        assert!(!p.try_take(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(p.try_take(Instant::now()));
        p.set_rate(1.0);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(p.try_take(Instant::now()), "the slot set at rate 5 is due");
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!p.try_take(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rehome_ready_to_close_still_waits_for_a_close_slot() {
        let pacer = Arc::new(ClosePacer::new(2.0));
        let root = CancellationToken::new();
        let a = ConnStop::new(&root, Duration::from_secs(5), pacer.clone());
        let b = ConnStop::new(&root, Duration::from_secs(5), pacer.clone());
        a.rehome();
        b.rehome();
        let (mut fa, mut fb) = (Finishing::new(&a), Finishing::new(&b));
        assert_eq!(fa.begin(0, Instant::now()), Some(CloseReason::Rehomed));
        assert_eq!(
            fb.begin(0, Instant::now()),
            None,
            "a close was just granted"
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(fb.check(0, Instant::now()), Some(CloseReason::Rehomed));
        // A drain is never paced.
        let c = ConnStop::new(&root, Duration::from_secs(5), pacer);
        root.cancel();
        assert_eq!(
            Finishing::new(&c).begin(0, Instant::now()),
            Some(CloseReason::Drained)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_commands_and_rehoming_also_for_its_grace() {
        let root = CancellationToken::new();
        let pacer = Arc::new(ClosePacer::new(1000.0));
        let stop = ConnStop::new(&root, Duration::from_secs(5), pacer.clone());
        let mut f = Finishing::new(&stop);
        assert_eq!(f.check(0, Instant::now()), None, "nothing asked yet");
        root.cancel();
        assert_eq!(f.begin(1, Instant::now()), None, "a command is in flight");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            f.check(1, Instant::now()),
            None,
            "a drain has no grace of its own"
        );
        assert_eq!(f.check(0, Instant::now()), Some(CloseReason::Drained));

        let stop = ConnStop::new(&CancellationToken::new(), Duration::from_secs(5), pacer);
        let mut f = Finishing::new(&stop);
        stop.rehome();
        assert!(stop.token().is_cancelled());
        assert_eq!(f.begin(2, Instant::now()), None);
        tokio::time::advance(Duration::from_millis(4999)).await;
        assert_eq!(f.check(2, Instant::now()), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(f.check(2, Instant::now()), Some(CloseReason::Rehomed));
    }
}
