//! Device-facing accept loop and the per-connection handler: connection limit, TLS accept,
//! handshake peek (design decision 1), routing, upstream dial, then the chosen path.
//!
//! Invariants:
//! - The listener is handed in already bound (tests bind port 0).
//! - A connection is routed only after its first frame has been read, within
//!   `handshake_timeout`; without a valid 0x23 in time it goes to legacy with
//!   `reason="no_handshake"`. Whatever was read is replayed upstream verbatim, as one write.
//! - Two budgets ([`Admission`]): from accept until its hello a connection holds a pre-hello
//!   slot (`listen.max_pending`, at most `max_pending_per_source` per source address), so a
//!   flood of stalled handshakes cannot take the slots devices need; once routed it holds one
//!   of `listen.max_connections` for its whole life. A refused connection is closed at once,
//!   counted by reason, and logged at most once per [`LIMIT_LOG_EVERY`].
//! - The TLS handshake has its own, shorter deadline (`tls_handshake_timeout`), and a
//!   connection that sent nothing at all within `handshake_timeout` is closed without dialling
//!   the add-on.
//! - On shutdown the accept loop stops at once (the listening socket closes) while accepted
//!   connections drain on their own.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use openssl::ssl::SslAcceptor;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, field, info, warn, Instrument};

use crate::legacy::{self, Observer};
use crate::metrics::{Metrics, Transport};
use crate::protocol::{header_data_len_checked, DeviceId, Packet, PacketType};
use crate::rehome::{ConnStop, Registry};
use crate::reliable::{self, SessionCtx};
use crate::reload::Live;
use crate::router;
use crate::shadow::{Shadow, ShadowCtx};
use crate::tls::{self, Stream};
use crate::transactions::Tracker;
use crate::upstream::Dialer;

/// Minimum spacing of "connection limit reached" warnings.
pub const LIMIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Everything a connection handler needs, shared by all connections.
pub struct ConnContext {
    /// The configuration in force; a connection routes and runs on the snapshot it takes once
    /// its hello has been read.
    pub live: Arc<Live>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub acceptor: Option<Arc<SslAcceptor>>,
    pub legacy: Dialer,
    /// The new path's shared state; it dials the same add-on.
    pub reliable: SessionCtx,
    /// Dark launch: where mirror mode replays device traffic, and what shadows share.
    pub shadow: ShadowCtx,
    pub shutdown: CancellationToken,
    pub admission: Arc<Admission>,
}

pub struct Listener {
    listener: TcpListener,
    ctx: Arc<ConnContext>,
    tasks: TaskTracker,
}

/// The admission budgets: routed connections, and the smaller pre-hello budget (overall and
/// per source address) that a connection holds from accept until its hello has been read.
pub struct Admission {
    routed: Arc<Semaphore>,
    pending: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    max_per_source: usize,
    /// Refusals since the last warning, and when that was.
    refused: Mutex<(u64, Option<Instant>)>,
}

/// A pre-hello slot: one of `max_pending`, and one of its source's. Released on drop.
pub struct PendingSlot {
    admission: Arc<Admission>,
    source: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut map = self
            .admission
            .per_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

impl Admission {
    pub fn new(listen: &crate::config::Listen) -> Arc<Admission> {
        Arc::new(Admission {
            routed: Arc::new(Semaphore::new(listen.max_connections)),
            pending: Arc::new(Semaphore::new(listen.max_pending)),
            per_source: Mutex::new(HashMap::new()),
            max_per_source: listen.max_pending_per_source,
            refused: Mutex::new((0, None)),
        })
    }

    /// A pre-hello slot for a connection from `source`, or why there is none.
    fn pending(self: &Arc<Self>, source: IpAddr) -> Result<PendingSlot, &'static str> {
        let mut map = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            if *n == 0 {
                map.remove(&source);
            }
            return Err("source_limit");
        }
        let permit = self
            .pending
            .clone()
            .try_acquire_owned()
            .map_err(|_| "pending_limit")?;
        *n += 1;
        Ok(PendingSlot {
            admission: self.clone(),
            source,
            _permit: permit,
        })
    }

    /// Pre-hello slots free now.
    pub fn pending_free(&self) -> usize {
        self.pending.available_permits()
    }

    /// Routed slots free now.
    pub fn routed_free(&self) -> usize {
        self.routed.available_permits()
    }

    /// Counts a refusal and warns at most every [`LIMIT_LOG_EVERY`], with how many were
    /// refused meanwhile.
    fn refuse(&self, metrics: &Metrics, reason: &'static str, peer: SocketAddr) {
        metrics
            .connections_rejected
            .with_label_values(&[reason])
            .inc();
        let mut r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        r.0 += 1;
        if r.1.map_or(true, |t| t.elapsed() >= LIMIT_LOG_EVERY) {
            warn!(
                %peer,
                reason,
                refused = r.0,
                "refusing new device connections: a connection budget is full (listen.max_connections, max_pending, max_pending_per_source)"
            );
            *r = (0, Some(Instant::now()));
        }
    }
}

impl Listener {
    pub fn new(listener: TcpListener, ctx: Arc<ConnContext>, tasks: TaskTracker) -> Listener {
        Listener {
            listener,
            ctx,
            tasks,
        }
    }

    /// Accepts until shutdown. Accept errors (e.g. out of file descriptors) are logged and
    /// retried with a short backoff rather than ending the daemon.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => break,
                r = self.listener.accept() => r,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => {
                    backoff = Duration::from_millis(10);
                    x
                }
                Err(e) => {
                    warn!(error = %e, "accept failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let slot = match self.ctx.admission.pending(peer.ip()) {
                Ok(s) => s,
                Err(reason) => {
                    self.ctx.admission.refuse(&self.ctx.metrics, reason, peer);
                    drop(tcp);
                    continue;
                }
            };
            let ctx = self.ctx.clone();
            let span = tracing::info_span!(
                "conn",
                %peer,
                device = field::Empty,
                route = field::Empty
            );
            self.tasks
                .spawn(handle(ctx, tcp, peer, slot).instrument(span));
        }
        debug!("device listener stopped accepting");
    }
}

/// What the handshake peek found.
#[derive(Debug)]
pub enum Hello {
    /// A valid 0x23 with this device id.
    Device(DeviceId),
    /// No valid 0x23 first frame in time.
    NoHandshake(&'static str),
}

/// Reads until the first frame is complete (or time runs out) and identifies the device.
/// Returns the bytes read (to be replayed) and what they held; `None` when the device closed or
/// failed before sending anything usable.
pub async fn peek_hello(
    stream: &mut Stream,
    max_frame_len: usize,
    deadline: Instant,
) -> Option<(BytesMut, Hello)> {
    let mut buf = BytesMut::with_capacity(64);
    loop {
        match header_data_len_checked(&buf, max_frame_len) {
            Some(Err(())) => return Some((buf, Hello::NoHandshake("oversized_first_frame"))),
            Some(Ok(total)) if buf.len() >= total => {
                let first = buf.clone().split_to(total).freeze();
                let hello = match Packet::parse(first, max_frame_len) {
                    Ok(p) if p.ptype() == PacketType::Hello => match p.id() {
                        Some(id) => Hello::Device(id),
                        None => Hello::NoHandshake("malformed_hello"),
                    },
                    Ok(_) => Hello::NoHandshake("first_frame_not_hello"),
                    Err(_) => Hello::NoHandshake("malformed_first_frame"),
                };
                return Some((buf, hello));
            }
            _ => {}
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => return Some((buf, Hello::NoHandshake("timeout"))),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return if buf.is_empty() {
                    None
                } else {
                    Some((buf, Hello::NoHandshake("closed_early")))
                };
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// Decrements the active-connections gauge however the handler ends.
struct ActiveGuard {
    metrics: Arc<Metrics>,
    transport: Transport,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.metrics.connection_ended(self.transport);
    }
}

async fn handle(ctx: Arc<ConnContext>, tcp: TcpStream, peer: SocketAddr, slot: PendingSlot) {
    let _ = tcp.set_nodelay(true);
    let cfg = ctx.live.config();
    let _ = crate::upstream::set_keepalive(&tcp, cfg.listen.tcp_keepalive);
    let metrics = &ctx.metrics;
    let accepted_at = Instant::now();
    let deadline = accepted_at + cfg.listen.handshake_timeout;
    let mut device = match &ctx.acceptor {
        None => Stream::Plain(tcp),
        Some(acc) => {
            // Devices finish TLS in ~100 ms; the hello may take longer after it.
            let tls_deadline = (accepted_at + cfg.listen.tls_handshake_timeout).min(deadline);
            let accepted = tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                r = tokio::time::timeout_at(tls_deadline, tls::accept(acc, tcp)) => r,
            };
            match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    metrics
                        .connections_rejected
                        .with_label_values(&["tls_handshake"])
                        .inc();
                    debug!(error = %e, "device TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics
                        .connections_rejected
                        .with_label_values(&["tls_timeout"])
                        .inc();
                    debug!("device TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let peeked = tokio::select! {
        _ = ctx.shutdown.cancelled() => return,
        r = peek_hello(&mut device, cfg.protocol.max_frame_len, deadline) => r,
    };
    let Some((first, hello)) = peeked else {
        metrics
            .connections_rejected
            .with_label_values(&["closed_before_hello"])
            .inc();
        debug!("device closed before sending anything");
        return;
    };
    if first.is_empty() {
        // Nothing at all in handshake_timeout: not a device that could be served, and not
        // worth an add-on connection.
        metrics
            .connections_rejected
            .with_label_values(&["silent"])
            .inc();
        debug!("nothing received within handshake_timeout; closing without dialling");
        return;
    }
    // Past the hello: from here on a routed slot, not a pre-hello one.
    let _permit = match ctx.admission.routed.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            ctx.admission.refuse(metrics, "limit", peer);
            return;
        }
    };
    drop(slot);
    let span = tracing::Span::current();
    let device_id = match hello {
        Hello::Device(id) => {
            span.record("device", field::display(id));
            Some(id)
        }
        Hello::NoHandshake(why) => {
            debug!(
                why,
                bytes = first.len(),
                "no valid hello; routing to legacy"
            );
            None
        }
    };
    // Route on the configuration in force now, not the one at accept (the peek can take up
    // to handshake_timeout, and a reload may have come meanwhile).
    let cfg = ctx.live.config();
    let route = router::route(device_id, &cfg.routing, ctx.live.latched());
    let (transport, reason) = (route.transport, route.reason.label());
    // Registered before anything awaits, so a reload from here on finds this connection; one
    // that landed between the snapshot above and the registration is caught by re-checking.
    let stop = ConnStop::new(&ctx.shutdown, cfg.routing.drain_grace, ctx.registry.pacer());
    let _registration = device_id.map(|id| ctx.registry.register(id, transport, stop.clone()));
    if let Some(id) = device_id {
        let now = router::route(Some(id), &ctx.live.config().routing, ctx.live.latched());
        if now.transport != transport {
            debug!("routing changed while this connection was being routed; re-homing it");
            stop.rehome();
        }
    }
    span.record("route", transport.label());
    metrics
        .routing_decisions
        .with_label_values(&[transport.label(), reason])
        .inc();
    metrics.connection_started(transport);
    let active = ActiveGuard {
        metrics: metrics.clone(),
        transport,
    };

    let upstream = match ctx.legacy.dial().await {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %e, "legacy upstream unreachable; closing the device connection");
            metrics
                .upstream_connect_errors
                .with_label_values(&[transport.label(), e.reason()])
                .inc();
            drop(active);
            metrics
                .connection_closes
                .with_label_values(&[transport.label(), "upstream_connect_failed"])
                .inc();
            return;
        }
    };
    let started = Instant::now();
    debug!(
        tls = device.is_tls(),
        cipher = device.cipher_name().unwrap_or("-"),
        "forwarding"
    );
    let reason = match (transport, device_id) {
        (Transport::New, Some(id)) => {
            reliable::run(
                &ctx.reliable,
                cfg.clone(),
                id,
                device,
                upstream,
                first.freeze(),
                &stop,
            )
            .await
        }
        _ => {
            let obs = Observer::new(
                transport,
                device_id,
                metrics.clone(),
                Tracker::new(cfg.protocol.command_deadline, cfg.protocol.reply_timeout),
                cfg.protocol.max_frame_len,
            );
            let obs = match device_id {
                Some(id) if router::shadowed(id, &cfg.dark_launch) => {
                    debug!(mode = ?cfg.dark_launch.mode, "dark launch: shadowing this connection");
                    obs.with_shadow(Shadow::start(&ctx.reliable, &ctx.shadow, cfg.clone(), id))
                }
                _ => obs,
            };
            legacy::run(
                device,
                upstream,
                &first,
                &obs,
                &stop,
                legacy::Timers {
                    idle: cfg.legacy.idle_timeout,
                    half_close: cfg.protocol.half_close_timeout,
                },
            )
            .await
        }
    };
    // No longer active by the time the close is counted, so a scrape never sees both.
    drop(active);
    metrics
        .connection_closes
        .with_label_values(&[transport.label(), reason.label()])
        .inc();
    info!(
        reason = reason.label(),
        duration_s = started.elapsed().as_secs_f64(),
        "connection closed"
    );
}
