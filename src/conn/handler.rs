//! One device connection, from accept to close, as named steps: TLS accept → hello peek →
//! routed slot → route → register → dial → run the chosen path ([`Handler::run`]).
//!
//! Invariants:
//! - A connection is routed only after its first frame has been read, within
//!   `handshake_timeout` (design decision 1); without a valid 0x23 in time it goes to legacy
//!   with `reason="no_handshake"`. Whatever was read is replayed upstream verbatim, as one
//!   write.
//! - The TLS handshake has its own, shorter deadline (`tls_handshake_timeout`), and a
//!   connection that sent nothing at all within `handshake_timeout` is closed without dialling
//!   the add-on. Where the route cannot change the upstream, the dial starts at the device's
//!   first byte and runs beside its TLS handshake and hello (`Handler::early_dial`).
//! - Routing uses the configuration in force once the hello is in (not the one at accept), and
//!   the connection is registered before anything else awaits, then re-checked, so a reload at
//!   any moment finds it.
//! - `tcp_comm_connections_active` stops counting a connection before its close is counted, so
//!   one scrape never shows both.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use openssl::ssl::SslAcceptor;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, field, info, warn};

use super::admission::{Admission, PendingSlot};
use super::legacy::Legacy;
use super::pair::{Pair, Path};
use super::proxy_protocol;
use super::registry::{Registration, Registry};
use super::reliable::SessionCtx;
use super::stop::ConnStop;
use super::tls::{self, Stream};
use super::upstream::{count_handshake, set_keepalive, Dialer};
use super::{CloseReason, Route, Routes, Transport};
use crate::config::Config;
use crate::protocol::{header_data_len_checked, DeviceId, Packet, PacketType};
use crate::telemetry::labels::{Label, Reject};
use crate::telemetry::metrics::Metrics;

/// Everything a connection handler needs, shared by all connections.
pub struct ConnContext {
    /// The control plane: the configuration in force and the route of each connection.
    pub routes: Arc<dyn Routes>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub acceptor: Option<Arc<SslAcceptor>>,
    /// The legacy path's upstream (`[upstream.legacy]`); the new path dials its own
    /// (`reliable.dialer`: `[upstream.new]`, or this one when that is not set).
    pub dialer: Dialer,
    /// The legacy path's shared state (and the dark launch's).
    pub legacy: Legacy,
    /// The new path's shared state.
    pub reliable: SessionCtx,
    pub shutdown: CancellationToken,
    pub admission: Arc<Admission>,
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

/// An upstream dial started before the hello ([`Handler::early_dial`]).
type EarlyDial =
    tokio_util::task::AbortOnDropHandle<Result<Stream, crate::conn::upstream::DialError>>;

/// A routed pair's path, run to its end ([`Handler::run_path`]).
type PathFuture<'a> = std::pin::Pin<Box<dyn Future<Output = CloseReason> + Send + 'a>>;

/// A connection that has been routed and registered: what is left is to dial and run it.
struct Routed {
    cfg: Arc<Config>,
    device_id: Option<DeviceId>,
    route: Route,
    stop: Arc<ConnStop>,
    _registration: Option<Registration>,
}

/// One device connection's handler.
pub struct Handler {
    ctx: Arc<ConnContext>,
    peer: SocketAddr,
    /// The address the device connected to (for a PROXY header), once known.
    local: Option<SocketAddr>,
    accepted_at: Instant,
}

impl Handler {
    pub fn new(ctx: Arc<ConnContext>, peer: SocketAddr) -> Handler {
        Handler {
            ctx,
            peer,
            local: None,
            accepted_at: Instant::now(),
        }
    }

    /// Runs the connection to its end. `slot` is its pre-hello slot, released once routed.
    ///
    /// An `async` block rather than an `async fn`: an `async fn` keeps its arguments and the
    /// locals they are moved into side by side, 0.2 KiB of every connection's task for good.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments and the locals they move to side by side"
    )]
    pub fn run(
        mut self,
        mut tcp: TcpStream,
        mut slot: PendingSlot,
    ) -> impl Future<Output = ()> + Send {
        async move {
            self.local = tcp.local_addr().ok();
            let cfg = self.ctx.routes.config();
            let _ = tcp.set_nodelay(true);
            let _ = set_keepalive(&tcp, cfg.listen.tcp_keepalive);
            let deadline = self.accepted_at + cfg.listen.handshake_timeout;
            // Every phase is boxed: a task's future is as large as its largest state, held for
            // the connection's life, and the phases differ greatly (the TLS accept, the new
            // path's session at ~5 KiB against the legacy path's ~3 KiB). Inline, every idle
            // connection carried 6.3 KiB of future; boxed, the task keeps under 1 KiB plus the
            // state of the phase it is in, and a finished phase's memory goes with it.
            if cfg.listen.expects_proxy_header(self.peer.ip())
                && !Box::pin(self.proxy_header(&mut tcp, &mut slot, &cfg, deadline)).await
            {
                return;
            }
            let early = Box::pin(self.early_dial(&tcp, &cfg, deadline)).await;
            let Some(mut device) = Box::pin(self.tls_accept(tcp, &cfg, deadline)).await else {
                return;
            };
            let Some((first, hello)) = Box::pin(self.peek(&mut device, &cfg, deadline)).await
            else {
                return;
            };
            // Past the hello: from here on a routed slot, not a pre-hello one.
            let Some(_permit) = self.ctx.admission.routed() else {
                self.ctx
                    .admission
                    .refuse(&self.ctx.metrics, Reject::Limit, self.peer);
                return;
            };
            drop(slot);
            let routed = self.route(hello, first.len());
            self.ctx.metrics.connection_started(routed.route.transport);
            let active = ActiveGuard {
                metrics: self.ctx.metrics.clone(),
                transport: routed.route.transport,
            };
            let Some((upstream, dialer)) =
                Box::pin(self.dial(routed.route.transport, routed.device_id, early)).await
            else {
                drop(active);
                self.ctx.metrics.closed(
                    routed.route.transport,
                    CloseReason::UpstreamConnectFailed,
                    false,
                );
                return;
            };
            debug!(
                tls = device.is_tls(),
                cipher = device.cipher_name().unwrap_or("-"),
                "forwarding"
            );
            let started = Instant::now();
            let transport = routed.route.transport;
            let reason = self
                .run_path(&routed, device, (upstream, dialer), first)
                .await;
            // No longer active by the time the close is counted, so a scrape never sees both.
            drop(active);
            self.ctx
                .metrics
                .closed(transport, reason, reason.requested_by_gateway());
            info!(
                reason = reason.label(),
                duration_s = started.elapsed().as_secs_f64(),
                "connection closed"
            );
        }
    }

    /// Reads the balancer's PROXY header (within `proxy_header_timeout`) and takes the
    /// device's address from it; `false` (counted, logged) when the connection ends here.
    async fn proxy_header(
        &mut self,
        tcp: &mut TcpStream,
        slot: &mut PendingSlot,
        cfg: &Config,
        deadline: Instant,
    ) -> bool {
        let until = (self.accepted_at + cfg.listen.proxy_header_timeout).min(deadline);
        let read = tokio::select! {
            _ = self.ctx.shutdown.cancelled() => return false,
            r = tokio::time::timeout_at(until, proxy_protocol::read_header(tcp)) => r,
        };
        let claimed = match read {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.ctx.metrics.rejected(Reject::ProxyHeader);
                warn!(error = %e, "refusing a connection from the balancer: no valid PROXY header (listen.accept_proxy_protocol)");
                return false;
            }
            Err(_) => {
                self.ctx.metrics.rejected(Reject::ProxyHeaderTimeout);
                debug!("no complete PROXY header within listen.proxy_header_timeout");
                return false;
            }
        };
        if let Some((device, local)) = claimed {
            debug!(%device, via = %self.peer, "PROXY header: the device's own address");
            tracing::Span::current().record("peer", field::display(device));
            self.peer = device;
            self.local = Some(local);
        }
        if let Err(reason) = slot.assign_source(self.peer.ip()) {
            self.ctx
                .admission
                .refuse(&self.ctx.metrics, reason, self.peer);
            return false;
        }
        true
    }

    /// TLS accept (when device TLS is on), within `tls_handshake_timeout`.
    async fn tls_accept(&self, tcp: TcpStream, cfg: &Config, deadline: Instant) -> Option<Stream> {
        let Some(acc) = &self.ctx.acceptor else {
            return Some(Stream::Plain(tcp));
        };
        // Devices finish TLS in ~100 ms; the hello may take longer after it.
        let tls_deadline = (self.accepted_at + cfg.listen.tls_handshake_timeout).min(deadline);
        let accepted = tokio::select! {
            _ = self.ctx.shutdown.cancelled() => return None,
            r = tokio::time::timeout_at(tls_deadline, tls::accept(acc, tcp)) => r,
        };
        match accepted {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                self.ctx.metrics.rejected(Reject::TlsHandshake);
                debug!(error = %e, "device TLS handshake failed");
                None
            }
            Err(_) => {
                self.ctx.metrics.rejected(Reject::TlsTimeout);
                debug!("device TLS handshake timed out");
                None
            }
        }
    }

    /// The hello peek; `None` (counted) when the connection ends here.
    async fn peek(
        &self,
        device: &mut Stream,
        cfg: &Config,
        deadline: Instant,
    ) -> Option<(BytesMut, Hello)> {
        let peeked = tokio::select! {
            _ = self.ctx.shutdown.cancelled() => return None,
            r = peek_hello(device, cfg.protocol.max_frame_len, deadline) => r,
        };
        let Some((first, hello)) = peeked else {
            self.ctx.metrics.rejected(Reject::ClosedBeforeHello);
            debug!("device closed before sending anything");
            return None;
        };
        if first.is_empty() {
            // Nothing at all in handshake_timeout: not a device that could be served, and
            // not worth an add-on connection.
            self.ctx.metrics.rejected(Reject::Silent);
            debug!("nothing received within handshake_timeout; closing without dialling");
            return None;
        }
        Some((first, hello))
    }

    /// Routes on the configuration in force now, and registers the connection.
    fn route(&self, hello: Hello, first_len: usize) -> Routed {
        let span = tracing::Span::current();
        let device_id = match hello {
            Hello::Device(id) => {
                span.record("device", field::display(id));
                Some(id)
            }
            Hello::NoHandshake(why) => {
                debug!(why, bytes = first_len, "no valid hello; routing to legacy");
                None
            }
        };
        // The configuration in force now, not the one at accept (the peek can take up to
        // handshake_timeout, and a reload may have come meanwhile).
        let routes = &self.ctx.routes;
        let cfg = routes.config();
        let route = routes.route(&cfg, device_id);
        // Registered before anything awaits, so a reload from here on finds this connection;
        // one that landed between the snapshot above and the registration is caught by
        // re-checking.
        let stop = ConnStop::new(
            &self.ctx.shutdown,
            cfg.routing.drain_grace,
            self.ctx.registry.pacer(),
        );
        let registration = device_id.map(|id| {
            self.ctx
                .registry
                .register(id, route.transport, stop.clone())
        });
        if let Some(id) = device_id {
            if routes.route(&routes.config(), Some(id)).transport != route.transport {
                debug!("routing changed while this connection was being routed; re-homing it");
                stop.rehome();
            }
        }
        span.record("route", route.transport.label());
        self.ctx.metrics.routed(route.transport, route.reason);
        Routed {
            cfg,
            device_id,
            route,
            stop,
            _registration: registration,
        }
    }

    /// Starts dialling the upstream as soon as the device sends its first byte, so the
    /// upstream's connect and TLS handshake overlap the device's TLS handshake and hello
    /// instead of following them (as HAProxy, which dials at accept, does): possible when
    /// the route cannot change where the connection goes or comes from (no `[upstream.new]`,
    /// no source pool). A connection that sends nothing is still never dialled; a dial whose
    /// connection ends before it is routed is dropped with it (aborted, its socket closed).
    async fn early_dial(
        &self,
        tcp: &TcpStream,
        cfg: &Config,
        deadline: Instant,
    ) -> Option<(EarlyDial, Dialer)> {
        if cfg.upstream_new.is_some() {
            return None;
        }
        let (dialer, _) = self.ctx.dialer.for_connection(self.peer, self.local, None);
        if dialer.needs_device() {
            return None;
        }
        // A peek, not `readable()`, which may wake without data.
        let mut one = [0u8; 1];
        let first_byte = tokio::select! {
            _ = self.ctx.shutdown.cancelled() => return None,
            r = tokio::time::timeout_at(deadline, tcp.peek(&mut one)) => r,
        };
        if !matches!(first_byte, Ok(Ok(n)) if n > 0) {
            return None;
        }
        let d = dialer.clone();
        let handle = tokio::spawn(async move { d.dial().await });
        Some((tokio_util::task::AbortOnDropHandle::new(handle), dialer))
    }

    /// This connection's dialer for its path, and its first upstream connection (the early
    /// dial's, when there is one); `None` (counted, logged) when it cannot be reached.
    async fn dial(
        &self,
        transport: Transport,
        device: Option<DeviceId>,
        early: Option<(EarlyDial, Dialer)>,
    ) -> Option<(Stream, Dialer)> {
        let (dialer, dialed) = match early {
            Some((handle, dialer)) => {
                let dialed = match handle.await {
                    Ok(r) => r,
                    // The task was cancelled or panicked: dial again, here.
                    Err(_) => dialer.dial().await,
                };
                (dialer, dialed)
            }
            None => {
                let shared = match transport {
                    Transport::New => &self.ctx.reliable.dialer,
                    _ => &self.ctx.dialer,
                };
                let (dialer, collision) = shared.for_connection(self.peer, self.local, device);
                if let Some(how) = collision {
                    self.ctx.metrics.source_pool_collision(transport, how);
                    debug!(
                        source = ?dialer.source_address(),
                        how = how.label(),
                        "the device's preferred source address is held by another device"
                    );
                }
                let dialed = dialer.dial().await;
                (dialer, dialed)
            }
        };
        match dialed {
            Ok(u) => {
                count_handshake(&self.ctx.metrics, transport, &u);
                Some((u, dialer))
            }
            Err(e) => {
                warn!(error = %e, path = transport.label(), upstream = dialer.address(), "upstream unreachable; closing the device connection");
                self.ctx
                    .metrics
                    .upstream_connect_error(transport, e.label());
                None
            }
        }
    }

    /// The pair's path, run until the pair ends: one box made here and awaited by the task,
    /// with no future of its own around it (an `async fn` here was 0.35 KiB more of every
    /// connection, held for its life). `routed` outlives it in the caller: its registration
    /// is the connection's for as long as it runs.
    fn run_path(
        &self,
        routed: &Routed,
        device: Stream,
        (upstream, dialer): (Stream, Dialer),
        first: BytesMut,
    ) -> PathFuture<'_> {
        let first = first.freeze();
        let (cfg, stop) = (routed.cfg.clone(), routed.stop.clone());
        match (routed.route.transport, routed.device_id) {
            (Transport::New, Some(id)) => Box::pin(self.ctx.reliable.run(Pair {
                device,
                upstream,
                first,
                device_id: id,
                cfg,
                stop,
                dialer,
            })),
            (_, device_id) => Box::pin(self.ctx.legacy.run(Pair {
                device,
                upstream,
                first,
                device_id,
                cfg,
                stop,
                dialer,
            })),
        }
    }
}
