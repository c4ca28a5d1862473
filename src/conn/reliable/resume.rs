//! Upstream resumption: what a reliable session does when the add-on connection drops while
//! the device stays (design decision 7, protocol §14.8).
//!
//! The session redials with growing, per-device jittered gaps for up to `resume_window` (long enough for an add-on
//! or its container to restart), replays the device's cached session preamble — its 0x23
//! hello, then the 0xc3, TLV-form 0x43 and firmware-report 0x83s it sent after connecting — and
//! swallows the answers to what it replayed (the device already had them). Meanwhile it answers
//! the device's 0xd3 itself; those heartbeats still reach the upstream once it is back, so the
//! upstream's 0xd8 for them is a second answer and is dropped too.
//!
//! Resumption is for losses, not refusals or kicks:
//! - an upstream that never answered the device's own hello (never established: e.g. an
//!   add-on at its connection limit holding the extra connection) is not resumed;
//! - a redialled upstream gets `resume_hello_timeout` to answer the replayed hello;
//! - an upstream that closes again within `resume_stable_after` of a resumption closed on
//!   purpose (a server keeping one session per device or address): the device side is closed
//!   too, so the device learns, as it would without the gateway.
//!
//! Invariants:
//! - Pure state plus one async dial loop; every state call takes `now`.
//! - An answer is swallowed only while one is owed (each owed answer once), and an owed answer
//!   expires after `owed_window`, so an upstream that never answers what was replayed cannot
//!   make the session swallow a later, real reply.
//! - Exactly one 0x28 is swallowed per resumption, and only before the resumption completes.
//! - The attempt budget belongs to one outage.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Config;
use crate::conn::fifo::Fifo;
use crate::conn::tls::Stream;
use crate::conn::upstream::{DialError, Dialer};
use crate::protocol::{MsgId, PacketType};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The first upstream has not answered the device's hello yet.
    Establishing,
    /// The upstream is up and has acknowledged the hello.
    Connected,
    /// No upstream; redialling.
    Redialing,
    /// Redialled and the hello replayed at this instant; its 0x28 has not come back yet.
    AwaitingHelloAck(Instant),
}

/// What an upstream loss leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Redial: this many attempts within this much time.
    Resume { attempts: u32, within: Duration },
    /// The upstream never accepted the device: close the device side, as legacy would.
    NotEstablished,
    /// Closed again right after a resumption, twice running: on purpose (the add-on keeps one
    /// session per device, say). Close the device side. Once alone may be an add-on that was
    /// still shutting down when it took the redial.
    Kicked,
    /// Redialled twice in this outage, and both times closed before it answered the replayed
    /// hello: the add-on is refusing this device. Close the device side.
    Refused,
    /// The device was given part of a frame the lost upstream never finished: whatever a
    /// new upstream sends would be read as its rest. Close the device side, as legacy would.
    MidFrame,
    /// The outage's attempts or time are spent (or resumption is off).
    Exhausted,
}

/// An answer the upstream owes to something the gateway wrote for the device (a replayed
/// frame, or a heartbeat it already answered locally): to be dropped when it comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owed {
    pub reply: PacketType,
    /// For echoing replies (0x88): the msg_id it echoes.
    pub echo: Option<MsgId>,
}

#[derive(Debug)]
pub struct Resume {
    phase: Phase,
    /// The session's configuration, read where a setting is used: a copy of each was 68 bytes
    /// more of every idle session.
    cfg: Arc<Config>,
    /// Attempts used in the current outage.
    used: u32,
    /// Redialled upstreams that closed before answering the replayed hello, this outage.
    refusals: u32,
    /// Resumed upstreams closed again within `stable_after`, in a row.
    kicks: u32,
    outage_started: Option<Instant>,
    /// When the last resumption completed.
    resumed_at: Option<Instant>,
    owed: Fifo<(Owed, Instant)>,
}

impl Resume {
    /// A session's resumption state, under `cfg`'s `reliable.resume_*` settings; owed answers
    /// are awaited for `protocol.reply_timeout`.
    pub fn new(cfg: Arc<Config>) -> Self {
        Self {
            phase: Phase::Establishing,
            cfg,
            used: 0,
            refusals: 0,
            kicks: 0,
            outage_started: None,
            resumed_at: None,
            owed: Fifo::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// While the upstream is away the session answers heartbeats itself.
    pub fn answers_locally(&self) -> bool {
        matches!(self.phase, Phase::Redialing | Phase::AwaitingHelloAck(_))
    }

    /// The upstream dropped.
    pub fn lost(&mut self, now: Instant) -> Loss {
        match self.phase {
            Phase::Establishing => return Loss::NotEstablished,
            Phase::Connected => {
                let recent = self.resumed_at.is_some_and(|t| {
                    now.saturating_duration_since(t) < self.cfg.reliable.resume_stable_after
                });
                self.kicks = if recent { self.kicks + 1 } else { 0 };
                if self.kicks >= 2 {
                    return Loss::Kicked;
                }
                self.used = 0;
                self.refusals = 0;
                self.outage_started = Some(now);
            }
            Phase::AwaitingHelloAck(_) => {
                // Accepted, then closed without a 0x28: once may be the add-on still starting;
                // twice is its answer.
                self.refusals += 1;
                if self.refusals >= 2 {
                    return Loss::Refused;
                }
            }
            Phase::Redialing => {}
        }
        let started = *self.outage_started.get_or_insert(now);
        self.phase = Phase::Redialing;
        let left = self.cfg.reliable.resume_attempts.saturating_sub(self.used);
        let within = self
            .cfg
            .reliable
            .resume_window
            .saturating_sub(now.saturating_duration_since(started));
        if left > 0 && !within.is_zero() {
            Loss::Resume {
                attempts: left,
                within,
            }
        } else {
            Loss::Exhausted
        }
    }

    /// Records attempts spent by a redial.
    pub fn spent(&mut self, attempts: u32) {
        self.used += attempts;
    }

    /// A redial succeeded and the preamble is about to be replayed; `replayed` are the answers
    /// it will draw (the 0x28 aside, which [`Resume::take_hello_ack`] handles).
    pub fn redialed(&mut self, now: Instant, replayed: &[Owed]) {
        self.phase = Phase::AwaitingHelloAck(now);
        for o in replayed {
            self.owed.push_back((*o, now));
        }
    }

    /// An upstream 0x28: true if it answers the replayed hello and must be swallowed. The first
    /// one on the first upstream establishes the session and is forwarded.
    pub fn take_hello_ack(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Establishing => {
                self.phase = Phase::Connected;
                false
            }
            Phase::AwaitingHelloAck(_) => {
                self.phase = Phase::Connected;
                self.outage_started = None;
                self.resumed_at = Some(now);
                true
            }
            Phase::Connected | Phase::Redialing => false,
        }
    }

    /// True when the redialled upstream has not answered the replayed hello in time.
    pub fn hello_overdue(&self, now: Instant) -> bool {
        matches!(self.phase, Phase::AwaitingHelloAck(at) if now.saturating_duration_since(at) >= self.cfg.reliable.resume_hello_timeout)
    }

    /// When [`Resume::hello_overdue`] turns true, if it can.
    pub fn hello_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitingHelloAck(at) => Some(at + self.cfg.reliable.resume_hello_timeout),
            _ => None,
        }
    }

    /// The upstream is gone: answers it owed will never come, so nothing is owed any more.
    pub fn clear_owed(&mut self) {
        self.owed.clear();
    }

    /// Something answered locally (or replayed) has just been written upstream.
    pub fn owe(&mut self, owed: Owed, now: Instant) {
        self.owed.push_back((owed, now));
    }

    /// An upstream reply of `reply` type (echoing `echo`): true if it is owed, and is then
    /// to be dropped.
    pub fn take_owed(&mut self, reply: PacketType, echo: Option<MsgId>, now: Instant) -> bool {
        self.expire(now);
        let pos = self
            .owed
            .position(|(o, _)| o.reply == reply && (o.echo.is_none() || o.echo == echo));
        match pos {
            Some(i) => {
                self.owed.remove(i);
                true
            }
            None => false,
        }
    }

    pub fn expire(&mut self, now: Instant) {
        let window = self.cfg.protocol.reply_timeout;
        self.owed
            .retain(|(_, at)| now.saturating_duration_since(*at) < window);
    }
}

/// First gap between redials, doubling up to [`MAX_GAP`].
pub const FIRST_GAP: Duration = Duration::from_millis(250);
/// Longest gap between redials: once the add-on listens again, a device waits at most this
/// (times its jitter) for its session back.
pub const MAX_GAP: Duration = Duration::from_secs(2);

/// When each of at most `attempts` dials starts, relative to the first: at once, then gaps of
/// 250 ms doubling up to 2 s, each scaled by `spread` (0.8–1.2, per device, so that a fleet
/// losing its add-on at one instant does not redial in lock-step), within `window` (with
/// spread 1: 0, 0.25, 0.75, 1.75, 3.75, 5.75, 7.75, … s). A quick add-on restart is caught
/// within a second; a container restart of several seconds about two seconds after it listens.
pub fn schedule(attempts: u32, window: Duration, spread: f64) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut at = Duration::ZERO;
    let mut gap = FIRST_GAP;
    while out.len() < attempts as usize && at < window {
        out.push(at);
        at += gap.mul_f64(spread.clamp(0.5, 2.0));
        gap = (gap * 2).min(MAX_GAP);
    }
    out
}

/// Dials up to `attempts` times within `window` on [`schedule`]. Returns the stream, or the
/// last error, and how many attempts were made.
pub async fn redial(
    dialer: &Dialer,
    attempts: u32,
    window: Duration,
    spread: f64,
) -> (Result<Stream, DialError>, u32) {
    let start = Instant::now();
    let slots = schedule(attempts, window, spread);
    let mut last = None;
    let mut made = 0;
    for (i, offset) in slots.iter().enumerate() {
        tokio::time::sleep_until(start + *offset).await;
        made += 1;
        let until = slots.get(i + 1).copied().unwrap_or(window);
        let budget = (start + until).saturating_duration_since(Instant::now());
        match tokio::time::timeout(budget.max(Duration::from_millis(50)), dialer.dial()).await {
            Ok(Ok(s)) => return (Ok(s), made),
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
    (Err(err), made.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Resumption under `attempts` attempts in 30 s, 5 s for the replayed hello's answer, 10 s
    /// to be stable and 10 s for owed answers.
    fn resume_with(attempts: u32) -> Resume {
        let text = format!(
            "[upstream.legacy]\naddress = \"127.0.0.1:1\"\n[protocol]\nreply_timeout = \"10s\"\n\
             [reliable]\nresume_attempts = {attempts}\nresume_window = \"30s\"\n\
             resume_hello_timeout = \"5s\"\nresume_stable_after = \"10s\"\n"
        );
        Resume::new(Arc::new(Config::parse(&text).expect("valid config")))
    }

    fn resume() -> Resume {
        resume_with(20)
    }

    #[test]
    fn redials_double_their_gap_up_to_two_seconds_within_the_window() {
        let s = schedule(100, secs(12), 1.0);
        let want: Vec<Duration> = [0, 250, 750, 1750, 3750, 5750, 7750, 9750, 11750]
            .iter()
            .map(|m| ms(*m))
            .collect();
        assert_eq!(s, want);
        assert_eq!(schedule(3, secs(30), 1.0), want[..3].to_vec());
        assert_eq!(schedule(1, secs(2), 1.0), vec![Duration::ZERO]);
        assert_eq!(schedule(0, secs(2), 1.0), Vec::<Duration>::new());
        // A device's spread scales every gap.
        let spread: Vec<Duration> = [0, 200, 600, 1400].iter().map(|m| ms(*m)).collect();
        assert_eq!(schedule(4, secs(30), 0.8), spread);
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_never_answered_the_hello_is_not_resumed() {
        let mut r = resume();
        assert!(
            !r.answers_locally(),
            "nothing is answered locally before the first 0x28"
        );
        assert_eq!(r.lost(Instant::now()), Loss::NotEstablished);
        let mut r = resume();
        assert!(
            !r.take_hello_ack(Instant::now()),
            "the first 0x28 reaches the device"
        );
        assert_eq!(r.phase(), Phase::Connected);
        assert!(matches!(
            r.lost(Instant::now()),
            Loss::Resume { attempts: 20, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_replayed_hello_has_a_deadline_and_one_0x28_is_swallowed() {
        let mut r = resume();
        r.take_hello_ack(Instant::now());
        r.lost(Instant::now());
        r.spent(1);
        r.redialed(Instant::now(), &[]);
        assert!(r.answers_locally());
        assert_eq!(r.hello_deadline(), Some(Instant::now() + secs(5)));
        tokio::time::advance(ms(4999)).await;
        assert!(!r.hello_overdue(Instant::now()));
        tokio::time::advance(ms(1)).await;
        assert!(r.hello_overdue(Instant::now()));
        assert!(
            r.take_hello_ack(Instant::now()),
            "late but still the replay's"
        );
        assert!(!r.take_hello_ack(Instant::now()), "only one");
        assert!(!r.answers_locally());
    }

    #[tokio::test(start_paused = true)]
    async fn closed_again_soon_after_a_resumption_is_a_kick() {
        let mut r = resume();
        r.take_hello_ack(Instant::now());
        r.lost(Instant::now());
        r.spent(1);
        r.redialed(Instant::now(), &[]);
        r.take_hello_ack(Instant::now());
        tokio::time::advance(ms(9999)).await;
        // Once may be an add-on still shutting down when it took the redial: resumed again.
        assert!(matches!(r.lost(Instant::now()), Loss::Resume { .. }));
        r.spent(1);
        r.redialed(Instant::now(), &[]);
        r.take_hello_ack(Instant::now());
        tokio::time::advance(ms(9999)).await;
        assert_eq!(
            r.lost(Instant::now()),
            Loss::Kicked,
            "twice running is a kick"
        );
        // Stable for long enough: a new loss is a new outage with the whole budget.
        let mut r = resume();
        r.take_hello_ack(Instant::now());
        r.lost(Instant::now());
        r.spent(4);
        r.redialed(Instant::now(), &[]);
        r.take_hello_ack(Instant::now());
        tokio::time::advance(secs(10)).await;
        assert_eq!(
            r.lost(Instant::now()),
            Loss::Resume {
                attempts: 20,
                within: secs(30)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_spans_one_outage() {
        let mut r = resume();
        r.take_hello_ack(Instant::now());
        assert!(matches!(
            r.lost(Instant::now()),
            Loss::Resume { attempts: 20, .. }
        ));
        r.spent(3);
        r.redialed(Instant::now(), &[]);
        tokio::time::advance(secs(2)).await;
        // Dropped again before answering the hello: the same outage, less left.
        assert_eq!(
            r.lost(Instant::now()),
            Loss::Resume {
                attempts: 17,
                within: secs(28)
            }
        );
        r.spent(17);
        assert_eq!(r.lost(Instant::now()), Loss::Exhausted);
        let mut off = resume_with(0);
        off.take_hello_ack(Instant::now());
        assert_eq!(off.lost(Instant::now()), Loss::Exhausted);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_twice_before_answering_the_replayed_hello_is_a_refusal() {
        let mut r = resume();
        r.take_hello_ack(Instant::now());
        assert!(matches!(r.lost(Instant::now()), Loss::Resume { .. }));
        for expect_refused in [false, true] {
            r.spent(1);
            r.redialed(Instant::now(), &[]);
            tokio::time::advance(ms(100)).await;
            let loss = r.lost(Instant::now());
            assert_eq!(loss == Loss::Refused, expect_refused, "{loss:?}");
        }
        // A new outage starts counting afresh.
        let mut r = resume();
        r.take_hello_ack(Instant::now());
        r.lost(Instant::now());
        r.spent(1);
        r.redialed(Instant::now(), &[]);
        assert!(matches!(r.lost(Instant::now()), Loss::Resume { .. }));
        r.spent(1);
        r.redialed(Instant::now(), &[]);
        r.take_hello_ack(Instant::now());
        tokio::time::advance(secs(10)).await;
        assert!(matches!(r.lost(Instant::now()), Loss::Resume { .. }));
        r.spent(1);
        r.redialed(Instant::now(), &[]);
        assert!(matches!(r.lost(Instant::now()), Loss::Resume { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn owed_answers_are_dropped_once_each_by_type_and_echo_and_expire() {
        let mut r = resume();
        let hb = Owed {
            reply: PacketType::HeartbeatAck,
            echo: None,
        };
        let fw = Owed {
            reply: PacketType::StatusAck,
            echo: Some(MsgId([0, 7, 0])),
        };
        r.owe(hb, Instant::now());
        r.owe(fw, Instant::now());
        let now = Instant::now();
        assert!(!r.take_owed(PacketType::StatusAck, Some(MsgId([0, 8, 0])), now));
        assert!(r.take_owed(PacketType::StatusAck, Some(MsgId([0, 7, 0])), now));
        assert!(!r.take_owed(PacketType::StatusAck, Some(MsgId([0, 7, 0])), now));
        r.owe(hb, now);
        assert!(r.take_owed(PacketType::HeartbeatAck, None, now));
        tokio::time::advance(secs(10)).await;
        assert!(
            !r.take_owed(PacketType::HeartbeatAck, None, Instant::now()),
            "expired: a real 0xd8 is not swallowed"
        );
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
        let (r, used) = redial(&dialer, 3, secs(30), 1.0).await;
        assert!(r.is_err());
        assert_eq!(used, 3);
        let took = start.elapsed();
        // The third dial starts at 750 ms and is refused at once.
        assert!(took >= ms(750) && took < secs(2), "{took:?}");
    }
}
