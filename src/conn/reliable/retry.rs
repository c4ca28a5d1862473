//! Commands in flight on one reliable session: when to re-send them, and whether a device
//! reply or 0x7b for them should reach the upstream.
//!
//! A command is a srv→dev 0x73 of class `f8`. It is re-sent byte-identical when its reply has
//! not come within the device's adaptive retry timeout ([`RttEstimator`], floored at
//! `ack_timeout`), then after exponentially growing waits plus additive jitter, up to
//! `max_attempts` sends in all (the first included). A copy also needs evidence that the reply
//! is missing rather than late — the device answered a command sent after this one (devices
//! answer in order, and a congested stream delivers in order), or acknowledged this one with
//! its 0x7b — or else a long silence about it ([`BLIND_FACTOR`] timeouts, half the deadline
//! at least): on a stalled link copies only add work for a device that is already behind. After the 0x7b ("received") the next
//! copy waits at least twice the timeout. Every copy must also fit the path's
//! [`RetryBudget`]; one that does not is counted and not sent. No copy goes out later than one
//! `ack_timeout` before `command_deadline`, the add-on's own 5 s wait.
//!
//! Invariants:
//! - Pure: every call takes `now`; randomness comes from the caller's seeded RNG.
//! - At most one entry per inner seq (a new command with a seq replaces the old entry), so the
//!   table holds at most 256 entries whatever the upstream does.
//! - Upstream sees at most one `f9` reply and one 0x7b per command: the first of each is
//!   [`Verdict::Forward`], later ones [`Verdict::Duplicate`]. Replies to commands sent by an
//!   upstream connection that has since been replaced are [`Verdict::Stale`]: the add-on that
//!   waited for them is gone, and its successor reuses inner seqs from 1.
//! - Anything this table has never seen is [`Verdict::Unknown`]; the caller forwards it unless
//!   the per-device dedup store knows it as a late duplicate.
//! - Retries never exceed what the budget grants, so a slow device or link is never sent more
//!   than `1 + retry_budget_ratio` times the commands it was asked to run.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::time::Instant;

use super::budget::RetryBudget;
use super::rto::RttEstimator;
use crate::config::{Config, Reliable, RetryUntil};
use crate::conn::fifo::Fifo;
use crate::protocol::{DeviceId, MsgId};

/// The (channel id, msg_id) a 0x7b echoes.
pub type AckKey = (DeviceId, MsgId);

/// Retry timing, from `[reliable]` and `protocol.command_deadline`, read from the session's
/// configuration snapshot rather than copied out of it: the copy was 0.2 KiB of every idle
/// session.
#[derive(Debug, Clone)]
pub struct Policy(Arc<Config>);

impl Policy {
    pub fn new(cfg: Arc<Config>) -> Policy {
        Policy(cfg)
    }

    pub fn settings(&self) -> &Reliable {
        &self.0.reliable
    }

    /// How long the add-on waits for a command's reply.
    pub fn command_deadline(&self) -> Duration {
        self.0.protocol.command_deadline
    }

    /// Wait after attempt `k` (1-based) before attempt `k + 1` for a device whose retry timeout
    /// is `rto`: `rto × multiplier^(k-1)` plus a uniform jitter in `[0, jitter]`, so devices
    /// retried together do not retry in step.
    pub fn delay<R: Rng>(&self, k: u32, rto: Duration, rng: &mut R) -> Duration {
        let exp = i32::try_from(k.saturating_sub(1)).unwrap_or(i32::MAX);
        let factor = self.settings().backoff_multiplier.powi(exp).min(1e6);
        let base = rto.mul_f64(factor).min(self.command_deadline());
        let j = self.settings().jitter;
        if j.is_zero() {
            base
        } else {
            base + j.mul_f64(rng.gen_range(0.0..=1.0))
        }
    }

    /// The longest retry timeout worth learning: a copy sent later than that after the first
    /// send could not be answered before the deadline with time to spare.
    pub fn rto_ceiling(&self) -> Duration {
        self.command_deadline() / 2
    }
}

/// What to do with a device frame answering a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Duplicate,
    Stale,
    Unknown,
}

#[derive(Debug, Clone)]
struct Cmd {
    seq: u8,
    key: AckKey,
    raw: Bytes,
    epoch: u32,
    first_sent: Instant,
    /// The device's retry timeout when the command was first sent: its copies' base wait.
    rto: Duration,
    /// Times the command went to the device.
    sends: u32,
    /// Attempt slots used: sends, and copies the budget refused.
    slots: u32,
    next_at: Option<Instant>,
    /// Its copy is due but waits for a sign that its reply is missing, not late.
    waiting_for_evidence: bool,
    /// 0x7b acknowledgements taken: one is owed for each send, so a copy's 0x7b is not
    /// credited to the next command (every add-on command has the same key). At `sends` or
    /// more the ack window is closed.
    acks: u32,
    /// Hashes of the reply frames forwarded for this command (a reply may come in several
    /// frames). Hashes, not the frames: those are slices of whole read buffers, and a table
    /// kept for minutes must not keep 16 KiB alive per entry.
    replies: Vec<u64>,
}

/// Where a 0x73's msg_id sits: the device numbers each frame it sends, so two answers to two
/// copies of a command differ there and only there.
const MSG_ID: std::ops::Range<usize> = 9..12;

/// A reply frame's identity without its msg_id: the answer to a copy has the same one as the
/// answer to the original; the next frame of a multi-frame answer does not.
fn digest(raw: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match (raw.get(..MSG_ID.start), raw.get(MSG_ID.end..)) {
        (Some(head), Some(tail)) => {
            head.hash(&mut h);
            tail.hash(&mut h);
        }
        _ => raw.hash(&mut h),
    }
    h.finish()
}

/// Most distinct reply frames remembered per command.
const MAX_REPLY_FRAMES: usize = 8;

/// Without any sign that its reply is missing rather than late, a command is copied only after
/// this many times its retry timeout, and not before half of `command_deadline` (then a copy's
/// reply still comes well inside the add-on's wait, and a device whose timeout has not been
/// learnt yet is not copied on a guess).
pub const BLIND_FACTOR: u32 = 3;

/// A command to send again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resend {
    pub raw: Bytes,
    pub seq: u8,
    pub key: AckKey,
    /// Which send this is (2 = first retry).
    pub attempt: u32,
}

/// What [`Outstanding::due`] decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    pub resend: Vec<Resend>,
    /// Copies due but refused by the retry budget.
    pub over_budget: u32,
    /// Copies due too close to the deadline to be answered in time.
    pub too_late: u32,
}

#[derive(Debug)]
pub struct Outstanding {
    policy: Policy,
    budget: Arc<RetryBudget>,
    rtt: RttEstimator,
    cmds: Fifo<Cmd>,
    /// When the newest command the device has answered was first sent: an unanswered command
    /// sent before it has had its turn (a device answers in order, and a stalled stream
    /// delivers in order), so its reply is missing, not late.
    newest_answered: Option<Instant>,
}

impl Outstanding {
    pub fn new(policy: Policy, budget: Arc<RetryBudget>) -> Self {
        let rtt = RttEstimator::new(policy.settings().ack_timeout, policy.rto_ceiling());
        Self {
            policy,
            budget,
            rtt,
            cmds: Fifo::new(),
            newest_answered: None,
        }
    }

    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    /// Times the command with inner seq `seq` went to the device, while it is remembered.
    pub fn sends(&self, seq: u8) -> Option<u32> {
        self.cmds.iter().find(|c| c.seq == seq).map(|c| c.sends)
    }

    /// The device's current retry timeout.
    pub fn rto(&self) -> Duration {
        self.rtt.rto()
    }

    /// The upstream sent a command; it has just been queued toward the device. `raw` is kept
    /// for copies until the dedup TTL: pass an owned copy, not a slice of a read buffer.
    pub fn on_command<R: Rng>(
        &mut self,
        raw: Bytes,
        seq: u8,
        key: AckKey,
        epoch: u32,
        now: Instant,
        rng: &mut R,
    ) {
        self.budget.deposit(now);
        self.cmds.retain(|c| c.seq != seq);
        let rto = self.rtt.rto();
        let next_at =
            (self.policy.settings().max_attempts > 1).then(|| now + self.policy.delay(1, rto, rng));
        self.cmds.push_back(Cmd {
            seq,
            key,
            raw,
            epoch,
            first_sent: now,
            rto,
            sends: 1,
            slots: 1,
            next_at,
            waiting_for_evidence: false,
            acks: 0,
            replies: Vec::new(),
        });
    }

    /// The device sent an `f9` reply frame `raw` with inner seq `seq`.
    ///
    /// The first reply is forwarded. A later one is a duplicate when it repeats a forwarded
    /// frame but for its msg_id (the device answered a copy, or the packet was duplicated);
    /// a *different* frame is forwarded, since a device may answer in several frames (a large
    /// mesh reply), copied command or not.
    pub fn on_reply(&mut self, seq: u8, epoch: u32, raw: &Bytes, now: Instant) -> Verdict {
        let Some(c) = self.cmds.iter_mut().find(|c| c.seq == seq) else {
            return Verdict::Unknown;
        };
        let d = digest(raw);
        if c.replies.contains(&d) {
            return Verdict::Duplicate;
        }
        if c.replies.len() >= MAX_REPLY_FRAMES {
            // More frames than any real answer has: treat the rest as repeats.
            return Verdict::Duplicate;
        }
        if c.replies.is_empty() && c.sends == 1 && c.epoch == epoch {
            // Karn's rule: only a command sent once says how long this device takes.
            self.rtt.sample(now.saturating_duration_since(c.first_sent));
        }
        c.replies.push(d);
        c.next_at = None;
        c.waiting_for_evidence = false;
        let (sent, stale) = (c.first_sent, c.epoch != epoch);
        if stale {
            return Verdict::Stale;
        }
        if self.newest_answered.is_none_or(|t| sent > t) {
            self.newest_answered = Some(sent);
            // Older commands of this upstream still unanswered are now known to be missing:
            // their copies, held back for want of that, are due (an acknowledged one keeps
            // its own wait, set by its 0x7b).
            for o in self.cmds.iter_mut() {
                if o.waiting_for_evidence && o.first_sent < sent && o.epoch == epoch && o.acks == 0
                {
                    o.waiting_for_evidence = false;
                    o.next_at = Some(now);
                }
            }
        }
        Verdict::Forward
    }

    /// The device sent a 0x7b echoing `key`. With the add-on every command has the same key,
    /// so the oldest command with that key still owed a 0x7b takes it (FIFO), one per send: the
    /// 0x7b for a copy belongs to the copied command (and is a duplicate upstream), not to the
    /// next one.
    pub fn on_ack(&mut self, key: AckKey, epoch: u32, now: Instant) -> Verdict {
        let stop = self.policy.settings().retry_until == RetryUntil::Ack;
        let patience = self.rtt.rto() * 2;
        let current = self
            .cmds
            .iter_mut()
            .find(|c| c.key == key && c.acks < c.sends && c.epoch == epoch);
        if let Some(c) = current {
            c.acks += 1;
            if c.acks > 1 {
                return Verdict::Duplicate;
            }
            let held_back = std::mem::take(&mut c.waiting_for_evidence);
            if stop {
                c.next_at = None;
            } else if held_back {
                // The copy that waited for evidence has it: the command was received, so its
                // reply is missing, or slow — which a copy rarely helps sooner than this.
                c.next_at = Some(now + patience);
            } else {
                c.next_at = c.next_at.map(|t| t.max(now + patience));
            }
            return Verdict::Forward;
        }
        if let Some(c) = self
            .cmds
            .iter_mut()
            .find(|c| c.key == key && c.acks < c.sends)
        {
            c.acks = c.sends;
            c.waiting_for_evidence = false;
            c.next_at = None;
            return Verdict::Stale;
        }
        if self.cmds.iter().any(|c| c.key == key) {
            Verdict::Duplicate
        } else {
            Verdict::Unknown
        }
    }

    /// Commands whose retry time has come, each marked sent once more. A command whose
    /// previous copy is still queued toward the device (`still_queued`) is not copied again:
    /// its clock restarts instead, since the device has not even been offered it yet.
    pub fn due<R: Rng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        still_queued: impl Fn(&Bytes) -> bool,
    ) -> Due {
        let max = self.policy.settings().max_attempts;
        let deadline = self.policy.command_deadline();
        let floor = self.policy.settings().ack_timeout;
        let mut out = Due::default();
        for c in self.cmds.iter_mut() {
            let Some(at) = c.next_at else { continue };
            if at > now {
                continue;
            }
            // A copy needs one ack_timeout for its reply before the add-on gives up (and a
            // timer that fired very late must not send what the add-on has given up on).
            if (c.first_sent + deadline).saturating_duration_since(now) < floor {
                c.next_at = None;
                out.too_late += 1;
                continue;
            }
            if still_queued(&c.raw) {
                c.next_at = Some(now + floor);
                continue;
            }
            // A reply can be late (a congested link holds everything behind one slow frame)
            // or missing. A copy only helps the second: it needs evidence — the device has
            // answered a later command, or acknowledged this one — or a silence about this
            // command of several timeouts (which, once the device has been seen slow, are
            // long: see `RttEstimator`).
            let missing = c.acks > 0 || self.newest_answered.is_some_and(|t| t > c.first_sent);
            let blind_at = c.first_sent + (c.rto * BLIND_FACTOR).max(deadline / 2);
            if !missing && now < blind_at {
                c.waiting_for_evidence = true;
                c.next_at = Some(blind_at);
                continue;
            }
            c.waiting_for_evidence = false;
            c.slots += 1;
            c.next_at = (c.slots < max).then(|| now + self.policy.delay(c.slots, c.rto, rng));
            self.rtt.timed_out();
            if !self.budget.try_withdraw(now) {
                out.over_budget += 1;
                continue;
            }
            c.sends += 1;
            out.resend.push(Resend {
                raw: c.raw.clone(),
                seq: c.seq,
                key: c.key,
                attempt: c.sends,
            });
        }
        out
    }

    /// When [`Outstanding::due`] next has something to return.
    pub fn next_due(&self) -> Option<Instant> {
        self.cmds.iter().filter_map(|c| c.next_at).min()
    }

    /// Closes the ack window of commands past the deadline (a later 0x7b for them is a
    /// duplicate) and forgets commands older than the dedup TTL.
    pub fn expire(&mut self, now: Instant) {
        let deadline = self.policy.command_deadline();
        for c in self.cmds.iter_mut() {
            if now.saturating_duration_since(c.first_sent) >= deadline {
                c.acks = c.acks.max(c.sends);
                c.next_at = None;
                c.waiting_for_evidence = false;
            }
        }
        // How long answered commands are remembered for duplicate suppression here.
        let keep = self.policy.settings().dedup_ttl;
        self.cmds
            .retain(|c| now.saturating_duration_since(c.first_sent) < keep);
    }

    /// No more copies of the current commands: their upstream is gone, or the device can no
    /// longer answer (it closed its side).
    pub fn end_epoch(&mut self) {
        for c in self.cmds.iter_mut() {
            c.next_at = None;
            c.waiting_for_evidence = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn config(extra: &str) -> Config {
        let text = format!("[upstream.legacy]\naddress = \"127.0.0.1:1\"\n[reliable]\n{extra}\n");
        Config::parse(&text).expect("valid config")
    }

    fn policy(extra: &str) -> Policy {
        Policy::new(Arc::new(config(extra)))
    }

    /// `extra`'s policy with the add-on waiting `deadline` for a reply.
    fn policy_until(extra: &str, deadline: Duration) -> Policy {
        let mut c = config(extra);
        c.protocol.command_deadline = deadline;
        Policy::new(Arc::new(c))
    }

    /// A budget that never refuses.
    fn open_budget() -> Arc<RetryBudget> {
        Arc::new(RetryBudget::new(
            1.0,
            u64::MAX,
            Duration::from_secs(10),
            Instant::now(),
        ))
    }

    fn outstanding(extra: &str) -> Outstanding {
        Outstanding::new(policy(extra), open_budget())
    }

    const KEY: AckKey = (DeviceId([1, 2, 3, 4]), MsgId([0, 0, 0]));

    fn cmd(seq: u8) -> Bytes {
        Bytes::from(vec![0x73, seq])
    }

    fn reply(n: u8) -> Bytes {
        Bytes::from(vec![0x73, 0xf9, n])
    }

    /// A real `f9` reply frame to seq 5 under the device's msg_id `msg`; `part` tells the
    /// frames of one answer apart.
    fn answer(msg: u8, part: u8) -> Bytes {
        crate::protocol::build::command_reply(KEY.0, crate::protocol::MsgId([0, msg, 0]), 5, part)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Fifty commands acknowledged and answered in 10 ms: the device's timeout is at the
    /// 400 ms floor.
    async fn warm(o: &mut Outstanding, rng: &mut SmallRng) {
        for seq in 100..150u8 {
            o.on_command(cmd(seq), seq, KEY, 0, Instant::now(), rng);
            tokio::time::advance(ms(10)).await;
            assert_eq!(o.on_ack(KEY, 0, Instant::now()), Verdict::Forward);
            assert_eq!(
                o.on_reply(seq, 0, &reply(seq), Instant::now()),
                Verdict::Forward
            );
        }
        assert_eq!(o.rto(), ms(400));
    }

    /// A command sent 1 ms later and answered at once: evidence that earlier unanswered ones
    /// are missing.
    async fn answer_a_later_one(o: &mut Outstanding, rng: &mut SmallRng, seq: u8) {
        tokio::time::advance(ms(1)).await;
        o.on_command(cmd(seq), seq, KEY, 0, Instant::now(), rng);
        assert_eq!(
            o.on_reply(seq, 0, &reply(seq), Instant::now()),
            Verdict::Forward
        );
    }

    /// Advances paused time to the next retry and returns the resends.
    async fn next_retry(o: &mut Outstanding, rng: &mut SmallRng) -> Vec<Resend> {
        let Some(at) = o.next_due() else {
            return Vec::new();
        };
        tokio::time::sleep_until(at).await;
        o.due(Instant::now(), rng, |_| false).resend
    }

    #[test]
    fn one_remembered_command_holds_room_for_one_and_none_once_forgotten() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(7);
        let t0 = Instant::now();
        o.on_command(cmd(1), 1, KEY, 0, t0, &mut rng);
        assert_eq!(o.cmds.capacity(), 1);
        o.on_command(cmd(2), 2, KEY, 0, t0, &mut rng);
        assert_eq!(o.len(), 2, "a second command still finds room");
        o.expire(t0 + o.policy.settings().dedup_ttl);
        assert!(o.is_empty());
        assert_eq!(
            o.cmds.capacity(),
            0,
            "forgotten commands leave no allocation"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_reply_is_copied_at_the_timeout_with_doubling_waits_up_to_max_attempts() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(7);
        warm(&mut o, &mut rng).await;
        let t0 = Instant::now();
        o.on_command(cmd(1), 1, KEY, 0, t0, &mut rng);
        answer_a_later_one(&mut o, &mut rng, 2).await;
        let mut sends = Vec::new();
        for _ in 0..10 {
            let r = next_retry(&mut o, &mut rng).await;
            if r.is_empty() {
                break;
            }
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].raw, cmd(1), "byte-identical resend");
            sends.push((r[0].attempt, t0.elapsed()));
        }
        assert_eq!(
            sends.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![2, 3, 4],
            "defaults: four attempts in all"
        );
        // Attempt k+1 follows attempt k after 400 ms * 2^(k-1) plus 0-100 ms of jitter.
        let mut prev = Duration::ZERO;
        for (i, (_, at)) in sends.iter().enumerate() {
            let gap = *at - prev;
            let base = ms(400) * 2u32.pow(i as u32);
            assert!(
                gap >= base && gap <= base + ms(100),
                "gap {gap:?} after attempt {} (base {base:?})",
                i + 1
            );
            prev = *at;
        }
        assert!(prev <= ms(3100), "last attempt at {prev:?}");
        assert_eq!(o.next_due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_reply_is_not_copied_without_evidence_until_a_long_silence() {
        let mut o = outstanding("jitter = 0");
        let mut rng = SmallRng::seed_from_u64(7);
        warm(&mut o, &mut rng).await;
        let t0 = Instant::now();
        o.on_command(cmd(1), 1, KEY, 0, t0, &mut rng);
        // Its timeout passes with nothing from the device about it: no copy, only a later look.
        tokio::time::advance(ms(400)).await;
        assert!(o.due(Instant::now(), &mut rng, |_| false).resend.is_empty());
        // Half the deadline (2.5 s) is longer than three timeouts (1.2 s).
        assert_eq!(o.next_due(), Some(t0 + ms(2500)));
        tokio::time::advance(ms(2099)).await;
        assert!(o.due(Instant::now(), &mut rng, |_| false).resend.is_empty());
        tokio::time::sleep_until(t0 + ms(2500)).await;
        let r = o.due(Instant::now(), &mut rng, |_| false).resend;
        assert_eq!(r.len(), 1, "copied after the long silence");
    }

    #[tokio::test(start_paused = true)]
    async fn evidence_arriving_late_makes_a_held_copy_due_at_once() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(7);
        warm(&mut o, &mut rng).await;
        o.on_command(cmd(1), 1, KEY, 0, Instant::now(), &mut rng);
        tokio::time::advance(ms(600)).await;
        assert!(o.due(Instant::now(), &mut rng, |_| false).resend.is_empty());
        // A command sent after it is answered: its own reply is missing, not late.
        answer_a_later_one(&mut o, &mut rng, 2).await;
        assert_eq!(o.next_due(), Some(Instant::now()));
        assert_eq!(o.due(Instant::now(), &mut rng, |_| false).resend.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn reply_stops_retries_and_duplicates_are_flagged() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(1);
        warm(&mut o, &mut rng).await;
        o.on_command(cmd(5), 5, KEY, 0, Instant::now(), &mut rng);
        // The 0x7b says "received": the copy waits twice the timeout from it.
        assert_eq!(o.on_ack(KEY, 0, Instant::now()), Verdict::Forward);
        assert!(
            o.next_due().is_some(),
            "retry_until = reply: the 0x7b alone does not stop them"
        );
        let r = next_retry(&mut o, &mut rng).await;
        assert_eq!(r.len(), 1);
        assert_eq!(o.on_ack(KEY, 0, Instant::now()), Verdict::Duplicate);
        assert_eq!(
            o.on_reply(5, 0, &answer(1, 0xd0), Instant::now()),
            Verdict::Forward
        );
        // The device answering the copy: the same frame under its next msg_id.
        assert_eq!(
            o.on_reply(5, 0, &answer(2, 0xd0), Instant::now()),
            Verdict::Duplicate
        );
        // Another frame of a multi-frame answer still reaches the add-on, copy or not.
        assert_eq!(
            o.on_reply(5, 0, &answer(3, 0xd1), Instant::now()),
            Verdict::Forward
        );
        assert_eq!(o.next_due(), None);
        assert_eq!(
            o.on_reply(6, 0, &reply(1), Instant::now()),
            Verdict::Unknown
        );
    }

    #[test]
    fn a_command_sent_once_may_be_answered_in_several_frames() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(1);
        o.on_command(cmd(5), 5, KEY, 0, Instant::now(), &mut rng);
        assert_eq!(
            o.on_reply(5, 0, &reply(1), Instant::now()),
            Verdict::Forward
        );
        assert_eq!(
            o.on_reply(5, 0, &reply(2), Instant::now()),
            Verdict::Forward,
            "second part"
        );
        assert_eq!(
            o.on_reply(5, 0, &reply(1), Instant::now()),
            Verdict::Duplicate,
            "a copy"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_copy_while_the_previous_one_is_still_queued() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(1);
        warm(&mut o, &mut rng).await;
        o.on_command(cmd(5), 5, KEY, 0, Instant::now(), &mut rng);
        answer_a_later_one(&mut o, &mut rng, 6).await;
        tokio::time::sleep_until(o.next_due().expect("due")).await;
        assert!(o.due(Instant::now(), &mut rng, |_| true).resend.is_empty());
        assert_eq!(
            o.next_due(),
            Some(Instant::now() + ms(400)),
            "clock restarted"
        );
        tokio::time::sleep_until(o.next_due().expect("due")).await;
        let r = o.due(Instant::now(), &mut rng, |_| false).resend;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].attempt, 2, "the skipped round was not an attempt");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_until_ack_stops_on_the_0x7b() {
        let mut o = outstanding("retry_until = \"ack\"");
        let mut rng = SmallRng::seed_from_u64(1);
        o.on_command(cmd(5), 5, KEY, 0, Instant::now(), &mut rng);
        assert_eq!(o.on_ack(KEY, 0, Instant::now()), Verdict::Forward);
        assert_eq!(o.next_due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn acks_pair_fifo_and_old_epochs_are_stale() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(1);
        let now = Instant::now();
        o.on_command(cmd(1), 1, KEY, 0, now, &mut rng);
        o.on_command(cmd(2), 2, KEY, 0, now, &mut rng);
        o.end_epoch();
        assert_eq!(
            o.next_due(),
            None,
            "no retries for a dead upstream's commands"
        );
        o.on_command(cmd(1), 1, KEY, 1, now, &mut rng);
        // Seq 1 was replaced by the new epoch's command; seq 2 is the old epoch's.
        assert_eq!(o.on_reply(2, 1, &reply(1), Instant::now()), Verdict::Stale);
        assert_eq!(
            o.on_reply(1, 1, &reply(1), Instant::now()),
            Verdict::Forward
        );
        assert_eq!(
            o.on_ack(KEY, 1, Instant::now()),
            Verdict::Forward,
            "current epoch first"
        );
        assert_eq!(o.on_ack(KEY, 1, Instant::now()), Verdict::Stale);
        assert_eq!(o.on_ack(KEY, 1, Instant::now()), Verdict::Duplicate);
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_closes_the_ack_window_and_ttl_forgets() {
        let mut o = outstanding("dedup_ttl = \"60s\"");
        let mut rng = SmallRng::seed_from_u64(1);
        o.on_command(cmd(1), 1, KEY, 0, Instant::now(), &mut rng);
        tokio::time::advance(Duration::from_secs(5)).await;
        o.expire(Instant::now());
        assert_eq!(
            o.on_ack(KEY, 0, Instant::now()),
            Verdict::Duplicate,
            "0x7b after the deadline"
        );
        tokio::time::advance(Duration::from_secs(54)).await;
        o.expire(Instant::now());
        assert_eq!(o.len(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        o.expire(Instant::now());
        assert!(o.is_empty());
        assert_eq!(
            o.on_reply(1, 0, &reply(1), Instant::now()),
            Verdict::Unknown
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_timer_does_not_resend_past_the_deadline() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(1);
        o.on_command(cmd(1), 1, KEY, 0, Instant::now(), &mut rng);
        tokio::time::advance(Duration::from_secs(6)).await;
        let due = o.due(Instant::now(), &mut rng, |_| false);
        assert!(due.resend.is_empty());
        assert_eq!(due.too_late, 1);
        assert_eq!(o.next_due(), None);
    }

    #[test]
    fn a_new_command_with_the_same_seq_replaces_the_old_entry() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(1);
        let now = Instant::now();
        for _ in 0..3 {
            for seq in 0..=255u8 {
                o.on_command(cmd(seq), seq, KEY, 0, now, &mut rng);
            }
        }
        assert_eq!(o.len(), 256);
    }

    #[tokio::test(start_paused = true)]
    async fn copies_beyond_the_budget_are_counted_and_not_sent() {
        // Twenty commands allow two copies (10 %), and there is no floor.
        let budget = Arc::new(RetryBudget::new(
            0.1,
            0,
            Duration::from_secs(10),
            Instant::now(),
        ));
        let mut o = Outstanding::new(policy(""), budget);
        let mut rng = SmallRng::seed_from_u64(3);
        for seq in 1..=19 {
            o.on_command(cmd(seq), seq, KEY, 0, Instant::now(), &mut rng);
        }
        answer_a_later_one(&mut o, &mut rng, 20).await;
        tokio::time::advance(ms(1100)).await;
        let due = o.due(Instant::now(), &mut rng, |_| false);
        assert_eq!((due.resend.len(), due.over_budget), (2, 17));
        // A refused copy used its slot: the next one is the third attempt's.
        assert!(o.next_due().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_device_gets_a_longer_timeout_before_its_first_copy() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(3);
        // Each command is answered after 600 ms.
        for seq in 1..=30u8 {
            o.on_command(cmd(seq), seq, KEY, 0, Instant::now(), &mut rng);
            tokio::time::advance(ms(600)).await;
            let _ = o.due(Instant::now(), &mut rng, |_| false);
            o.on_reply(seq, 0, &reply(seq), Instant::now());
        }
        let rto = o.rto();
        assert!(rto > ms(600), "{rto:?}");
        let t0 = Instant::now();
        o.on_command(cmd(40), 40, KEY, 0, t0, &mut rng);
        assert!(o.next_due().expect("scheduled") >= t0 + rto);
    }

    #[tokio::test(start_paused = true)]
    async fn a_received_command_waits_twice_the_timeout_for_its_copy() {
        let mut o = outstanding("jitter = 0");
        let mut rng = SmallRng::seed_from_u64(3);
        warm(&mut o, &mut rng).await;
        let t0 = Instant::now();
        o.on_command(cmd(1), 1, KEY, 0, t0, &mut rng);
        assert_eq!(o.next_due(), Some(t0 + ms(400)));
        tokio::time::advance(ms(100)).await;
        assert_eq!(o.on_ack(KEY, 0, Instant::now()), Verdict::Forward);
        assert_eq!(o.next_due(), Some(t0 + ms(900)));
        tokio::time::sleep_until(t0 + ms(900)).await;
        assert_eq!(
            o.due(Instant::now(), &mut rng, |_| false).resend.len(),
            1,
            "the 0x7b is evidence: its f9 is what is missing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_copy_goes_out_less_than_an_ack_timeout_before_the_deadline() {
        let p = policy_until("max_attempts = 3\njitter = 0", Duration::from_secs(1));
        let mut o = Outstanding::new(p, open_budget());
        let mut rng = SmallRng::seed_from_u64(3);
        warm(&mut o, &mut rng).await;
        o.on_command(cmd(1), 1, KEY, 0, Instant::now(), &mut rng);
        answer_a_later_one(&mut o, &mut rng, 2).await;
        // At 400 ms, 600 ms are left: a copy goes out.
        tokio::time::advance(ms(400)).await;
        assert_eq!(o.due(Instant::now(), &mut rng, |_| false).resend.len(), 1);
        // The next would be at 1.2 s, past the deadline.
        tokio::time::sleep_until(o.next_due().expect("due")).await;
        let due = o.due(Instant::now(), &mut rng, |_| false);
        assert_eq!((due.resend.len(), due.too_late), (0, 1));
        assert_eq!(o.next_due(), None);
    }

    /// Advances to `o`'s first due time (or by `limit` if none is due sooner) and returns what
    /// is re-sent then.
    async fn due_within(o: &mut Outstanding, rng: &mut SmallRng, limit: Duration) -> Vec<Resend> {
        let end = Instant::now() + limit;
        let at = o.next_due().map_or(end, |t| t.min(end));
        tokio::time::sleep_until(at).await;
        o.due(Instant::now(), rng, |_| false).resend
    }

    #[tokio::test(start_paused = true)]
    async fn in_ack_mode_an_acknowledged_command_is_never_copied_even_when_a_later_one_is_answered()
    {
        let mut o = outstanding("retry_until = \"ack\"");
        let mut rng = SmallRng::seed_from_u64(1);
        warm(&mut o, &mut rng).await;
        o.on_command(cmd(1), 1, KEY, 0, Instant::now(), &mut rng);
        // Its copy comes due with no evidence yet: held back.
        assert!(next_retry(&mut o, &mut rng).await.is_empty());
        assert_eq!(o.on_ack(KEY, 0, Instant::now()), Verdict::Forward);
        answer_a_later_one(&mut o, &mut rng, 2).await;
        assert!(
            due_within(&mut o, &mut rng, Duration::from_secs(5))
                .await
                .is_empty(),
            "received: retry_until = ack is satisfied"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_its_0x7b_a_command_waits_twice_the_timeout_whatever_evidence_comes_later() {
        let mut o = outstanding("jitter = 0");
        let mut rng = SmallRng::seed_from_u64(1);
        warm(&mut o, &mut rng).await;
        o.on_command(cmd(1), 1, KEY, 0, Instant::now(), &mut rng);
        assert!(next_retry(&mut o, &mut rng).await.is_empty(), "held back");
        let acked = Instant::now();
        assert_eq!(o.on_ack(KEY, 0, acked), Verdict::Forward);
        answer_a_later_one(&mut o, &mut rng, 2).await;
        let r = due_within(&mut o, &mut rng, Duration::from_secs(5)).await;
        assert_eq!(r.len(), 1);
        assert!(
            Instant::now() - acked >= ms(800),
            "copied {:?} after its 0x7b",
            Instant::now() - acked
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_of_a_dead_upstream_is_not_copied_on_the_next_one() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(1);
        warm(&mut o, &mut rng).await;
        o.on_command(cmd(1), 1, KEY, 0, Instant::now(), &mut rng);
        assert!(next_retry(&mut o, &mut rng).await.is_empty(), "held back");
        o.end_epoch();
        // The next upstream's own command, answered at once.
        tokio::time::advance(ms(1)).await;
        o.on_command(cmd(2), 2, KEY, 1, Instant::now(), &mut rng);
        assert_eq!(
            o.on_reply(2, 1, &reply(2), Instant::now()),
            Verdict::Forward
        );
        assert!(due_within(&mut o, &mut rng, Duration::from_secs(5))
            .await
            .is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_copys_0x7b_belongs_to_the_copied_command_not_to_the_next() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(1);
        warm(&mut o, &mut rng).await;
        o.on_command(cmd(1), 1, KEY, 0, Instant::now(), &mut rng);
        assert_eq!(o.on_ack(KEY, 0, Instant::now()), Verdict::Forward);
        answer_a_later_one(&mut o, &mut rng, 2).await;
        assert_eq!(next_retry(&mut o, &mut rng).await.len(), 1, "copied");
        o.on_command(cmd(3), 3, KEY, 0, Instant::now(), &mut rng);
        // The device acknowledges the copy, then the next command.
        assert_eq!(o.on_ack(KEY, 0, Instant::now()), Verdict::Duplicate);
        assert_eq!(
            o.on_ack(KEY, 0, Instant::now()),
            Verdict::Forward,
            "the next command's own 0x7b reaches the add-on"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_slower_than_half_the_deadline_is_timed_at_half_the_deadline() {
        // One attempt only, so every answer is a clean RTT sample (Karn's rule).
        let mut o = outstanding("max_attempts = 1");
        let mut rng = SmallRng::seed_from_u64(1);
        for seq in 1..=20u8 {
            o.on_command(cmd(seq), seq, KEY, 0, Instant::now(), &mut rng);
            assert!(!o.is_empty());
            tokio::time::advance(ms(4500)).await;
            assert_eq!(
                o.on_reply(seq, 0, &reply(seq), Instant::now()),
                Verdict::Forward
            );
        }
        // The default deadline is 5 s: a copy sent later than 2.5 s in could not be answered
        // in time, so that is as long as the timeout grows.
        assert_eq!(o.rto(), ms(2500));
    }

    #[test]
    fn a_single_attempt_policy_schedules_no_copy() {
        let mut o = outstanding("max_attempts = 1");
        let mut rng = SmallRng::seed_from_u64(1);
        o.on_command(cmd(1), 1, KEY, 0, Instant::now(), &mut rng);
        assert_eq!(o.len(), 1);
        assert_eq!(o.next_due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_first_frame_of_a_once_sent_command_times_the_device() {
        let mut o = outstanding("");
        let mut rng = SmallRng::seed_from_u64(1);
        warm(&mut o, &mut rng).await;
        o.on_command(cmd(1), 1, KEY, 0, Instant::now(), &mut rng);
        tokio::time::advance(ms(10)).await;
        assert_eq!(
            o.on_reply(1, 0, &reply(1), Instant::now()),
            Verdict::Forward
        );
        // The second frame of the same answer, much later, says nothing about round trips.
        tokio::time::advance(ms(3000)).await;
        assert_eq!(
            o.on_reply(1, 0, &reply(2), Instant::now()),
            Verdict::Forward
        );
        assert_eq!(o.rto(), ms(400));
    }

    #[tokio::test(start_paused = true)]
    async fn the_reply_to_a_copied_command_does_not_time_the_device() {
        let mut o = outstanding("jitter = 0");
        let mut rng = SmallRng::seed_from_u64(1);
        warm(&mut o, &mut rng).await;
        o.on_command(cmd(1), 1, KEY, 0, Instant::now(), &mut rng);
        answer_a_later_one(&mut o, &mut rng, 2).await;
        assert_eq!(next_retry(&mut o, &mut rng).await.len(), 1, "copied");
        let rto_after_copy = o.rto();
        // Answered 2 s in: whether to the original or the copy is unknown, so no sample.
        tokio::time::advance(ms(1600)).await;
        assert_eq!(
            o.on_reply(1, 0, &reply(1), Instant::now()),
            Verdict::Forward
        );
        assert_eq!(o.rto(), rto_after_copy);
    }

    #[tokio::test(start_paused = true)]
    async fn commands_sent_at_the_same_instant_are_no_evidence_about_each_other() {
        // Two commands read from one segment share their send time: which the device took
        // first cannot be told, so an answer to one does not make the other's copy due.
        let mut o = outstanding("jitter = 0");
        let mut rng = SmallRng::seed_from_u64(1);
        warm(&mut o, &mut rng).await;
        let t0 = Instant::now();
        o.on_command(cmd(1), 1, KEY, 0, t0, &mut rng);
        o.on_command(cmd(2), 2, KEY, 0, t0, &mut rng);
        // Answered before seq 1's copy is first due...
        tokio::time::advance(ms(10)).await;
        assert_eq!(
            o.on_reply(2, 0, &reply(2), Instant::now()),
            Verdict::Forward
        );
        assert_eq!(o.next_due(), Some(t0 + ms(400)));
        // ...and when it is due, that answer is no evidence: held back.
        tokio::time::sleep_until(t0 + ms(400)).await;
        assert!(o.due(Instant::now(), &mut rng, |_| false).resend.is_empty());
        assert_eq!(o.next_due(), Some(t0 + ms(2500)), "held back");
        // Nor does an answer to a third sent at that instant wake it while it waits.
        o.on_command(cmd(3), 3, KEY, 0, t0, &mut rng);
        assert_eq!(
            o.on_reply(3, 0, &reply(3), Instant::now()),
            Verdict::Forward
        );
        assert_eq!(o.next_due(), Some(t0 + ms(2500)), "still held back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_due_exactly_one_ack_timeout_before_the_deadline_still_goes_out() {
        let p = policy_until("max_attempts = 2\njitter = 0", ms(800));
        let mut o = Outstanding::new(p, open_budget());
        let mut rng = SmallRng::seed_from_u64(3);
        warm(&mut o, &mut rng).await;
        let t0 = Instant::now();
        o.on_command(cmd(1), 1, KEY, 0, t0, &mut rng);
        tokio::time::advance(ms(1)).await;
        o.on_command(cmd(2), 2, KEY, 0, Instant::now(), &mut rng);
        assert_eq!(
            o.on_reply(2, 0, &reply(2), Instant::now()),
            Verdict::Forward
        );
        // Due at 400 ms with 400 ms (one ack_timeout) left: just in time.
        tokio::time::sleep_until(t0 + ms(400)).await;
        let due = o.due(Instant::now(), &mut rng, |_| false);
        assert_eq!((due.resend.len(), due.too_late), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_devices_blind_copy_waits_three_of_its_timeouts() {
        let p = policy_until("jitter = 0", Duration::from_secs(60));
        let mut o = Outstanding::new(p, open_budget());
        let mut rng = SmallRng::seed_from_u64(3);
        // Answered after 10 s each, sent once: its timeout grows well past 10 s.
        for seq in 1..=30u8 {
            o.on_command(cmd(seq), seq, KEY, 0, Instant::now(), &mut rng);
            tokio::time::advance(Duration::from_secs(10)).await;
            o.on_reply(seq, 0, &reply(seq), Instant::now());
        }
        let rto = o.rto();
        assert!(rto > Duration::from_secs(10), "{rto:?}");
        let t0 = Instant::now();
        o.on_command(cmd(40), 40, KEY, 0, t0, &mut rng);
        // No evidence: not before three timeouts, which here is later than half the deadline.
        tokio::time::sleep_until(t0 + rto).await;
        assert!(o.due(Instant::now(), &mut rng, |_| false).resend.is_empty());
        assert_eq!(o.next_due(), Some(t0 + rto * BLIND_FACTOR));
    }

    #[tokio::test(start_paused = true)]
    async fn max_attempts_counts_the_first_send() {
        let p = policy_until("max_attempts = 2\njitter = 0", Duration::from_secs(60));
        let mut o = Outstanding::new(p, open_budget());
        let mut rng = SmallRng::seed_from_u64(3);
        warm(&mut o, &mut rng).await;
        o.on_command(cmd(1), 1, KEY, 0, Instant::now(), &mut rng);
        answer_a_later_one(&mut o, &mut rng, 2).await;
        let r = next_retry(&mut o, &mut rng).await;
        assert_eq!(r.iter().map(|r| r.attempt).collect::<Vec<_>>(), vec![2]);
        assert_eq!(o.next_due(), None, "two sends in all");
    }

    #[test]
    fn an_expired_command_is_no_longer_waiting_for_evidence() {
        // Remembered (for duplicate suppression) well past its deadline.
        let mut o = outstanding("dedup_ttl = \"60s\"");
        let mut rng = SmallRng::seed_from_u64(1);
        let t0 = Instant::now();
        o.on_command(cmd(1), 1, KEY, 0, t0, &mut rng);
        let due = o.due(t0 + ms(1200), &mut rng, |_| false);
        assert!(due.resend.is_empty(), "no evidence yet");
        assert!(o.next_due().is_some(), "waiting for evidence");
        o.expire(t0 + Duration::from_secs(5));
        assert_eq!(o.next_due(), None);
        // A later command answered: nothing is woken for the expired one.
        o.on_command(cmd(2), 2, KEY, 0, t0 + Duration::from_secs(6), &mut rng);
        o.on_reply(2, 0, &reply(2), t0 + Duration::from_secs(6));
        let due = o.due(t0 + Duration::from_secs(6), &mut rng, |_| false);
        assert_eq!(due.too_late, 0, "{due:?}");
        assert!(due.resend.is_empty());
    }
}
