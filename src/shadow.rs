//! Dark launch (design decision 8): the new path's logic and a shadow upstream, run beside a
//! legacy connection without ever writing to its device.
//!
//! - **observe**: a [`Core`] with `transport="shadow"` is fed copies of both directions of the
//!   legacy connection; its metrics say what the reliable session would have done (retries,
//!   duplicate drops, outcomes). Whatever it queues is discarded.
//! - **mirror**: additionally every device read is replayed to `upstream.shadow`; the shadow's
//!   answers are paired with the legacy upstream's, frame by frame and type by type
//!   ([`Comparator`]), counted in `tcp_comm_shadow_comparisons_total`, and discarded.
//!
//! Invariants:
//! - Nothing here holds a reference to the device socket: not one byte can reach a device.
//! - The legacy path never waits on the shadow: a device read is offered to a bounded queue
//!   that drops on full (counted), and a slow, failed or dead shadow upstream only stops the
//!   mirror of that connection.
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
use tracing::debug;

use crate::config::{Config, DarkMode};
use crate::metrics::{Metrics, Transport};
use crate::protocol::{DeviceId, Frame, Packet, PacketType, Tap};
use crate::reliable::queue::{BoundedQueue, Item, Pushed};
use crate::reliable::session::Core;
use crate::reliable::SessionCtx;
use crate::transactions::Direction;
use crate::upstream::Dialer;

const SHADOW: Transport = Transport::Shadow;

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
}

impl Comparison {
    pub fn label(self) -> &'static str {
        match self {
            Self::Match => "match",
            Self::Mismatch => "mismatch",
            Self::Missing => "missing",
            Self::Extra => "extra",
        }
    }
}

/// Pairs the two upstreams' replies to the same device traffic.
///
/// Only replies are compared (0x28, 0x48, 0x88, 0xc8, 0xd8 and server 0x7b): what an upstream
/// originates (commands, 0xa3, queries) depends on its own timers and harness. Replies that
/// echo a request (0x88, 0x7b) pair by their bytes; the others pair in order per type and must
/// be byte-equal, except the 0xc8 time reply, which legitimately differs.
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

    fn compared(t: PacketType) -> bool {
        matches!(
            t,
            PacketType::HelloAck
                | PacketType::InfoAck
                | PacketType::StatusAck
                | PacketType::TimeReply
                | PacketType::HeartbeatAck
                | PacketType::DataAck
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
        let echo = matches!(t, PacketType::StatusAck | PacketType::DataAck);
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

    pub fn pending(&self) -> usize {
        self.pending.values().map(VecDeque::len).sum()
    }
}

/// The mirror of one legacy connection to the shadow upstream.
struct Mirror {
    queue: Mutex<BoundedQueue>,
    ready: Notify,
    alive: AtomicBool,
    cmp: Mutex<Comparator>,
    stop: CancellationToken,
}

/// Everything dark-launched for one legacy connection.
pub struct Shadow {
    core: Mutex<Core>,
    mirror: Option<Arc<Mirror>>,
    metrics: Arc<Metrics>,
    rearm: Notify,
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
    /// dialer) the mirror dials in the background.
    pub fn start(
        ctx: &SessionCtx,
        cfg: Arc<Config>,
        device: DeviceId,
        shadow_dialer: Option<&Dialer>,
    ) -> Shadow {
        let metrics = ctx.metrics.clone();
        metrics.connection_started(SHADOW);
        let mirror = match (cfg.dark_launch.mode, shadow_dialer) {
            (DarkMode::Mirror, Some(d)) => {
                let m = Arc::new(Mirror {
                    queue: Mutex::new(BoundedQueue::new(
                        cfg.dark_launch.mirror_queue_bytes,
                        metrics
                            .queue_bytes
                            .with_label_values(&[SHADOW.label(), "mirror"]),
                    )),
                    ready: Notify::new(),
                    alive: AtomicBool::new(true),
                    cmp: Mutex::new(Comparator::new(cfg.dark_launch.compare_window)),
                    stop: CancellationToken::new(),
                });
                tokio::spawn(run_mirror(
                    m.clone(),
                    d.clone(),
                    metrics.clone(),
                    cfg.protocol.max_frame_len,
                ));
                Some(m)
            }
            _ => None,
        };
        Shadow {
            core: Mutex::new(Core::new(
                SHADOW,
                ctx,
                cfg,
                device,
                Bytes::new(),
                Instant::now(),
            )),
            mirror,
            metrics,
            rearm: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// One read just forwarded by the legacy path in `dir`, and the frames it completed.
    pub fn observe(&self, dir: Direction, read: &[u8], frames: &[Frame], now: Instant) {
        {
            let mut core = lock(&self.core);
            match dir {
                Direction::DevToSrv => {
                    let _ = core.device_read(read, now);
                    while core.pop_for_upstream(now).is_some() {}
                }
                Direction::SrvToDev => {
                    if core.upstream_read(read, now) {
                        self.rearm.notify_one();
                    }
                }
            }
            while core.pop_for_device().is_some() {}
        }
        let Some(m) = &self.mirror else { return };
        if !m.alive.load(Ordering::SeqCst) {
            return;
        }
        match dir {
            Direction::DevToSrv => {
                let pushed = lock(&m.queue).push(Item::frames(Bytes::copy_from_slice(read)));
                if pushed == Pushed::Full {
                    // A dropped read can cut a frame in half, after which the shadow's stream
                    // (and every comparison) would be noise: stop mirroring this connection.
                    self.metrics
                        .queue_full
                        .with_label_values(&[SHADOW.label(), "mirror", "drop"])
                        .inc();
                    m.alive.store(false, Ordering::SeqCst);
                    m.stop.cancel();
                } else {
                    m.ready.notify_one();
                }
            }
            Direction::SrvToDev => {
                let mut out = Vec::new();
                let mut cmp = lock(&m.cmp);
                for f in frames {
                    if let Ok(p) = &f.packet {
                        cmp.on_frame(Side::Legacy, p, now, &mut out);
                    }
                }
                drop(cmp);
                record(&self.metrics, &mut out);
            }
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
        if let Some(m) = &self.mirror {
            m.stop.cancel();
            let mut out = Vec::new();
            let window = lock(&m.cmp).window;
            lock(&m.cmp).expire(now + window, &mut out);
            record(&self.metrics, &mut out);
        }
        self.metrics.connection_ended(SHADOW);
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        self.close(Instant::now());
    }
}

async fn run_mirror(m: Arc<Mirror>, dialer: Dialer, metrics: Arc<Metrics>, max_frame_len: usize) {
    let stream = tokio::select! {
        _ = m.stop.cancelled() => return,
        r = dialer.dial() => r,
    };
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "shadow upstream unreachable; mirror off for this connection");
            metrics
                .upstream_connect_errors
                .with_label_values(&[SHADOW.label(), e.reason()])
                .inc();
            m.alive.store(false, Ordering::SeqCst);
            return;
        }
    };
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = async {
        loop {
            let next = lock(&m.queue).pop();
            match next {
                Some(item) => {
                    if w.write_all(&item.bytes).await.is_err() {
                        return;
                    }
                }
                None => m.ready.notified().await,
            }
        }
    };
    let reader = async {
        let mut tap = Tap::new(max_frame_len);
        let mut buf = vec![0u8; 16 * 1024];
        let mut out = Vec::new();
        loop {
            let n = match r.read(&mut buf).await {
                Ok(n) if n > 0 => n,
                _ => return,
            };
            let now = Instant::now();
            let frames = tap.feed(&buf[..n]).frames;
            let mut cmp = lock(&m.cmp);
            for f in &frames {
                if let Ok(p) = &f.packet {
                    cmp.on_frame(Side::Shadow, p, now, &mut out);
                }
            }
            drop(cmp);
            record(&metrics, &mut out);
        }
    };
    tokio::select! {
        _ = m.stop.cancelled() => {}
        _ = writer => {}
        _ = reader => {}
    }
    m.alive.store(false, Ordering::SeqCst);
    // Anything still queued for a dead mirror is released (and leaves the depth gauge).
    while lock(&m.queue).pop().is_some() {}
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

    #[tokio::test]
    async fn dropping_a_shadow_without_close_releases_it() {
        let cfg = Arc::new(
            Config::parse(
                "[upstream.legacy]\naddress = \"127.0.0.1:1\"\ntls = false\n[upstream.shadow]\naddress = \"127.0.0.1:1\"\ntls = false\n[dark_launch]\nmode = \"mirror\"\npercent = 100\n",
            )
            .expect("config"),
        );
        let metrics = Arc::new(Metrics::new(false).expect("metrics"));
        let ctx = SessionCtx {
            metrics: metrics.clone(),
            dialer: Dialer::new(&cfg.upstream_legacy).expect("dialer"),
            dedup: Arc::new(crate::reliable::DedupStore::new(10, Duration::from_secs(1))),
        };
        let dialer = Dialer::new(cfg.upstream_shadow.as_ref().expect("shadow")).expect("dialer");
        let active = || metrics.total("tcp_comm_connections_active", &[("transport", "shadow")]);
        let shadow = Shadow::start(&ctx, cfg.clone(), DeviceId([1, 2, 3, 4]), Some(&dialer));
        let mirror = shadow.mirror.clone().expect("mirror");
        assert_eq!(active(), 1.0);
        // An early exit of the legacy path that never calls close().
        drop(shadow);
        assert_eq!(active(), 0.0);
        assert!(
            mirror.stop.is_cancelled(),
            "the mirror task is told to stop"
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
