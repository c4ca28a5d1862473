//! The admin API: what the runbook commands (`cync-gateway status`, `rollback`, `resume`,
//! `history`, `set-canary`, `reload`) ask the running daemon, over a Unix socket — and, when
//! `admin.listen` is set, over TCP too, where mutations need the bearer token.
//!
//! - `GET /status` — [`Status`]: configured and effective percentage, the latch (since when,
//!   why, by whom), per path its connections, commands, success and budget, and the last
//!   rollback check;
//! - `GET /history?limit=N` — the audit log's newest entries;
//! - `GET /report` — the rollout so far ([`super::report`]);
//! - `GET /trace?device=ID&failures=1` — every finished command from now on, one JSON line
//!   each ([`crate::telemetry::trace::CommandEvent`]), streamed until the client goes;
//! - `POST /rollback` `{"reason": "…"}`, `POST /resume` `{"reason": "…"}`, `POST /reload`;
//! - `POST /promote` `{"force": false, "reason": "…"}` — the next of `rollout.stages`, refused
//!   (409, saying which gate) while latched or while a gate fails (`force` skips all but the
//!   latch);
//! - `POST /alertmanager` — an Alertmanager webhook: a firing alert labelled
//!   `cync_rollback="true"` sets the latch (cause `alert`, actor `alertmanager`), so a
//!   fleet-wide rule in Prometheus can roll an instance back. Resolved alerts change nothing
//!   (only a person resumes).
//!
//! Invariants:
//! - The socket is mode 0600, owned by the daemon's user: its permissions are the
//!   authentication, as with HAProxy's stats socket. A stale socket left by a crash is
//!   replaced; a live one (another daemon on the same `state_dir`) stops the start.
//! - On TCP every mutating request (every POST), and `GET /trace` (a held-open stream of every
//!   device's commands), needs `Authorization: Bearer <token>`, the
//!   token read from `admin.token_file` at start and compared in constant time; without it, or
//!   with a wrong one, the answer is 401 and nothing changes. `check-config` refuses a TCP
//!   listener without a token file, and a non-loopback one without `admin.allow_remote`.
//! - Mutations only send [`Control`] events (origin [`Origin::Operator`], actor `admin` in the
//!   audit log); the control task applies them. The answer says what was asked, and the next
//!   `status` shows what it did.
//! - A bad request gets a 4xx with a message saying what to send; nothing here panics on
//!   input, and bodies are capped ([`MAX_BODY`]).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;
use tokio::net::UnixListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::audit;
use super::event::{Control, ControlTx, Origin, RollbackCause};
use super::live::Live;
use super::rollback::LastCheckCell;
use super::rollout::{Rollouts, View as RolloutView};
use super::router;
use super::slo_task::SloService;
use super::state::{self, LatchLoad};
use crate::telemetry::labels::{Label, Transport};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::slo::Slo;
use crate::telemetry::tasks::Tasks;

/// Request bodies larger than this are refused (a reason is a sentence, not a file).
pub const MAX_BODY: usize = 16 * 1024;

/// Reasons longer than this are refused: they go into logs, the audit log and a webhook.
pub const MAX_REASON: usize = 500;

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {0}: another cync-gateway is serving it (same state_dir?)")]
    InUse(PathBuf),
}

/// Binds the admin socket at `path` (mode 0600), replacing a stale one.
pub async fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let io = |source| AdminError::Io {
        path: path.to_path_buf(),
        source,
    };
    if tokio::fs::symlink_metadata(path).await.is_ok() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(AdminError::InUse(path.to_path_buf()));
        }
        // Left by a process that is gone: nobody answers on it.
        tokio::fs::remove_file(path).await.map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .await
        .map_err(io)?;
    Ok(listener)
}

/// What the admin API reads and sends.
pub struct Admin {
    pub live: Arc<Live>,
    pub metrics: Arc<Metrics>,
    pub slo: Arc<SloService>,
    pub last_check: LastCheckCell,
    pub control: ControlTx,
    pub rollouts: Arc<Rollouts>,
}

/// The rollback latch as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LatchView {
    pub latched: bool,
    /// From the latch file: when, why and by whom it was last set or cleared.
    pub since: Option<String>,
    pub reason: Option<String>,
    pub actor: Option<String>,
}

/// One SLO of one path over one window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WindowView {
    pub window: String,
    pub commands: u64,
    /// Share of commands answered within the deadline; `None` with no commands.
    pub success: Option<f64>,
    /// Share of commands answered within the latency threshold, of those answered in time or
    /// late.
    pub latency: Option<f64>,
}

/// One path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PathView {
    pub transport: String,
    pub connections: u64,
    pub windows: Vec<WindowView>,
    /// Error budget left per SLO (over its period).
    pub budget_remaining: Vec<(String, f64)>,
    /// Success burn rate over 1 h.
    pub success_burn_1h: f64,
    /// Command latency p99 since start, seconds (`None`: no answered command yet).
    #[serde(default)]
    pub p99_s: Option<f64>,
}

/// The last rollback check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckView {
    pub at: String,
    pub result: String,
    pub streak: u32,
    pub max_violations: u32,
    /// The verdict as a person reads it: counts, comparison, each breach and whether it counted.
    pub summary: String,
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub configured_percent: f64,
    pub effective_percent: f64,
    pub latch: LatchView,
    pub rollback_enabled: bool,
    pub check_interval_s: f64,
    pub window_s: f64,
    pub paths: Vec<PathView>,
    pub last_check: Option<CheckView>,
    /// The rollout stage and what gates the next one.
    #[serde(default)]
    pub rollout: Option<RolloutView>,
}

/// The windows `status` shows.
const WINDOWS: [(&str, Duration); 3] = [
    ("5m", Duration::from_secs(300)),
    ("1h", Duration::from_secs(3600)),
    ("30d", Duration::from_secs(30 * 86_400)),
];

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

impl Admin {
    /// The daemon's state now.
    pub async fn status(&self) -> Status {
        let cfg = self.live.config();
        let latched = self.live.latched();
        let dir = cfg.state_dir.clone();
        let file = tokio::task::spawn_blocking(move || state::load_latch(&dir))
            .await
            .unwrap_or_else(|e| LatchLoad::Unreadable {
                error: e.to_string(),
            });
        let (since, reason, actor) = match file {
            LatchLoad::Set(f) | LatchLoad::Clear(f) => (Some(f.at), Some(f.reason), Some(f.actor)),
            LatchLoad::Absent => (None, None, None),
            LatchLoad::Unreadable { error } => {
                (None, Some(format!("latch file unreadable: {error}")), None)
            }
        };
        let now = Instant::now();
        self.slo.observe(now);
        let obj = super::slo_task::objectives(&cfg.slo);
        let paths = [Transport::New, Transport::Legacy]
            .into_iter()
            .map(|t| {
                let windows = WINDOWS
                    .iter()
                    .map(|(label, w)| {
                        let c = self.slo.window(now, t, *w);
                        WindowView {
                            window: (*label).into(),
                            commands: c.commands,
                            success: finite(self.slo.sli(now, t, Slo::Success, *w)),
                            latency: finite(self.slo.sli(now, t, Slo::Latency, *w)),
                        }
                    })
                    .collect();
                let budget_remaining = [Slo::Success, Slo::Latency]
                    .into_iter()
                    .map(|s| (s.label().to_string(), self.slo.budget(now, t, s, &obj)))
                    .collect();
                PathView {
                    transport: t.label().into(),
                    connections: self.metrics.active(t),
                    windows,
                    budget_remaining,
                    success_burn_1h: self.slo.burn(
                        now,
                        t,
                        Slo::Success,
                        &obj,
                        Duration::from_secs(3600),
                    ),
                    p99_s: self.metrics.command_quantile(t, 0.99),
                }
            })
            .collect();
        let last_check = self
            .last_check
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .map(|c| CheckView {
                at: c.at,
                result: c.result.label().into(),
                streak: c.streak,
                max_violations: cfg.rollback.max_violations,
                summary: match &c.note {
                    Some(n) => format!("{}\n({n})", c.verdict),
                    None => c.verdict.to_string(),
                },
            });
        Status {
            configured_percent: cfg.routing.canary_percent,
            effective_percent: router::effective_percent(&cfg.routing, latched),
            latch: LatchView {
                latched,
                since,
                reason,
                actor,
            },
            rollback_enabled: cfg.rollback.enabled,
            check_interval_s: cfg.rollback.check_interval.as_secs_f64(),
            window_s: cfg.rollback.window.as_secs_f64(),
            paths,
            last_check,
            rollout: Some(self.rollouts.view(now)),
        }
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut text = body.to_string();
    text.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": message.into() }))
}

/// A mutation's body: `{"reason": "…"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reason {
    reason: Option<String>,
}

/// A promotion's body: `{"force": true, "reason": "…"}`, both optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteBody {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    reason: Option<String>,
}

async fn promote(admin: &Admin, body: &[u8]) -> Response<Full<Bytes>> {
    let parsed: PromoteBody = if body.iter().all(u8::is_ascii_whitespace) {
        PromoteBody {
            force: false,
            reason: None,
        }
    } else {
        match serde_json::from_slice(body) {
            Ok(b) => b,
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the body must be JSON like {{\"force\": false, \"reason\": \"why\"}}: {e}"
                    ),
                )
            }
        }
    };
    let mut reason = parsed.reason.unwrap_or_default().trim().to_string();
    reason.truncate(MAX_REASON);
    let to = match admin.rollouts.next(Instant::now(), parsed.force) {
        Ok(to) => to,
        Err(why) => return problem(StatusCode::CONFLICT, why),
    };
    let from = admin.live.config().routing.canary_percent;
    let reason = match (reason.is_empty(), parsed.force) {
        (true, false) => format!("{from}% -> {to}%: every gate met"),
        (true, true) => format!("{from}% -> {to}%: forced"),
        (false, force) => format!(
            "{from}% -> {to}%{}: {reason}",
            if force { " (forced)" } else { "" }
        ),
    };
    info!(reason, "admin: promotion requested");
    admin.rollouts.asked(to);
    match admin
        .control
        .send(Control::Promote {
            origin: Origin::Operator,
            to,
            reason,
        })
        .await
    {
        Ok(()) => reply(
            StatusCode::ACCEPTED,
            json!({ "accepted": "promote", "from": from, "to": to }),
        ),
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        ),
    }
}

/// The reason in `body`; required for a rollback, so the audit log says why.
fn reason(body: &[u8], required: bool) -> Result<String, Box<Response<Full<Bytes>>>> {
    let parsed: Reason = if body.iter().all(u8::is_ascii_whitespace) {
        Reason { reason: None }
    } else {
        serde_json::from_slice(body).map_err(|e| {
            Box::new(problem(
                StatusCode::BAD_REQUEST,
                format!("the body must be JSON like {{\"reason\": \"why\"}}: {e}"),
            ))
        })?
    };
    let text = parsed.reason.unwrap_or_default().trim().to_string();
    if text.is_empty() && required {
        return Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            "a reason is required: {\"reason\": \"why\"} (it goes into the audit log)",
        )));
    }
    if text.chars().count() > MAX_REASON {
        return Err(Box::new(problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the reason is longer than {MAX_REASON} characters"),
        )));
    }
    Ok(text)
}

async fn send(admin: &Admin, event: Control, what: &str) -> Response<Full<Bytes>> {
    match admin.control.send(event).await {
        Ok(()) => reply(StatusCode::ACCEPTED, json!({ "accepted": what })),
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        ),
    }
}

/// How a request reached the API.
#[derive(Clone)]
pub enum Access {
    /// The Unix socket: its file permissions already authenticated the caller.
    Socket,
    /// TCP: mutations need this bearer token.
    Tcp { token: Arc<String> },
}

/// Whether `req` may change anything.
fn authorised(access: &Access, req: &Request<Incoming>) -> bool {
    match access {
        Access::Socket => true,
        Access::Tcp { token } => req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .is_some_and(|given| {
                // Constant time: how much of a guess matched must not show in the timing.
                given.len() == token.len()
                    && openssl::memcmp::eq(given.as_bytes(), token.as_bytes())
            }),
    }
}

/// An Alertmanager webhook body (version 4), the parts used.
#[derive(Debug, Deserialize)]
struct AlertBatch {
    #[serde(default)]
    alerts: Vec<Alert>,
}

#[derive(Debug, Deserialize)]
struct Alert {
    #[serde(default)]
    status: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// The label that marks an alert as a rollback order.
pub const ROLLBACK_LABEL: &str = "cync_rollback";

/// The reason a rollback alert gives, for the audit log: its name and summary.
fn alert_reason(a: &Alert) -> String {
    let name = a.labels.get("alertname").map_or("an alert", String::as_str);
    match a.annotations.get("summary") {
        Some(s) => format!("alert {name}: {s}"),
        None => format!("alert {name}"),
    }
}

async fn alertmanager(admin: &Admin, body: &[u8]) -> Response<Full<Bytes>> {
    let batch: AlertBatch = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("not an Alertmanager webhook body: {e}"),
            )
        }
    };
    let order = batch.alerts.iter().find(|a| {
        a.status == "firing" && a.labels.get(ROLLBACK_LABEL).is_some_and(|v| v == "true")
    });
    let Some(a) = order else {
        return reply(
            StatusCode::OK,
            json!({ "accepted": "nothing", "why": format!("no firing alert labelled {ROLLBACK_LABEL}=\"true\"") }),
        );
    };
    let mut reason = alert_reason(a);
    reason.truncate(MAX_REASON);
    info!(reason, "alertmanager: rollback requested");
    let event = Control::Rollback {
        origin: Origin::Alertmanager,
        cause: RollbackCause::Alert,
        reason,
    };
    send(admin, event, "rollback").await
}

async fn route(admin: Arc<Admin>, access: Access, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() == Method::POST && !authorised(&access, &req) {
        return problem(
            StatusCode::UNAUTHORIZED,
            "a change needs `Authorization: Bearer <token>`, the token in admin.token_file",
        );
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body could not be read (at most {MAX_BODY} bytes): {e}"),
            )
        }
    };
    match (&method, path.as_str()) {
        (&Method::GET, "/status") => match serde_json::to_value(admin.status().await) {
            Ok(v) => reply(StatusCode::OK, v),
            Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        (&Method::GET, "/history") => {
            let limit = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("limit="))
                .map(str::parse::<usize>);
            let limit = match limit {
                None => None,
                Some(Ok(n)) => Some(n),
                Some(Err(_)) => {
                    return problem(
                        StatusCode::BAD_REQUEST,
                        "limit must be a whole number, e.g. /history?limit=20",
                    )
                }
            };
            let dir = admin.live.config().state_dir.clone();
            match tokio::task::spawn_blocking(move || audit::read(&dir, limit)).await {
                Ok(Ok(h)) => reply(
                    StatusCode::OK,
                    json!({ "entries": h.entries, "unreadable_lines": h.skipped }),
                ),
                Ok(Err(e)) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (&Method::POST, "/rollback") => match reason(&body, true) {
            Ok(reason) => {
                info!(reason, "admin: rollback requested");
                let event = Control::Rollback {
                    origin: Origin::Operator,
                    cause: RollbackCause::Operator,
                    reason,
                };
                send(&admin, event, "rollback").await
            }
            Err(r) => *r,
        },
        (&Method::POST, "/resume") => match reason(&body, false) {
            Ok(reason) => {
                let reason = if reason.is_empty() {
                    "resumed by an operator".to_string()
                } else {
                    reason
                };
                info!(reason, "admin: resume requested");
                let event = Control::Resume {
                    origin: Origin::Operator,
                    reason,
                };
                send(&admin, event, "resume").await
            }
            Err(r) => *r,
        },
        (&Method::POST, "/reload") => {
            let event = Control::Reload {
                origin: Origin::Operator,
            };
            send(&admin, event, "reload").await
        }
        (&Method::GET, "/report") => match admin.report().await {
            Ok(r) => match serde_json::to_value(r) {
                Ok(v) => reply(StatusCode::OK, v),
                Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            },
            Err(e) => problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the audit log: {e}"),
            ),
        },
        (&Method::POST, "/alertmanager") => alertmanager(&admin, &body).await,
        (&Method::POST, "/promote") => promote(&admin, &body).await,
        (_, "/status" | "/history" | "/report") => {
            problem(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
        (_, "/rollback" | "/resume" | "/reload" | "/alertmanager" | "/promote") => {
            problem(StatusCode::METHOD_NOT_ALLOWED, "use POST")
        }
        _ => problem(
            StatusCode::NOT_FOUND,
            "not found: GET /status, GET /history, GET /report, POST /rollback, POST /resume, POST /promote, POST /reload, POST /alertmanager",
        ),
    }
}

/// What `GET /trace` follows.
#[derive(Debug, Default, Clone)]
struct TraceFilter {
    device: Option<String>,
    failures: bool,
}

fn trace_filter(query: Option<&str>) -> Result<TraceFilter, String> {
    let mut f = TraceFilter::default();
    for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=').unwrap_or((kv, "")) {
            ("device", id) => match crate::protocol::DeviceId::from_hex(id) {
                Some(d) => f.device = Some(d.to_hex()),
                None => return Err(format!("device={id:?} is not a device id (8 hex digits)")),
            },
            ("failures", "" | "1" | "true") => f.failures = true,
            ("failures", "0" | "false") => f.failures = false,
            (k, _) => {
                return Err(format!(
                    "unknown parameter {k:?}: use device=ID and failures=1"
                ))
            }
        }
    }
    Ok(f)
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `GET /trace?device=ID&failures=1`: every finished command from now on, one JSON line each,
/// until the client goes or the daemon stops. A follower that falls behind gets a
/// `{"lagged": N}` line for the events it lost.
fn trace(admin: &Admin, query: Option<&str>, stop: CancellationToken) -> Response<Body> {
    let filter = match trace_filter(query) {
        Ok(f) => f,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e).map(BodyExt::boxed),
    };
    let rx = admin.metrics.tracer().subscribe();
    let lines = futures_util::stream::unfold((rx, filter, stop), |(mut rx, f, stop)| async move {
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return None,
                r = rx.recv() => r,
            };
            let line = match next {
                Ok(ev) => {
                    if f.device.is_some() && ev.device != f.device {
                        continue;
                    }
                    if f.failures && ev.outcome == "success" {
                        continue;
                    }
                    serde_json::to_string(&ev).unwrap_or_default()
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    json!({ "lagged": n }).to_string()
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            let frame = hyper::body::Frame::data(Bytes::from(line + "\n"));
            return Some((Ok::<_, Infallible>(frame), (rx, f, stop)));
        }
    });
    let mut r = Response::new(BodyExt::boxed(http_body_util::StreamBody::new(lines)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// Serves the admin API on the Unix socket `listener` until `stop`.
pub async fn serve(
    listener: UnixListener,
    admin: Arc<Admin>,
    tasks: Tasks,
    stop: CancellationToken,
) {
    let accept = || async { listener.accept().await.map(|(s, _)| s) };
    accept_loop(accept, admin, Access::Socket, tasks, stop).await;
}

/// Serves the admin API on TCP (`admin.listen`) until `stop`; mutations need `token`.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    admin: Arc<Admin>,
    token: String,
    tasks: Tasks,
    stop: CancellationToken,
) {
    let access = Access::Tcp {
        token: Arc::new(token),
    };
    let accept = || async { listener.accept().await.map(|(s, _)| s) };
    accept_loop(accept, admin, access, tasks, stop).await;
}

/// Takes connections from `accept` and serves each with `access` until `stop`; a failed
/// accept (out of descriptors, say) is logged and retried shortly.
async fn accept_loop<S, F, Fut>(
    mut accept: F,
    admin: Arc<Admin>,
    access: Access,
    tasks: Tasks,
    stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            r = accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        connection(stream, admin.clone(), access.clone(), &tasks, &stop);
    }
}

/// One HTTP/1 connection of the admin API, on `tasks`.
fn connection<S>(
    stream: S,
    admin: Arc<Admin>,
    access: Access,
    tasks: &Tasks,
    stop: &CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let stop = stop.clone();
    let follow_stop = stop.clone();
    tasks.spawn("admin-connection", async move {
        let svc = service_fn(move |req: Request<Incoming>| {
            let admin = admin.clone();
            let access = access.clone();
            let stop = follow_stop.clone();
            async move {
                if req.uri().path() == "/trace" && req.method() == Method::GET {
                    // A stream of every device's commands, held open: on TCP, for token
                    // holders only.
                    if !authorised(&access, &req) {
                        return Ok::<_, Infallible>(
                            problem(
                                StatusCode::UNAUTHORIZED,
                                "following commands needs `Authorization: Bearer <token>`, the token in admin.token_file",
                            )
                            .map(BodyExt::boxed),
                        );
                    }
                    return Ok::<_, Infallible>(trace(&admin, req.uri().query(), stop));
                }
                Ok::<_, Infallible>(route(admin, access, req).await.map(BodyExt::boxed))
            }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(stream), svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "admin connection error"); },
            _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
        }
    });
}
