//! The new path's I/O shell: runs one device connection's [`Core`] over real sockets — a
//! device reader, a device writer, and an upstream reader/writer pair that is replaced when
//! the upstream is resumed.
//!
//! Invariants (design decision 7):
//! - The device socket is always being read, whatever the upstream does.
//! - Every decision is the core's; this file only moves bytes and sleeps until the core's
//!   next deadline.
//! - Closing is never abrupt when it can be clean: a device FIN is passed upstream once what it
//!   sent is written, and what the upstream still sends is delivered (half-close, as on
//!   legacy); a drain or re-home closes upstream first. Whatever is still queued when the pair
//!   ends is counted in `tcp_comm_close_dropped_bytes_total`.

use std::io;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use futures_util::Future;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::core::{Core, ReadPermit, SessionCtx, READ_BUF};
use super::resume::{self, Loss};
use super::signal::{Signal, Signals};
use crate::conn::close::{is_reset, CLOSE_GRACE};
use crate::conn::pair::{Pair, Path};
use crate::conn::stop::{ConnStop, Finishing};
use crate::conn::tls::{ReadHalf, Stream};
use crate::conn::upstream::count_handshake;
use crate::conn::{CloseReason, Transport};
use crate::protocol::{header_data_len, DeviceId};
use crate::telemetry::labels::ResumeOutcome;

struct Shared {
    core: Mutex<Core>,
    signals: Signals,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core> {
        // A poisoned lock only means a panic elsewhere mid-update; keep the pair going.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raise(&self, s: Signal) {
        self.signals.raise(s);
    }

    fn wait(&self, s: Signal) -> impl Future<Output = ()> + '_ {
        self.signals.wait(s)
    }
}

#[derive(Debug)]
enum DevEnd {
    Eof,
    Failed(io::Error),
    Close(CloseReason),
}

async fn read_device(mut r: ReadHalf, sh: &Shared) -> DevEnd {
    loop {
        let buf = match r.read_ready(READ_BUF).await {
            Ok(b) if b.is_empty() => return DevEnd::Eof,
            Ok(b) => b,
            Err(e) => return DevEnd::Failed(e),
        };
        let res = sh.core().device_read(&buf, Instant::now());
        sh.raise(Signal::ToUpstream);
        sh.raise(Signal::ToDevice);
        // A reply may have made an older command's copy due at once.
        sh.raise(Signal::Rearm);
        if let Err(reason) = res {
            return DevEnd::Close(reason);
        }
    }
}

/// How the device writer ended: it passed the FIN on after the last bytes, or a write failed.
enum DevWriteEnd {
    Finished,
    Failed(io::Error),
}

async fn write_device<W: AsyncWrite + Unpin>(mut w: W, sh: &Shared) -> DevWriteEnd {
    loop {
        let chunk = loop {
            let (next, done) = {
                let mut core = sh.core();
                let next = core.take_for_device(Instant::now());
                (next, core.device_write_done())
            };
            if let Some(b) = next {
                break b;
            }
            if done {
                let _ = w.shutdown().await;
                return DevWriteEnd::Finished;
            }
            sh.wait(Signal::ToDevice).await;
        };
        sh.raise(Signal::Room);
        // The stuck-device deadline may now be the session's next wake-up.
        sh.raise(Signal::Rearm);
        if let Err(e) = w.write_all(&chunk).await {
            return DevWriteEnd::Failed(e);
        }
        if let Err(e) = w.flush().await {
            return DevWriteEnd::Failed(e);
        }
        sh.core().device_written();
    }
}

async fn write_upstream<W: AsyncWrite + Unpin>(
    mut w: W,
    replay: Option<Bytes>,
    sh: &Shared,
) -> io::Error {
    if let Some(preamble) = replay {
        if let Err(e) = w.write_all(&preamble).await {
            return e;
        }
    }
    loop {
        if let Err(e) = w.flush().await {
            return e;
        }
        let batch = loop {
            let (next, done) = {
                let mut core = sh.core();
                let next = core.take_for_upstream(Instant::now());
                (next, core.upstream_write_done())
            };
            if let Some(b) = next {
                break b;
            }
            if done {
                // Everything the device sent is written: pass its FIN (or ours) on, and let
                // the reader carry what the upstream still sends.
                let _ = w.shutdown().await;
                return std::future::pending().await;
            }
            sh.wait(Signal::ToUpstream).await;
        };
        // One device read, one write (protocol §14.5).
        if let Err(e) = w.write_all(&batch).await {
            return e;
        }
        sh.core().upstream_written();
    }
}

async fn read_upstream(mut r: ReadHalf, sh: &Shared) -> io::Error {
    loop {
        let limit = loop {
            let permit = sh.core().upstream_read_permit(Instant::now());
            match permit {
                ReadPermit::Read(n) => break n,
                ReadPermit::WaitUntil(t) => {
                    // Boxed: a `Sleep` inline would be 112 bytes of every session's upstream
                    // future for good, for a wait only a full device queue brings.
                    tokio::select! {
                        _ = sh.wait(Signal::Room) => {}
                        _ = Box::pin(tokio::time::sleep_until(t)) => {}
                    }
                }
            }
        };
        if sh.core().rejecting() {
            // Reading only to reject: let the session's timers (the stuck-device limit among
            // them) run between reads, however fast the add-on writes.
            tokio::task::yield_now().await;
        }
        let buf = match r.read_ready(limit.min(READ_BUF)).await {
            Ok(b) if b.is_empty() => return io::ErrorKind::UnexpectedEof.into(),
            Ok(b) => b,
            Err(e) => return e,
        };
        let rearm = sh.core().upstream_read(&buf, Instant::now());
        sh.raise(Signal::ToDevice);
        if rearm {
            sh.raise(Signal::Rearm);
        }
    }
}

/// Runs one upstream connection until it fails either way; the session then resumes.
async fn upstream_io(stream: Stream, replay: Option<Bytes>, sh: &Shared) -> io::Error {
    let (r, w) = stream.split();
    tokio::select! {
        e = write_upstream(w, replay, sh) => e,
        e = read_upstream(r, sh) => e,
    }
}

type UpFuture<'a> = Pin<Box<dyn Future<Output = io::Error> + Send + 'a>>;
type RedialFuture<'a> = Pin<
    Box<dyn Future<Output = (Result<Stream, crate::conn::upstream::DialError>, u32)> + Send + 'a>,
>;

/// The close reason for an upstream that ended with `e` where legacy would have closed the
/// device side too.
fn upstream_end_reason(e: &io::Error) -> CloseReason {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        CloseReason::UpstreamClosed
    } else if is_reset(e) {
        CloseReason::UpstreamReset
    } else {
        CloseReason::UpstreamError
    }
}

/// Runs the session until the device leaves, the pair is closed, or a drain completes.
/// `first` holds the bytes already read from the device (starting with its 0x23).
///
/// An `async` block, not an `async fn`, and the pair used where it lies: an `async fn` keeps
/// its arguments and the locals they are moved into side by side, and a `let Pair { .. }`
/// would copy every field once more; each copy was 0.3 KiB of every idle session's future.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments and the locals they move to side by side"
)]
pub fn serve(
    ctx: &SessionCtx,
    pair: Pair<DeviceId>,
) -> impl Future<Output = CloseReason> + Send + '_ {
    async move {
        let stop: &ConnStop = &pair.stop;
        let first = &pair.first;
        let hello_len = header_data_len(first).map_or(first.len(), |d| (5 + d).min(first.len()));
        let half_close = pair.cfg.protocol.half_close_timeout;
        let now = Instant::now();
        // The core is built in place in its mutex, and the futures below pinned where they are
        // made: a value moved after being built kept its first slot too, in every session's
        // future for the connection's life (1.6 KiB for the core alone).
        let sh = Shared {
            core: Mutex::new(Core::new(
                Transport::New,
                ctx,
                pair.cfg.clone(),
                pair.device_id,
                first.slice(..hello_len),
                now,
            )),
            signals: Signals::new(),
        };
        {
            let mut core = sh.core();
            if let Err(reason) = core.device_read(first, now) {
                core.close(now);
                return reason;
            }
        }
        let device_id = pair.device_id;
        let dialer = &pair.dialer;
        let (dev_r, dev_w) = pair.device.split();
        let mut dev_read = std::pin::pin!(read_device(dev_r, &sh));
        let mut dev_write = std::pin::pin!(write_device(dev_w, &sh));
        let mut up: Option<UpFuture<'_>> = Some(Box::pin(upstream_io(pair.upstream, None, &sh)));
        let mut redial: Option<RedialFuture<'_>> = None;
        let mut finishing = Finishing::new(stop);
        // Once the pair is finishing: the reason it will close with, and by when at the latest.
        let mut finish: Option<(CloseReason, Instant)> = None;
        let mut device_eof = false;
        // This device's redial spread, 0.8-1.2, the same at every outage.
        let spread = 0.8 + f64::from(u32::from_be_bytes(device_id.0) % 401) / 1000.0;

        // The loop turns on every device read and write (each re-arms it), so its two
        // long-lived waits are made once: a fresh `Sleep` per turn registered and cancelled a
        // timer each time, and a fresh `cancelled()` a waiter under the token's lock. The one
        // timer serves the core, the close deadline and the drain's next look: each `Sleep` more
        // was 112 bytes of every idle session.
        let mut stopping = std::pin::pin!(stop.token().cancelled());
        let mut armed = sh.core().next_wake();
        let mut timer = std::pin::pin!(tokio::time::sleep_until(armed));
        let mut fired = false;
        let reason = loop {
            let wake = [finish.map(|(_, t)| t), finishing.next_look()]
                .into_iter()
                .flatten()
                .fold(sh.core().next_wake(), Instant::min);
            if wake != armed || fired {
                timer.as_mut().reset(wake);
                armed = wake;
                fired = false;
            }
            tokio::select! {
                end = &mut dev_read, if !device_eof => match end {
                    DevEnd::Eof => {
                        device_eof = true;
                        if up.is_none() {
                            break finish.map_or(CloseReason::DeviceClosed, |(r, _)| r);
                        }
                        sh.core().device_finished();
                        sh.raise(Signal::ToUpstream);
                        if finish.is_none() {
                            finish = Some((CloseReason::DeviceClosed, Instant::now() + half_close));
                        }
                    }
                    DevEnd::Failed(e) if is_reset(&e) => break CloseReason::DeviceReset,
                    DevEnd::Failed(_) => break CloseReason::DeviceError,
                    DevEnd::Close(r) => break r,
                },
                end = &mut dev_write => match end {
                    DevWriteEnd::Finished => break finish.map_or(CloseReason::UpstreamClosed, |(r, _)| r),
                    DevWriteEnd::Failed(e) if is_reset(&e) => break CloseReason::DeviceReset,
                    DevWriteEnd::Failed(_) => break CloseReason::DeviceError,
                },
                e = async { match up.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if up.is_some() => {
                    up = None;
                    if finish.is_some() {
                        // Finishing: the upstream answered the FIN (or failed); the device gets
                        // what is queued, then its FIN.
                        sh.core().upstream_finished();
                        sh.raise(Signal::ToDevice);
                        continue;
                    }
                    let loss = sh.core().upstream_lost(Instant::now());
                    sh.raise(Signal::ToDevice);
                    match loss {
                        Loss::Resume { attempts, within } => {
                            info!(error = %e, "upstream lost under a live device; resuming");
                            redial = Some(Box::pin(resume::redial(dialer, attempts, within, spread)));
                        }
                        ended => {
                            let (outcome, reason) = match ended {
                                Loss::NotEstablished => {
                                    debug!(error = %e, "upstream closed before it answered the hello; closing the device connection");
                                    (ResumeOutcome::NotEstablished, upstream_end_reason(&e))
                                }
                                Loss::Kicked => {
                                    info!(error = %e, "upstream closed the connection again right after a resumption (on purpose); closing the device connection");
                                    (ResumeOutcome::Kicked, upstream_end_reason(&e))
                                }
                                Loss::Refused => {
                                    info!(error = %e, "redialled upstreams closed twice before answering the replayed hello; closing the device connection");
                                    (ResumeOutcome::Refused, upstream_end_reason(&e))
                                }
                                Loss::MidFrame => {
                                    info!(error = %e, "upstream lost while the device had part of a frame; closing the device connection");
                                    (ResumeOutcome::MidFrame, upstream_end_reason(&e))
                                }
                                _ => (ResumeOutcome::Failed, CloseReason::ResumeFailed),
                            };
                            sh.core().resumption(outcome);
                            // As on legacy: what the upstream sent reaches the device, then the FIN.
                            sh.core().upstream_finished();
                            sh.raise(Signal::ToDevice);
                            finish = Some((reason, Instant::now() + CLOSE_GRACE));
                        }
                    }
                }
                r = async { match redial.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if redial.is_some() => {
                    redial = None;
                    match r {
                        (Ok(stream), used) => {
                            count_handshake(&ctx.metrics, Transport::New, &stream);
                            let replay = sh.core().upstream_redialed(used, Instant::now());
                            up = Some(Box::pin(upstream_io(stream, Some(replay), &sh)));
                        }
                        (Err(e), used) => {
                            sh.core().redial_failed(used);
                            warn!(error = %e, "upstream resumption failed; closing the device connection");
                            ctx.metrics.upstream_connect_error(Transport::New, &e);
                            sh.core().resumption(ResumeOutcome::Failed);
                            break CloseReason::ResumeFailed;
                        }
                    }
                }
                _ = sh.wait(Signal::Rearm) => {}
                _ = &mut timer => {
                    fired = true;
                    let now = Instant::now();
                    let r = sh.core().tick(now);
                    sh.raise(Signal::ToDevice);
                    if let Err(reason) = r {
                        break reason;
                    }
                    if let Some((r, by)) = finish {
                        if now >= by {
                            break if r == CloseReason::DeviceClosed { CloseReason::HalfCloseTimeout } else { r };
                        }
                    }
                    if finishing.look_due(now) {
                        let pending = sh.core().pending_commands();
                        if let Some(r) = finishing.check(pending, now) {
                            // Already half-closed, or no upstream to close first: close now.
                            if up.is_none() || finish.is_some() { break r; }
                            sh.core().begin_close();
                            sh.raise(Signal::ToUpstream);
                            finish = Some((r, now + CLOSE_GRACE));
                        }
                    }
                }
                _ = &mut stopping, if !finishing.requested() => {
                    let now = Instant::now();
                    let pending = sh.core().pending_commands();
                    if let Some(r) = finishing.begin(pending, now) {
                        if up.is_none() || finish.is_some() { break r; }
                        sh.core().begin_close();
                        sh.raise(Signal::ToUpstream);
                        finish = Some((r, now + CLOSE_GRACE));
                    }
                }
            }
        };
        sh.core().close(Instant::now());
        reason
    }
}

impl Path for SessionCtx {
    type Id = DeviceId;

    fn run(&self, pair: Pair<DeviceId>) -> impl Future<Output = CloseReason> + Send {
        serve(self, pair)
    }
}
