//! Re-homing (design decision 4): open connections follow a routing change.
//!
//! Every routed connection with a device id is in the [`Registry`] with its path and a
//! [`ConnStop`]. When the configuration or the rollback latch changes, [`run`] finds the
//! connections whose route now differs and asks them, one after another, to close between
//! frames: at once if no command awaits its reply, else when the last one is answered or
//! `routing.drain_grace` has passed — and in either case only when the [`ClosePacer`] grants a
//! slot, so at most `routing.rehome_rate` re-homed connections close per second. The device
//! redials and is routed afresh.
//!
//! Invariants:
//! - A connection whose route did not change is never touched; each candidate is checked
//!   again against the configuration in force right before it is asked to close, so a change
//!   that is undone in time re-homes nobody.
//! - `rehome = "never"` leaves open connections where they are after a configuration change;
//!   the rollback latch still moves new-path connections to legacy (design decision 10).
//! - Shutdown and re-homing share one mechanism (a per-connection child of the shutdown
//!   token), so a connection has exactly one way of being asked to finish.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Rehome;
use crate::legacy::CloseReason;
use crate::metrics::{Metrics, Transport};
use crate::protocol::DeviceId;
use crate::reload::Live;
use crate::router;

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
}

impl<'a> Finishing<'a> {
    pub fn new(stop: &'a ConnStop) -> Self {
        Self {
            stop,
            requested: false,
            deadline: None,
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
    /// has then taken its close slot).
    pub fn check(&self, pending_commands: usize, now: Instant) -> Option<CloseReason> {
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
}

struct Entry {
    device: DeviceId,
    transport: Transport,
    stop: Arc<ConnStop>,
}

/// The routed connections that are open now.
pub struct Registry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
    pacer: Arc<ClosePacer>,
}

/// Removes its connection from the registry when dropped.
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registry {
    pub fn new(rehome_rate: f64) -> Registry {
        Registry {
            next: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            pacer: Arc::new(ClosePacer::new(rehome_rate)),
        }
    }

    /// The pacer every re-homed connection of this registry takes its close slot from.
    pub fn pacer(&self) -> Arc<ClosePacer> {
        self.pacer.clone()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(
        self: &Arc<Self>,
        device: DeviceId,
        transport: Transport,
        stop: Arc<ConnStop>,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            Entry {
                device,
                transport,
                stop,
            },
        );
        Registration {
            registry: self.clone(),
            id,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every open connection's device and path.
    pub fn snapshot(&self) -> Vec<(DeviceId, Transport)> {
        self.lock()
            .values()
            .map(|e| (e.device, e.transport))
            .collect()
    }

    /// Connections on `transport` now.
    pub fn count(&self, transport: Transport) -> usize {
        self.lock()
            .values()
            .filter(|e| e.transport == transport)
            .count()
    }

    /// Connections whose route under the configuration in force differs from their path,
    /// oldest first.
    fn misrouted(&self, live: &Live) -> Vec<u64> {
        let cfg = live.config();
        let latched = live.latched();
        let mut ids: Vec<u64> = self
            .lock()
            .iter()
            .filter(|(_, e)| {
                !e.stop.is_rehome()
                    && router::route(Some(e.device), &cfg.routing, latched).transport != e.transport
            })
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Asks connection `id` to re-home if its route still differs; returns its move.
    fn rehome(&self, id: u64, live: &Live) -> Option<(DeviceId, Transport, Transport)> {
        let cfg = live.config();
        let map = self.lock();
        let e = map.get(&id)?;
        let to = router::route(Some(e.device), &cfg.routing, live.latched()).transport;
        // `rehome = "never"` is about configuration changes; a rollback moves everyone.
        let never = cfg.routing.rehome == Rehome::Never && !live.latched();
        if to == e.transport || e.stop.is_rehome() || never {
            return None;
        }
        e.stop.rehome();
        Some((e.device, e.transport, to))
    }
}

/// Follows configuration changes and re-homes misrouted connections at the configured pace.
pub async fn run(
    live: Arc<Live>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut changes = live.subscribe();
    let mut queue: VecDeque<u64> = VecDeque::new();
    let mut next_slot = Instant::now();
    loop {
        let changed = if queue.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => { if r.is_err() { return; } true }
            }
        } else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => { if r.is_err() { return; } true }
                _ = tokio::time::sleep_until(next_slot) => false,
            }
        };
        if changed {
            changes.borrow_and_update();
            // The latch can change without a reload; keep the effective-percentage gauge true.
            crate::reload::publish(&metrics, &live);
            let rate = live.config().routing.rehome_rate;
            registry.pacer.set_rate(rate);
            if live.config().routing.rehome == Rehome::Never && !live.latched() {
                queue.clear();
                continue;
            }
            // Whom this configuration moves, afresh: a change that was undone meanwhile
            // leaves nobody behind in the queue.
            let before = queue.len();
            queue = registry.misrouted(&live).into();
            if !queue.is_empty() && queue.len() != before {
                info!(
                    connections = queue.len(),
                    rate_per_s = rate,
                    "routing changed; re-homing connections whose path changed"
                );
            }
            continue;
        }
        let Some(id) = queue.pop_front() else {
            continue;
        };
        if let Some((device, from, to)) = registry.rehome(id, &live) {
            metrics
                .rehomes
                .with_label_values(&[from.label(), to.label()])
                .inc();
            info!(%device, from = from.label(), to = to.label(), "re-homing connection");
            let rate = live.config().routing.rehome_rate;
            next_slot = Instant::now() + Duration::from_secs_f64(1.0 / rate);
        }
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
