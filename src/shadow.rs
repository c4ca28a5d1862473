//! Dark launch (design decision 8): the new path's logic and a shadow upstream, run beside a
//! legacy connection without ever writing to its device.
//!
//! - **observe**: a [`Core`] with `transport="shadow"` is fed copies of both directions of the
//!   legacy connection; its metrics say what the reliable session would have done against the
//!   legacy upstream (retries, duplicate drops, outcomes). Whatever it queues is discarded.
//! - **mirror**: every device read is replayed to `upstream.shadow`, and the core is fed the
//!   *shadow's* answers instead of the legacy upstream's, so `transport="shadow"` figures
//!   describe the shadow upstream. The shadow's replies are also paired with the legacy
//!   upstream's, frame by frame and type by type ([`Comparator`]), counted in
//!   `tcp_comm_shadow_comparisons_total`, and discarded.
//!
//! Invariants:
//! - Nothing here holds a reference to the device socket: not one byte can reach a device.
//! - The legacy path never waits on the shadow: a device read is offered to a bounded queue
//!   that drops on full, and a slow, failed or dead shadow upstream only stops the mirror of
//!   that connection.
//! - Nothing vanishes unseen: every read not mirrored is counted (reads and bytes); mirroring
//!   resumes at the next read that starts on a frame boundary once the queue has room, so the
//!   shadow is only ever sent whole frames. A shadow upstream that dies is counted and logged
//!   (at most every [`LOSS_LOG_EVERY`]), and every legacy reply that could then not be compared
//!   is counted `uncompared`. `connections_active{transport="shadow"}` counts shadows alive:
//!   observe cores, and mirrors whose shadow upstream is connected.
//! - The comparator is pure and takes `now`; its memory is bounded by `compare_window`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::{Config, DarkMode};
use crate::logging::LogLimit;
use crate::metrics::{Metrics, Transport};
use crate::protocol::{DeviceId, Packet, PacketType, Tap, TapOutput};
use crate::reliable::queue::{BoundedQueue, Item, Pushed};
use crate::reliable::session::Core;
use crate::reliable::SessionCtx;
use crate::transactions::Direction;
use crate::upstream::Dialer;

const SHADOW: Transport = Transport::Shadow;

/// Minimum spacing of "shadow upstream lost" log lines across all connections.
pub const LOSS_LOG_EVERY: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which upstream a reply came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Legacy,
    Shadow,
}

/// How one comparison ended; the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// Both upstreams sent it (equal where the content is meant to be equal).
    Match,
    /// Both sent a reply of this type but its content differs.
    Mismatch,
    /// The legacy upstream sent it; the shadow did not within the window.
    Missing,
    /// The shadow sent it; the legacy upstream did not within the window.
    Extra,
    /// The legacy upstream sent it while no shadow upstream was there to answer.
    Uncompared,
}

impl Comparison {
    pub fn label(self) -> &'static str {
        match self {
            Self::Match => "match",
            Self::Mismatch => "mismatch",
            Self::Missing => "missing",
            Self::Extra => "extra",
            Self::Uncompared => "uncompared",
        }
    }
}

/// Pairs the two upstreams' replies to the same device traffic.
///
/// Only replies are compared (0x28, 0x48, 0x88, 0xc8, 0xd8, server 0x7b and the 0x78 notice
/// that follows a device 0x7b): what an upstream originates (commands, 0xa3, queries) depends on
/// its own timers and harness. Replies that echo a request (0x88, 0x7b, 0x78) pair by their
/// bytes; the others pair in order per type and must be byte-equal, except the 0xc8 time
/// reply, which legitimately differs.
#[derive(Debug)]
pub struct Comparator {
    window: Duration,
    pending: HashMap<PairKey, VecDeque<Unpaired>>,
}

/// Replies pair within a type, and for echoing types only with the same bytes.
type PairKey = (PacketType, Option<Bytes>);
/// A reply waiting for its counterpart: who sent it, its bytes, when.
type Unpaired = (Side, Bytes, Instant);

impl Comparator {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            pending: HashMap::new(),
        }
    }

    pub fn compared(t: PacketType) -> bool {
        matches!(
            t,
            PacketType::HelloAck
                | PacketType::InfoAck
                | PacketType::StatusAck
                | PacketType::TimeReply
                | PacketType::HeartbeatAck
                | PacketType::DataAck
                | PacketType::Notice
        )
    }

    /// A srv→dev frame from `side`.
    pub fn on_frame(
        &mut self,
        side: Side,
        p: &Packet,
        now: Instant,
        out: &mut Vec<(Comparison, PacketType)>,
    ) {
        let t = p.ptype();
        if !Self::compared(t) {
            return;
        }
        let echo = matches!(
            t,
            PacketType::StatusAck | PacketType::DataAck | PacketType::Notice
        );
        let key = (t, echo.then(|| p.raw().clone()));
        let q = self.pending.entry(key).or_default();
        match q.front() {
            Some((other, raw, _)) if *other != side => {
                let equal = t == PacketType::TimeReply || raw == p.raw();
                out.push((
                    if equal {
                        Comparison::Match
                    } else {
                        Comparison::Mismatch
                    },
                    t,
                ));
                q.pop_front();
            }
            _ => q.push_back((side, p.raw().clone(), now)),
        }
    }

    /// Replies unpaired for longer than the window are missing (legacy only) or extra
    /// (shadow only).
    pub fn expire(&mut self, now: Instant, out: &mut Vec<(Comparison, PacketType)>) {
        let window = self.window;
        self.pending.retain(|(t, _), q| {
            while let Some((side, _, at)) = q.front() {
                if now.saturating_duration_since(*at) < window {
                    break;
                }
                out.push((
                    match side {
                        Side::Legacy => Comparison::Missing,
                        Side::Shadow => Comparison::Extra,
                    },
                    *t,
                ));
                q.pop_front();
            }
            !q.is_empty()
        });
    }

    /// The shadow upstream is gone: legacy replies still waiting can never be compared; the
    /// shadow's own are extra.
    pub fn shadow_gone(&mut self, out: &mut Vec<(Comparison, PacketType)>) {
        for ((t, _), q) in self.pending.drain() {
            for (side, _, _) in q {
                out.push((
                    match side {
                        Side::Legacy => Comparison::Uncompared,
                        Side::Shadow => Comparison::Extra,
                    },
                    t,
                ));
            }
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.values().map(VecDeque::len).sum()
    }
}

/// What every shadow shares: where mirror mode replays traffic, the task tracker its mirror
/// tasks run on (so shutdown waits for them), and the spacing of its loss log lines.
#[derive(Clone)]
pub struct ShadowCtx {
    pub dialer: Option<Dialer>,
    pub tasks: tokio_util::task::TaskTracker,
    pub log: Arc<LogLimit>,
}

/// The mirror of one legacy connection to the shadow upstream.
struct Mirror {
    queue: Mutex<BoundedQueue>,
    ready: Notify,
    /// The shadow upstream is connected and being written.
    alive: AtomicBool,
    /// Ended for good (dial failed or the shadow upstream went away).
    dead: AtomicBool,
    /// Reads are being dropped until one starts on a frame boundary with room to spare.
    skipping: AtomicBool,
    cmp: Mutex<Comparator>,
    stop: CancellationToken,
}

/// Everything dark-launched for one legacy connection.
pub struct Shadow {
    core: Arc<Mutex<Core>>,
    mirror: Option<Arc<Mirror>>,
    metrics: Arc<Metrics>,
    rearm: Arc<Notify>,
    closed: AtomicBool,
}

fn record(metrics: &Metrics, out: &mut Vec<(Comparison, PacketType)>) {
    for (c, t) in out.drain(..) {
        metrics
            .shadow_comparisons
            .with_label_values(&[c.label(), t.label()])
            .inc();
    }
}

impl Shadow {
    /// Starts shadowing a legacy connection of `device`; with mirror mode (and a shadow
    /// dialer) the mirror dials in the background, on `tasks`.
    pub fn start(ctx: &SessionCtx, sctx: &ShadowCtx, cfg: Arc<Config>, device: DeviceId) -> Shadow {
        let metrics = ctx.metrics.clone();
        let core = Arc::new(Mutex::new(Core::new(
            SHADOW,
            ctx,
            cfg.clone(),
            device,
            Bytes::new(),
            Instant::now(),
        )));
        let rearm = Arc::new(Notify::new());
        let mirror = match (cfg.dark_launch.mode, sctx.dialer.as_ref()) {
            (DarkMode::Mirror, Some(d)) => {
                let m = Arc::new(Mirror {
                    queue: Mutex::new(BoundedQueue::new(
                        cfg.dark_launch.mirror_queue_bytes,
                        metrics
                            .queue_bytes
                            .with_label_values(&[SHADOW.label(), "mirror"]),
                    )),
                    ready: Notify::new(),
                    alive: AtomicBool::new(false),
                    dead: AtomicBool::new(false),
                    skipping: AtomicBool::new(false),
                    cmp: Mutex::new(Comparator::new(cfg.dark_launch.compare_window)),
                    stop: CancellationToken::new(),
                });
                sctx.tasks.spawn(run_mirror(MirrorTask {
                    m: m.clone(),
                    dialer: d.clone(),
                    metrics: metrics.clone(),
                    core: core.clone(),
                    rearm: rearm.clone(),
                    log: sctx.log.clone(),
                    max_frame_len: cfg.protocol.max_frame_len,
                }));
                Some(m)
            }
            _ => {
                metrics.connection_started(SHADOW);
                None
            }
        };
        Shadow {
            core,
            mirror,
            metrics,
            rearm,
            closed: AtomicBool::new(false),
        }
    }

    /// One read about to be forwarded by the legacy path in `dir`, and what the legacy tap made
    /// of it.
    pub fn observe(&self, dir: Direction, read: &[u8], tapped: &TapOutput, now: Instant) {
        let mirrored = self.mirror.is_some();
        {
            let mut core = lock(&self.core);
            match dir {
                Direction::DevToSrv => {
                    let _ = core.device_read(read, now);
                    while core.pop_for_upstream(now).is_some() {}
                }
                // In mirror mode the core hears the shadow upstream instead (see run_mirror).
                Direction::SrvToDev if !mirrored => {
                    if core.upstream_read(read, now) {
                        self.rearm.notify_one();
                    }
                }
                Direction::SrvToDev => {}
            }
            while core.pop_for_device().is_some() {}
        }
        let Some(m) = &self.mirror else { return };
        match dir {
            Direction::DevToSrv => self.mirror_read(m, read, tapped),
            Direction::SrvToDev => {
                let mut out = Vec::new();
                let compared = !m.dead.load(Ordering::SeqCst);
                let mut cmp = lock(&m.cmp);
                for p in tapped.frames().filter_map(|f| f.packet.as_ref().ok()) {
                    if compared {
                        cmp.on_frame(Side::Legacy, p, now, &mut out);
                    } else if Comparator::compared(p.ptype()) {
                        out.push((Comparison::Uncompared, p.ptype()));
                    }
                }
                drop(cmp);
                record(&self.metrics, &mut out);
            }
        }
    }

    /// Offers one device read to the mirror queue.
    fn mirror_read(&self, m: &Mirror, read: &[u8], tapped: &TapOutput) {
        if m.dead.load(Ordering::SeqCst) {
            return;
        }
        let drop_it = |why: &str| {
            self.metrics
                .queue_full
                .with_label_values(&[SHADOW.label(), "mirror", "drop"])
                .inc();
            self.metrics.mirror_dropped_bytes.inc_by(read.len() as u64);
            debug!(why, bytes = read.len(), "device read not mirrored");
        };
        // After a drop, the shadow's stream may only go on from a frame boundary.
        if m.skipping.load(Ordering::SeqCst) && tapped.held_before > 0 {
            drop_it("after a dropped read, mid-frame");
            return;
        }
        let pushed = lock(&m.queue).push(Item::frames(Bytes::copy_from_slice(read)));
        if pushed == Pushed::Full {
            m.skipping.store(true, Ordering::SeqCst);
            drop_it("mirror queue full");
        } else {
            m.skipping.store(false, Ordering::SeqCst);
            m.ready.notify_one();
        }
    }

    /// When the shadow core next has timer work.
    pub fn next_wake(&self) -> Instant {
        lock(&self.core).next_wake()
    }

    /// Resolves when a new command may have moved [`Shadow::next_wake`] earlier.
    pub async fn rearmed(&self) {
        self.rearm.notified().await
    }

    pub fn tick(&self, now: Instant) {
        {
            let mut core = lock(&self.core);
            // An idle device is the legacy path's business; the shadow only measures.
            let _ = core.tick(now);
            while core.pop_for_device().is_some() {}
        }
        if let Some(m) = &self.mirror {
            let mut out = Vec::new();
            lock(&m.cmp).expire(now, &mut out);
            record(&self.metrics, &mut out);
        }
    }

    /// The legacy connection ended. Replies still unpaired are counted as missing / extra.
    /// Idempotent; also run on drop, so no exit path leaks the mirror task.
    pub fn close(&self, now: Instant) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        lock(&self.core).close(now);
        match &self.mirror {
            Some(m) => {
                m.stop.cancel();
                let mut out = Vec::new();
                let window = lock(&m.cmp).window;
                lock(&m.cmp).expire(now + window, &mut out);
                record(&self.metrics, &mut out);
            }
            None => self.metrics.connection_ended(SHADOW),
        }
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        self.close(Instant::now());
    }
}

/// What one mirror task needs.
struct MirrorTask {
    m: Arc<Mirror>,
    dialer: Dialer,
    metrics: Arc<Metrics>,
    core: Arc<Mutex<Core>>,
    rearm: Arc<Notify>,
    log: Arc<LogLimit>,
    max_frame_len: usize,
}

/// Why a mirror's shadow upstream went away; the `reason` label.
fn lost(t: &MirrorTask, reason: &str) {
    t.m.dead.store(true, Ordering::SeqCst);
    t.metrics.shadow_lost.with_label_values(&[reason]).inc();
    let mut out = Vec::new();
    lock(&t.m.cmp).shadow_gone(&mut out);
    record(&t.metrics, &mut out);
    if t.log.allow(Instant::now(), LOSS_LOG_EVERY) {
        warn!(
            reason,
            "shadow upstream lost; mirroring stopped for this connection (replies it cannot compare are counted uncompared)"
        );
    }
}

async fn run_mirror(t: MirrorTask) {
    let stream = tokio::select! {
        _ = t.m.stop.cancelled() => return,
        r = t.dialer.dial() => r,
    };
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            t.metrics
                .upstream_connect_errors
                .with_label_values(&[SHADOW.label(), e.reason()])
                .inc();
            lost(&t, "connect_failed");
            while lock(&t.m.queue).pop().is_some() {}
            return;
        }
    };
    t.m.alive.store(true, Ordering::SeqCst);
    t.metrics.connection_started(SHADOW);
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = async {
        loop {
            let next = lock(&t.m.queue).pop();
            match next {
                Some(item) => {
                    if w.write_all(&item.bytes).await.is_err() {
                        return "write_failed";
                    }
                }
                None => t.m.ready.notified().await,
            }
        }
    };
    let reader = async {
        let mut tap = Tap::new(t.max_frame_len);
        let mut buf = vec![0u8; 16 * 1024];
        let mut out = Vec::new();
        loop {
            let n = match r.read(&mut buf).await {
                Ok(n) if n > 0 => n,
                Ok(_) => return "closed",
                Err(_) => return "read_failed",
            };
            let now = Instant::now();
            // The new path's logic hears the shadow upstream, as it would on the new path.
            {
                let mut core = lock(&t.core);
                if core.upstream_read(&buf[..n], now) {
                    t.rearm.notify_one();
                }
                while core.pop_for_device().is_some() {}
            }
            let tapped = tap.feed(&buf[..n]);
            let mut cmp = lock(&t.m.cmp);
            for p in tapped.frames().filter_map(|f| f.packet.as_ref().ok()) {
                cmp.on_frame(Side::Shadow, p, now, &mut out);
            }
            drop(cmp);
            record(&t.metrics, &mut out);
        }
    };
    let why = tokio::select! {
        _ = t.m.stop.cancelled() => None,
        why = writer => Some(why),
        why = reader => Some(why),
    };
    t.m.alive.store(false, Ordering::SeqCst);
    t.metrics.connection_ended(SHADOW);
    if let Some(why) = why {
        lost(&t, why);
    }
    // Anything still queued for a dead mirror is released (and leaves the depth gauge).
    while lock(&t.m.queue).pop().is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{build, MsgId};

    fn pkt(b: Bytes) -> Packet {
        Packet::parse(b, 4096).expect("packet")
    }

    #[tokio::test(start_paused = true)]
    async fn pairs_by_type_and_echo_and_expires_the_unpaired() {
        let mut c = Comparator::new(Duration::from_secs(2));
        let mut out = Vec::new();
        let now = Instant::now();
        c.on_frame(Side::Legacy, &pkt(build::hello_ack()), now, &mut out);
        c.on_frame(Side::Shadow, &pkt(build::hello_ack()), now, &mut out);
        c.on_frame(
            Side::Legacy,
            &pkt(build::status_ack(MsgId([0, 9, 0]))),
            now,
            &mut out,
        );
        c.on_frame(
            Side::Legacy,
            &pkt(build::status_ack(MsgId([0, 8, 0]))),
            now,
            &mut out,
        );
        c.on_frame(
            Side::Shadow,
            &pkt(build::status_ack(MsgId([0, 8, 0]))),
            now,
            &mut out,
        );
        c.on_frame(Side::Shadow, &pkt(build::heartbeat_ack()), now, &mut out);
        // Not a reply: never compared.
        c.on_frame(
            Side::Shadow,
            &pkt(build::channel_open(
                DeviceId([1, 2, 3, 4]),
                MsgId([1, 2, 0]),
            )),
            now,
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                (Comparison::Match, PacketType::HelloAck),
                (Comparison::Match, PacketType::StatusAck),
            ]
        );
        out.clear();
        tokio::time::advance(Duration::from_millis(1999)).await;
        c.expire(Instant::now(), &mut out);
        assert!(out.is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        c.expire(Instant::now(), &mut out);
        out.sort_by_key(|(c, _)| c.label());
        assert_eq!(
            out,
            vec![
                (Comparison::Extra, PacketType::HeartbeatAck),
                (Comparison::Missing, PacketType::StatusAck),
            ]
        );
        assert_eq!(c.pending(), 0);
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_mirror_counts_as_a_shadow_connection_while_connected_and_dropping_releases_it() {
        let shadow_up = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = shadow_up.local_addr().expect("addr");
        let cfg = Arc::new(
            Config::parse(&format!(
                "[upstream.legacy]\naddress = \"127.0.0.1:1\"\ntls = false\n[upstream.shadow]\naddress = \"{addr}\"\ntls = false\n[dark_launch]\nmode = \"mirror\"\npercent = 100\n"
            ))
            .expect("config"),
        );
        let metrics = Arc::new(Metrics::new(false).expect("metrics"));
        let ctx = SessionCtx::new(
            metrics.clone(),
            Dialer::new(&cfg.upstream_legacy).expect("dialer"),
            &cfg,
        );
        let sctx = ShadowCtx {
            dialer: Some(
                Dialer::new(cfg.upstream_shadow.as_ref().expect("shadow")).expect("dialer"),
            ),
            tasks: tokio_util::task::TaskTracker::new(),
            log: Arc::new(LogLimit::default()),
        };
        let active = || metrics.total("tcp_comm_connections_active", &[("transport", "shadow")]);
        let shadow = Shadow::start(&ctx, &sctx, cfg.clone(), DeviceId([1, 2, 3, 4]));
        let (_peer, _) = shadow_up.accept().await.expect("the mirror dials");
        until("the mirror is connected", || active() == 1.0).await;
        let mirror = shadow.mirror.clone().expect("mirror");
        // An early exit of the legacy path that never calls close().
        drop(shadow);
        assert!(
            mirror.stop.is_cancelled(),
            "the mirror task is told to stop"
        );
        until("the mirror released", || active() == 0.0).await;
        sctx.tasks.close();
        sctx.tasks.wait().await;
        assert_eq!(
            metrics.total("tcp_comm_shadow_upstream_lost_total", &[]),
            0.0,
            "stopped, not lost"
        );
    }

    #[test]
    fn same_type_different_bytes_is_a_mismatch_but_time_replies_may_differ() {
        let mut c = Comparator::new(Duration::from_secs(2));
        let mut out = Vec::new();
        let now = Instant::now();
        let mut odd_ack = build::info_ack().to_vec();
        if let Some(last) = odd_ack.last_mut() {
            *last ^= 0xff;
        }
        c.on_frame(Side::Legacy, &pkt(build::info_ack()), now, &mut out);
        c.on_frame(Side::Shadow, &pkt(Bytes::from(odd_ack)), now, &mut out);
        let mut late = build::time_reply_stale().to_vec();
        if let Some(b) = late.get_mut(8) {
            *b ^= 1;
        }
        c.on_frame(Side::Legacy, &pkt(build::time_reply_stale()), now, &mut out);
        c.on_frame(Side::Shadow, &pkt(Bytes::from(late)), now, &mut out);
        assert_eq!(
            out,
            vec![
                (Comparison::Mismatch, PacketType::InfoAck),
                (Comparison::Match, PacketType::TimeReply),
            ]
        );
    }
}
