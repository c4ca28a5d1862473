//! The runbook commands against a running daemon (the real binary both ends): `status`,
//! `rollback`, `resume` and `history`, human and `--json`, their effect, their exit codes, and
//! the admin socket's permissions.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use common::daemon::{Daemon, BIN};
use common::gateway::TestGateway;
use common::*;
use cync_gateway::runbook::{self, RunbookError};
use tokio::net::TcpListener;

async fn cli(args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .output()
        .await
        .expect("run the CLI")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {o:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_resume_status_and_history_against_a_running_daemon() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        TestGateway::new(up.local_addr().expect("addr"))
            .set("routing.canary_percent", 12.5)
            .set("logging.format", "json")
            .text(),
    )
    .expect("config");
    let d = Daemon::start(path.clone(), None).await;
    let cfg = path.to_str().expect("utf-8 path");

    // The socket: the daemon's user only.
    let socket = runbook::socket_of(&path).expect("socket");
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let s = json(&cli(&["status", "--config", cfg, "--json"]).await);
    assert_eq!(s["configured_percent"], 12.5);
    assert_eq!(s["effective_percent"], 12.5);
    assert_eq!(s["latch"]["latched"], false);
    assert_eq!(s["paths"][0]["transport"], "new");
    assert_eq!(s["paths"][1]["transport"], "legacy");
    let human = cli(&["status", "--config", cfg]).await;
    assert_eq!(human.status.code(), Some(0));
    let text = stdout(&human);
    println!("{text}");
    assert!(
        text.contains("canary        12.50% configured, 12.50% in force"),
        "{text}"
    );
    assert!(text.contains("latch         clear"), "{text}");

    // Rollback: latched, audited with the operator's reason, visible in status and metrics.
    let o = cli(&[
        "rollback",
        "--config",
        cfg,
        "--reason",
        "drill: new path p99",
    ])
    .await;
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    wait_metric(d.metrics, "tcp_comm_rollback_active", 1.0).await;
    let s = json(&cli(&["status", "--config", cfg, "--json"]).await);
    assert_eq!(s["latch"]["latched"], true);
    assert_eq!(s["latch"]["reason"], "drill: new path p99");
    assert_eq!(s["latch"]["actor"], "admin");
    assert_eq!(s["effective_percent"], 0.0);
    let text = stdout(&cli(&["status", "--config", cfg]).await);
    println!("{text}");
    assert!(text.contains("latch         SET since "), "{text}");
    assert!(text.contains("by admin: drill: new path p99"), "{text}");
    let m = http_get(d.metrics, "/metrics").await.1;
    assert_eq!(
        sample(&m, "tcp_comm_rollbacks_total{reason=\"operator\"}"),
        1.0
    );

    let o = cli(&["resume", "--config", cfg, "--reason", "fixed in 1.2.3"]).await;
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    wait_metric(d.metrics, "tcp_comm_rollback_active", 0.0).await;

    let h = json(&cli(&["history", "--config", cfg, "--json"]).await);
    let entries = h["entries"].as_array().expect("entries");
    let actions: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or(""),
                e["actor"].as_str().unwrap_or(""),
                e["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("rollback", "admin", "drill: new path p99"),
            ("resume", "admin", "fixed in 1.2.3")
        ]
    );
    let text = stdout(&cli(&["history", "--config", cfg]).await);
    println!("{text}");
    assert!(text.contains("rollback.latched: false -> true"), "{text}");
    assert!(
        text.contains("canary_effective_percent: 12.5 -> 0.0"),
        "{text}"
    );

    // A rollback without a reason is refused by the daemon and changes nothing.
    let refused = runbook::request(
        &socket,
        hyper::Method::POST,
        "/rollback",
        Some(serde_json::json!({ "reason": "  " })),
    )
    .await;
    match refused {
        Err(RunbookError::Refused(msg)) => assert!(msg.starts_with("400"), "{msg}"),
        other => panic!("not refused: {other:?}"),
    }
    let unknown = runbook::request(&socket, hyper::Method::GET, "/nope", None).await;
    assert!(matches!(unknown, Err(RunbookError::Refused(m)) if m.starts_with("404")));
    let m = http_get(d.metrics, "/metrics").await.1;
    assert_eq!(sample(&m, "tcp_comm_rollback_active"), 0.0);
    drop(d);
}

#[tokio::test]
async fn a_daemon_that_is_not_running_is_exit_69_with_what_to_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        TestGateway::new("127.0.0.1:1".parse().expect("addr")).text(),
    )
    .expect("config");
    let o = cli(&["status", "--config", path.to_str().expect("utf-8")]).await;
    assert_eq!(o.status.code(), Some(69), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot reach the gateway at"), "{err}");
    assert!(err.contains("is `cync-gateway run` running"), "{err}");
    let o = cli(&["status", "--config", "/nonexistent/gw.toml"]).await;
    assert_eq!(o.status.code(), Some(64), "{o:?}");
}
