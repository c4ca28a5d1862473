//! HTTP endpoints: `/metrics`, `/healthz` and `/readyz` on the metrics address (:9400 by
//! default). The runbook admin API (:9401) joins this file when its commands exist.
//!
//! Invariants:
//! - Readiness is a latch that only goes up once the device listener is bound and comes down
//!   for good when a drain starts, so a load balancer stops sending new devices before any
//!   connection is closed.
//! - `/healthz` answers 200 for as long as the process serves HTTP: it reports liveness only.
//! - The server takes an already-bound listener and stops when its token is cancelled, which
//!   the daemon does only after the drain, so scrapes keep working while draining.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;

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
            metrics.ready.set(i64::from(health.is_ready()));
            match metrics.render() {
                Ok(body) => text(
                    StatusCode::OK,
                    body,
                    "text/plain; version=0.0.4; charset=utf-8",
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"), PLAIN),
            }
        }
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

/// Serves the metrics/health endpoints until `stop` is cancelled.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let health = health.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = route(&req, &metrics, &health);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "metrics connection error"); },
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}
