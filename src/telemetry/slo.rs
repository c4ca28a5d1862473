//! The SLO engine: per path, fixed-size rings of event counts, and from them each SLI over a
//! window, its burn rate and the error budget left. Pure: every method takes `now`.
//!
//! Invariants:
//! - Memory is fixed at construction and independent of traffic (see [`RINGS`]).
//! - Counts are fed as cumulative totals (the same counters the metrics family counts, one
//!   sink); the engine keeps the deltas, so a missed tick loses resolution, never events.
//! - Buckets are addressed by wall-clock slot numbers (`unix_ms / resolution`), so a restored
//!   state lines up with the time that passed while the daemon was down.
//! - Memory bound: per transport 600 + 360 + 720 = 1680 buckets of `size_of::<Counts>()` =
//!   80 bytes (ten `u64`), so 3 transports × 1680 × 80 = 403200 bytes (≈ 394 KiB) in all,
//!   whatever the traffic or the uptime. A test pins this figure.
//! - Advancing a ring over any gap costs at most its length (a longer gap clears it once), and
//!   queries never mutate: a bucket outside the span ending at `now` reads as empty.

use std::collections::BTreeMap;
use std::ops::{Add, Sub};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::telemetry::labels::Transport;

/// What one bucket holds for one path: every SLI's good and total events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredCounts")]
pub struct Counts {
    /// Commands (server 0x73 of class f8) that ended: success, timeout or abandoned.
    pub commands: u64,
    /// Commands whose f9 reply arrived within `command_deadline`.
    pub successes: u64,
    /// Successful commands answered within `slo.latency_threshold`.
    pub within_latency: u64,
    /// Commands that passed `slo.latency_threshold` unanswered, counted when it passed (or when
    /// they ended past it, whichever the tracker saw first), whatever came of them after: a
    /// stall shows as latency misses a threshold after it starts, not a deadline later.
    pub late: u64,
    /// Frames decoded (both directions): the denominator of the decode-error and queue-full
    /// ratios.
    pub frames: u64,
    pub decode_errors: u64,
    /// Frames that met a full queue.
    pub queue_full: u64,
    pub retransmits: u64,
    /// Device connections that ended without the gateway asking (not a drain, not a re-home).
    pub churn_closes: u64,
    /// Connected device time, in milliseconds: the exposure churn is measured against.
    pub device_ms: u64,
}

/// [`Counts`] as a state file holds them. Files written before `late` existed counted a late
/// command only once it was answered, as `successes - within_latency`; that is what their
/// buckets' `late` was, so the latency budget they carry is kept.
#[derive(Deserialize)]
struct StoredCounts {
    commands: u64,
    successes: u64,
    within_latency: u64,
    late: Option<u64>,
    frames: u64,
    decode_errors: u64,
    queue_full: u64,
    retransmits: u64,
    churn_closes: u64,
    device_ms: u64,
}

impl From<StoredCounts> for Counts {
    fn from(s: StoredCounts) -> Counts {
        Counts {
            commands: s.commands,
            successes: s.successes,
            within_latency: s.within_latency,
            late: s
                .late
                .unwrap_or(s.successes.saturating_sub(s.within_latency)),
            frames: s.frames,
            decode_errors: s.decode_errors,
            queue_full: s.queue_full,
            retransmits: s.retransmits,
            churn_closes: s.churn_closes,
            device_ms: s.device_ms,
        }
    }
}

impl Add for Counts {
    type Output = Counts;
    fn add(self, o: Counts) -> Counts {
        Counts {
            commands: self.commands + o.commands,
            successes: self.successes + o.successes,
            within_latency: self.within_latency + o.within_latency,
            late: self.late + o.late,
            frames: self.frames + o.frames,
            decode_errors: self.decode_errors + o.decode_errors,
            queue_full: self.queue_full + o.queue_full,
            retransmits: self.retransmits + o.retransmits,
            churn_closes: self.churn_closes + o.churn_closes,
            device_ms: self.device_ms + o.device_ms,
        }
    }
}

impl Sub for Counts {
    type Output = Counts;
    /// Saturating: a counter that went backwards (it cannot, in one process) yields 0, not a
    /// wrapped huge delta.
    fn sub(self, o: Counts) -> Counts {
        Counts {
            commands: self.commands.saturating_sub(o.commands),
            successes: self.successes.saturating_sub(o.successes),
            within_latency: self.within_latency.saturating_sub(o.within_latency),
            late: self.late.saturating_sub(o.late),
            frames: self.frames.saturating_sub(o.frames),
            decode_errors: self.decode_errors.saturating_sub(o.decode_errors),
            queue_full: self.queue_full.saturating_sub(o.queue_full),
            retransmits: self.retransmits.saturating_sub(o.retransmits),
            churn_closes: self.churn_closes.saturating_sub(o.churn_closes),
            device_ms: self.device_ms.saturating_sub(o.device_ms),
        }
    }
}

/// One objective; the `slo` label.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumIter, Serialize,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Slo {
    /// Share of commands answered (f9) within `command_deadline`.
    Success,
    /// Share of commands answered within `slo.latency_threshold`, of those answered in time
    /// or known late; a command still unanswered when the threshold passes is late at once.
    Latency,
    /// Share of frames that decoded (the SLI is 1 − decode-error ratio).
    DecodeErrors,
    /// Share of frames that did not meet a full queue.
    QueueFull,
    /// Share of commands not re-sent.
    Retransmits,
    /// Device-connection closes the gateway did not ask for, per connected device-hour.
    Churn,
}

impl Slo {
    /// `(bad, total)` events of this objective in `c`; for [`Slo::Churn`] the total is the
    /// exposure in device-hours.
    pub fn bad_total(self, c: &Counts) -> (f64, f64) {
        let f = |n: u64| n as f64;
        match self {
            Slo::Success => (f(c.commands.saturating_sub(c.successes)), f(c.commands)),
            Slo::Latency => (f(c.late), f(c.within_latency + c.late)),
            Slo::DecodeErrors => (f(c.decode_errors), f(c.frames)),
            Slo::QueueFull => (f(c.queue_full), f(c.frames)),
            Slo::Retransmits => (f(c.retransmits), f(c.commands)),
            Slo::Churn => (f(c.churn_closes), c.device_ms as f64 / 3_600_000.0),
        }
    }
}

/// The rings every path keeps, finest first: `(resolution, buckets)`. 10 minutes at 1 s,
/// 6 hours at 1 minute, 30 days at 1 hour. A window is answered from the finest ring whose
/// span covers it, so short windows (fast-burn alerts) keep second resolution while the
/// 30-day budget costs only 720 buckets.
pub const RINGS: [(Duration, usize); 3] = [
    (Duration::from_secs(1), 600),
    (Duration::from_secs(60), 360),
    (Duration::from_secs(3600), 720),
];

/// The version of [`Persisted`] this build writes and accepts.
pub const STATE_VERSION: u32 = 1;

/// A fixed-size circular series of [`Counts`], one bucket per `res_ms` of wall-clock time.
///
/// Bucket of slot `s` (`s = unix_ms / res_ms`) lives at index `s % len`. The ring holds slots
/// `head_slot - len + 1 ..= head_slot`; any other bucket content is stale and never read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    res_ms: u64,
    head_slot: u64,
    #[serde(with = "sparse")]
    buckets: Vec<Counts>,
}

/// A ring's buckets on disk: only the non-empty ones, with their index. Most buckets of a
/// quiet path are empty, and the state file is rewritten every minute.
mod sparse {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Counts;

    /// Longer than any ring in [`super::RINGS`]; a file that says more is not ours.
    const MAX_LEN: usize = 100_000;

    #[derive(Serialize, Deserialize)]
    struct Sparse {
        len: usize,
        filled: Vec<(usize, Counts)>,
    }

    pub fn serialize<S: Serializer>(buckets: &[Counts], s: S) -> Result<S::Ok, S::Error> {
        let filled = buckets
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != Counts::default())
            .map(|(i, c)| (i, *c))
            .collect();
        Sparse {
            len: buckets.len(),
            filled,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Counts>, D::Error> {
        let sp = Sparse::deserialize(d)?;
        if sp.len > MAX_LEN {
            return Err(D::Error::custom(format!("a ring of {} buckets", sp.len)));
        }
        let mut out = vec![Counts::default(); sp.len];
        for (i, c) in sp.filled {
            *out.get_mut(i)
                .ok_or_else(|| D::Error::custom(format!("bucket {i} beyond the ring")))? = c;
        }
        Ok(out)
    }
}

impl Ring {
    /// An empty ring whose head is `head_slot`. `res_ms` and `len` must be non-zero (they come
    /// from [`RINGS`], or are checked by [`Engine::restore`]).
    fn new(res_ms: u64, len: usize, head_slot: u64) -> Ring {
        Ring {
            res_ms,
            head_slot,
            buckets: vec![Counts::default(); len],
        }
    }

    fn len(&self) -> u64 {
        self.buckets.len() as u64
    }

    fn index(&self, slot: u64) -> usize {
        // `slot % len < len`, which came from a `usize`, so the cast cannot truncate.
        (slot % self.len()) as usize
    }

    /// Whether `slot` is one the ring currently holds (`head - len + 1 ..= head`).
    fn holds(&self, slot: u64) -> bool {
        slot <= self.head_slot && slot + self.len() > self.head_slot
    }

    /// Moves the head to `slot`, zeroing every bucket skipped on the way. A gap longer than the
    /// ring zeroes the whole ring once, so the cost is at most `len`, whatever the gap.
    /// An older `slot` is a no-op (the head never moves backwards).
    fn advance(&mut self, slot: u64) {
        if slot <= self.head_slot {
            return;
        }
        let gap = slot - self.head_slot;
        if gap >= self.len() {
            self.buckets.fill(Counts::default());
        } else {
            for s in self.head_slot + 1..=slot {
                let i = self.index(s);
                self.buckets[i] = Counts::default();
            }
        }
        self.head_slot = slot;
    }

    /// Adds `delta` to the bucket of `slot`, advancing the head first if `slot` is newer.
    /// A slot older than the ring's span is dropped: its bucket now belongs to a newer slot.
    fn add(&mut self, slot: u64, delta: Counts) {
        self.advance(slot);
        if self.holds(slot) {
            let i = self.index(slot);
            self.buckets[i] = self.buckets[i] + delta;
        }
    }

    /// The sum of the last `n` buckets up to and including `now_slot` (at most `len`), without
    /// advancing: slots the ring does not hold (older than its span, or newer than its head)
    /// count as empty, so a ring that has not been fed for a while still answers correctly.
    fn sum(&self, now_slot: u64, n: u64) -> Counts {
        let n = n.min(self.len());
        let first = (now_slot + 1).saturating_sub(n);
        // Slots past the head hold nothing yet; stop there so the loop is at most `n` long.
        let last = now_slot.min(self.head_slot);
        let mut acc = Counts::default();
        let mut s = first;
        while s <= last {
            if self.holds(s) {
                acc = acc + self.buckets[self.index(s)];
            }
            s += 1;
        }
        acc
    }
}

/// The engine's state for one transport.
#[derive(Debug, Clone)]
struct PathState {
    /// One ring per entry of [`RINGS`], same order.
    rings: [Ring; 3],
    /// The cumulative counts of the previous observe: deltas are taken against it.
    last_cumulative: Counts,
    /// When this path was last observed; device time is integrated from it.
    last_observe: Option<Instant>,
}

impl PathState {
    fn new(unix_ms: u64) -> PathState {
        PathState {
            rings: RINGS.map(|(res, len)| {
                let res_ms = duration_ms(res);
                Ring::new(res_ms, len, unix_ms / res_ms)
            }),
            last_cumulative: Counts::default(),
            last_observe: None,
        }
    }
}

/// The transports in [`transport_index`] order.
const TRANSPORTS: [Transport; 3] = [Transport::Legacy, Transport::New, Transport::Shadow];

/// The array slot of a transport; an exhaustive match so a new variant fails to compile here.
fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Legacy => 0,
        Transport::New => 1,
        Transport::Shadow => 2,
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The targets the SLIs are judged against, and the period each error budget covers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objectives {
    /// Target share of commands answered (default 0.999).
    pub success: f64,
    /// Target share of commands answered within `latency_threshold`, of those answered in time
    /// or known late (default 0.99).
    pub latency: f64,
    /// The latency a command must beat to count as good (default 1.5 s).
    pub latency_threshold: Duration,
    /// Largest allowed share of frames that fail to decode (default 0.001).
    pub decode_errors: f64,
    /// Largest allowed share of frames that meet a full queue (default 0.01).
    pub queue_full: f64,
    /// Largest allowed share of commands re-sent (default 0.01).
    pub retransmits: f64,
    /// Largest allowed unrequested closes per connected device-hour (default 0.5).
    pub churn_per_device_hour: f64,
    /// The success budget's period (default 30 days).
    pub success_period: Duration,
    /// The latency budget's period (default 7 days).
    pub latency_period: Duration,
    /// The period of every other budget (default 30 days).
    pub other_period: Duration,
}

impl Default for Objectives {
    fn default() -> Objectives {
        const DAY: u64 = 24 * 3600;
        Objectives {
            success: 0.999,
            latency: 0.99,
            latency_threshold: Duration::from_millis(1500),
            decode_errors: 0.001,
            queue_full: 0.01,
            retransmits: 0.01,
            churn_per_device_hour: 0.5,
            success_period: Duration::from_secs(30 * DAY),
            latency_period: Duration::from_secs(7 * DAY),
            other_period: Duration::from_secs(30 * DAY),
        }
    }
}

impl Objectives {
    /// The allowed bad rate of `slo`: the share of bad events (ratio SLOs) or closes per
    /// device-hour (churn). A burn rate of 1 spends exactly this.
    pub fn allowed(&self, slo: Slo) -> f64 {
        match slo {
            Slo::Success => 1.0 - self.success,
            Slo::Latency => 1.0 - self.latency,
            Slo::DecodeErrors => self.decode_errors,
            Slo::QueueFull => self.queue_full,
            Slo::Retransmits => self.retransmits,
            Slo::Churn => self.churn_per_device_hour,
        }
    }

    /// The target of `slo`'s SLI as [`Engine::sli`] reports it: the good share for ratio SLOs
    /// (e.g. 0.999, or 1 − 0.001 for decode errors), the largest allowed rate for churn.
    pub fn target(&self, slo: Slo) -> f64 {
        match slo {
            Slo::Success => self.success,
            Slo::Latency => self.latency,
            Slo::DecodeErrors => 1.0 - self.decode_errors,
            Slo::QueueFull => 1.0 - self.queue_full,
            Slo::Retransmits => 1.0 - self.retransmits,
            Slo::Churn => self.churn_per_device_hour,
        }
    }

    /// The period `slo`'s error budget is computed over.
    pub fn period(&self, slo: Slo) -> Duration {
        match slo {
            Slo::Success => self.success_period,
            Slo::Latency => self.latency_period,
            Slo::DecodeErrors | Slo::QueueFull | Slo::Retransmits | Slo::Churn => self.other_period,
        }
    }
}

/// The SLO engine: per transport, [`RINGS`] of [`Counts`] fed from cumulative counters.
///
/// Time comes only from arguments: `now` is a tokio [`Instant`], mapped to wall-clock
/// milliseconds through the `(start, start_unix_ms)` pair given at construction, so slots
/// line up across restarts and tests can build any instant as `start + Duration`.
#[derive(Debug, Clone)]
pub struct Engine {
    start: Instant,
    start_unix_ms: u64,
    paths: [PathState; 3],
}

impl Engine {
    /// An empty engine; `start` is the instant at which the wall clock read `start_unix_ms`.
    pub fn new(start: Instant, start_unix_ms: u64) -> Engine {
        Engine {
            start,
            start_unix_ms,
            paths: std::array::from_fn(|_| PathState::new(start_unix_ms)),
        }
    }

    /// The wall clock at `now`. An instant before `start` maps to `start_unix_ms`.
    fn unix_ms(&self, now: Instant) -> u64 {
        self.start_unix_ms
            .saturating_add(duration_ms(now.saturating_duration_since(self.start)))
    }

    /// Feeds the cumulative counters of `t` as of `now`, and the device connections open now.
    ///
    /// The delta against the previous feed goes into the current bucket of every ring, so a
    /// missed tick only lumps two ticks' events together. `cumulative.device_ms` is ignored:
    /// device time is integrated here as `active_connections` × the time since the previous
    /// observe of `t` (0 on the first one, which has no previous instant).
    pub fn observe(
        &mut self,
        now: Instant,
        t: Transport,
        cumulative: Counts,
        active_connections: u64,
    ) {
        let unix_ms = self.unix_ms(now);
        let path = &mut self.paths[transport_index(t)];
        let mut delta = cumulative - path.last_cumulative;
        delta.device_ms = match path.last_observe {
            Some(prev) => {
                active_connections.saturating_mul(duration_ms(now.saturating_duration_since(prev)))
            }
            None => 0,
        };
        for ring in &mut path.rings {
            let slot = unix_ms / ring.res_ms;
            if slot + ring.len() <= ring.head_slot {
                // The head is more than a whole span ahead of the clock (the wall clock went
                // back, or a state saved under a future clock was restored). Every event would
                // be dropped until the clock caught up, possibly for weeks; the buckets ahead
                // are unreachable for a full span anyway, so restart the ring at the clock.
                *ring = Ring::new(ring.res_ms, ring.buckets.len(), slot);
            }
            ring.add(slot, delta);
        }
        path.last_cumulative = cumulative;
        path.last_observe = Some(now);
    }

    /// The counts of `t` over the `window` ending at `now`, current partial bucket included.
    ///
    /// Answered from the finest ring whose span covers the window, as the last
    /// `ceil(window / resolution)` buckets; a window longer than the coarsest ring's span is
    /// clamped to it. Does not mutate: buckets the ring has not advanced past yet are read as
    /// empty when they fall outside the span ending at `now`.
    pub fn window(&self, now: Instant, t: Transport, window: Duration) -> Counts {
        let path = &self.paths[transport_index(t)];
        let window_ms = duration_ms(window);
        let ring = path
            .rings
            .iter()
            .find(|r| r.res_ms.saturating_mul(r.len()) >= window_ms)
            .unwrap_or(&path.rings[2]);
        let n = window_ms.div_ceil(ring.res_ms);
        ring.sum(self.unix_ms(now) / ring.res_ms, n)
    }

    /// The SLI of `slo` for `t` over `window`: the good share `1 − bad/total` for ratio SLOs,
    /// closes per device-hour for [`Slo::Churn`]; `NaN` when the window has no events (no
    /// exposure), because "no data" is neither good nor bad.
    pub fn sli(&self, now: Instant, t: Transport, slo: Slo, window: Duration) -> f64 {
        let (bad, total) = slo.bad_total(&self.window(now, t, window));
        if total <= 0.0 {
            return f64::NAN;
        }
        match slo {
            Slo::Churn => bad / total,
            _ => 1.0 - bad / total,
        }
    }

    /// How fast `t` spends `slo`'s budget over `window`: the bad rate divided by the allowed
    /// rate (1 spends the budget exactly over its period). 0 when the window has no events, so
    /// an idle path never pages. An allowed rate of 0 with bad events is infinite.
    pub fn burn_rate(
        &self,
        now: Instant,
        t: Transport,
        slo: Slo,
        objective: &Objectives,
        window: Duration,
    ) -> f64 {
        let (bad, total) = slo.bad_total(&self.window(now, t, window));
        if total <= 0.0 || bad <= 0.0 {
            return 0.0;
        }
        (bad / total) / objective.allowed(slo)
    }

    /// The share of `slo`'s error budget left for `t` over its period
    /// ([`Objectives::period`]): `max(0, 1 − burn rate over the period)`, which for ratio SLOs
    /// is `max(0, 1 − (1 − actual)/(1 − target))`. 1 when the period has no events.
    pub fn budget_remaining(
        &self,
        now: Instant,
        t: Transport,
        slo: Slo,
        objective: &Objectives,
    ) -> f64 {
        let burn = self.burn_rate(now, t, slo, objective, objective.period(slo));
        (1.0 - burn).max(0.0)
    }

    /// The rings as they stand, for writing to disk. Does not advance them: each ring's
    /// `head_slot` is the last slot it was fed, and [`Engine::restore`] reads stale buckets
    /// the same way a live engine does.
    pub fn snapshot(&self, now: Instant) -> Persisted {
        Persisted {
            version: STATE_VERSION,
            saved_unix_ms: self.unix_ms(now),
            transports: TRANSPORTS
                .iter()
                .map(|&t| {
                    let key: &'static str = t.into();
                    (
                        key.to_string(),
                        self.paths[transport_index(t)].rings.to_vec(),
                    )
                })
                .collect(),
        }
    }

    /// An engine that continues from `p`, with `start` the instant at which the wall clock
    /// read `start_unix_ms` (the new process's clock pair).
    ///
    /// Buckets keep their slots, so the downtime reads as empty buckets and anything older
    /// than a ring's span falls out of it on the next query or feed. The cumulative baseline
    /// is zero (a new process's counters start at 0). A transport missing from `p` starts
    /// empty. A ring whose head is ahead of the clock (the clock went back) keeps its buckets:
    /// windows ending now skip the slots ahead of now until the clock reaches them, events
    /// still land in their own slot while it is within the ring's span of the head, and a head
    /// more than a span ahead is reset at the next feed (see [`Engine::observe`]).
    pub fn restore(
        p: Persisted,
        start: Instant,
        start_unix_ms: u64,
    ) -> Result<Engine, RestoreError> {
        if p.version != STATE_VERSION {
            return Err(RestoreError::Version {
                found: p.version,
                expected: STATE_VERSION,
            });
        }
        let mut engine = Engine::new(start, start_unix_ms);
        for (key, rings) in p.transports {
            let Some(t) = TRANSPORTS
                .iter()
                .copied()
                .find(|&t| <&'static str>::from(t) == key)
            else {
                return Err(RestoreError::UnknownTransport(key));
            };
            if rings.len() != RINGS.len() {
                return Err(RestoreError::RingCount {
                    transport: key,
                    expected: RINGS.len(),
                    found: rings.len(),
                });
            }
            for (index, (ring, (res, len))) in rings.iter().zip(RINGS).enumerate() {
                let expected_res_ms = duration_ms(res);
                if ring.res_ms != expected_res_ms || ring.buckets.len() != len {
                    return Err(RestoreError::RingShape {
                        transport: key,
                        index,
                        expected_res_ms,
                        expected_len: len,
                        found_res_ms: ring.res_ms,
                        found_len: ring.buckets.len(),
                    });
                }
            }
            let path = &mut engine.paths[transport_index(t)];
            for (dst, src) in path.rings.iter_mut().zip(rings) {
                *dst = src;
            }
        }
        Ok(engine)
    }
}

/// The engine's state on disk: every transport's rings, as [`Engine::snapshot`] wrote them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    /// The format version; [`Engine::restore`] accepts only [`STATE_VERSION`].
    pub version: u32,
    /// The wall clock when the snapshot was taken (informational: buckets carry their slots).
    pub saved_unix_ms: u64,
    /// Per transport label (`"legacy"`, `"new"`, `"shadow"`), its rings in [`RINGS`] order.
    pub transports: BTreeMap<String, Vec<Ring>>,
}

/// Why a [`Persisted`] state cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The state was written by another format version.
    #[error("SLO state version {found} is not the supported version {expected}")]
    Version {
        /// The version in the state.
        found: u32,
        /// [`STATE_VERSION`].
        expected: u32,
    },
    /// A transport key that is not a transport label.
    #[error("SLO state names an unknown transport {0:?}")]
    UnknownTransport(String),
    /// A transport with another number of rings than [`RINGS`].
    #[error("SLO state for {transport} has {found} rings, expected {expected}")]
    RingCount {
        /// The transport key.
        transport: String,
        /// `RINGS.len()`.
        expected: usize,
        /// The number in the state.
        found: usize,
    },
    /// A ring whose resolution or length differs from [`RINGS`].
    #[error(
        "SLO state ring {index} of {transport} is {found_len} x {found_res_ms} ms, \
         expected {expected_len} x {expected_res_ms} ms"
    )]
    RingShape {
        /// The transport key.
        transport: String,
        /// The ring's position (0 = finest).
        index: usize,
        /// The resolution [`RINGS`] expects.
        expected_res_ms: u64,
        /// The bucket count [`RINGS`] expects.
        expected_len: usize,
        /// The resolution in the state.
        found_res_ms: u64,
        /// The bucket count in the state.
        found_len: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::IntoEnumIterator;

    /// A wall clock aligned to an hour (472_222 × 3_600_000), so slot arithmetic in the tests
    /// can count seconds, minutes and hours from 0.
    const T0: u64 = 1_699_999_200_000;

    fn start() -> Instant {
        Instant::now()
    }

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    fn cmds(commands: u64, successes: u64) -> Counts {
        Counts {
            commands,
            successes,
            within_latency: successes,
            ..Counts::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn counts_add_and_subtract_field_by_field() {
        let a = Counts {
            commands: 1,
            successes: 2,
            within_latency: 3,
            late: 10,
            frames: 4,
            decode_errors: 5,
            queue_full: 6,
            retransmits: 7,
            churn_closes: 8,
            device_ms: 9,
        };
        let b = Counts {
            commands: 10,
            successes: 20,
            within_latency: 30,
            late: 100,
            frames: 40,
            decode_errors: 50,
            queue_full: 60,
            retransmits: 70,
            churn_closes: 80,
            device_ms: 90,
        };
        let sum = Counts {
            commands: 11,
            successes: 22,
            within_latency: 33,
            late: 110,
            frames: 44,
            decode_errors: 55,
            queue_full: 66,
            retransmits: 77,
            churn_closes: 88,
            device_ms: 99,
        };
        assert_eq!(a + b, sum);
        assert_eq!(sum - a, b);
        assert_eq!(a - b, Counts::default(), "saturates, never wraps");
    }

    #[test]
    fn a_late_command_is_a_latency_miss_before_it_is_answered_and_only_once() {
        // Two in time, one past the threshold and still unanswered: already one miss in three.
        let waiting = Counts {
            within_latency: 2,
            late: 1,
            ..Counts::default()
        };
        assert_eq!(Slo::Latency.bad_total(&waiting), (1.0, 3.0));
        // Its answer later adds a command and a success, not another latency event.
        let answered = Counts {
            commands: 3,
            successes: 3,
            ..waiting
        };
        assert_eq!(Slo::Latency.bad_total(&answered), (1.0, 3.0));
        assert_eq!(Slo::Success.bad_total(&answered), (0.0, 3.0));
    }

    #[test]
    fn a_bucket_written_before_late_existed_reads_its_late_answers_as_late() {
        let old = r#"{"commands":10,"successes":8,"within_latency":5,"frames":0,"decode_errors":0,"queue_full":0,"retransmits":0,"churn_closes":0,"device_ms":0}"#;
        let c: Counts = serde_json::from_str(old).unwrap();
        assert_eq!(c.late, 3, "the 3 answered past the threshold");
        assert_eq!(Slo::Latency.bad_total(&c), (3.0, 8.0));
        let now: Counts =
            serde_json::from_str(&serde_json::to_string(&Counts { late: 1, ..c }).unwrap())
                .unwrap();
        assert_eq!(now.late, 1, "a field written is read back as written");
    }

    #[test]
    fn memory_bound_in_header_matches_size_of_counts() {
        // 600 + 360 + 720 = 1680 buckets per transport.
        assert_eq!(RINGS.iter().map(|r| r.1).sum::<usize>(), 1680);
        // 3 × 1680 × 80 = 403200, the figure in the module header.
        assert_eq!(std::mem::size_of::<Counts>() * 1680 * 3, 403_200);
    }

    #[test]
    fn window_sums_the_last_buckets_at_one_second_resolution() {
        let s = start();
        let mut e = Engine::new(s, T0);
        // Cumulative 1, 3, 6, 10 at seconds 0, 1, 2, 5: deltas 1, 2, 3, 4 in slots 0, 1, 2, 5.
        for (sec, cum) in [(0, 1), (1, 3), (2, 6), (5, 10)] {
            e.observe(at(s, sec), Transport::Legacy, cmds(cum, cum), 0);
        }
        let now = at(s, 5);
        let w = |d: Duration| e.window(now, Transport::Legacy, d).commands;
        assert_eq!(w(Duration::from_secs(1)), 4); // slot 5
        assert_eq!(w(Duration::from_secs(3)), 4); // slots 3..=5: 0 + 0 + 4
        assert_eq!(w(Duration::from_secs(4)), 7); // slots 2..=5: 3 + 4
        assert_eq!(w(Duration::from_millis(2500)), 4); // ceil(2.5) = 3 buckets: slots 3..=5
        assert_eq!(w(Duration::from_secs(6)), 10); // slots 0..=5: 1 + 2 + 3 + 4
                                                   // The current, partial bucket counts: 0.5 s into slot 5 still sees slot 5.
        let mid = now + Duration::from_millis(500);
        assert_eq!(
            e.window(mid, Transport::Legacy, Duration::from_secs(1))
                .commands,
            4
        );
        // Later, without a feed: slots 5..=7 hold 4 + 0 + 0.
        assert_eq!(
            e.window(at(s, 7), Transport::Legacy, Duration::from_secs(3))
                .commands,
            4
        );
        // Other transports are untouched.
        assert_eq!(e.window(now, Transport::New, HOUR), Counts::default());
    }

    #[test]
    fn data_older_than_ten_minutes_leaves_the_ten_minute_window_but_stays_in_the_hour_window() {
        let s = start();
        let mut e = Engine::new(s, T0);
        let ten_min = Duration::from_secs(600);
        e.observe(at(s, 0), Transport::Legacy, cmds(5, 5), 0);
        // At 599 s the 10-minute window is slots 0..=599: still holds the 5.
        assert_eq!(e.window(at(s, 599), Transport::Legacy, ten_min).commands, 5);
        // At 600 s it is slots 1..=600: the 5 has left, although the ring was not advanced.
        assert_eq!(e.window(at(s, 600), Transport::Legacy, ten_min).commands, 0);
        // Cumulative 12 at 700 s: delta 7 in second 700 and minute 11.
        e.observe(at(s, 700), Transport::Legacy, cmds(12, 12), 0);
        assert_eq!(e.window(at(s, 700), Transport::Legacy, ten_min).commands, 7);
        // 1 h > the second ring's 600 s span, so the minute ring answers: 60 buckets ending at
        // minute 11 = minutes 0..=11, holding 5 (minute 0) + 7 (minute 11) = 12.
        assert_eq!(e.window(at(s, 700), Transport::Legacy, HOUR).commands, 12);
        // 30 days: the hour ring, hour 0 holds both.
        let month = Duration::from_secs(30 * 24 * 3600);
        assert_eq!(e.window(at(s, 700), Transport::Legacy, month).commands, 12);
        // Longer than the hour ring's span is clamped to it (720 h), not an error.
        assert_eq!(
            e.window(at(s, 700), Transport::Legacy, month * 10).commands,
            12
        );
    }

    #[test]
    fn a_long_silence_clears_the_skipped_buckets() {
        let s = start();
        let mut e = Engine::new(s, T0);
        e.observe(at(s, 0), Transport::Legacy, cmds(5, 5), 0);
        // 2 h of silence, then cumulative 6: delta 1 at second 7200, minute 120, hour 2.
        e.observe(at(s, 7200), Transport::Legacy, cmds(6, 6), 0);
        let now = at(s, 7200);
        assert_eq!(
            e.window(now, Transport::Legacy, Duration::from_secs(600))
                .commands,
            1
        );
        // 6 h in the minute ring: minutes 0..=120 → 5 + 1.
        assert_eq!(e.window(now, Transport::Legacy, 6 * HOUR).commands, 6);
        // The gap (7200 slots) exceeded the second ring's 600: every old bucket was zeroed, so
        // only the current one is non-empty.
        let ring = &e.paths[0].rings[0];
        let non_empty = ring.buckets.iter().filter(|c| **c != Counts::default());
        assert_eq!(non_empty.count(), 1);
        assert_eq!(ring.head_slot, (T0 + 7_200_000) / 1000);
    }

    #[test]
    fn ring_advance_clears_skipped_buckets_and_drops_slots_older_than_its_span() {
        let one = cmds(1, 1);
        let mut r = Ring::new(1000, 600, 0);
        r.add(10, cmds(5, 5));
        // 10 → 605 wraps (index 5) but slot 10 is still within 6..=605: kept.
        r.add(605, one);
        assert_eq!(r.sum(605, 600).commands, 6);
        // Same slot index as slot 0 after exactly one span: cleared, not summed with old data.
        let mut r2 = Ring::new(1000, 600, 0);
        r2.add(0, cmds(5, 5));
        r2.add(600, one);
        assert_eq!(r2.buckets[0].commands, 1);
        // Head 1000 holds slots 1000 − 600 + 1 = 401 ..= 1000: slot 400 is dropped, 401 kept.
        let mut r3 = Ring::new(1000, 600, 0);
        r3.add(1000, one);
        r3.add(400, cmds(100, 100));
        r3.add(401, cmds(2, 2));
        assert_eq!(r3.sum(1000, 600).commands, 3); // 1 + 2, the 100 counted nowhere
                                                   // Reading far past the head without advancing: the window 701..=1300 lies entirely
                                                   // after r's head (605), so it is empty although r's buckets still hold data.
        assert_eq!(r.sum(1300, 600), Counts::default());
    }

    #[test]
    fn device_ms_integrates_active_connections_over_the_time_between_observes() {
        let s = start();
        let mut e = Engine::new(s, T0);
        // The cumulative `device_ms` fed is ignored: the engine integrates its own.
        let junk = Counts {
            device_ms: 999_999,
            ..Counts::default()
        };
        e.observe(s, Transport::Legacy, junk, 4); // first observe: 0
        e.observe(s + Duration::from_millis(1500), Transport::Legacy, junk, 4); // 4 × 1500
        e.observe(at(s, 4), Transport::Legacy, junk, 2); // 2 × 2500
                                                         // 0 + 6000 + 5000 = 11000 ms.
        let w = e.window(at(s, 4), Transport::Legacy, Duration::from_secs(10));
        assert_eq!(w.device_ms, 11_000);
        // Per transport: New's first observe integrates nothing.
        e.observe(at(s, 4), Transport::New, junk, 100);
        assert_eq!(e.window(at(s, 4), Transport::New, HOUR).device_ms, 0);
    }

    #[test]
    fn churn_sli_is_closes_per_device_hour() {
        let s = start();
        let mut e = Engine::new(s, T0);
        let o = Objectives::default();
        e.observe(s, Transport::New, Counts::default(), 10);
        let closes = Counts {
            churn_closes: 1,
            ..Counts::default()
        };
        // 10 devices × 720 s = 7_200_000 ms = 2 device-hours; 1 close → 0.5 per device-hour.
        e.observe(at(s, 720), Transport::New, closes, 10);
        let now = at(s, 720);
        assert!(close(e.sli(now, Transport::New, Slo::Churn, HOUR), 0.5));
        // Burn: 0.5 / 0.5 allowed = 1; budget over 30 d: max(0, 1 − 1) = 0.
        assert!(close(
            e.burn_rate(now, Transport::New, Slo::Churn, &o, HOUR),
            1.0
        ));
        assert!(close(
            e.budget_remaining(now, Transport::New, Slo::Churn, &o),
            0.0
        ));
        // Three more closes in the next 720 s (2 more device-hours): 4 in 4 h = 1.0 per
        // device-hour; a rate, not a share (a share would read 1 − 1.0 = 0).
        let more = Counts {
            churn_closes: 4,
            ..Counts::default()
        };
        e.observe(at(s, 1440), Transport::New, more, 10);
        assert!(close(
            e.sli(at(s, 1440), Transport::New, Slo::Churn, HOUR),
            1.0
        ));
    }

    #[test]
    fn each_targets_sli_is_the_share_of_good_events_or_the_churn_rate() {
        let o = Objectives {
            decode_errors: 0.002,
            queue_full: 0.03,
            retransmits: 0.04,
            ..Objectives::default()
        };
        assert_eq!(o.target(Slo::Success), 0.999);
        assert_eq!(o.target(Slo::Latency), 0.99);
        assert!(close(o.target(Slo::DecodeErrors), 0.998));
        assert!(close(o.target(Slo::QueueFull), 0.97));
        assert!(close(o.target(Slo::Retransmits), 0.96));
        assert_eq!(o.target(Slo::Churn), 0.5);
    }

    #[test]
    fn three_failures_in_a_thousand_commands_burn_three_times_and_exhaust_the_budget() {
        let s = start();
        let mut e = Engine::new(s, T0);
        let o = Objectives::default();
        e.observe(s, Transport::Legacy, cmds(1000, 997), 0);
        let now = at(s, 1);
        // SLI = 1 − 3/1000 = 0.997.
        assert!(close(
            e.sli(now, Transport::Legacy, Slo::Success, HOUR),
            0.997
        ));
        // Burn = (3/1000) / (1 − 0.999) = 0.003 / 0.001 = 3.
        let burn = e.burn_rate(now, Transport::Legacy, Slo::Success, &o, HOUR);
        assert!(close(burn, 3.0), "{burn}");
        // Budget = max(0, 1 − 3) = 0 (clamped, not −2).
        assert_eq!(
            e.budget_remaining(now, Transport::Legacy, Slo::Success, &o),
            0.0
        );
    }

    #[test]
    fn five_failures_in_ten_thousand_commands_leave_half_the_budget() {
        let s = start();
        let mut e = Engine::new(s, T0);
        let o = Objectives::default();
        e.observe(s, Transport::Legacy, cmds(10_000, 9_995), 0);
        let now = at(s, 1);
        // Burn = (5/10000) / 0.001 = 0.5; budget = 1 − 0.5 = 0.5, which is also
        // 1 − (1 − 0.9995)/(1 − 0.999).
        let b = e.budget_remaining(now, Transport::Legacy, Slo::Success, &o);
        assert!(close(b, 0.5), "{b}");
        let sli = e.sli(now, Transport::Legacy, Slo::Success, o.period(Slo::Success));
        assert!(close(b, 1.0 - (1.0 - sli) / (1.0 - o.target(Slo::Success))));
    }

    #[test]
    fn empty_windows_give_nan_sli_zero_burn_and_a_full_budget() {
        let s = start();
        let mut e = Engine::new(s, T0);
        let o = Objectives::default();
        for slo in Slo::iter() {
            assert!(e.sli(s, Transport::Shadow, slo, HOUR).is_nan(), "{slo:?}");
            assert_eq!(e.burn_rate(s, Transport::Shadow, slo, &o, HOUR), 0.0);
            assert_eq!(e.budget_remaining(s, Transport::Shadow, slo, &o), 1.0);
        }
        // Commands that all failed: the latency SLI has no answered commands, so no data.
        e.observe(s, Transport::Shadow, cmds(3, 0), 0);
        assert!(e.sli(s, Transport::Shadow, Slo::Latency, MIN).is_nan());
        assert!(close(e.sli(s, Transport::Shadow, Slo::Success, MIN), 0.0));
    }

    #[test]
    fn objectives_default_allowed_target_and_period() {
        let o = Objectives::default();
        assert!(close(o.allowed(Slo::Success), 0.001));
        assert!(close(o.allowed(Slo::Latency), 0.01));
        assert!(close(o.target(Slo::DecodeErrors), 0.999));
        assert!(close(o.allowed(Slo::QueueFull), 0.01));
        assert!(close(o.target(Slo::Churn), 0.5));
        assert_eq!(o.latency_threshold, Duration::from_millis(1500));
        assert_eq!(o.period(Slo::Latency), 7 * 24 * HOUR);
        assert_eq!(o.period(Slo::Success), 30 * 24 * HOUR);
        assert_eq!(o.period(Slo::Retransmits), 30 * 24 * HOUR);
    }

    #[test]
    fn snapshot_through_json_and_restore_keeps_the_budget_now_and_after_a_thirty_minute_gap() {
        let s = start();
        let mut e = Engine::new(s, T0);
        let o = Objectives::default();
        e.observe(at(s, 100), Transport::Legacy, cmds(10_000, 9_995), 0);
        let now = at(s, 100);
        let saved = e.snapshot(now);
        assert_eq!(saved.saved_unix_ms, T0 + 100_000);
        let json = serde_json::to_string(&saved).unwrap();
        let p: Persisted = serde_json::from_str(&json).unwrap();
        assert_eq!(p, saved);

        // Same wall clock, a new process's instant.
        let s2 = at(s, 5000);
        let r = Engine::restore(p.clone(), s2, T0 + 100_000).unwrap();
        let b = r.budget_remaining(s2, Transport::Legacy, Slo::Success, &o);
        assert!(close(b, 0.5), "{b}"); // 1 − (5/10000)/0.001
        assert_eq!(r.snapshot(s2).transports, saved.transports);

        // 30 minutes down: the budget (30 d, hour ring) is unchanged, as on the original at
        // the same wall clock; the 10-minute window has lost the data, the 1 h window not.
        let r = Engine::restore(p, s2, T0 + 100_000 + 1_800_000).unwrap();
        let later = at(s, 1900);
        let original = e.budget_remaining(later, Transport::Legacy, Slo::Success, &o);
        let restored = r.budget_remaining(s2, Transport::Legacy, Slo::Success, &o);
        assert!(close(original, 0.5) && close(restored, 0.5));
        let ten_min = Duration::from_secs(600);
        assert!(r.sli(s2, Transport::Legacy, Slo::Success, ten_min).is_nan());
        assert!(close(
            r.sli(s2, Transport::Legacy, Slo::Success, HOUR),
            0.9995
        ));

        // The baseline is zero: the new process's first cumulative 100/100 is all new.
        let mut r = r;
        r.observe(s2, Transport::Legacy, cmds(100, 100), 0);
        // 5 bad of 10100: burn = (5/10100)/0.001 = 0.4950495..., budget = 0.5049504...
        let b = r.budget_remaining(s2, Transport::Legacy, Slo::Success, &o);
        assert!(close(b, 1.0 - (5.0 / 10_100.0) / 0.001), "{b}");
    }

    #[test]
    fn restore_rejects_a_wrong_version() {
        let s = start();
        let mut p = Engine::new(s, T0).snapshot(s);
        p.version = 2;
        let err = Engine::restore(p, s, T0).unwrap_err();
        assert_eq!(
            err,
            RestoreError::Version {
                found: 2,
                expected: STATE_VERSION
            }
        );
    }

    #[test]
    fn restore_rejects_a_wrong_ring_shape() {
        let s = start();
        let good = Engine::new(s, T0).snapshot(s);

        let mut p = good.clone();
        if let Some(rings) = p.transports.get_mut("new") {
            rings[1].buckets.pop();
        }
        assert!(matches!(
            Engine::restore(p, s, T0),
            Err(RestoreError::RingShape {
                index: 1,
                expected_len: 360,
                found_len: 359,
                ..
            })
        ));

        let mut p = good.clone();
        if let Some(rings) = p.transports.get_mut("legacy") {
            rings[0].res_ms = 500;
        }
        assert!(matches!(
            Engine::restore(p, s, T0),
            Err(RestoreError::RingShape {
                index: 0,
                found_res_ms: 500,
                ..
            })
        ));

        let mut p = good.clone();
        if let Some(rings) = p.transports.get_mut("shadow") {
            rings.pop();
        }
        assert!(matches!(
            Engine::restore(p, s, T0),
            Err(RestoreError::RingCount {
                expected: 3,
                found: 2,
                ..
            })
        ));

        let mut p = good;
        let rings = p.transports["new"].clone();
        p.transports.insert("carrier_pigeon".to_string(), rings);
        assert_eq!(
            Engine::restore(p, s, T0).unwrap_err(),
            RestoreError::UnknownTransport("carrier_pigeon".to_string())
        );
    }

    #[test]
    fn cumulative_feed_with_a_missed_tick_loses_nothing() {
        let s = start();
        let mut e = Engine::new(s, T0);
        // Ticks at 0, 1, (2 missed), 3: cumulative 10, 20, 40. Deltas 10, 10, 20: the missed
        // tick's events land in second 3, none is lost.
        for (sec, cum) in [(0, 10), (1, 20), (3, 40)] {
            e.observe(at(s, sec), Transport::New, cmds(cum, cum), 0);
        }
        let now = at(s, 3);
        assert_eq!(
            e.window(now, Transport::New, Duration::from_secs(10))
                .commands,
            40
        );
        assert_eq!(
            e.window(now, Transport::New, Duration::from_secs(1))
                .commands,
            20
        );
        assert_eq!(e.window(now, Transport::New, HOUR).commands, 40);
    }

    #[test]
    fn restored_head_ahead_of_the_clock_keeps_buckets_and_does_not_panic() {
        let s = start();
        let mut e = Engine::new(s, T0 + 1_000_000);
        e.observe(s, Transport::Legacy, cmds(7, 7), 0); // second 1000, minute 16, hour 0
        let p = e.snapshot(s);
        let ten_min = Duration::from_secs(600);

        // The clock went back 100 s: head 1000 is ahead of second 900.
        let mut r = Engine::restore(p.clone(), s, T0 + 900_000).unwrap();
        // Windows ending at 900 skip the slots ahead: 10 min = seconds 301..=900 → 0; the
        // hour ring's hour 0 is the current hour → 7.
        assert_eq!(r.window(s, Transport::Legacy, ten_min).commands, 0);
        assert_eq!(r.window(s, Transport::Legacy, 24 * HOUR).commands, 7);
        // A feed at second 900 is within 600 of the head (1000): it lands in its own slot.
        r.observe(s, Transport::Legacy, cmds(3, 3), 0);
        // Once the clock reaches 1000, seconds 401..=1000 hold 3 + 7.
        assert_eq!(
            r.window(at(s, 100), Transport::Legacy, ten_min).commands,
            10
        );

        // Back a whole day: the second and minute heads are more than a span ahead and are
        // reset at the feed, so the new events are not dropped; the hour ring (span 30 d)
        // keeps hour 0 ahead of the clock.
        let day_ms = 24 * 3_600_000;
        let mut r = Engine::restore(p, s, T0 + 1_000_000 - day_ms).unwrap();
        r.observe(s, Transport::Legacy, cmds(3, 3), 0);
        assert_eq!(r.window(s, Transport::Legacy, ten_min).commands, 3);
        assert_eq!(r.window(s, Transport::Legacy, 6 * HOUR).commands, 3);
        assert_eq!(r.window(s, Transport::Legacy, 30 * 24 * HOUR).commands, 3);
        let a_day_later = s + Duration::from_millis(day_ms);
        assert_eq!(
            r.window(a_day_later, Transport::Legacy, 30 * 24 * HOUR)
                .commands,
            10
        );
    }
}
