//! The legacy path: a byte-exact passthrough between a device and the legacy upstream, with a
//! passive observer that decodes a copy of each direction for metrics (design decision 6).
//!
//! Invariants:
//! - Bytes are forwarded unchanged and in order; each read from one side is written to the
//!   other as one write. Decoding works on a copy (a resynchronising [`Tap`]) and a decode
//!   failure can never hold back or alter traffic (it is counted, never fatal).
//! - Both directions run concurrently, so a peer that is slow to read in one direction never
//!   stalls the other; each direction's own backpressure is plain TCP, like any L4 proxy.
//! - A FIN on one side is passed on as a FIN (half-close) and the other direction keeps going;
//!   a reset on one side is passed on as a reset.
//! - Each read is observed in the same step as its first write attempt, with no await between
//!   (the bytes go out first: decoding is not on the way to the peer), so whoever asks whether a
//!   command is in flight (drain, re-home: the pair's own loop) sees one that is still being
//!   written.
//! - On shutdown or re-homing the pair stays open until no command is awaiting its reply, then
//!   closes upstream first ([`forward`]); the daemon's drain deadline bounds the wait. Nothing read
//!   is lost unseen: what arrives while closing is forwarded and measured, or counted dropped.
//! - Timeouts (a transaction's, the idle limit, the half-close limit, the close grace, a
//!   drain's next look, the shadow's) are acted on when due, by one timer per pair set for the
//!   first of them; a pair with nothing due does not wake, nor does an answered command.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use tracing::debug;

use super::close::{is_reset, CloseReason, CLOSE_GRACE};
use super::pair::{Pair, Path};
use super::reliable::SessionCtx;
use super::shadow::{Shadow, ShadowCtx};
use super::stop::{ConnStop, Finishing};
use super::tls::{ReadHalf, Stream};
use super::transactions::{record, Event, Tracker};
use super::{Direction, Routes, Transport};
use crate::protocol::{DeviceId, Segment, Tap};
use crate::telemetry::metrics::Metrics;

/// Read buffer per direction; larger than any Cync frame and than the add-on's 2,048-byte reads.
const READ_BUF: usize = 16 * 1024;

struct ObserverState {
    tracker: Tracker,
    dev_tap: Tap,
    srv_tap: Tap,
    events: Vec<Event>,
    /// When the device last sent anything.
    last_device: Instant,
    /// The tracker's next deadline when the pair's timer was last set ([`Observer::arm`]):
    /// a packet that moves it, earlier or later, has the pair set its timer again.
    armed_tracker: Option<Instant>,
}

/// Decodes copies of both directions of one connection and records what it sees.
pub struct Observer {
    transport: Transport,
    device: Option<DeviceId>,
    metrics: Arc<Metrics>,
    state: Mutex<ObserverState>,
    /// Dark launch: the new path's logic (and maybe a mirror) on a copy of this traffic.
    shadow: Option<Shadow>,
    /// The tracker's next deadline moved since the pair's timer was set. A flag, not a
    /// `Notify`: it is only ever raised by a pump inside the pair's own task, polled just
    /// before the pair looks at it (see [`Observer::moved`]), so waking the task is never
    /// needed, and a wake-up per command is what the legacy path's CPU per command paid.
    moved: TaskFlag,
    /// How often the pair's timer has fired: the tests' view of wake-ups for nothing.
    #[cfg(test)]
    timer_fired: std::sync::atomic::AtomicU32,
}

impl Observer {
    pub fn new(
        transport: Transport,
        device: Option<DeviceId>,
        metrics: Arc<Metrics>,
        tracker: Tracker,
        max_frame_len: usize,
    ) -> Observer {
        Observer {
            transport,
            device,
            metrics,
            state: Mutex::new(ObserverState {
                tracker,
                dev_tap: Tap::new(max_frame_len),
                srv_tap: Tap::new(max_frame_len),
                events: Vec::new(),
                last_device: Instant::now(),
                armed_tracker: None,
            }),
            shadow: None,
            moved: TaskFlag::default(),
            #[cfg(test)]
            timer_fired: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// Runs a dark launch beside this connection.
    pub fn with_shadow(mut self, shadow: Shadow) -> Observer {
        self.shadow = Some(shadow);
        self
    }

    /// When the shadow's timers next need a [`Observer::tick`].
    fn shadow_wake(&self) -> Option<Instant> {
        self.shadow.as_ref().map(Shadow::next_wake)
    }

    async fn shadow_rearmed(&self) {
        match &self.shadow {
            Some(s) => s.rearmed().await,
            None => std::future::pending().await,
        }
    }

    fn lock(&self) -> MutexGuard<'_, ObserverState> {
        // A poisoned lock only means another direction panicked mid-update; the counters are
        // still usable, and the observer must never take the connection down.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Feeds one read forwarded in `dir`, in the same step as its first write attempt (see
    /// `pump`): a drain or re-home that looks at [`Observer::pending_commands`] while any of
    /// it is still being written already sees a command in it.
    pub fn observe(&self, dir: Direction, read: &[u8]) {
        let t = self.transport;
        self.metrics.bytes(t, dir, read.len());
        let now = Instant::now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let out = match dir {
            Direction::DevToSrv => {
                st.last_device = now;
                st.dev_tap.feed(read)
            }
            Direction::SrvToDev => st.srv_tap.feed(read),
        };
        for seg in &out.segments {
            match seg {
                Segment::Frame(frame) => match &frame.packet {
                    Ok(p) => {
                        self.metrics.packet(t, dir, p.ptype());
                        st.tracker.on_packet(dir, p, now, &mut st.events);
                    }
                    Err(e) => self.metrics.decode_error(t, dir, e),
                },
                Segment::Unframed { bytes, reason } => {
                    self.metrics.unframed(t, dir, bytes.len(), reason)
                }
            }
        }
        self.flush(st);
        // Later as well as earlier: a command answered in a millisecond leaves the timer set
        // for its latency threshold, and setting it later is a compare-and-swap in tokio's
        // timer (the wheel re-files the entry when it comes round, without waking anyone),
        // where letting it fire woke the pair for nothing once per command.
        if st.tracker.next_deadline() != st.armed_tracker {
            self.moved.raise();
        }
        drop(guard);
        if let Some(shadow) = &self.shadow {
            shadow.observe(dir, read, &out, now);
        }
    }

    /// When the pair must next wake: the first transaction timeout, the idle limit (`idle`,
    /// while the device may still send) or any of the pair's `others` (half-close limit, close
    /// grace, drain's next look, shadow timers), whichever comes first; the tracker's part
    /// remembered, so that a packet moving it can say so.
    fn arm(&self, idle: Option<Duration>, others: [Option<Instant>; 4], now: Instant) -> Instant {
        let mut st = self.lock();
        let due = [st.tracker.next_deadline(), idle.map(|d| st.last_device + d)]
            .into_iter()
            .chain(others)
            .flatten()
            .min()
            .unwrap_or(now + NOTHING_DUE);
        st.armed_tracker = st.tracker.next_deadline();
        self.moved.lower();
        due
    }

    /// Ready once a packet has moved the tracker's next deadline. Sound without a waker
    /// because [`Observer::observe`] runs in the pair's own task, inside a pump polled ahead
    /// of this in the same `select!` (biased): when a pump raises the flag and returns
    /// pending, this branch sees it in the same poll.
    fn moved(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.moved.raised()
    }

    fn flush(&self, st: &mut ObserverState) {
        if !st.events.is_empty() {
            record(
                &self.metrics,
                self.transport,
                self.device,
                &st.events,
                &|_| 1,
            );
            // Freed, not kept: a few events per packet are a cheap allocation, and kept they
            // were a part of every idle connection's memory.
            st.events = Vec::new();
        }
    }

    /// Times out overdue transactions.
    pub fn tick(&self) {
        let now = Instant::now();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            st.tracker.expire(now, &mut st.events);
            self.flush(st);
        }
        if let Some(shadow) = &self.shadow {
            shadow.tick(now);
        }
    }

    /// The connection ended.
    pub fn close(&self) {
        let now = Instant::now();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            st.tracker.close(now, &mut st.events);
            self.flush(st);
        }
        if let Some(shadow) = &self.shadow {
            shadow.close(now);
        }
    }

    pub fn pending_commands(&self) -> usize {
        self.lock().tracker.pending_commands()
    }

    /// How long the device has been silent at `now`.
    pub fn device_silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.lock().last_device)
    }

    /// Bytes read in `dir` while the pair was closing, not forwarded.
    fn dropped_at_close(&self, dir: Direction, n: usize) {
        self.metrics.close_dropped(self.transport, dir, n);
    }
}

#[derive(Debug)]
enum PumpEnd {
    Eof,
    ReadFailed(io::Error),
    WriteFailed(io::Error),
}

/// A signal between futures of one task: raised by one, seen by another polled after it in
/// the same task. [`TaskFlag::raised`] registers no waker, so it is only sound where whoever
/// raises the flag is sure to have the waiting future polled next (the pair's loop and its
/// pumps): there it saves a `Notify` wake-up, or a `CancellationToken`'s lock on every poll.
#[derive(Debug, Default)]
struct TaskFlag(AtomicBool);

impl TaskFlag {
    fn raise(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn lower(&self) {
        self.0.store(false, Ordering::Relaxed);
    }

    fn raised(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|_| {
            if self.0.load(Ordering::Relaxed) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }
}

/// Forwards one direction, each read written as one write and observed as it goes out. Once `closing`
/// is raised (seen between reads, never mid-write) the FIN is passed on and whatever still arrives is
/// read and counted as dropped, so the peer sees a clean close rather than a reset.
///
/// The read buffer exists only while bytes are in hand ([`ReadHalf::read_ready`]), so an
/// idle connection holds none.
async fn pump<W>(
    from: &mut ReadHalf,
    mut to: W,
    dir: Direction,
    obs: &Observer,
    closing: &TaskFlag,
) -> PumpEnd
where
    W: AsyncWrite + Unpin,
{
    let mut closed = false;
    loop {
        let read = tokio::select! {
            biased;
            _ = closing.raised(), if !closed => {
                closed = true;
                let _ = to.shutdown().await;
                continue;
            }
            r = from.read_ready(READ_BUF) => r,
        };
        let buf = match read {
            Ok(b) if b.is_empty() => {
                // Pass the FIN on; the other direction keeps flowing.
                if !closed {
                    let _ = to.shutdown().await;
                }
                return PumpEnd::Eof;
            }
            Ok(b) => b,
            Err(e) => return PumpEnd::ReadFailed(e),
        };
        let n = buf.len();
        if closed {
            obs.dropped_at_close(dir, n);
            continue;
        }
        let chunk = &buf[..n];
        // Written first, observed in the same step: decoding and bookkeeping took 5-6 µs of
        // every hop on the way to the peer, where HAProxy passes bytes on in under 2 µs
        // (scripts/bench_hops.py). Nothing can look at the observer between the two (only
        // this pair's own loop does, and no await lies between), so a drain still never sees
        // a command that is on its way as not sent.
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut to).poll_write(cx, chunk) {
                std::task::Poll::Ready(r) => Some(r),
                std::task::Poll::Pending => None,
            })
        })
        .await;
        obs.observe(dir, chunk);
        let rest = match first {
            Some(Ok(written)) => &chunk[written.min(n)..],
            Some(Err(e)) => return PumpEnd::WriteFailed(e),
            None => chunk,
        };
        if !rest.is_empty() {
            if let Err(e) = to.write_all(rest).await {
                return PumpEnd::WriteFailed(e);
            }
        }
        if let Err(e) = to.flush().await {
            return PumpEnd::WriteFailed(e);
        }
    }
}

/// The legacy path's shared state: what every legacy connection (and its shadow) records to.
#[derive(Clone)]
pub struct Legacy {
    pub metrics: Arc<Metrics>,
    /// The new path's shared state: a shadow runs the new path's core on a copy.
    pub reliable: SessionCtx,
    /// Dark launch: where mirror mode replays device traffic, and what shadows share.
    pub shadow: ShadowCtx,
    /// The control plane: whether the dark launch shadows a device.
    pub routes: Arc<dyn Routes>,
}

impl Path for Legacy {
    type Id = Option<DeviceId>;

    /// Builds the connection's observer (and its shadow, when the dark launch takes this
    /// device) and forwards until the pair ends. An `async` block using the pair where it
    /// lies, as the new path's `serve` does: an `async fn` and a `let Pair { .. }` kept the
    /// pair two times more (0.5 KiB of every idle connection). The pair's dialer is held to
    /// the end: it holds the device's pool address.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments and the locals they move to side by side"
    )]
    fn run(&self, pair: Pair<Option<DeviceId>>) -> impl Future<Output = CloseReason> + Send {
        async move {
            // Named so that the block owns it: a field it never names is not captured, and
            // would be dropped (the pool address given back) before the pair even starts.
            let _held = &pair.dialer;
            let cfg = &pair.cfg;
            let obs = Observer::new(
                Transport::Legacy,
                pair.device_id,
                self.metrics.clone(),
                Tracker::new(
                    cfg.protocol.command_deadline,
                    cfg.protocol.reply_timeout,
                    self.metrics.feeds().latency_threshold().clone(),
                ),
                cfg.protocol.max_frame_len,
            );
            let obs = match pair.device_id {
                Some(id) if self.routes.shadowed(cfg, id) => {
                    debug!(mode = ?cfg.dark_launch.mode, "dark launch: shadowing this connection");
                    obs.with_shadow(Shadow::start(&self.reliable, &self.shadow, cfg.clone(), id))
                }
                _ => obs,
            };
            let timers = Timers {
                idle: cfg.legacy.idle_timeout,
                half_close: cfg.protocol.half_close_timeout,
            };
            forward(
                pair.device,
                pair.upstream,
                &pair.first,
                &obs,
                &pair.stop,
                timers,
            )
            .await
        }
    }
}

/// How far ahead the pair's timer is set when nothing is due (no transaction waiting, the
/// device done sending, no half-close): only so that it is set to something.
const NOTHING_DUE: Duration = Duration::from_secs(3600);

/// The legacy path's timers, from the configuration of the connection.
#[derive(Debug, Clone, Copy)]
pub struct Timers {
    /// No device bytes for this long closes the pair (`legacy.idle_timeout`).
    pub idle: Duration,
    /// A half-closed pair waits this long for the other side (`protocol.half_close_timeout`).
    pub half_close: Duration,
}

/// Forwards between `device` and `upstream` until both sides are done, one resets, or a drain
/// or re-home completes. `first` holds bytes already read from the device (the handshake peek);
/// they are written upstream as one write before anything else.
///
/// A drain or re-home closes between frames, upstream first: once no command awaits its reply
/// the upstream gets a FIN, and what the add-on still sends until it closes its side (at most
/// [`CLOSE_GRACE`]) is forwarded and measured, so a command written just then is delivered and,
/// its reply having nowhere to go, counted as abandoned rather than lost unseen.
///
/// An `async` block, not an `async fn`, for the reason given at [`Legacy`]'s `run`.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments and the locals they move to side by side"
)]
pub fn forward<'a>(
    device: Stream,
    mut upstream: Stream,
    first: &'a [u8],
    obs: &'a Observer,
    stop: &'a ConnStop,
    timers: Timers,
) -> impl Future<Output = CloseReason> + Send + 'a {
    async move {
        if !first.is_empty() {
            obs.observe(Direction::DevToSrv, first);
            if let Err(e) = upstream.write_all(first).await {
                obs.close();
                return if is_reset(&e) {
                    device.set_reset_on_close();
                    CloseReason::UpstreamReset
                } else {
                    CloseReason::UpstreamError
                };
            }
            let _ = upstream.flush().await;
        }

        let (mut dev_r, mut dev_w) = device.split();
        let (mut up_r, mut up_w) = upstream.split();
        // Raised when the pair begins to close: the device-to-upstream pump passes the FIN on.
        let closing = TaskFlag::default();
        let never = TaskFlag::default();
        let reason = {
            let mut to_up = std::pin::pin!(pump(
                &mut dev_r,
                &mut up_w,
                Direction::DevToSrv,
                obs,
                &closing
            ));
            let mut to_dev = std::pin::pin!(pump(
                &mut up_r,
                &mut dev_w,
                Direction::SrvToDev,
                obs,
                &never
            ));
            let mut up_done = false;
            let mut dev_done = false;
            let mut half_closed_at: Option<Instant> = None;
            let mut finishing = Finishing::new(stop);
            // Set once the close has begun: why, and until when the add-on may take to close.
            let mut closing_as: Option<(CloseReason, Instant)> = None;
            // One timer for the pair's life, set for the next thing due (see `Observer::arm`):
            // transaction timeouts, the idle and half-close limits, the shadow's timers, the close
            // grace and the drain's next look. Not a tick a second (a thousand idle devices woke
            // the proxy a thousand times a second for nothing, which HAProxy does not), and not a
            // timer each: every `Sleep` is 112 bytes of every idle connection's memory.
            let mut timer = std::pin::pin!(tokio::time::sleep_until(Instant::now() + NOTHING_DUE));
            let mut armed: Option<Instant> = None;
            let mut stopping = std::pin::pin!(stop.token().cancelled());
            // The pump futures are polled by reference and never dropped mid-loop, so a write in
            // progress is never cancelled while the pair lives; they are only dropped at teardown.
            loop {
                let due = obs.arm(
                    (!up_done).then_some(timers.idle),
                    [
                        half_closed_at.map(|t| t + timers.half_close),
                        closing_as.map(|(_, t)| t),
                        finishing.next_look(),
                        obs.shadow_wake(),
                    ],
                    Instant::now(),
                );
                if armed != Some(due) {
                    timer.as_mut().reset(due);
                    armed = Some(due);
                }
                // Biased: every wake-up is a socket's, so the pumps go first, and no random
                // branch order is drawn per wake-up; the timers behind them are polled each time.
                tokio::select! {
                    biased;
                    end = &mut to_up, if !up_done => {
                        up_done = true;
                        match end {
                            PumpEnd::Eof => {
                                if let Some((r, _)) = closing_as {
                                    if dev_done { break r; }
                                } else if dev_done {
                                    break CloseReason::UpstreamClosed;
                                } else {
                                    half_closed_at = Some(Instant::now());
                                }
                            }
                            PumpEnd::ReadFailed(e) if is_reset(&e) => break CloseReason::DeviceReset,
                            PumpEnd::ReadFailed(_) => break CloseReason::DeviceError,
                            PumpEnd::WriteFailed(e) if is_reset(&e) => break CloseReason::UpstreamReset,
                            PumpEnd::WriteFailed(_) => break CloseReason::UpstreamError,
                        }
                    }
                    end = &mut to_dev, if !dev_done => {
                        dev_done = true;
                        match end {
                            PumpEnd::Eof => {
                                if let Some((r, _)) = closing_as { break r; }
                                if up_done { break CloseReason::DeviceClosed; }
                                half_closed_at = Some(Instant::now());
                            }
                            PumpEnd::ReadFailed(e) if is_reset(&e) => break CloseReason::UpstreamReset,
                            PumpEnd::ReadFailed(_) => break CloseReason::UpstreamError,
                            PumpEnd::WriteFailed(e) if is_reset(&e) => break CloseReason::DeviceReset,
                            PumpEnd::WriteFailed(_) => break CloseReason::DeviceError,
                        }
                    }
                    _ = obs.shadow_rearmed() => {}
                    _ = obs.moved() => {}
                    _ = &mut timer => {
                        // Fired: reset on the next turn even if the next due time is the same.
                        armed = None;
                        #[cfg(test)]
                        obs.timer_fired.fetch_add(1, Ordering::Relaxed);
                        obs.tick();
                        let now = Instant::now();
                        if let Some((r, by)) = closing_as {
                            if now >= by { break r; }
                        }
                        if half_closed_at.is_some_and(|t| now >= t + timers.half_close) {
                            break CloseReason::HalfCloseTimeout;
                        }
                        // A device heartbeats after 21 s of silence; one that has said nothing
                        // for far longer is gone (Wi-Fi lost, no FIN), and holds two sockets.
                        if !up_done && obs.device_silent_for(now) >= timers.idle {
                            break CloseReason::IdleTimeout;
                        }
                        if finishing.look_due(now) {
                            if let Some(r) = finishing.check(obs.pending_commands(), now) {
                                closing.raise();
                                closing_as = Some((r, now + CLOSE_GRACE));
                            }
                        }
                    }
                    _ = &mut stopping, if !finishing.requested() => {
                        let now = Instant::now();
                        if let Some(r) = finishing.begin(obs.pending_commands(), now) {
                            closing.raise();
                            closing_as = Some((r, now + CLOSE_GRACE));
                        }
                    }
                }
            }
        };
        match reason {
            CloseReason::DeviceReset => up_r.set_reset_on_close(),
            CloseReason::UpstreamReset => dev_r.set_reset_on_close(),
            _ => {}
        }
        // Both halves of each go here, and with them the sockets.
        drop((dev_r, dev_w, up_r, up_w));
        obs.close();
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{build, MsgId};
    use tokio::io::AsyncReadExt;
    use tokio_util::sync::CancellationToken;

    fn observer() -> Observer {
        observer_with(Arc::new(Metrics::new(false).expect("metrics")))
    }

    /// A legacy observer recording to `metrics`: 5 s command deadline, 10 s reply timeout.
    fn observer_with(metrics: Arc<Metrics>) -> Observer {
        Observer::new(
            Transport::Legacy,
            None,
            metrics.clone(),
            Tracker::new(
                Duration::from_secs(5),
                Duration::from_secs(10),
                metrics.feeds().latency_threshold().clone(),
            ),
            4096,
        )
    }

    /// A loopback connection: the peer's end, and this end split as a path splits it.
    async fn tcp_pair() -> (tokio::net::TcpStream, ReadHalf, crate::conn::tls::WriteHalf) {
        let (c, s) = streams().await;
        let (r, w) = s.split();
        (c, r, w)
    }

    #[tokio::test]
    async fn a_command_still_being_written_to_a_device_that_does_not_read_is_pending() {
        let obs = observer();
        let cmd = build::power_command(DeviceId([1, 2, 3, 4]), MsgId([0, 0, 0]), 7, 10, true);
        // The add-on's side holds one command; the device's side takes one byte and no more.
        let (mut addon, mut from, _keep) = tcp_pair().await;
        let (to, _device) = tokio::io::duplex(1);
        addon.write_all(&cmd).await.expect("write");
        let never = TaskFlag::default();
        let pump = pump(&mut from, to, Direction::SrvToDev, &obs, &never);
        tokio::pin!(pump);
        // Drive the pump until it is stuck in the device write.
        let stuck = tokio::time::timeout(Duration::from_millis(200), &mut pump).await;
        assert!(stuck.is_err(), "the write to the device blocks");
        assert_eq!(
            obs.pending_commands(),
            1,
            "a drain asking now must see the command being written"
        );
    }

    /// Both sides of a loopback connection as streams: the peer's and the pair's.
    async fn streams() -> (tokio::net::TcpStream, Stream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let c = tokio::net::TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        (c, Stream::Plain(s))
    }

    /// Runs a pair of `dev` and `up` through `obs`: 90 s idle limit, 10 s half-close limit,
    /// 1 s re-home grace. Cancel the token to drain it.
    fn spawn_pair(
        obs: Arc<Observer>,
        dev: Stream,
        up: Stream,
    ) -> (CancellationToken, tokio::task::JoinHandle<CloseReason>) {
        let shutdown = CancellationToken::new();
        let stop = ConnStop::new(
            &shutdown,
            Duration::from_secs(1),
            Arc::new(super::super::stop::ClosePacer::new(0.0)),
        );
        let timers = Timers {
            idle: Duration::from_secs(90),
            half_close: Duration::from_secs(10),
        };
        let pair = tokio::spawn(async move { forward(dev, up, &[], &obs, &stop, timers).await });
        (shutdown, pair)
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_reply_times_out_at_its_deadline_and_a_silent_device_at_the_idle_limit() {
        let metrics = Arc::new(Metrics::new(false).expect("metrics"));
        let obs = observer_with(metrics.clone());
        let timeouts = || {
            metrics.total(
                "tcp_comm_packet_sent_total",
                &[("transport", "legacy"), ("outcome", "timeout")],
            )
        };
        let (mut device, dev) = streams().await;
        let (mut addon, up) = streams().await;
        let start = Instant::now();
        let (_shutdown, pair) = spawn_pair(Arc::new(obs), dev, up);
        // Half a second in (off any whole-second tick), the add-on sends a command that the
        // device receives and never answers.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cmd = build::power_command(DeviceId([1, 2, 3, 4]), MsgId([0, 0, 0]), 7, 10, true);
        addon.write_all(&cmd).await.expect("write");
        let mut got = vec![0u8; cmd.len()];
        device.read_exact(&mut got).await.expect("forwarded");
        assert_eq!(got, cmd);
        let sent = Instant::now();
        let late = || metrics.total("tcp_comm_commands_late_total", &[("transport", "legacy")]);
        // Late at the 1.5 s latency threshold (the metrics' default), the pair's timer woken
        // for it: the SLO sees the stall then, not at the deadline.
        tokio::time::sleep_until(sent + Duration::from_millis(1490)).await;
        assert_eq!(late(), 0.0, "not before the latency threshold");
        tokio::time::sleep_until(sent + Duration::from_millis(1510)).await;
        assert_eq!(late(), 1.0, "late at the threshold, while still waiting");
        tokio::time::sleep_until(sent + Duration::from_millis(4990)).await;
        assert_eq!(timeouts(), 0.0, "not before its 5 s deadline");
        tokio::time::sleep_until(sent + Duration::from_millis(5010)).await;
        assert_eq!(timeouts(), 1.0, "at its deadline, not at a later tick");
        assert_eq!(late(), 1.0, "its timeout is not a second latency miss");
        // The device has said nothing since the pair began: it is closed at 90 s from then.
        let reason = pair.await.expect("pair task");
        assert_eq!(reason, CloseReason::IdleTimeout);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(90) && took < Duration::from_millis(90_050),
            "closed after {took:?}"
        );
    }

    #[tokio::test]
    async fn once_closing_the_pump_passes_the_fin_on_and_counts_what_still_arrives() {
        let metrics = Arc::new(Metrics::new(false).expect("metrics"));
        let obs = observer_with(metrics.clone());
        let (mut device, mut from, _keep) = tcp_pair().await;
        let (to, mut upstream) = tokio::io::duplex(4096);
        let closing = TaskFlag::default();
        let task = pump(&mut from, to, Direction::DevToSrv, &obs, &closing);
        tokio::pin!(task);
        device.write_all(&build::heartbeat()).await.expect("write");
        let mut got = [0u8; 5];
        tokio::select! {
            _ = &mut task => panic!("pump ended"),
            r = upstream.read_exact(&mut got) => { r.expect("read"); }
        }
        closing.raise();
        device.write_all(&build::heartbeat()).await.expect("write");
        drop(device);
        assert!(matches!(task.await, PumpEnd::Eof));
        let mut rest = Vec::new();
        upstream
            .read_to_end(&mut rest)
            .await
            .expect("FIN passed on");
        assert!(rest.is_empty(), "nothing forwarded after closing began");
        assert_eq!(
            metrics.total(
                "tcp_comm_close_dropped_bytes_total",
                &[("direction", "dev_to_srv")]
            ),
            5.0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_answered_at_once_does_not_wake_the_pair_at_its_threshold_or_deadline() {
        let metrics = Arc::new(Metrics::new(false).expect("metrics"));
        let obs = Arc::new(observer_with(metrics.clone()));
        let (mut device, dev) = streams().await;
        let (mut addon, up) = streams().await;
        let (shutdown, pair) = spawn_pair(obs.clone(), dev, up);
        tokio::time::sleep(Duration::from_millis(500)).await;
        for n in 0..3u8 {
            let msg = MsgId([0, 0, n]);
            let cmd = build::power_command(DeviceId([1, 2, 3, 4]), msg, 7, 10, true);
            addon.write_all(&cmd).await.expect("write");
            let mut got = vec![0u8; cmd.len()];
            device.read_exact(&mut got).await.expect("forwarded");
            // The device acks and replies, as real ones do; the add-on leaves the reply's
            // 0x73 unacknowledged, as the real one does.
            let mut ack = build::data_ack(DeviceId([1, 2, 3, 4]), msg).to_vec();
            ack.extend_from_slice(&build::command_reply(DeviceId([1, 2, 3, 4]), msg, 7, 0xd0));
            device.write_all(&ack).await.expect("ack");
            let mut back = vec![0u8; ack.len()];
            addon.read_exact(&mut back).await.expect("ack forwarded");
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        // Past every command's 1.5 s threshold and 5 s deadline, short of the 90 s idle limit.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let done = metrics.total(
            "tcp_comm_packet_sent_total",
            &[("transport", "legacy"), ("outcome", "success")],
        );
        assert_eq!(done, 3.0, "the three commands were seen answered");
        assert_eq!(
            obs.timer_fired.load(Ordering::Relaxed),
            0,
            "answered commands leave nothing for the timer to wake for"
        );
        shutdown.cancel();
        drop((device, addon));
        let _ = pair.await;
    }
}
