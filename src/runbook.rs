//! The runbook commands' side of the admin API: `cync-gateway status`, `rollback`, `resume`,
//! `history`, `set-canary` and `reload` find the daemon through the configuration file (its
//! `admin.socket`), ask it, and print what an operator on call reads — or JSON for scripts
//! (`--json`). `set-canary` edits the file itself (the file is the source of truth) and then
//! has the daemon apply it, waiting until the daemon reports the new percentage.
//!
//! Invariants:
//! - Every failure says what to do next: a daemon that is not running, a socket without
//!   permission, a request the daemon refused (its message is shown as it gave it).
//! - Plain words and aligned columns; nothing depends on a terminal (no colour).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use thiserror::Error;
use tokio::net::UnixStream;

use crate::config::edit::{self, EditError};
use crate::config::{Config, ConfigError};
use crate::control::admin::Status;
use crate::control::audit::Entry;

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum RunbookError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot reach the gateway at {socket}: {source} (is `cync-gateway run` running with this configuration? is this the user it runs as?)")]
    Unreachable {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the gateway did not answer within {0:?}")]
    Timeout(Duration),
    #[error("talking to the gateway: {0}")]
    Http(String),
    #[error("the gateway refused: {0}")]
    Refused(String),
    #[error("the gateway's answer is not what this version expects: {0}")]
    Decode(String),
    #[error(transparent)]
    Edit(#[from] EditError),
    /// The file was changed but the daemon could not be asked to apply it.
    #[error("{written}, but {why}")]
    WrittenNotApplied {
        written: String,
        why: String,
        code: u8,
    },
}

impl RunbookError {
    /// The exit code: 69 (EX_UNAVAILABLE) when the daemon cannot be reached, 64 for a bad
    /// configuration, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunbookError::Config(_) | RunbookError::Edit(EditError::Invalid(_)) => 64,
            RunbookError::Unreachable { .. } | RunbookError::Timeout(_) => 69,
            RunbookError::WrittenNotApplied { code, .. } => *code,
            _ => 1,
        }
    }
}

/// What a runbook command asks for.
#[derive(Debug, Clone)]
pub enum Ask {
    Status {
        json: bool,
    },
    Rollback {
        reason: String,
    },
    Resume {
        reason: String,
    },
    History {
        limit: usize,
        json: bool,
    },
    /// Edit `routing.canary_percent` in the configuration file, have the daemon apply it, and
    /// wait at most `wait` until it reports the new percentage.
    SetCanary {
        percent: f64,
        wait: Duration,
    },
    Report {
        json: bool,
    },
    /// Ask the daemon for the next of `rollout.stages`, and wait until it applied it.
    Promote {
        force: bool,
        reason: String,
        wait: Duration,
    },
}

/// Runs one runbook command against the daemon `config` names; what to print.
pub async fn run(config: &Path, ask: Ask) -> Result<String, RunbookError> {
    let socket = socket_of(config)?;
    Ok(match ask {
        Ask::Status { json } => {
            let (s, raw) = status(&socket).await?;
            if json {
                format!("{raw:#}\n")
            } else {
                render_status(&s)
            }
        }
        Ask::History { limit, json } => {
            let (entries, raw) = history(&socket, limit).await?;
            if json {
                format!("{raw:#}\n")
            } else {
                render_history(&entries)
            }
        }
        Ask::Rollback { reason } => {
            let body = serde_json::json!({ "reason": reason });
            request(&socket, hyper::Method::POST, "/rollback", Some(body)).await?;
            "rollback requested: every device goes to legacy; see `cync-gateway status`\n".into()
        }
        Ask::SetCanary { percent, wait } => set_canary(config, &socket, percent, wait).await?,
        Ask::Report { json } => {
            let v = request(&socket, hyper::Method::GET, "/report", None).await?;
            if json {
                format!("{v:#}\n")
            } else {
                let r: crate::control::report::Report =
                    serde_json::from_value(v).map_err(|e| RunbookError::Decode(e.to_string()))?;
                render_report(&r)
            }
        }
        Ask::Promote {
            force,
            reason,
            wait,
        } => promote(&socket, force, reason, wait).await?,
        Ask::Resume { reason } => {
            let body = serde_json::json!({ "reason": reason });
            request(&socket, hyper::Method::POST, "/resume", Some(body)).await?;
            "resume requested: the configured percentage is in force again; see `cync-gateway status`\n"
                .into()
        }
    })
}

fn percent_text(p: Option<f64>) -> String {
    match p {
        Some(p) => format!("{p}%"),
        None => "the default (0%)".into(),
    }
}

/// `set-canary`: the file edited, the daemon told, its answer awaited.
async fn set_canary(
    config: &Path,
    socket: &Path,
    percent: f64,
    wait: Duration,
) -> Result<String, RunbookError> {
    let path = config.to_path_buf();
    let edited = tokio::task::spawn_blocking(move || edit::set_canary(&path, percent))
        .await
        .map_err(|e| RunbookError::Http(e.to_string()))??;
    let mut o = String::new();
    let written = if edited.changed {
        format!(
            "{}: routing.canary_percent {} -> {}%",
            edited.path.display(),
            percent_text(edited.old),
            edited.new
        )
    } else {
        format!(
            "{}: routing.canary_percent is already {}%",
            edited.path.display(),
            edited.new
        )
    };
    let _ = writeln!(o, "{written}");
    // Applied now rather than at the daemon's next look at the file; the reload validates
    // the whole file again and audits the change (actor `admin`).
    if let Err(e) = request(socket, hyper::Method::POST, "/reload", None).await {
        return Err(RunbookError::WrittenNotApplied {
            written,
            code: e.exit_code(),
            why: format!("the daemon could not be asked to apply it ({e}); a running daemon picks the file up by itself within a second"),
        });
    }
    let end = tokio::time::Instant::now() + wait;
    loop {
        let (s, _) = status(socket).await?;
        if s.configured_percent == percent {
            if s.latch.latched {
                let _ = writeln!(
                    o,
                    "applied: {}% configured, but 0% in force: the rollback latch is set ({}); `cync-gateway resume` puts it in force",
                    s.configured_percent,
                    s.latch.reason.as_deref().unwrap_or("no reason recorded")
                );
            } else {
                let new = s
                    .paths
                    .iter()
                    .find(|p| p.transport == "new")
                    .map_or(0, |p| p.connections);
                let _ = writeln!(
                    o,
                    "applied: {}% in force ({new} devices on the new path now; devices that change path are re-homed at routing.rehome_rate)",
                    s.effective_percent
                );
            }
            return Ok(o);
        }
        if tokio::time::Instant::now() >= end {
            return Err(RunbookError::WrittenNotApplied {
                written,
                code: 1,
                why: format!(
                    "after {wait:?} the daemon still reports {}% configured: is it running on this file? `cync-gateway history` and its log show a reload it refused",
                    s.configured_percent
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `promote`: the daemon checks the gates and writes the next stage into its file.
async fn promote(
    socket: &Path,
    force: bool,
    reason: String,
    wait: Duration,
) -> Result<String, RunbookError> {
    let body = serde_json::json!({ "force": force, "reason": reason });
    let v = request(socket, hyper::Method::POST, "/promote", Some(body)).await?;
    let to = v["to"].as_f64().unwrap_or(f64::NAN);
    let from = v["from"].as_f64().unwrap_or(f64::NAN);
    let end = tokio::time::Instant::now() + wait;
    loop {
        let (s, _) = status(socket).await?;
        if s.configured_percent == to {
            return Ok(format!(
                "promoted: {from}% -> {to}% (written to the configuration file and applied; `cync-gateway history` has the entry)\n"
            ));
        }
        if let Some(r) = s.rollout.as_ref().and_then(|r| r.ready.as_ref()) {
            if r.to == to {
                return Err(RunbookError::Refused(format!(
                    "the promotion to {to}% is due but the daemon cannot write its configuration file: {} — make it with `cync-gateway set-canary {to}` as a user who can, or where the file comes from",
                    r.why
                )));
            }
        }
        if tokio::time::Instant::now() >= end {
            return Err(RunbookError::Refused(format!(
                "asked to promote to {to}%, but after {wait:?} the daemon still reports {}%: see `cync-gateway history` and its log",
                s.configured_percent
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The admin socket named by the configuration at `config`.
pub fn socket_of(config: &Path) -> Result<PathBuf, RunbookError> {
    Ok(Config::load(config)?.admin.socket)
}

/// One request to the admin API; the JSON answer of a 2xx, or the daemon's message.
pub async fn request(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, RunbookError> {
    tokio::time::timeout(TIMEOUT, request_inner(socket, method, path, body))
        .await
        .map_err(|_| RunbookError::Timeout(TIMEOUT))?
}

/// Sends one request on a new connection to the admin socket: the response (its body still
/// to read) and the task driving the connection (abort it when done).
async fn send(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    body: Option<Value>,
) -> Result<
    (
        hyper::Response<hyper::body::Incoming>,
        tokio::task::JoinHandle<()>,
    ),
    RunbookError,
> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| RunbookError::Unreachable {
            socket: socket.to_path_buf(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| RunbookError::Http(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "cync-gateway")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| RunbookError::Http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| RunbookError::Http(e.to_string()))?;
    Ok((resp, driver))
}

/// A refusal's message: the daemon's `{"error": ...}`, with the status.
fn refused(status: hyper::StatusCode, body: &[u8]) -> RunbookError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let msg = v["error"].as_str().unwrap_or("no reason given");
    RunbookError::Refused(format!("{status}: {msg}"))
}

async fn request_inner(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, RunbookError> {
    let (resp, driver) = send(socket, method, path, body).await?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| RunbookError::Http(e.to_string()))?
        .to_bytes();
    driver.abort();
    if !status.is_success() {
        return Err(refused(status, &body));
    }
    serde_json::from_slice(&body).map_err(|e| RunbookError::Decode(e.to_string()))
}

/// `status`: the daemon's [`Status`].
pub async fn status(socket: &Path) -> Result<(Status, Value), RunbookError> {
    let v = request(socket, hyper::Method::GET, "/status", None).await?;
    let s = serde_json::from_value(v.clone()).map_err(|e| RunbookError::Decode(e.to_string()))?;
    Ok((s, v))
}

fn pct(v: Option<f64>) -> String {
    match v {
        Some(x) => format!("{:.2}%", x * 100.0),
        None => "-".into(),
    }
}

/// `status` as a person reads it.
pub fn render_status(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "canary        {:.2}% configured, {:.2}% in force",
        s.configured_percent, s.effective_percent
    );
    if s.latch.latched {
        let _ = writeln!(
            o,
            "latch         SET since {} by {}: {}",
            s.latch.since.as_deref().unwrap_or("?"),
            s.latch.actor.as_deref().unwrap_or("?"),
            s.latch.reason.as_deref().unwrap_or("?")
        );
        let _ = writeln!(
            o,
            "              every device routes to legacy; `cync-gateway resume` clears it"
        );
    } else {
        let _ = writeln!(o, "latch         clear");
    }
    let _ = writeln!(
        o,
        "rollback      {} (a check every {}s over {}s)",
        if s.rollback_enabled {
            "automatic"
        } else {
            "OFF (rollback.enabled = false)"
        },
        s.check_interval_s,
        s.window_s
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>10} {:>9}",
        "path",
        "devices",
        "cmds 5m",
        "ok 5m",
        "ok 1h",
        "ok 30d",
        "in time 1h",
        "p99",
        "budget ok",
        "burn 1h"
    );
    for p in &s.paths {
        let w = |label: &str| p.windows.iter().find(|w| w.window == label);
        let budget = p
            .budget_remaining
            .iter()
            .find(|(k, _)| k == "success")
            .map(|(_, v)| *v);
        let _ = writeln!(
            o,
            "{:<8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>10} {:>9.2}",
            p.transport,
            p.connections,
            w("5m").map(|w| w.commands).unwrap_or(0),
            pct(w("5m").and_then(|w| w.success)),
            pct(w("1h").and_then(|w| w.success)),
            pct(w("30d").and_then(|w| w.success)),
            pct(w("1h").and_then(|w| w.latency)),
            p.p99_s
                .map(|v| format!("{:.0}ms", v * 1000.0))
                .unwrap_or_else(|| "-".into()),
            pct(budget),
            p.success_burn_1h
        );
    }
    let _ = writeln!(
        o,
        "(ok: answered within the command deadline; in time: answered within the latency threshold; p99: command latency since start; budget: success error budget left over 30 d)"
    );
    if let Some(r) = &s.rollout {
        let _ = writeln!(o);
        let stages: Vec<String> = r
            .stages
            .iter()
            .map(|x| {
                if Some(*x) == r.position.stage {
                    format!("[{x}]")
                } else {
                    format!("{x}")
                }
            })
            .collect();
        let _ = writeln!(
            o,
            "rollout       stages {} (since {}; automatic promotion {})",
            stages.join(" -> "),
            r.since,
            if r.auto_promote { "on" } else { "off" }
        );
        match r.position.next {
            Some(next) => {
                let _ = writeln!(o, "              next {next}%, once every gate is met:");
                for g in &r.gates {
                    let _ = writeln!(
                        o,
                        "                {} {:<7} {}",
                        if g.ok { "ok  " } else { "WAIT" },
                        g.name,
                        g.detail
                    );
                }
            }
            None => {
                let _ = writeln!(o, "              the last stage: nothing to promote");
            }
        }
        if let Some(ready) = &r.ready {
            let _ = writeln!(
                o,
                "              promotion to {}% READY since {} but not written: {}",
                ready.to, ready.at, ready.why
            );
        }
    }
    let _ = writeln!(o);
    match &s.last_check {
        Some(c) => {
            let _ = writeln!(
                o,
                "last check    {} {} (failed {} of {} in a row needed)",
                c.at, c.result, c.streak, c.max_violations
            );
            for line in c.summary.lines() {
                let _ = writeln!(o, "              {line}");
            }
        }
        None => {
            let _ = writeln!(o, "last check    none yet");
        }
    }
    o
}

fn span(s: f64) -> String {
    humantime::format_duration(Duration::from_secs(s.max(0.0) as u64)).to_string()
}

/// `report` as a person reads it.
pub fn render_report(r: &crate::control::report::Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "rollout so far (from the audit log and the SLO state; new-path figures)\n"
    );
    let _ = writeln!(
        o,
        "{:>7}  {:<26} {:<11} {:>14} {:>9} {:>7} {:>11}",
        "stage", "in force since", "set by", "for", "commands", "failed", "budget used"
    );
    for s in &r.stages {
        let _ = writeln!(
            o,
            "{:>6}%  {:<26} {:<11} {:>14} {:>9} {:>7} {:>11}{}",
            s.percent,
            if s.started.is_empty() {
                "(before the audit log)"
            } else {
                s.started.as_str()
            },
            s.set_by.as_deref().unwrap_or("-"),
            s.baked_s.map_or_else(|| "?".to_string(), span),
            s.new_commands,
            s.new_failed,
            s.budget_used
                .map(|b| format!("{:.1}%", b * 100.0))
                .unwrap_or_else(|| "-".into()),
            if s.current { "  <- now" } else { "" }
        );
        for e in &s.events {
            let _ = writeln!(
                o,
                "           {} {} by {}: {}",
                e.time,
                e.action,
                e.actor,
                e.reason.lines().next().unwrap_or("")
            );
        }
    }
    let _ = writeln!(
        o,
        "\nsuccess budget left (30 d): {:.1}%{}",
        r.budget_left * 100.0,
        if r.latched {
            "; the rollback latch is SET"
        } else {
            ""
        }
    );
    let _ = writeln!(o, "validation at 100 %: {}", r.validation.verdict);
    o
}

/// One command event as `trace` prints it: time, id, path, device, seq, outcome, the ms to
/// the 0x7b and the f9, and the attempts when there were copies.
pub fn render_trace(ev: &crate::telemetry::trace::CommandEvent) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}ms"));
    format!(
        "#{:<6} {:<6} {} seq {:>3} msg {} {:<9} 0x7b {:>9}  f9 {:>9}{}",
        ev.id,
        ev.path,
        ev.device.as_deref().unwrap_or("--------"),
        ev.seq,
        ev.msg_id.as_deref().unwrap_or("------"),
        ev.outcome,
        ms(ev.ack_ms),
        ms(ev.reply_ms),
        if ev.attempts > 1 {
            format!("  ({} attempts)", ev.attempts)
        } else {
            String::new()
        }
    )
}

/// `trace`: follows the daemon's command events, calling `print` with each line (JSON as the
/// daemon sent it, or [`render_trace`]), until `limit` lines or the daemon ends the stream.
pub async fn trace(
    config: &Path,
    device: Option<&str>,
    failures: bool,
    json: bool,
    limit: Option<u64>,
    mut print: impl FnMut(&str),
) -> Result<(), RunbookError> {
    let socket = socket_of(config)?;
    let mut query = Vec::new();
    if let Some(d) = device {
        query.push(format!("device={d}"));
    }
    if failures {
        query.push("failures=1".into());
    }
    let path = format!("/trace?{}", query.join("&"));
    let (resp, driver) = send(&socket, hyper::Method::GET, &path, None).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map_err(|e| RunbookError::Http(e.to_string()))?
            .to_bytes();
        driver.abort();
        return Err(refused(status, &bytes));
    }
    let mut pending = Vec::new();
    let mut shown = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| RunbookError::Http(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if json {
                print(&text);
            } else {
                match serde_json::from_str::<crate::telemetry::trace::CommandEvent>(&text) {
                    Ok(ev) => print(&render_trace(&ev)),
                    Err(_) => print(&format!("({text}: events lost, this follower fell behind)")),
                }
            }
            shown += 1;
            if limit.is_some_and(|l| shown >= l) {
                driver.abort();
                return Ok(());
            }
        }
    }
    driver.abort();
    Ok(())
}

/// `history`: the newest audit entries.
pub async fn history(socket: &Path, limit: usize) -> Result<(Vec<Entry>, Value), RunbookError> {
    let v = request(
        socket,
        hyper::Method::GET,
        &format!("/history?limit={limit}"),
        None,
    )
    .await?;
    let entries = serde_json::from_value(v["entries"].clone())
        .map_err(|e| RunbookError::Decode(e.to_string()))?;
    Ok((entries, v))
}

/// `history` as a person reads it: one line per entry, its changes indented.
pub fn render_history(entries: &[Entry]) -> String {
    let mut o = String::new();
    if entries.is_empty() {
        let _ = writeln!(o, "no routing changes recorded yet");
    }
    for e in entries {
        let _ = writeln!(
            o,
            "{}  {:<8} {:<10} {}",
            e.time,
            e.action,
            e.actor,
            e.reason.lines().next().unwrap_or("")
        );
        for c in &e.changes {
            let _ = writeln!(o, "    {}: {} -> {}", c.key, c.old, c.new);
        }
    }
    o
}
