//! The device-facing accept loop: accepts, takes a pre-hello slot for the connection (or
//! refuses it), and hands it to a [`Handler`] on the shutdown task tracker.
//!
//! Invariants:
//! - The listener is handed in already bound (tests bind port 0); [`bind`] binds one with the
//!   accept queue asked for, not the standard library's 128.
//! - Accept errors (out of file descriptors, say) never end the loop: they are logged and
//!   retried with a short backoff.
//! - On shutdown the accept loop stops at once (the listening socket closes) while accepted
//!   connections drain on their own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::tasks::Tasks;
use tokio::net::{TcpListener, TcpSocket};
use tracing::{debug, field, warn, Instrument};

use super::handler::{ConnContext, Handler};

/// Binds a listening socket on `addr` with an accept queue of `backlog` (the kernel caps it at
/// `net.core.somaxconn`), address reuse on as `TcpListener::bind` has it, so a restart does
/// not wait for the old socket's TIME_WAIT connections. Needs a runtime.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

pub struct Listener {
    listener: TcpListener,
    ctx: Arc<ConnContext>,
    tasks: Tasks,
}

impl Listener {
    pub fn new(listener: TcpListener, ctx: Arc<ConnContext>, tasks: Tasks) -> Listener {
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
            // Behind a balancer the source is known only after the PROXY header: the
            // per-source limit waits for it.
            let admitted = if self
                .ctx
                .routes
                .config()
                .listen
                .expects_proxy_header(peer.ip())
            {
                self.ctx.admission.pending_unsourced()
            } else {
                self.ctx.admission.pending(peer.ip())
            };
            let slot = match admitted {
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
                .tracker()
                .spawn(Handler::new(ctx, peer).run(tcp, slot).instrument(span));
        }
        debug!("device listener stopped accepting");
    }
}
