//! HTTP endpoints on the metrics address (:9400 by default): `/metrics`, `/healthz`, `/readyz`,
//! and `/`, the status page, which the control plane renders (through [`StatusPage`], so this
//! layer knows nothing of what it shows). The admin API is elsewhere: a Unix socket
//! (`control::admin`).
//!
//! Invariants:
//! - Readiness is a latch that only goes up once the device listener is bound and comes down
//!   for good when a drain starts, so a load balancer stops sending new devices before any
//!   connection is closed.
//! - `/healthz` answers 200 for as long as the process serves HTTP: it reports liveness only.
//! - The server takes an already-bound listener and stops when its token is cancelled, which
//!   the daemon does only after the drain, so scrapes keep working while draining.
//! - Bounded: at most `listen.http_max_connections` at once (more are closed at accept,
//!   counted), and a client has `listen.http_header_timeout` to send its request headers, so
//!   idle or half-sent requests cannot hold file descriptors the device listener needs.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::metrics::Metrics;
use super::tasks::Tasks;

/// Readiness state shared by the daemon and the HTTP server.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    pub fn set_ready(&self) {
        if !self.draining.load(Ordering::SeqCst) {
            self.ready.store(true, Ordering::SeqCst);
        }
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.ready.store(false, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }
}

/// Renders the status page served at `/` (an HTML document).
pub trait StatusPage: Send + Sync {
    fn render(&self) -> Pin<Box<dyn Future<Output = String> + Send + '_>>;
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn route(req: &Request<Incoming>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n", PLAIN);
    }
    match req.uri().path() {
        "/metrics" => {
            metrics.set_ready(health.is_ready());
            match metrics.render() {
                Ok(body) => text(
                    StatusCode::OK,
                    body,
                    "text/plain; version=0.0.4; charset=utf-8",
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"), PLAIN),
            }
        }
        "/" => text(
            StatusCode::NOT_FOUND,
            "no status page here: try /metrics, /healthz, /readyz\n",
            PLAIN,
        ),
        "/healthz" => text(StatusCode::OK, "ok\n", PLAIN),
        "/readyz" => {
            if health.is_ready() {
                text(StatusCode::OK, "ready\n", PLAIN)
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n", PLAIN)
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz\n",
            PLAIN,
        ),
    }
}

/// Limits of the HTTP endpoint.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// A client that has not sent its request headers within this is disconnected.
    pub header_timeout: Duration,
    /// Connections served at once; further ones are closed at accept.
    pub max_connections: usize,
}

/// Serves the metrics/health endpoints (and the status page at `/`, with `page`) until
/// `stop` is cancelled.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    page: Option<Arc<dyn StatusPage>>,
    limits: HttpLimits,
    tasks: Tasks,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Idle or half-sent requests cannot pile up: each holds one of a few slots, for at
        // most the header timeout.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.http_rejected();
            debug!(%peer, "HTTP connection limit reached; closing");
            drop(tcp);
            continue;
        };
        let metrics = metrics.clone();
        let health = health.clone();
        let page = page.clone();
        let stop = stop.clone();
        tasks.spawn("http-connection", async move {
            let _slot = slot;
            let svc = service_fn(move |req: Request<Incoming>| {
                let page = page
                    .clone()
                    .filter(|_| req.uri().path() == "/" && req.method() == Method::GET);
                let resp = page.is_none().then(|| route(&req, &metrics, &health));
                async move {
                    Ok::<_, Infallible>(match (resp, page) {
                        (Some(r), _) => r,
                        (None, Some(p)) => {
                            text(StatusCode::OK, p.render().await, "text/html; charset=utf-8")
                        }
                        (None, None) => text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "no page\n",
                            "text/plain; charset=utf-8",
                        ),
                    })
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "metrics connection error"); },
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}
