//! Dark launch (design decision 8): the new path's logic and a shadow upstream, run beside a
//! legacy connection without ever writing to its device.
//!
//! - **observe**: a [`Core`] with `transport="shadow"` is fed copies of both directions of the
//!   legacy connection; its metrics say what the reliable session would have done against the
//!   legacy upstream (retries, duplicate drops, outcomes). Whatever it queues is discarded.
//! - **mirror**: every device read is replayed to `upstream.shadow`, and the core is fed the
//!   *shadow's* answers instead of the legacy upstream's, so `transport="shadow"` figures
//!   describe the shadow upstream. The shadow's replies are also paired with the legacy
//!   upstream's, frame by frame and type by type ([`compare`]), counted in
//!   `tcp_comm_shadow_comparisons_total`, and discarded.
//!
//! Invariants:
//! - Nothing here holds a reference to the device socket: not one byte can reach a device.
//! - The legacy path never waits on the shadow: a device read is offered to a bounded queue
//!   that drops on full, and a slow, failed or dead shadow upstream only stops the mirror of
//!   that connection.
//! - The shadow is only ever sent whole frames (and unframeable bytes as the tap cut them):
//!   the mirror is fed the frames each read completes, not the read, so a frame cut short by a
//!   read waits for its rest and a full queue drops whole frames only.
//! - Nothing vanishes unseen: what a live mirror does not replay is counted (reads and
//!   bytes). A shadow upstream that dies is counted and logged (at most every
//!   [`mirror::LOSS_LOG_EVERY`]), and every legacy reply that could then not be compared is
//!   counted `uncompared`. `connections_active{transport="shadow"}` counts shadows alive:
//!   observe cores, and mirrors whose shadow upstream is connected.
//! - The comparator is pure and takes `now`; its memory is bounded by `compare_window`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub mod compare;
pub mod mirror;

use crate::config::{Config, DarkMode};
use crate::conn::reliable::core::Core;
use crate::conn::reliable::queue::{BoundedQueue, Item, Pushed};
use crate::conn::reliable::SessionCtx;
use crate::conn::upstream::Dialer;
use crate::conn::{Direction, Transport};
use crate::protocol::{DeviceId, Segment, TapOutput};
use crate::telemetry::labels::{Queue, QueueAction};
use crate::telemetry::logging::LogLimit;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::tasks::Tasks;
use compare::{Comparator, Comparison, ReplyFrom};
use mirror::{lock, record, Mirror, MirrorTask};

const SHADOW: Transport = Transport::Shadow;

/// What every shadow shares: where mirror mode replays traffic, the task tracker its mirror
/// tasks run on (so shutdown waits for them), and the spacing of its loss log lines.
#[derive(Clone)]
pub struct ShadowCtx {
    pub dialer: Option<Dialer>,
    pub tasks: Tasks,
    pub log: Arc<LogLimit>,
}

/// Everything dark-launched for one legacy connection.
pub struct Shadow {
    core: Arc<Mutex<Core>>,
    mirror: Option<Arc<Mirror>>,
    metrics: Arc<Metrics>,
    rearm: Arc<Notify>,
    closed: AtomicBool,
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
                        metrics.queue_gauge(SHADOW, Queue::Mirror),
                    )),
                    ready: Notify::new(),
                    alive: AtomicBool::new(false),
                    dead: AtomicBool::new(false),
                    cmp: Mutex::new(Comparator::new(cfg.dark_launch.compare_window)),
                    stop: CancellationToken::new(),
                });
                sctx.tasks.spawn(
                    "mirror",
                    mirror::run(MirrorTask {
                        m: m.clone(),
                        dialer: d.clone(),
                        metrics: metrics.clone(),
                        core: core.clone(),
                        rearm: rearm.clone(),
                        log: sctx.log.clone(),
                        max_frame_len: cfg.protocol.max_frame_len,
                    }),
                );
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
            Direction::DevToSrv => self.mirror_read(m, tapped),
            Direction::SrvToDev => {
                let mut out = Vec::new();
                let compared = !m.dead.load(Ordering::SeqCst);
                let mut cmp = lock(&m.cmp);
                for p in tapped.frames().filter_map(|f| f.packet.as_ref().ok()) {
                    if compared {
                        cmp.on_frame(ReplyFrom::Legacy, p, now, &mut out);
                    } else if Comparator::compared(p.ptype()) {
                        out.push((Comparison::Uncompared, p.ptype()));
                    }
                }
                drop(cmp);
                record(&self.metrics, &mut out);
            }
        }
    }

    /// Offers the whole frames one device read completed to the mirror queue. Frames, not
    /// the read: a read may end inside a frame, and a queue full at the next read would then
    /// leave the shadow with half a frame that whatever follows is read as the rest of. A
    /// frame cut short waits in the tap for its rest; what the queue has no room for is
    /// dropped whole and counted.
    fn mirror_read(&self, m: &Mirror, tapped: &TapOutput) {
        if m.dead.load(Ordering::SeqCst) {
            return;
        }
        let len: usize = tapped.segments.iter().map(Segment::len).sum();
        if len == 0 {
            return;
        }
        let mut whole = BytesMut::with_capacity(len);
        for seg in &tapped.segments {
            whole.extend_from_slice(seg.raw());
        }
        let pushed = lock(&m.queue).push(Item::frames(whole.freeze()));
        if pushed == Pushed::Full {
            self.metrics
                .queue_full(SHADOW, Queue::Mirror, QueueAction::Drop, 1);
            self.metrics.mirror_dropped(len);
            debug!(bytes = len, "mirror queue full; frames not mirrored");
        } else {
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
                let window = lock(&m.cmp).window();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{build, Tap};
    use std::time::Duration;

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
            tasks: Tasks::default(),
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

    #[tokio::test]
    async fn a_queue_full_in_the_middle_of_a_frame_drops_whole_frames_and_the_shadow_stays_aligned()
    {
        let shadow_up = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = shadow_up.local_addr().expect("addr");
        let cfg = Arc::new(
            Config::parse(&format!(
                "[upstream.legacy]\naddress = \"127.0.0.1:1\"\ntls = false\n[upstream.shadow]\naddress = \"{addr}\"\ntls = false\n[dark_launch]\nmode = \"mirror\"\npercent = 100\nmirror_queue_bytes = 4096\n"
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
            tasks: Tasks::default(),
            log: Arc::new(LogLimit::default()),
        };
        let dev = DeviceId([1, 2, 3, 4]);
        let shadow = Shadow::start(&ctx, &sctx, cfg.clone(), dev);
        let mut tap = Tap::new(cfg.protocol.max_frame_len);
        let now = Instant::now();
        let record = build::MeshDevice {
            mesh_id: 1,
            kind: 2,
            state: 1,
            brightness: 50,
            temp: 0,
            rgb: [0; 3],
        };
        let frame = build::mesh_reply(dev, crate::protocol::MsgId([0, 1, 0]), 1, &[record; 20]);
        let half = frame.len() / 2;
        // The mirror task does not run between these calls (one thread, no await), so the
        // queue fills exactly as written here. Read 1: seven frames and half of the eighth.
        let mut reads = vec![[&frame[..]; 7].concat()];
        reads[0].extend_from_slice(&frame[..half]);
        // Read 2: the eighth's rest and three more, which do not fit; read 3: one frame.
        reads.push([&frame[half..], &frame[..], &frame[..], &frame[..]].concat());
        reads.push(frame.to_vec());
        for r in &reads {
            let t = tap.feed(r);
            shadow.observe(Direction::DevToSrv, r, &t, now);
        }
        let dropped = metrics.total("tcp_comm_mirror_dropped_bytes_total", &[]);
        assert_eq!(
            dropped,
            (4 * frame.len()) as f64,
            "four whole frames dropped"
        );
        // The shadow gets the seven frames, then the last one: whole frames, in order.
        let (mut peer, _) = tokio::time::timeout(Duration::from_secs(10), shadow_up.accept())
            .await
            .expect("the mirror dials")
            .expect("accept");
        let want = [&frame[..]; 8].concat();
        let mut got = vec![0u8; want.len()];
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_exact(&mut peer, &mut got),
        )
        .await
        .expect("in time")
        .expect("read");
        assert_eq!(got, want);
        drop(shadow);
        sctx.tasks.close();
        sctx.tasks.wait().await;
    }
}
