//! Per-connection transaction tracker: pairs requests with their replies and yields outcomes.
//!
//! Shared by every path (the legacy observer now; the reliable session and the shadow later) so
//! all of them are measured by the same rules, those of `cync-protocol.md` §7:
//! - a srv→dev command (0x73 class `f8`) succeeds when the device's `f9` reply echoing its inner
//!   seq (byte 13) arrives within `command_deadline`; otherwise it times out (a reply after the
//!   deadline included, whenever expiry last ran), or is abandoned when the connection ends
//!   first;
//! - a command still unanswered when `slo.latency_threshold` passes is late ([`Event::Late`])
//!   at that moment, once, whatever comes of it: a stall is known a threshold after it starts,
//!   not a deadline later (the rollback judge acts on it). One answered in time is not;
//! - a 0x73 is "received" when a 0x7b echoing its (channel id, msg_id) comes back; with
//!   repeated msg_ids (the add-on always sends `00 00 00`) the oldest pending one with that key
//!   is taken, which is FIFO;
//! - 0x83 → 0x88 by echoed msg_id, 0xa3 → 0xab by (id, msg_id);
//! - 0x23/0x43/0xc3/0xd3 → 0x28/0x48/0xc8/0xd8 FIFO per type, heads older than `reply_timeout`
//!   expire so one lost reply cannot shift every later match.
//!
//! Invariants:
//! - Pure: no clocks, no I/O. Every call takes `now`, so timer behaviour is tested with
//!   constructed instants or paused tokio time.
//! - Matching is per connection and per type, never across either.
//! - Pairing is for measurement only; nothing here may gate forwarding.
//! - Memory is bounded: each queue holds at most [`MAX_PENDING`] entries; the oldest is
//!   expired (counted as a timeout) to make room.

use std::time::Duration;

use tokio::time::Instant;

use crate::conn::fifo::Fifo;
use crate::conn::{Direction, Transport};
use crate::protocol::{DeviceId, FrameClass, MsgId, Packet, PacketType};
use crate::telemetry::labels::{AckOutcome, CommandOutcome, HeartbeatOutcome, Label, ReplyOutcome};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::slo_feed::LatencyThreshold;

/// Upper bound on each pending queue of one connection.
pub const MAX_PENDING: usize = 1024;

/// What the tracker concluded from a packet or the passing of time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A command finished; `latency` from first forward to the `f9` reply on success, `ack`
    /// to the device's 0x7b for it (when one came), `msg_id` the command's own; `late` when
    /// an [`Event::Late`] already counted it past the latency threshold.
    Command {
        seq: u8,
        outcome: CommandOutcome,
        latency: Option<Duration>,
        msg_id: Option<MsgId>,
        ack: Option<Duration>,
        late: bool,
    },
    /// The command with inner seq `seq` passed the latency threshold unanswered.
    Late { seq: u8 },
    /// A request of `request` type got its reply, timed out, or a reply came unasked.
    /// For 0x73 this is the 0x7b "received" acknowledgement.
    Reply {
        request: PacketType,
        outcome: ReplyOutcome,
        latency: Option<Duration>,
    },
}

#[derive(Debug, Clone)]
struct PendingCommand {
    seq: u8,
    sent: Instant,
    msg_id: Option<MsgId>,
    /// When its 0x7b came, after `sent`.
    ack: Option<Duration>,
    /// An [`Event::Late`] was sent for it.
    late: bool,
}

impl PendingCommand {
    fn finished(&self, outcome: CommandOutcome, latency: Option<Duration>) -> Event {
        Event::Command {
            seq: self.seq,
            outcome,
            latency,
            msg_id: self.msg_id,
            ack: self.ack,
            late: self.late,
        }
    }
}

#[derive(Debug, Clone)]
struct Pending<K> {
    key: K,
    sent: Instant,
}

/// Requests of type `PacketType::ALL[REQ]` waiting for an echoed reply, oldest first. The
/// type is a parameter, not a field: a field was another word of every connection's memory
/// for each of the tracker's eight queues.
#[derive(Debug)]
struct Keyed<K, const REQ: usize> {
    queue: Fifo<Pending<K>>,
}

impl<K: PartialEq, const REQ: usize> Keyed<K, REQ> {
    const REQUEST: PacketType = PacketType::ALL[REQ];

    const fn new() -> Self {
        Self { queue: Fifo::new() }
    }

    fn push(&mut self, key: K, now: Instant, out: &mut Vec<Event>) {
        if self.queue.len() >= MAX_PENDING {
            self.queue.pop_front();
            out.push(timeout(Self::REQUEST));
        }
        self.queue.push_back(Pending { key, sent: now });
    }

    fn answer(&mut self, key: &K, now: Instant, out: &mut Vec<Event>) {
        match self.queue.position(|p| &p.key == key) {
            Some(i) => {
                let sent = self.queue.remove(i).map(|p| p.sent).unwrap_or(now);
                out.push(Event::Reply {
                    request: Self::REQUEST,
                    outcome: ReplyOutcome::Matched,
                    latency: Some(now.saturating_duration_since(sent)),
                });
            }
            None => out.push(Event::Reply {
                request: Self::REQUEST,
                outcome: ReplyOutcome::Unmatched,
                latency: None,
            }),
        }
    }

    /// When the oldest waiting request was sent (they are kept in the order sent).
    fn oldest(&self) -> Option<Instant> {
        self.queue.front().map(|p| p.sent)
    }

    fn expire(&mut self, cutoff: Duration, now: Instant, out: &mut Vec<Event>) {
        while self
            .queue
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.sent) >= cutoff)
        {
            self.queue.pop_front();
            out.push(timeout(Self::REQUEST));
        }
    }
}

fn timeout(request: PacketType) -> Event {
    Event::Reply {
        request,
        outcome: ReplyOutcome::Timeout,
        latency: None,
    }
}

/// Tracks the transactions of one device connection.
#[derive(Debug)]
pub struct Tracker {
    command_deadline: Duration,
    reply_timeout: Duration,
    latency: LatencyThreshold,
    commands: Fifo<PendingCommand>,
    /// srv→dev 0x73 waiting for the device's 0x7b.
    down_data: Keyed<(DeviceId, MsgId), { PacketType::Data as usize }>,
    /// dev→srv 0x73 waiting for a server 0x7b (the real cloud acks them; the add-on never does,
    /// so these expire silently rather than count as timeouts).
    up_data: Keyed<(DeviceId, MsgId), { PacketType::Data as usize }>,
    status: Keyed<MsgId, { PacketType::Status as usize }>,
    channel: Keyed<(DeviceId, MsgId), { PacketType::ChannelOpen as usize }>,
    hello: Keyed<(), { PacketType::Hello as usize }>,
    info: Keyed<(), { PacketType::Info as usize }>,
    time: Keyed<(), { PacketType::TimeRequest as usize }>,
    heartbeat: Keyed<(), { PacketType::Heartbeat as usize }>,
}

impl Tracker {
    pub fn new(
        command_deadline: Duration,
        reply_timeout: Duration,
        latency: LatencyThreshold,
    ) -> Self {
        Self {
            command_deadline,
            reply_timeout,
            latency,
            commands: Fifo::new(),
            down_data: Keyed::new(),
            up_data: Keyed::new(),
            status: Keyed::new(),
            channel: Keyed::new(),
            hello: Keyed::new(),
            info: Keyed::new(),
            time: Keyed::new(),
            heartbeat: Keyed::new(),
        }
    }

    /// Commands forwarded and not yet answered: a connection should not be closed while this is
    /// non-zero (re-homing and draining wait for it).
    pub fn pending_commands(&self) -> usize {
        self.commands.len()
    }

    /// When a command's next SLI event is due: the oldest unanswered one's timeout, or the
    /// first not yet late passing the latency threshold. A caller that wakes then counts it
    /// on time (commands are kept in the order sent).
    pub fn next_command_event(&self) -> Option<Instant> {
        let timeout = self
            .commands
            .front()
            .map(|c| c.sent + self.command_deadline);
        let late = self
            .commands
            .iter()
            .find(|c| !c.late)
            .map(|c| c.sent + self.latency.get());
        timeout.into_iter().chain(late).min()
    }

    /// When [`Tracker::expire`] next has something to time out, `None` while nothing waits:
    /// a connection that sleeps until then, rather than waking every second, sees each
    /// timeout when it happens and costs nothing while idle.
    pub fn next_deadline(&self) -> Option<Instant> {
        let reply = self.reply_timeout;
        [
            self.next_command_event(),
            self.down_data.oldest().map(|t| t + self.command_deadline),
            self.status.oldest().map(|t| t + reply),
            self.channel.oldest().map(|t| t + reply),
            self.hello.oldest().map(|t| t + reply),
            self.info.oldest().map(|t| t + reply),
            self.time.oldest().map(|t| t + reply),
            self.heartbeat.oldest().map(|t| t + reply),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Records one packet seen travelling in `dir` at `now`; appends conclusions to `out`.
    pub fn on_packet(&mut self, dir: Direction, pkt: &Packet, now: Instant, out: &mut Vec<Event>) {
        use Direction::*;
        match (dir, pkt.ptype()) {
            (DevToSrv, PacketType::Hello) => self.hello.push((), now, out),
            (SrvToDev, PacketType::HelloAck) => self.hello.answer(&(), now, out),
            (DevToSrv, PacketType::Info) => self.info.push((), now, out),
            (SrvToDev, PacketType::InfoAck) => self.info.answer(&(), now, out),
            (DevToSrv, PacketType::TimeRequest) => self.time.push((), now, out),
            (SrvToDev, PacketType::TimeReply) => self.time.answer(&(), now, out),
            (DevToSrv, PacketType::Heartbeat) => self.heartbeat.push((), now, out),
            (SrvToDev, PacketType::HeartbeatAck) => self.heartbeat.answer(&(), now, out),
            (DevToSrv, PacketType::Status) => {
                if let Some(m) = pkt.msg_id() {
                    self.status.push(m, now, out);
                }
            }
            (SrvToDev, PacketType::StatusAck) => {
                if let Some(m) = pkt.acks_msg_id() {
                    self.status.answer(&m, now, out);
                }
            }
            (SrvToDev, PacketType::ChannelOpen) => {
                if let (Some(id), Some(m)) = (pkt.id(), pkt.msg_id()) {
                    self.channel.push((id, m), now, out);
                }
            }
            (DevToSrv, PacketType::ChannelReply) => {
                if let (Some(id), Some(m)) = (pkt.id(), pkt.acks_msg_id()) {
                    self.channel.answer(&(id, m), now, out);
                }
            }
            (SrvToDev, PacketType::Data) => self.server_data(pkt, now, out),
            (DevToSrv, PacketType::Data) => self.device_data(pkt, now, out),
            (DevToSrv, PacketType::DataAck) => {
                if let (Some(id), Some(m)) = (pkt.id(), pkt.acks_msg_id()) {
                    self.down_data.answer(&(id, m), now, out);
                    // The oldest command under that msg_id still without one takes it (the
                    // add-on numbers every command 00 00 00: FIFO, as for the pairing).
                    if let Some(c) = self
                        .commands
                        .iter_mut()
                        .find(|c| c.msg_id == Some(m) && c.ack.is_none())
                    {
                        c.ack = Some(now.saturating_duration_since(c.sent));
                    }
                }
            }
            (SrvToDev, PacketType::DataAck) => {
                if let (Some(id), Some(m)) = (pkt.id(), pkt.acks_msg_id()) {
                    // The add-on never acks device 0x73s and the real cloud also acks 0x83s
                    // with 0x7b, so an unmatched server 0x7b is normal and not reported.
                    if self.up_data.queue.iter().any(|p| p.key == (id, m)) {
                        self.up_data.answer(&(id, m), now, out);
                    }
                }
            }
            _ => {}
        }
        self.drop_expired_up_data(now);
    }

    fn server_data(&mut self, pkt: &Packet, now: Instant, out: &mut Vec<Event>) {
        if let (Some(id), Some(m)) = (pkt.id(), pkt.msg_id()) {
            self.down_data.push((id, m), now, out);
        }
        if let Some(f) = pkt.inner().filter(|f| f.class() == FrameClass::Request) {
            if self.commands.len() >= MAX_PENDING {
                if let Some(old) = self.commands.pop_front() {
                    out.push(old.finished(CommandOutcome::Timeout, None));
                }
            }
            self.commands.push_back(PendingCommand {
                seq: f.seq,
                sent: now,
                msg_id: pkt.msg_id(),
                ack: None,
                late: false,
            });
        }
    }

    fn device_data(&mut self, pkt: &Packet, now: Instant, out: &mut Vec<Event>) {
        if let (Some(id), Some(m)) = (pkt.id(), pkt.msg_id()) {
            // Left unanswered by the add-on as a rule, and dropped without an event when they
            // expire: so they are dropped here, as the next one comes, and not by a timer,
            // which would wake every connection once per device reply for nothing.
            self.drop_expired_up_data(now);
            if self.up_data.queue.len() >= MAX_PENDING {
                self.up_data.queue.pop_front();
            }
            self.up_data.queue.push_back(Pending {
                key: (id, m),
                sent: now,
            });
        }
        let Some(f) = pkt.inner().filter(|f| f.class() == FrameClass::Reply) else {
            return;
        };
        if let Some(i) = self.commands.position(|c| c.seq == f.seq) {
            if let Some(c) = self.commands.remove(i) {
                // Expiry runs on a tick; a reply that beats the tick but not the deadline
                // came after the add-on gave up, which makes it a timeout, not a success.
                let latency = now.saturating_duration_since(c.sent);
                out.push(if latency >= self.command_deadline {
                    c.finished(CommandOutcome::Timeout, None)
                } else {
                    c.finished(CommandOutcome::Success, Some(latency))
                });
            }
        }
    }

    /// Times out what has waited too long and marks late the commands past the latency
    /// threshold. Call at [`Tracker::next_deadline`] (or about once a second) and before
    /// closing.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Event>) {
        let threshold = self.latency.get();
        for c in self.commands.iter_mut().filter(|c| !c.late) {
            // Kept in the order sent: the first not yet due ends the scan.
            if now.saturating_duration_since(c.sent) < threshold {
                break;
            }
            c.late = true;
            out.push(Event::Late { seq: c.seq });
        }
        while self
            .commands
            .front()
            .is_some_and(|c| now.saturating_duration_since(c.sent) >= self.command_deadline)
        {
            if let Some(c) = self.commands.pop_front() {
                out.push(c.finished(CommandOutcome::Timeout, None));
            }
        }
        let deadline = self.command_deadline;
        let reply = self.reply_timeout;
        self.down_data.expire(deadline, now, out);
        self.drop_expired_up_data(now);
        let queues: [&mut dyn ExpireDyn; 6] = [
            &mut self.status,
            &mut self.channel,
            &mut self.hello,
            &mut self.info,
            &mut self.time,
            &mut self.heartbeat,
        ];
        for q in queues {
            q.expire_dyn(reply, now, out);
        }
    }

    /// Device 0x73s past the reply timeout: expected to go unanswered under the add-on, so
    /// dropped without an event.
    fn drop_expired_up_data(&mut self, now: Instant) {
        let reply = self.reply_timeout;
        while self
            .up_data
            .queue
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.sent) >= reply)
        {
            self.up_data.queue.pop_front();
        }
    }

    /// Heartbeats forwarded and not yet answered.
    pub fn pending_heartbeats(&self) -> usize {
        self.heartbeat.queue.len()
    }

    /// The gateway answered the oldest pending heartbeat itself (the upstream is gone).
    pub fn answer_heartbeat_locally(&mut self, now: Instant, out: &mut Vec<Event>) {
        if let Some(p) = self.heartbeat.queue.pop_front() {
            out.push(Event::Reply {
                request: PacketType::Heartbeat,
                outcome: ReplyOutcome::Local,
                latency: Some(now.saturating_duration_since(p.sent)),
            });
        }
    }

    /// The upstream that issued the pending commands is gone (the new path resumes with a new
    /// one): they are abandoned, as they would be if the device had left.
    pub fn abandon_commands(&mut self, out: &mut Vec<Event>) {
        for c in self.commands.take_all() {
            out.push(c.finished(CommandOutcome::Abandoned, None));
        }
    }

    /// The connection ended: commands still waiting are abandoned. Other pending requests are
    /// dropped without an outcome (their replies can no longer come).
    pub fn close(&mut self, now: Instant, out: &mut Vec<Event>) {
        self.expire(now, out);
        self.abandon_commands(out);
    }
}

trait ExpireDyn {
    fn expire_dyn(&mut self, cutoff: Duration, now: Instant, out: &mut Vec<Event>);
}

impl<K: PartialEq, const REQ: usize> ExpireDyn for Keyed<K, REQ> {
    fn expire_dyn(&mut self, cutoff: Duration, now: Instant, out: &mut Vec<Event>) {
        self.expire(cutoff, now, out);
    }
}

/// Records what a [`Tracker`] concluded, for a connection of `device` on `t`. A 0x73's
/// "reply" is its 0x7b acknowledgement; a 0xd3's is also a heartbeat outcome. `attempts`
/// says how many times the command with an inner seq went to the device (the new path's
/// copies; 1 elsewhere).
pub fn record(
    metrics: &Metrics,
    t: Transport,
    device: Option<DeviceId>,
    events: &[Event],
    attempts: &dyn Fn(u8) -> u32,
) {
    for e in events {
        match *e {
            Event::Command {
                seq,
                outcome,
                latency,
                msg_id,
                ack,
                late,
            } => {
                metrics.command_ended(t, outcome, latency, device, late);
                metrics.tracer().command(
                    device,
                    t.label(),
                    seq,
                    msg_id,
                    attempts(seq),
                    outcome.label(),
                    ack,
                    latency,
                );
            }
            Event::Late { .. } => metrics.command_late(t),
            Event::Reply {
                request: PacketType::Data,
                outcome,
                latency,
            } => {
                let ack = match outcome {
                    ReplyOutcome::Matched | ReplyOutcome::Local => AckOutcome::Received,
                    ReplyOutcome::Timeout => AckOutcome::Timeout,
                    ReplyOutcome::Unmatched => AckOutcome::Unmatched,
                };
                metrics.ack(t, ack, latency);
            }
            Event::Reply {
                request,
                outcome,
                latency,
            } => {
                metrics.reply(t, request, outcome, latency);
                if request == PacketType::Heartbeat {
                    metrics.heartbeat(
                        t,
                        match outcome {
                            ReplyOutcome::Matched => HeartbeatOutcome::Acked,
                            ReplyOutcome::Local => HeartbeatOutcome::Local,
                            ReplyOutcome::Timeout => HeartbeatOutcome::Missed,
                            ReplyOutcome::Unmatched => HeartbeatOutcome::Unmatched,
                        },
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn pkt(hex_str: &str) -> Packet {
        let raw = Bytes::from(hex::decode(hex_str.replace(' ', "")).expect("hex"));
        Packet::parse(raw, 4096).expect("valid packet")
    }

    // The add-on's power command (inner seq 0x01) and a device f9 reply with the same seq.
    const CMD: &str = "730000001f38e8cf460000007e01000000f8d00d0001000000005000d01102010000127e";
    const ACK: &str = "7b0000000738e8cf46000000";

    fn f9(seq: u8) -> Packet {
        // 0x73 f9 d0 01 00 00, checksum = d0 + 01 + 00 + 00 = d1.
        let s = format!("730000001338e8cf460002007e{seq:02x}000000f9d0010000d17e");
        pkt(&s)
    }

    fn tracker() -> Tracker {
        Tracker::new(
            Duration::from_secs(5),
            Duration::from_secs(10),
            LatencyThreshold::new(Duration::from_millis(1500)),
        )
    }

    fn parse_built(b: Bytes) -> Packet {
        Packet::parse(b, 4096).expect("valid packet")
    }

    /// Entries the tracker has room for in its queues.
    fn queued_capacity(t: &Tracker) -> usize {
        [
            t.commands.capacity(),
            t.down_data.queue.capacity(),
            t.up_data.queue.capacity(),
            t.channel.queue.capacity(),
            t.status.queue.capacity(),
            t.hello.queue.capacity(),
            t.info.queue.capacity(),
            t.time.queue.capacity(),
            t.heartbeat.queue.capacity(),
        ]
        .iter()
        .sum()
    }

    #[test]
    fn an_idle_connection_holds_no_queue_once_everything_is_answered() {
        let mut t = tracker();
        let mut out = Vec::new();
        let t0 = Instant::now();
        let dev = Direction::DevToSrv;
        let srv = Direction::SrvToDev;
        t.on_packet(
            dev,
            &parse_built(crate::protocol::build::hello(
                DeviceId([1, 2, 3, 4]),
                &[0; 16],
            )),
            t0,
            &mut out,
        );
        t.on_packet(
            srv,
            &parse_built(crate::protocol::build::hello_ack()),
            t0,
            &mut out,
        );
        t.on_packet(
            dev,
            &parse_built(crate::protocol::build::heartbeat()),
            t0,
            &mut out,
        );
        t.on_packet(
            srv,
            &parse_built(crate::protocol::build::heartbeat_ack()),
            t0,
            &mut out,
        );
        t.on_packet(srv, &pkt(CMD), t0, &mut out);
        assert!(queued_capacity(&t) > 0, "waiting transactions are held");
        t.on_packet(dev, &pkt(ACK), t0, &mut out);
        t.on_packet(dev, &f9(1), t0, &mut out);
        // The device's f9 is a 0x73 the add-on never acks: held until the reply timeout.
        t.on_packet(
            dev,
            &parse_built(crate::protocol::build::heartbeat()),
            t0 + Duration::from_secs(11),
            &mut out,
        );
        t.on_packet(
            srv,
            &parse_built(crate::protocol::build::heartbeat_ack()),
            t0 + Duration::from_secs(11),
            &mut out,
        );
        assert_eq!(t.pending_commands(), 0);
        assert_eq!(
            queued_capacity(&t),
            0,
            "nothing answered keeps an allocation"
        );
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn command_success_latency_and_ack() {
        let mut t = tracker();
        let t0 = Instant::now();
        let mut out = Vec::new();
        t.on_packet(Direction::SrvToDev, &pkt(CMD), t0, &mut out);
        assert_eq!(t.pending_commands(), 1);
        t.on_packet(
            Direction::DevToSrv,
            &pkt(ACK),
            t0 + Duration::from_millis(20),
            &mut out,
        );
        t.on_packet(
            Direction::DevToSrv,
            &f9(1),
            t0 + Duration::from_millis(30),
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                Event::Reply {
                    request: PacketType::Data,
                    outcome: ReplyOutcome::Matched,
                    latency: Some(Duration::from_millis(20)),
                },
                Event::Command {
                    seq: 1,
                    outcome: CommandOutcome::Success,
                    latency: Some(Duration::from_millis(30)),
                    msg_id: pkt(CMD).msg_id(),
                    // Its own 0x7b, 20 ms in, rides along to the trace.
                    ack: Some(Duration::from_millis(20)),
                    late: false,
                },
            ]
        );
        assert_eq!(t.pending_commands(), 0);
    }

    #[test]
    fn reply_with_other_seq_does_not_complete() {
        let mut t = tracker();
        let t0 = Instant::now();
        let mut out = Vec::new();
        t.on_packet(Direction::SrvToDev, &pkt(CMD), t0, &mut out);
        t.on_packet(Direction::DevToSrv, &f9(2), t0, &mut out);
        assert_eq!(t.pending_commands(), 1);
        t.expire(t0 + Duration::from_secs(5), &mut out);
        // Late and timed out in one expiry: late first, and the timeout says it was counted.
        assert_eq!(
            out[..2],
            [
                Event::Late { seq: 1 },
                Event::Command {
                    seq: 1,
                    outcome: CommandOutcome::Timeout,
                    latency: None,
                    msg_id: pkt(CMD).msg_id(),
                    ack: None,
                    late: true,
                }
            ]
        );
        assert_eq!(t.pending_commands(), 0);
    }

    /// A device 0x73 (an f9 reply to seq 1) under message id `00 mm 00`.
    fn device_data(mm: u8) -> Packet {
        pkt(&format!(
            "730000001338e8cf4600{mm:02x}007e01000000f9d0010000d17e"
        ))
    }

    fn server_ack(mm: u8) -> Packet {
        pkt(&format!("7b0000000738e8cf4600{mm:02x}00"))
    }

    fn data_replies(out: &[Event]) -> Vec<(ReplyOutcome, Option<Duration>)> {
        out.iter()
            .filter_map(|e| match e {
                Event::Reply {
                    request: PacketType::Data,
                    outcome,
                    latency,
                } => Some((*outcome, *latency)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_server_0x7b_pairs_with_its_own_device_0x73_among_several_pending() {
        let mut t = tracker();
        let t0 = Instant::now();
        let mut out = Vec::new();
        t.on_packet(Direction::DevToSrv, &device_data(1), t0, &mut out);
        t.on_packet(Direction::DevToSrv, &device_data(2), t0, &mut out);
        let later = t0 + Duration::from_millis(30);
        t.on_packet(Direction::SrvToDev, &server_ack(1), later, &mut out);
        t.on_packet(Direction::SrvToDev, &server_ack(2), later, &mut out);
        assert_eq!(
            data_replies(&out),
            vec![
                (ReplyOutcome::Matched, Some(Duration::from_millis(30))),
                (ReplyOutcome::Matched, Some(Duration::from_millis(30)))
            ]
        );
    }

    #[test]
    fn a_device_0x73_waits_for_its_0x7b_until_the_reply_timeout_and_no_longer() {
        // tracker(): a 10 s reply timeout.
        let mut t = tracker();
        let t0 = Instant::now();
        let mut out = Vec::new();
        t.on_packet(Direction::DevToSrv, &device_data(1), t0, &mut out);
        t.on_packet(Direction::DevToSrv, &device_data(2), t0, &mut out);
        t.expire(t0 + Duration::from_secs(9), &mut out);
        t.on_packet(
            Direction::SrvToDev,
            &server_ack(1),
            t0 + Duration::from_secs(9),
            &mut out,
        );
        assert_eq!(
            data_replies(&out),
            vec![(ReplyOutcome::Matched, Some(Duration::from_secs(9)))]
        );
        // Past the timeout the other is gone, silently (the add-on never acks device 0x73s).
        t.expire(t0 + Duration::from_secs(10), &mut out);
        t.on_packet(
            Direction::SrvToDev,
            &server_ack(2),
            t0 + Duration::from_secs(10),
            &mut out,
        );
        assert_eq!(data_replies(&out).len(), 1, "{out:?}");
    }

    #[test]
    fn the_next_command_event_is_the_oldest_pending_commands_threshold_then_its_deadline() {
        let mut t = tracker();
        let t0 = Instant::now();
        let mut out = Vec::new();
        assert_eq!(t.next_command_event(), None);
        t.on_packet(Direction::SrvToDev, &pkt(CMD), t0, &mut out);
        // tracker(): late at 1.5 s, a 5 s command deadline.
        assert_eq!(
            t.next_command_event(),
            Some(t0 + Duration::from_millis(1500))
        );
        t.expire(t0 + Duration::from_millis(1500), &mut out);
        assert_eq!(t.next_command_event(), Some(t0 + Duration::from_secs(5)));
        t.on_packet(
            Direction::DevToSrv,
            &f9(1),
            t0 + Duration::from_millis(1600),
            &mut out,
        );
        assert_eq!(t.next_command_event(), None);
    }

    #[test]
    fn a_command_unanswered_at_the_latency_threshold_is_late_then_and_only_once() {
        let mut t = tracker();
        let t0 = Instant::now();
        let mut out = Vec::new();
        t.on_packet(Direction::SrvToDev, &pkt(CMD), t0, &mut out);
        // Due at the threshold (1.5 s), before the 5 s deadline.
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_millis(1500)));
        t.expire(t0 + Duration::from_millis(1499), &mut out);
        assert!(out.is_empty(), "not before the threshold: {out:?}");
        t.expire(t0 + Duration::from_millis(1500), &mut out);
        assert_eq!(out, vec![Event::Late { seq: 1 }]);
        // Now only the timeout is due, and a second expiry says nothing new.
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_secs(5)));
        t.expire(t0 + Duration::from_secs(2), &mut out);
        assert_eq!(out.len(), 1);
        // Answered afterwards: a success, marked as already counted late.
        t.on_packet(
            Direction::DevToSrv,
            &f9(1),
            t0 + Duration::from_secs(3),
            &mut out,
        );
        assert_eq!(
            out[1],
            Event::Command {
                seq: 1,
                outcome: CommandOutcome::Success,
                latency: Some(Duration::from_secs(3)),
                msg_id: pkt(CMD).msg_id(),
                ack: None,
                late: true,
            }
        );
    }

    #[test]
    fn a_lowered_threshold_reaches_a_tracker_already_holding_commands() {
        let threshold = LatencyThreshold::new(Duration::from_millis(1500));
        let mut t = Tracker::new(
            Duration::from_secs(5),
            Duration::from_secs(10),
            threshold.clone(),
        );
        let t0 = Instant::now();
        let mut out = Vec::new();
        t.on_packet(Direction::SrvToDev, &pkt(CMD), t0, &mut out);
        threshold.set(Duration::from_millis(200));
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_millis(200)));
        t.expire(t0 + Duration::from_millis(200), &mut out);
        assert_eq!(out, vec![Event::Late { seq: 1 }]);
    }

    #[test]
    fn close_abandons_pending_commands() {
        let mut t = tracker();
        let t0 = Instant::now();
        let mut out = Vec::new();
        t.on_packet(Direction::SrvToDev, &pkt(CMD), t0, &mut out);
        t.close(t0 + Duration::from_secs(1), &mut out);
        assert_eq!(
            out,
            vec![Event::Command {
                seq: 1,
                outcome: CommandOutcome::Abandoned,
                latency: None,
                msg_id: pkt(CMD).msg_id(),
                ack: None,
                late: false,
            }]
        );
    }

    #[test]
    fn stale_fifo_head_expires_so_later_pairs_stay_aligned() {
        let mut t = tracker();
        let t0 = Instant::now();
        let hb = parse_built(crate::protocol::build::heartbeat());
        let hb_ack = parse_built(crate::protocol::build::heartbeat_ack());
        let mut out = Vec::new();
        // First heartbeat's ack is lost.
        t.on_packet(Direction::DevToSrv, &hb, t0, &mut out);
        t.expire(t0 + Duration::from_secs(10), &mut out);
        let t1 = t0 + Duration::from_secs(21);
        t.on_packet(Direction::DevToSrv, &hb, t1, &mut out);
        t.on_packet(
            Direction::SrvToDev,
            &hb_ack,
            t1 + Duration::from_millis(40),
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                timeout(PacketType::Heartbeat),
                Event::Reply {
                    request: PacketType::Heartbeat,
                    outcome: ReplyOutcome::Matched,
                    latency: Some(Duration::from_millis(40)),
                }
            ]
        );
    }

    #[test]
    fn status_ack_matches_by_msg_id_even_out_of_order() {
        let mut t = tracker();
        let t0 = Instant::now();
        let mut out = Vec::new();
        let s1 = pkt(
            "830000002545880f3a0009007e1f000000fadb130072251150005000db110201010a0affffff0000377e",
        );
        t.on_packet(Direction::DevToSrv, &s1, t0, &mut out);
        t.on_packet(Direction::SrvToDev, &pkt("8800000003000a00"), t0, &mut out);
        t.on_packet(Direction::SrvToDev, &pkt("8800000003000900"), t0, &mut out);
        assert_eq!(out.len(), 2);
        assert!(matches!(
            out[0],
            Event::Reply {
                outcome: ReplyOutcome::Unmatched,
                ..
            }
        ));
        assert!(matches!(
            out[1],
            Event::Reply {
                outcome: ReplyOutcome::Matched,
                ..
            }
        ));
    }

    #[test]
    fn a_reply_after_the_deadline_is_a_timeout_even_before_expiry_runs() {
        let mut t = tracker();
        let t0 = Instant::now();
        let mut out = Vec::new();
        t.on_packet(Direction::SrvToDev, &pkt(CMD), t0, &mut out);
        t.on_packet(
            Direction::DevToSrv,
            &f9(1),
            t0 + Duration::from_millis(5000),
            &mut out,
        );
        assert_eq!(
            out,
            vec![Event::Command {
                seq: 1,
                outcome: CommandOutcome::Timeout,
                latency: None,
                msg_id: pkt(CMD).msg_id(),
                ack: None,
                late: false,
            }]
        );
        assert_eq!(t.pending_commands(), 0);
        // Just inside the deadline it is a success.
        let mut out = Vec::new();
        t.on_packet(Direction::SrvToDev, &pkt(CMD), t0, &mut out);
        t.on_packet(
            Direction::DevToSrv,
            &f9(1),
            t0 + Duration::from_millis(4999),
            &mut out,
        );
        assert!(matches!(
            out[..],
            [Event::Command {
                outcome: CommandOutcome::Success,
                ..
            }]
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn command_deadline_with_paused_time() {
        let mut t = tracker();
        let mut out = Vec::new();
        t.on_packet(Direction::SrvToDev, &pkt(CMD), Instant::now(), &mut out);
        tokio::time::advance(Duration::from_millis(4999)).await;
        t.expire(Instant::now(), &mut out);
        assert_eq!(
            out,
            [Event::Late { seq: 1 }],
            "late at 1.5 s, not timed out"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        t.expire(Instant::now(), &mut out);
        assert_eq!(
            out.len(),
            3,
            "then the command timeout and its missing 0x7b: {out:?}"
        );
    }

    use crate::protocol::build;
    use crate::protocol::MsgId;

    const DEV: DeviceId = DeviceId([0x38, 0xe8, 0xcf, 0x46]);

    fn matched(out: &[Event]) -> Vec<PacketType> {
        out.iter()
            .filter_map(|e| match e {
                Event::Reply {
                    request,
                    outcome: ReplyOutcome::Matched,
                    ..
                } => Some(*request),
                _ => None,
            })
            .collect()
    }

    fn parse(b: Bytes) -> Packet {
        Packet::parse(b, 4096).expect("valid")
    }

    #[test]
    fn each_request_is_answered_by_its_own_reply_in_the_other_direction() {
        use Direction::*;
        let m = MsgId([0, 7, 0]);
        let cases = [
            (
                DevToSrv,
                build::hello(DEV, &[1; 16]),
                build::hello_ack(),
                PacketType::Hello,
            ),
            (
                DevToSrv,
                build::info_empty(DEV),
                build::info_ack(),
                PacketType::Info,
            ),
            (
                DevToSrv,
                build::time_request(),
                build::time_reply_stale(),
                PacketType::TimeRequest,
            ),
            (
                SrvToDev,
                build::channel_open(DEV, m),
                build::channel_reply(DEV, m),
                PacketType::ChannelOpen,
            ),
            // A device 0x73 and the server's 0x7b for it.
            (
                DevToSrv,
                build::command_reply(DEV, m, 9, 0xd0),
                build::data_ack(DEV, m),
                PacketType::Data,
            ),
        ];
        for (dir, request, reply, ptype) in cases {
            let back = if dir == DevToSrv { SrvToDev } else { DevToSrv };
            let mut t = tracker();
            let mut out = Vec::new();
            let now = Instant::now();
            t.on_packet(dir, &parse(request.clone()), now, &mut out);
            // The reply sent the same way as the request answers nothing.
            t.on_packet(dir, &parse(reply.clone()), now, &mut out);
            assert!(matched(&out).is_empty(), "{ptype:?}: {out:?}");
            t.on_packet(back, &parse(reply), now, &mut out);
            assert_eq!(matched(&out), [ptype], "{ptype:?}: {out:?}");
        }
    }

    #[test]
    fn a_server_0x7b_for_no_device_0x73_is_not_reported() {
        let mut t = tracker();
        let mut out = Vec::new();
        let now = Instant::now();
        t.on_packet(
            Direction::DevToSrv,
            &parse(build::command_reply(DEV, MsgId([0, 7, 0]), 9, 0xd0)),
            now,
            &mut out,
        );
        t.on_packet(
            Direction::SrvToDev,
            &parse(build::data_ack(DEV, MsgId([0, 8, 0]))),
            now,
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn commands_and_device_reports_in_flight_together_do_not_push_each_other_out() {
        let mut t = tracker();
        let mut out = Vec::new();
        let now = Instant::now();
        for seq in 1..=3 {
            t.on_packet(
                Direction::SrvToDev,
                &parse(build::power_command(DEV, MsgId([0, 0, 0]), seq, 10, true)),
                now,
                &mut out,
            );
            t.on_packet(
                Direction::DevToSrv,
                &parse(build::command_reply(
                    DEV,
                    MsgId([0, seq, 0]),
                    100 + seq,
                    0xd0,
                )),
                now,
                &mut out,
            );
        }
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(t.pending_commands(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_deadline_is_the_first_timeout_of_any_kind_and_expiring_there_times_it_out() {
        let mut t = tracker();
        let mut out = Vec::new();
        assert_eq!(
            t.next_deadline(),
            None,
            "nothing waits: nothing to wake for"
        );
        let t0 = Instant::now();
        // tracker(): commands 5 s (late at 1.5 s), other replies 10 s. A time request first, a
        // command 1 s on: the command's threshold (2.5 s), then its deadline (6 s), come before
        // the request's (10 s).
        t.on_packet(
            Direction::DevToSrv,
            &parse(build::time_request()),
            t0,
            &mut out,
        );
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_secs(10)));
        let t1 = t0 + Duration::from_secs(1);
        t.on_packet(Direction::SrvToDev, &pkt(CMD), t1, &mut out);
        assert_eq!(t.next_deadline(), Some(t1 + Duration::from_millis(1500)));
        t.expire(t1 + Duration::from_millis(1500), &mut out);
        assert_eq!(out, vec![Event::Late { seq: 1 }]);
        out.clear();
        assert_eq!(t.next_deadline(), Some(t1 + Duration::from_secs(5)));
        // Expiring just before a deadline times nothing out; at it, exactly that one.
        t.expire(t1 + Duration::from_millis(4999), &mut out);
        assert!(out.is_empty(), "{out:?}");
        t.expire(t1 + Duration::from_secs(5), &mut out);
        assert_eq!(t.pending_commands(), 0);
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_secs(10)));
        out.clear();
        t.expire(t0 + Duration::from_secs(10), &mut out);
        assert!(
            out.iter().any(|e| matches!(
                e,
                Event::Reply {
                    request: PacketType::TimeRequest,
                    outcome: ReplyOutcome::Timeout,
                    ..
                }
            )),
            "{out:?}"
        );
        assert_eq!(t.next_deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_times_out_exactly_at_the_reply_timeout() {
        let mut t = tracker();
        let mut out = Vec::new();
        t.on_packet(
            Direction::DevToSrv,
            &parse(build::time_request()),
            Instant::now(),
            &mut out,
        );
        tokio::time::advance(Duration::from_millis(9999)).await;
        t.expire(Instant::now(), &mut out);
        assert!(out.is_empty(), "{out:?}");
        tokio::time::advance(Duration::from_millis(1)).await;
        t.expire(Instant::now(), &mut out);
        assert!(
            matches!(
                out.as_slice(),
                [Event::Reply {
                    request: PacketType::TimeRequest,
                    outcome: ReplyOutcome::Timeout,
                    ..
                }]
            ),
            "{out:?}"
        );
    }
}
