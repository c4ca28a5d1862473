//! The reliable session: one device connection on the new path, and its upstream.
//!
//! [`Core`] is the session's state machine and holds every decision (what to forward, drop,
//! re-send or answer locally); it takes `now` and does no I/O, so its timers are tested with
//! paused time. [`run`] is the I/O shell around it: a device reader, a device writer, and an
//! upstream reader/writer pair that is replaced when the upstream is resumed.
//!
//! Invariants (design decision 7, protocol §7, §8, §14):
//! - The device socket is always being read, whatever the upstream does; what cannot be
//!   queued is shed (superseded status reports) or ends the pair, never left in the socket.
//! - Device→upstream: each device read becomes one upstream write, byte-exact except for whole
//!   frames deliberately dropped (duplicate `f9`/0x7b answers, stale answers). Malformed
//!   frames and stray bytes are forwarded as they came.
//! - Upstream→device: whole frames, in order. The session only ever *adds* frames the device
//!   has already seen from upstream (byte-identical command retries) or that it expects
//!   (0xd8 for its own 0xd3 while the upstream is away). It never originates a hello, a
//!   heartbeat or a command, and never rewrites an id or msg_id.
//! - Metrics record what was forwarded: the tracker sees one command, one `f9`, one 0x7b.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Future;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::dedup::DedupStore;
use super::queue::{BoundedQueue, Item, Pushed};
use super::resume::{self, Resume};
use super::retry::{Outstanding, Policy, Verdict};
use crate::config::Config;
use crate::legacy::{is_reset, CloseReason};
use crate::metrics::{Metrics, Transport};
use crate::protocol::{build, header_data_len, DeviceId, FrameClass, Packet, PacketType, Tap};
use crate::rehome::{ConnStop, Finishing};
use crate::tls::Stream;
use crate::transactions::{Direction, Event, Tracker};
use crate::upstream::Dialer;

/// Read size per direction; also the most the device writer coalesces into one write.
const READ_BUF: usize = 16 * 1024;
/// How often overdue transactions are expired.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// After the device closes, how long queued frames may take to reach the upstream.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);

/// What every reliable session shares.
pub struct SessionCtx {
    pub metrics: Arc<Metrics>,
    pub dialer: Dialer,
    pub dedup: Arc<DedupStore>,
}

/// Whether the upstream reader may read, and how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPermit {
    /// Read at most this many bytes.
    Read(usize),
    /// The device queue is full: wait for room until this instant (TCP backpressure on the
    /// add-on), after which reads resume and frames that do not fit are rejected.
    WaitUntil(Instant),
}

/// The session state machine.
pub struct Core {
    /// `new`, or `shadow` when the core only observes a copy of legacy traffic.
    transport: Transport,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    dedup: Arc<DedupStore>,
    device: DeviceId,
    hello: Bytes,
    tracker: Tracker,
    dev_tap: Tap,
    srv_tap: Tap,
    cmds: Outstanding,
    to_up: BoundedQueue,
    to_dev: BoundedQueue,
    resume: Resume,
    /// Counts upstream connections; commands remember the one that sent them.
    epoch: u32,
    last_device_bytes: Instant,
    next_expire: Instant,
    /// Since when the device queue has had no room.
    full_since: Option<Instant>,
    rng: SmallRng,
    events: Vec<Event>,
    /// Heartbeats in the device read being decoded, and how many were answered locally.
    read_heartbeats: u32,
    read_answered: u32,
}

impl Core {
    /// A session core on `transport`: `new` for a device on the new path, with `hello` its
    /// 0x23 frame (replayed when the upstream is resumed); or `shadow` for the dark launch,
    /// which runs the same logic on a copy of a legacy connection's traffic so its metrics say
    /// what the new path *would* have done (the caller discards whatever it queues; `hello`
    /// may be empty).
    pub fn new(
        transport: Transport,
        ctx: &SessionCtx,
        cfg: Arc<Config>,
        device: DeviceId,
        hello: Bytes,
        now: Instant,
    ) -> Core {
        let r = &cfg.reliable;
        let gauge = |dir: Direction| {
            ctx.metrics
                .queue_bytes
                .with_label_values(&[transport.label(), dir.label()])
        };
        Core {
            transport,
            tracker: Tracker::new(cfg.protocol.command_deadline, cfg.protocol.reply_timeout),
            dev_tap: Tap::new(cfg.protocol.max_frame_len),
            srv_tap: Tap::new(cfg.protocol.max_frame_len),
            cmds: Outstanding::new(Policy {
                settings: r.clone(),
                command_deadline: cfg.protocol.command_deadline,
            }),
            to_up: BoundedQueue::new(r.device_queue_bytes, gauge(Direction::DevToSrv)),
            to_dev: BoundedQueue::new(r.upstream_queue_bytes, gauge(Direction::SrvToDev)),
            resume: Resume::new(
                r.resume_attempts,
                r.resume_window,
                cfg.protocol.reply_timeout,
            ),
            epoch: 0,
            last_device_bytes: now,
            next_expire: now + EXPIRE_EVERY,
            full_since: None,
            rng: SmallRng::seed_from_u64(u64::from(u32::from_be_bytes(device.0))),
            events: Vec::new(),
            read_heartbeats: 0,
            read_answered: 0,
            metrics: ctx.metrics.clone(),
            dedup: ctx.dedup.clone(),
            device,
            hello,
            cfg,
        }
    }

    fn flush_events(&mut self) {
        if !self.events.is_empty() {
            self.metrics
                .record(self.transport, Some(self.device), &self.events);
            self.events.clear();
        }
    }

    fn drop_frame(&self, ptype: PacketType, reason: &str) {
        self.metrics
            .idempotent_drops
            .with_label_values(&[self.transport.label(), ptype.label(), reason])
            .inc();
    }

    fn resume_frame(&self, action: &str) {
        self.metrics
            .resume_frames
            .with_label_values(&[self.transport.label(), action])
            .inc();
    }

    /// Decides one whole device frame; true = forward it.
    fn device_frame(&mut self, p: &Packet, now: Instant) -> bool {
        let keep = match p.ptype() {
            PacketType::Data => match p.inner().filter(|f| f.class() == FrameClass::Reply) {
                Some(f) => {
                    let v = self.cmds.on_reply(f.seq, self.epoch, p.raw());
                    self.verdict(v, p.ptype(), || {
                        self.dedup.late_reply(self.device, f.seq, now)
                    })
                }
                None => true,
            },
            PacketType::DataAck => match (p.id(), p.acks_msg_id()) {
                (Some(id), Some(m)) => {
                    let v = self.cmds.on_ack((id, m), self.epoch);
                    self.verdict(v, p.ptype(), || {
                        self.dedup.late_ack(self.device, (id, m), now)
                    })
                }
                _ => true,
            },
            _ => true,
        };
        if keep {
            self.tracker
                .on_packet(Direction::DevToSrv, p, now, &mut self.events);
            if p.ptype() == PacketType::Heartbeat {
                self.read_heartbeats += 1;
                if self.resume.answers_locally() && self.answer_heartbeat(now) {
                    self.read_answered += 1;
                }
            }
        }
        keep
    }

    fn verdict(&self, v: Verdict, ptype: PacketType, late: impl FnOnce() -> bool) -> bool {
        match v {
            Verdict::Forward => true,
            Verdict::Duplicate => {
                self.drop_frame(ptype, "duplicate");
                false
            }
            Verdict::Stale => {
                self.drop_frame(ptype, "stale");
                false
            }
            Verdict::Unknown if late() => {
                self.drop_frame(ptype, "duplicate");
                false
            }
            Verdict::Unknown => true,
        }
    }

    /// Answers the oldest pending heartbeat with a local 0xd8; false if it could not be queued.
    fn answer_heartbeat(&mut self, now: Instant) -> bool {
        self.tracker.answer_heartbeat_locally(now, &mut self.events);
        self.resume_frame("local_heartbeat_ack");
        self.push_to_device(build::heartbeat_ack(), PacketType::HeartbeatAck)
    }

    fn push_to_device(&mut self, bytes: Bytes, ptype: PacketType) -> bool {
        let ok = match self.to_dev.push(Item::frames(bytes)) {
            Pushed::Queued | Pushed::Shed(_) => true,
            Pushed::Full => {
                self.metrics
                    .queue_full
                    .with_label_values(&[
                        self.transport.label(),
                        Direction::SrvToDev.label(),
                        "reject",
                    ])
                    .inc();
                debug!(
                    packet_type = ptype.label(),
                    "device queue full; frame rejected"
                );
                false
            }
        };
        ok
    }

    /// One read from the device. `Err` means the pair must close (its queue is full of
    /// frames that cannot be shed).
    pub fn device_read(&mut self, read: &[u8], now: Instant) -> Result<(), CloseReason> {
        self.last_device_bytes = now;
        let dir = Direction::DevToSrv;
        self.metrics
            .bytes
            .with_label_values(&[self.transport.label(), dir.label()])
            .inc_by(read.len() as u64);
        let carried = self.dev_tap.pending();
        let out = self.dev_tap.feed(read);
        self.read_heartbeats = 0;
        self.read_answered = 0;
        let mut cuts: Vec<Range<usize>> = Vec::new();
        let mut sheddable = carried == 0 && !out.frames.is_empty();
        let mut offset = -(carried as i64);
        for frame in &out.frames {
            let start = offset;
            offset += frame.raw.len() as i64;
            let keep = match &frame.packet {
                Ok(p) => {
                    self.metrics.packet(self.transport, dir, p.ptype());
                    sheddable &= matches!(p.ptype(), PacketType::Status | PacketType::Info);
                    self.device_frame(p, now)
                }
                Err(e) => {
                    self.metrics.decode_error(self.transport, dir, e);
                    sheddable = false;
                    true
                }
            };
            // A frame that began in an earlier read was already forwarded in part; it can
            // only be dropped when it lies wholly inside this read.
            if !keep && start >= 0 {
                if let (Ok(s), Ok(e)) = (usize::try_from(start), usize::try_from(offset)) {
                    cuts.push(s..e.min(read.len()));
                }
            }
        }
        if let Some(e) = &out.framing_error {
            self.metrics.decode_error(self.transport, dir, e);
            sheddable = false;
        }
        if self.dev_tap.pending() > 0 {
            sheddable = false;
        }
        self.flush_events();
        let bytes = excise(read, &cuts);
        if bytes.is_empty() {
            return Ok(());
        }
        let item = Item {
            bytes,
            sheddable,
            heartbeats: self.read_heartbeats,
            answered: self.read_answered,
        };
        match self.to_up.push(item) {
            Pushed::Queued => Ok(()),
            Pushed::Shed(n) => {
                self.metrics
                    .queue_full
                    .with_label_values(&[self.transport.label(), dir.label(), "shed"])
                    .inc_by(n as u64);
                Ok(())
            }
            Pushed::Full => {
                self.metrics
                    .queue_full
                    .with_label_values(&[self.transport.label(), dir.label(), "close"])
                    .inc();
                Err(CloseReason::QueueFull)
            }
        }
    }

    /// May the upstream reader read now?
    pub fn upstream_read_permit(&mut self, now: Instant) -> ReadPermit {
        // Read only while a whole frame (plus what the tap holds of a split one) is sure to
        // fit, so in normal operation nothing read is ever rejected.
        let room = self.to_dev.room();
        let frame_max = self.cfg.protocol.max_frame_len + 5;
        if room >= frame_max {
            self.full_since = None;
            let n = (room - self.srv_tap.pending()).min(READ_BUF);
            return ReadPermit::Read(n.max(1));
        }
        let since = *self.full_since.get_or_insert(now);
        let until = since + self.cfg.reliable.backpressure_timeout;
        if now >= until {
            ReadPermit::Read(READ_BUF)
        } else {
            ReadPermit::WaitUntil(until)
        }
    }

    /// One read from the upstream. Returns true when it added a command, i.e. a retry timer
    /// that may be due before the session's current wake-up.
    pub fn upstream_read(&mut self, read: &[u8], now: Instant) -> bool {
        let mut commands = false;
        let dir = Direction::SrvToDev;
        self.metrics
            .bytes
            .with_label_values(&[self.transport.label(), dir.label()])
            .inc_by(read.len() as u64);
        let out = self.srv_tap.feed(read);
        if let Some(e) = &out.framing_error {
            self.metrics.decode_error(self.transport, dir, e);
        }
        for frame in out.frames {
            let p = match &frame.packet {
                Ok(p) => p,
                Err(e) => {
                    self.metrics.decode_error(self.transport, dir, e);
                    self.push_to_device(frame.raw.clone(), PacketType::Data);
                    continue;
                }
            };
            self.metrics.packet(self.transport, dir, p.ptype());
            match p.ptype() {
                PacketType::HelloAck if self.resume.take_hello_ack(now) => {
                    self.resume_frame("swallowed_hello_ack");
                    self.metrics
                        .resumptions
                        .with_label_values(&[self.transport.label(), "success"])
                        .inc();
                    info!("upstream resumed");
                    continue;
                }
                PacketType::HeartbeatAck if self.resume.take_late_heartbeat_ack(now) => {
                    self.resume_frame("dropped_late_heartbeat_ack");
                    continue;
                }
                PacketType::Data => {
                    if let (Some(f), Some(id), Some(m)) = (
                        p.inner().filter(|f| f.class() == FrameClass::Request),
                        p.id(),
                        p.msg_id(),
                    ) {
                        self.cmds.on_command(
                            frame.raw.clone(),
                            f.seq,
                            (id, m),
                            self.epoch,
                            now,
                            &mut self.rng,
                        );
                        self.dedup.forget_seq(self.device, f.seq);
                        commands = true;
                    }
                }
                _ => {}
            }
            self.tracker.on_packet(dir, p, now, &mut self.events);
            self.push_to_device(frame.raw.clone(), p.ptype());
        }
        self.flush_events();
        commands
    }

    /// Timers: command retries, transaction expiry, the idle limit.
    pub fn tick(&mut self, now: Instant) -> Result<(), CloseReason> {
        let to_dev = &self.to_dev;
        let due = self.cmds.due(now, &mut self.rng, |raw| to_dev.holds(raw));
        for r in due {
            self.metrics
                .retransmits
                .with_label_values(&[self.transport.label()])
                .inc();
            self.dedup.remember(self.device, r.seq, r.key, now);
            debug!(seq = r.seq, attempt = r.attempt, "re-sending command");
            self.push_to_device(r.raw, PacketType::Data);
        }
        if now >= self.next_expire {
            self.next_expire = now + EXPIRE_EVERY;
            self.tracker.expire(now, &mut self.events);
            self.cmds.expire(now);
            self.resume.expire(now);
            self.flush_events();
        }
        // A shadow only measures: closing an idle device is the legacy path's business.
        if self.transport == Transport::New
            && now.saturating_duration_since(self.last_device_bytes)
                >= self.cfg.reliable.idle_timeout
        {
            return Err(CloseReason::IdleTimeout);
        }
        Ok(())
    }

    /// When [`Core::tick`] next has work.
    pub fn next_wake(&self) -> Instant {
        let mut at = self.next_expire;
        if self.transport == Transport::New {
            at = at.min(self.last_device_bytes + self.cfg.reliable.idle_timeout);
        }
        if let Some(r) = self.cmds.next_due() {
            at = at.min(r);
        }
        at
    }

    /// The upstream connection dropped. Returns the redial budget, or `None` when resuming
    /// is not possible any more.
    pub fn upstream_lost(&mut self, now: Instant) -> Option<(u32, Duration)> {
        self.epoch = self.epoch.wrapping_add(1);
        // Half a frame from the dead upstream can never be completed; the new upstream's
        // stream starts on a frame boundary.
        self.srv_tap = Tap::new(self.cfg.protocol.max_frame_len);
        self.cmds.end_epoch();
        self.tracker.abandon_commands(&mut self.events);
        // Every heartbeat still waiting is answered here: those written to the dead upstream
        // will never be, and those still queued will reach the next upstream, whose answers
        // to them are then dropped (owed when they are written, see `pop_for_upstream`).
        self.resume.clear_owed();
        // A read whose write the dead upstream may not have received goes to the next one.
        self.to_up.return_in_flight();
        for _ in 0..self.tracker.pending_heartbeats() {
            self.answer_heartbeat(now);
        }
        for item in self.to_up.items_mut() {
            item.answered = item.heartbeats;
        }
        let budget = self.resume.lost(now);
        self.flush_events();
        budget
    }

    /// A redial succeeded: returns the hello to replay before anything else.
    pub fn upstream_redialed(&mut self, attempts: u32) -> Bytes {
        self.resume.spent(attempts);
        self.resume.redialed();
        self.hello.clone()
    }

    pub fn redial_failed(&mut self, attempts: u32) {
        self.resume.spent(attempts);
    }

    /// The next device read to write upstream; it stays accounted for until
    /// [`Core::upstream_written`], and goes back to the front if the upstream is lost first.
    pub fn take_for_upstream(&mut self, now: Instant) -> Option<Bytes> {
        let (bytes, answered) = {
            let item = self.to_up.take_front()?;
            (item.bytes.clone(), item.answered)
        };
        // Heartbeats already answered here are about to reach the upstream, whose answers to
        // them must then be dropped.
        for _ in 0..answered {
            self.resume.owe_drop(now);
        }
        Some(bytes)
    }

    /// The bytes from [`Core::take_for_upstream`] were written.
    pub fn upstream_written(&mut self) {
        self.to_up.release_in_flight();
    }

    /// Take and confirm at once (for callers that do not write: the shadow, tests).
    pub fn pop_for_upstream(&mut self, now: Instant) -> Option<Bytes> {
        let b = self.take_for_upstream(now)?;
        self.upstream_written();
        Some(b)
    }

    pub fn pop_for_device(&mut self) -> Option<Bytes> {
        let items = self.to_dev.pop_up_to(READ_BUF);
        match items.len() {
            0 => None,
            1 => items.into_iter().next().map(|i| i.bytes),
            _ => {
                let mut b = BytesMut::with_capacity(items.iter().map(|i| i.bytes.len()).sum());
                for i in items {
                    b.extend_from_slice(&i.bytes);
                }
                Some(b.freeze())
            }
        }
    }

    /// Everything the device sent has been written upstream.
    pub fn upstream_queue_empty(&self) -> bool {
        self.to_up.is_idle()
    }

    pub fn pending_commands(&self) -> usize {
        self.tracker.pending_commands()
    }

    /// The pair is closing.
    pub fn close(&mut self, now: Instant) {
        self.tracker.close(now, &mut self.events);
        self.flush_events();
        self.dedup.session_closed(self.device, now);
    }
}

/// `read` without the byte ranges in `cuts` (sorted, non-overlapping).
fn excise(read: &[u8], cuts: &[Range<usize>]) -> Bytes {
    if cuts.is_empty() {
        return Bytes::copy_from_slice(read);
    }
    let mut out = BytesMut::with_capacity(read.len());
    let mut at = 0;
    for c in cuts {
        if c.start > at {
            out.extend_from_slice(&read[at..c.start]);
        }
        at = at.max(c.end);
    }
    if at < read.len() {
        out.extend_from_slice(&read[at..]);
    }
    out.freeze()
}

struct Shared {
    core: Mutex<Core>,
    /// Something was queued for the upstream.
    to_up: Notify,
    /// Something was queued for the device.
    to_dev: Notify,
    /// The device queue has room again.
    room: Notify,
    /// A timer was added (a command to retry): the session loop recomputes its wake-up.
    rearm: Notify,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core> {
        // A poisoned lock only means a panic elsewhere mid-update; keep the pair going.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
enum DevEnd {
    Eof,
    Failed(io::Error),
    Close(CloseReason),
}

async fn read_device<R: AsyncRead + Unpin>(mut r: R, sh: &Shared) -> DevEnd {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => return DevEnd::Eof,
            Ok(n) => n,
            Err(e) => return DevEnd::Failed(e),
        };
        let res = sh.core().device_read(&buf[..n], Instant::now());
        sh.to_up.notify_one();
        sh.to_dev.notify_one();
        if let Err(reason) = res {
            return DevEnd::Close(reason);
        }
    }
}

async fn write_device<W: AsyncWrite + Unpin>(mut w: W, sh: &Shared) -> io::Error {
    loop {
        let chunk = loop {
            if let Some(b) = sh.core().pop_for_device() {
                break b;
            }
            sh.to_dev.notified().await;
        };
        sh.room.notify_one();
        if let Err(e) = w.write_all(&chunk).await {
            return e;
        }
        if let Err(e) = w.flush().await {
            return e;
        }
    }
}

async fn write_upstream<W: AsyncWrite + Unpin>(
    mut w: W,
    replay: Option<Bytes>,
    sh: &Shared,
) -> io::Error {
    if let Some(hello) = replay {
        if let Err(e) = w.write_all(&hello).await {
            return e;
        }
    }
    loop {
        if let Err(e) = w.flush().await {
            return e;
        }
        let batch = loop {
            if let Some(b) = sh.core().take_for_upstream(Instant::now()) {
                break b;
            }
            sh.to_up.notified().await;
        };
        // One device read, one write (protocol §14.5).
        if let Err(e) = w.write_all(&batch).await {
            return e;
        }
        sh.core().upstream_written();
    }
}

async fn read_upstream<R: AsyncRead + Unpin>(mut r: R, sh: &Shared) -> io::Error {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let limit = loop {
            let permit = sh.core().upstream_read_permit(Instant::now());
            match permit {
                ReadPermit::Read(n) => break n,
                ReadPermit::WaitUntil(t) => {
                    tokio::select! {
                        _ = sh.room.notified() => {}
                        _ = tokio::time::sleep_until(t) => {}
                    }
                }
            }
        };
        let n = match r.read(&mut buf[..limit]).await {
            Ok(0) => return io::ErrorKind::UnexpectedEof.into(),
            Ok(n) => n,
            Err(e) => return e,
        };
        let rearm = sh.core().upstream_read(&buf[..n], Instant::now());
        sh.to_dev.notify_one();
        if rearm {
            sh.rearm.notify_one();
        }
    }
}

/// Runs one upstream connection until it fails either way; the session then resumes.
async fn upstream_io(stream: Stream, replay: Option<Bytes>, sh: &Shared) -> io::Error {
    let (r, w) = tokio::io::split(stream);
    tokio::select! {
        e = write_upstream(w, replay, sh) => e,
        e = read_upstream(r, sh) => e,
    }
}

type UpFuture<'a> = Pin<Box<dyn Future<Output = io::Error> + Send + 'a>>;
type RedialFuture<'a> =
    Pin<Box<dyn Future<Output = (Result<Stream, crate::upstream::DialError>, u32)> + Send + 'a>>;

/// Runs the session until the device leaves, the pair is closed, or a drain completes.
/// `first` holds the bytes already read from the device (starting with its 0x23).
pub async fn run(
    ctx: &SessionCtx,
    cfg: Arc<Config>,
    device_id: DeviceId,
    device: Stream,
    upstream: Stream,
    first: Bytes,
    stop: &ConnStop,
) -> CloseReason {
    let hello_len = header_data_len(&first).map_or(first.len(), |d| (5 + d).min(first.len()));
    let now = Instant::now();
    let mut core = Core::new(
        Transport::New,
        ctx,
        cfg,
        device_id,
        first.slice(..hello_len),
        now,
    );
    if let Err(reason) = core.device_read(&first, now) {
        core.close(now);
        return reason;
    }
    let sh = Shared {
        core: Mutex::new(core),
        to_up: Notify::new(),
        to_dev: Notify::new(),
        room: Notify::new(),
        rearm: Notify::new(),
    };
    let (dev_r, dev_w) = tokio::io::split(device);
    let dev_read = read_device(dev_r, &sh);
    let dev_write = write_device(dev_w, &sh);
    tokio::pin!(dev_read, dev_write);
    let mut up: Option<UpFuture<'_>> = Some(Box::pin(upstream_io(upstream, None, &sh)));
    let mut redial: Option<RedialFuture<'_>> = None;
    let mut finishing = Finishing::new(stop);
    let mut device_done: Option<Instant> = None;
    let mut drain_tick = tokio::time::interval(Duration::from_millis(50));

    let reason = loop {
        if let Some(at) = device_done {
            if sh.core().upstream_queue_empty() || at.elapsed() >= FLUSH_ON_CLOSE || up.is_none() {
                break CloseReason::DeviceClosed;
            }
        }
        let mut wake = sh.core().next_wake();
        if device_done.is_some() {
            // Flushing what the device sent last: look again soon.
            wake = wake.min(Instant::now() + Duration::from_millis(20));
        }
        tokio::select! {
            end = &mut dev_read, if device_done.is_none() => match end {
                DevEnd::Eof => device_done = Some(Instant::now()),
                DevEnd::Failed(e) if is_reset(&e) => break CloseReason::DeviceReset,
                DevEnd::Failed(_) => break CloseReason::DeviceError,
                DevEnd::Close(r) => break r,
            },
            e = &mut dev_write => {
                break if is_reset(&e) { CloseReason::DeviceReset } else { CloseReason::DeviceError };
            }
            e = async { match up.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if up.is_some() => {
                up = None;
                if device_done.is_some() || finishing.requested() {
                    break CloseReason::UpstreamClosed;
                }
                info!(error = %e, "upstream lost under a live device; resuming");
                let budget = sh.core().upstream_lost(Instant::now());
                sh.to_dev.notify_one();
                match budget {
                    Some((attempts, window)) => {
                        redial = Some(Box::pin(resume::redial(&ctx.dialer, attempts, window)));
                    }
                    None => {
                        resumption_failed(ctx);
                        break CloseReason::ResumeFailed;
                    }
                }
            }
            r = async { match redial.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if redial.is_some() => {
                redial = None;
                match r {
                    (Ok(stream), used) => {
                        let hello = sh.core().upstream_redialed(used);
                        up = Some(Box::pin(upstream_io(stream, Some(hello), &sh)));
                    }
                    (Err(e), used) => {
                        sh.core().redial_failed(used);
                        warn!(error = %e, "upstream resumption failed; closing the device connection");
                        ctx.metrics
                            .upstream_connect_errors
                            .with_label_values(&[Transport::New.label(), e.reason()])
                            .inc();
                        resumption_failed(ctx);
                        break CloseReason::ResumeFailed;
                    }
                }
            }
            _ = sh.rearm.notified() => {}
            _ = tokio::time::sleep_until(wake) => {
                let r = sh.core().tick(Instant::now());
                sh.to_dev.notify_one();
                if let Err(reason) = r {
                    break reason;
                }
            }
            _ = drain_tick.tick(), if finishing.requested() => {
                let pending = sh.core().pending_commands();
                if let Some(r) = finishing.check(pending, Instant::now()) { break r; }
            }
            _ = stop.token().cancelled(), if !finishing.requested() => {
                let pending = sh.core().pending_commands();
                if let Some(r) = finishing.begin(pending, Instant::now()) { break r; }
            }
        }
    };
    sh.core().close(Instant::now());
    reason
}

fn resumption_failed(ctx: &SessionCtx) {
    ctx.metrics
        .resumptions
        .with_label_values(&[Transport::New.label(), "failed"])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MsgId;

    const DEV: DeviceId = DeviceId([0x38, 0xe8, 0xcf, 0x46]);
    const ZERO: MsgId = MsgId([0, 0, 0]);

    fn ctx(extra: &str) -> (SessionCtx, Arc<Config>) {
        let text = format!(
            "[upstream.legacy]\naddress = \"127.0.0.1:1\"\ntls = false\n[reliable]\n{extra}\n"
        );
        let config = Arc::new(Config::parse(&text).expect("config"));
        (
            SessionCtx {
                metrics: Arc::new(Metrics::new(false).expect("metrics")),
                dialer: Dialer::new(&config.upstream_legacy).expect("dialer"),
                dedup: Arc::new(DedupStore::new(1000, Duration::from_secs(300))),
            },
            config,
        )
    }

    fn core(ctx: &(SessionCtx, Arc<Config>)) -> Core {
        let hello = build::hello(DEV, &[7; 16]);
        let mut c = Core::new(
            Transport::New,
            &ctx.0,
            ctx.1.clone(),
            DEV,
            hello.clone(),
            Instant::now(),
        );
        c.device_read(&hello, Instant::now()).expect("hello queued");
        assert_eq!(c.pop_for_upstream(Instant::now()), Some(hello));
        c
    }

    fn cat(parts: &[Bytes]) -> Vec<u8> {
        parts.iter().flat_map(|p| p.iter().copied()).collect()
    }

    fn total(ctx: &(SessionCtx, Arc<Config>), name: &str, labels: &[(&str, &str)]) -> f64 {
        ctx.0.metrics.total(name, labels)
    }

    #[tokio::test(start_paused = true)]
    async fn duplicate_answers_in_one_read_are_cut_and_the_rest_forwarded_as_one_write() {
        let ctx = ctx("");
        let mut c = core(&ctx);
        let cmd = build::power_command(DEV, ZERO, 1, 10, true);
        c.upstream_read(&cmd, Instant::now());
        assert_eq!(c.pop_for_device(), Some(cmd));
        let reply = build::command_reply(DEV, MsgId([0, 2, 0]), 1, 0xd0);
        let ack = build::data_ack(DEV, ZERO);
        let status = build::mesh_status(DEV, MsgId([0, 3, 0]), 1, 1, 10, 1, 100, 0);
        let read = cat(&[
            reply.clone(),
            ack.clone(),
            reply.clone(),
            ack.clone(),
            status.clone(),
        ]);
        c.device_read(&read, Instant::now()).expect("queued");
        let fwd = c.pop_for_upstream(Instant::now()).expect("one write");
        assert_eq!(fwd.as_ref(), cat(&[reply, ack, status]).as_slice());
        assert_eq!(c.pop_for_upstream(Instant::now()), None);
        assert_eq!(
            total(
                &ctx,
                "tcp_comm_idempotent_drops_total",
                &[("reason", "duplicate")]
            ),
            2.0
        );
        assert_eq!(
            total(
                &ctx,
                "tcp_comm_packet_sent_total",
                &[("outcome", "success")]
            ),
            1.0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unanswered_command_is_resent_byte_identical_and_its_second_reply_dropped() {
        let ctx = ctx("");
        let mut c = core(&ctx);
        let cmd = build::brightness_command(DEV, ZERO, 9, 10, 55);
        c.upstream_read(&cmd, Instant::now());
        assert_eq!(c.pop_for_device(), Some(cmd.clone()));
        let first_due = c.next_wake();
        assert!(first_due <= Instant::now() + Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(399)).await;
        c.tick(Instant::now()).expect("alive");
        assert_eq!(c.pop_for_device(), None, "not before ack_timeout");
        tokio::time::sleep_until(c.next_wake()).await;
        c.tick(Instant::now()).expect("alive");
        assert_eq!(c.pop_for_device(), Some(cmd), "re-sent as it was");
        assert_eq!(total(&ctx, "tcp_comm_packet_retransmit_total", &[]), 1.0);
        // Both sends are answered.
        let reply = build::command_reply(DEV, MsgId([0, 2, 0]), 9, 0xd0);
        c.device_read(&reply, Instant::now()).expect("queued");
        c.device_read(&reply, Instant::now()).expect("queued");
        assert_eq!(c.pop_for_upstream(Instant::now()), Some(reply));
        assert_eq!(c.pop_for_upstream(Instant::now()), None);
        // Nothing more is re-sent once answered.
        tokio::time::advance(Duration::from_secs(4)).await;
        c.tick(Instant::now()).expect("alive");
        assert_eq!(c.pop_for_device(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn late_duplicate_on_a_new_connection_is_dropped_by_the_shared_store() {
        let ctx = ctx("");
        let mut c = core(&ctx);
        let cmd = build::power_command(DEV, ZERO, 3, 10, false);
        c.upstream_read(&cmd, Instant::now());
        assert_eq!(c.pop_for_device(), Some(cmd.clone()));
        tokio::time::advance(Duration::from_millis(500)).await;
        c.tick(Instant::now()).expect("alive");
        c.close(Instant::now());
        // The device reconnects; its answer to the retried command arrives on the new session.
        let mut c2 = core(&ctx);
        let reply = build::command_reply(DEV, MsgId([0, 2, 0]), 3, 0xd0);
        c2.device_read(&reply, Instant::now()).expect("queued");
        assert_eq!(c2.pop_for_upstream(Instant::now()), None);
        // Once the upstream reuses seq 3 the reply is legitimate again.
        c2.upstream_read(&cmd, Instant::now());
        c2.device_read(&reply, Instant::now()).expect("queued");
        assert_eq!(c2.pop_for_upstream(Instant::now()), Some(reply));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_device_closes_after_idle_timeout() {
        let ctx = ctx("idle_timeout = \"90s\"");
        let mut c = core(&ctx);
        tokio::time::advance(Duration::from_secs(60)).await;
        c.device_read(&build::heartbeat(), Instant::now())
            .expect("queued");
        tokio::time::advance(Duration::from_millis(89_999)).await;
        assert_eq!(c.tick(Instant::now()), Ok(()));
        assert_eq!(c.next_wake(), Instant::now() + Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(c.tick(Instant::now()), Err(CloseReason::IdleTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn resumption_answers_heartbeats_locally_swallows_the_hello_ack_and_late_d8() {
        let ctx = ctx("");
        let mut c = core(&ctx);
        let hb = build::heartbeat();
        let hb_ack = build::heartbeat_ack();
        // A heartbeat forwarded just before the upstream died is answered by the gateway.
        c.device_read(&hb, Instant::now()).expect("queued");
        assert_eq!(c.pop_for_upstream(Instant::now()), Some(hb.clone()));
        assert!(c.upstream_lost(Instant::now()).is_some());
        assert_eq!(c.pop_for_device(), Some(hb_ack.clone()));
        // While redialling: answered locally and still queued for the upstream.
        c.device_read(&hb, Instant::now()).expect("queued");
        assert_eq!(c.pop_for_device(), Some(hb_ack.clone()));
        let hello = c.upstream_redialed(1);
        assert_eq!(hello, build::hello(DEV, &[7; 16]));
        assert_eq!(c.pop_for_upstream(Instant::now()), Some(hb.clone()));
        // The new upstream answers the hello and the replayed heartbeat: both are swallowed.
        c.upstream_read(&cat(&[build::hello_ack(), hb_ack.clone()]), Instant::now());
        assert_eq!(c.pop_for_device(), None);
        // From now on heartbeats are the upstream's to answer.
        c.device_read(&hb, Instant::now()).expect("queued");
        assert_eq!(c.pop_for_device(), None);
        c.upstream_read(&hb_ack, Instant::now());
        assert_eq!(c.pop_for_device(), Some(hb_ack));
        assert_eq!(
            total(
                &ctx,
                "tcp_comm_resumptions_total",
                &[("outcome", "success")]
            ),
            1.0
        );
        assert_eq!(
            total(&ctx, "tcp_comm_heartbeats_total", &[("outcome", "local")]),
            2.0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shadow_core_never_times_out_an_idle_device_nor_wakes_in_the_past() {
        let ctx = ctx("idle_timeout = \"1s\"");
        let mut c = Core::new(
            Transport::Shadow,
            &ctx.0,
            ctx.1.clone(),
            DEV,
            Bytes::new(),
            Instant::now(),
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(c.tick(Instant::now()), Ok(()));
        assert!(
            c.next_wake() > Instant::now(),
            "a wake in the past would spin"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_a_frame_from_a_dead_upstream_does_not_corrupt_the_next_one() {
        let ctx = ctx("");
        let mut c = core(&ctx);
        let cmd = build::power_command(DEV, ZERO, 1, 10, true);
        c.upstream_read(&cmd[..10], Instant::now());
        assert!(c.upstream_lost(Instant::now()).is_some());
        c.upstream_redialed(1);
        c.upstream_read(&build::hello_ack(), Instant::now());
        assert_eq!(c.pop_for_device(), None, "the new 0x28 is swallowed");
        c.upstream_read(&cmd, Instant::now());
        assert_eq!(c.pop_for_device(), Some(cmd), "whole frames again");
    }

    #[tokio::test(start_paused = true)]
    async fn every_heartbeat_gets_exactly_one_answer_across_two_upstream_losses() {
        let ctx = ctx("");
        let mut c = core(&ctx);
        let hb = build::heartbeat();
        let hb_ack = build::heartbeat_ack();
        let now = Instant::now;
        // A heartbeat still queued (never written) when the upstream dies: answered now.
        c.device_read(&hb, now()).expect("queued");
        assert!(c.upstream_lost(now()).is_some());
        assert_eq!(c.pop_for_device(), Some(hb_ack.clone()));
        // Written to the next upstream, which dies before answering: nothing more is owed.
        c.upstream_redialed(1);
        assert_eq!(c.pop_for_upstream(now()), Some(hb.clone()));
        assert!(c.upstream_lost(now()).is_some());
        assert_eq!(c.pop_for_device(), None, "already answered once");
        // A heartbeat during the second resumption: answered locally, the upstream's dropped.
        c.upstream_redialed(1);
        c.device_read(&hb, now()).expect("queued");
        assert_eq!(c.pop_for_device(), Some(hb_ack.clone()));
        assert_eq!(c.pop_for_upstream(now()), Some(hb.clone()));
        c.upstream_read(&cat(&[build::hello_ack(), hb_ack.clone()]), now());
        assert_eq!(c.pop_for_device(), None);
        // Back to normal: the upstream answers.
        c.device_read(&hb, now()).expect("queued");
        c.upstream_read(&hb_ack, now());
        assert_eq!(c.pop_for_device(), Some(hb_ack));
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_being_written_when_the_upstream_dies_goes_to_the_next_one() {
        let ctx = ctx("");
        let mut c = core(&ctx);
        let status = build::mesh_status(DEV, MsgId([0, 5, 0]), 0, 1, 10, 1, 100, 0);
        c.device_read(&status, Instant::now()).expect("queued");
        assert_eq!(c.take_for_upstream(Instant::now()), Some(status.clone()));
        assert!(!c.upstream_queue_empty(), "not written yet");
        // The write never completed: the upstream is gone.
        assert!(c.upstream_lost(Instant::now()).is_some());
        c.upstream_redialed(1);
        assert_eq!(c.take_for_upstream(Instant::now()), Some(status));
        c.upstream_written();
        assert!(c.upstream_queue_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn full_device_queue_backpressures_then_rejects() {
        let ctx = ctx("upstream_queue_bytes = 16384\nbackpressure_timeout = \"2s\"");
        let mut c = core(&ctx);
        let cmd = build::power_command(DEV, ZERO, 1, 10, true);
        let mut pushed = 0;
        while let ReadPermit::Read(n) = c.upstream_read_permit(Instant::now()) {
            assert!(n <= 16384);
            c.upstream_read(&cmd, Instant::now());
            pushed += 1;
            assert!(pushed < 1000, "queue never filled");
        }
        let ReadPermit::WaitUntil(until) = c.upstream_read_permit(Instant::now()) else {
            panic!("expected backpressure");
        };
        assert_eq!(until, Instant::now() + Duration::from_secs(2));
        assert_eq!(
            total(&ctx, "tcp_comm_queue_full_total", &[("action", "reject")]),
            0.0
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            c.upstream_read_permit(Instant::now()),
            ReadPermit::Read(READ_BUF)
        );
        // What still fits is queued; the rest is rejected, and the bound holds.
        for _ in 0..200 {
            c.upstream_read(&cmd, Instant::now());
        }
        let rejected = total(&ctx, "tcp_comm_queue_full_total", &[("action", "reject")]);
        assert!(rejected > 50.0, "{rejected}");
        let depth = total(&ctx, "tcp_comm_queue_bytes", &[("direction", "srv_to_dev")]);
        assert!(depth <= 16384.0, "{depth}");
    }

    #[tokio::test(start_paused = true)]
    async fn full_upstream_queue_sheds_old_status_then_closes() {
        let ctx = ctx("device_queue_bytes = 16384");
        let mut c = core(&ctx);
        let mut n = 0u16;
        let mut status = || {
            n += 1;
            let b = n.to_be_bytes();
            build::mesh_status(DEV, MsgId([b[0], b[1], 0]), 0, 1, 10, 1, 100, 0)
        };
        for _ in 0..1000 {
            c.device_read(&status(), Instant::now())
                .expect("statuses are shed, never fatal");
        }
        assert!(total(&ctx, "tcp_comm_queue_full_total", &[("action", "shed")]) > 0.0);
        // Fill with heartbeats (not sheddable) until the pair must close.
        let mut closed = None;
        for _ in 0..10_000 {
            if let Err(r) = c.device_read(&build::heartbeat(), Instant::now()) {
                closed = Some(r);
                break;
            }
        }
        assert_eq!(closed, Some(CloseReason::QueueFull));
    }
}
