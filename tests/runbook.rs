//! The runbook commands against a running daemon (the real binary both ends): `status`,
//! `rollback`, `resume` and `history`, human and `--json`, their effect, their exit codes, and
//! the admin socket's permissions.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use common::daemon::{cli, Daemon};
use common::gateway::TestGateway;
use common::*;
use cync_gateway::runbook::{self, RunbookError};
use tokio::net::TcpListener;

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

/// The reference configuration (`config/gateway.toml`, every comment) made runnable here:
/// loopback ports, a plain fake upstream, its own state_dir, JSON logs.
fn runnable_reference(upstream: std::net::SocketAddr) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
    let text = std::fs::read_to_string(path).expect("reference");
    let mut doc: toml_edit::DocumentMut = text.parse().expect("reference is TOML");
    doc["state_dir"] = toml_edit::value(common::gateway::fresh_state_dir());
    doc["listen"]["devices"] = toml_edit::value("127.0.0.1:0");
    doc["listen"]["metrics"] = toml_edit::value("127.0.0.1:0");
    doc["device_tls"]["mode"] = toml_edit::value("plain");
    doc["upstream"]["legacy"]["address"] = toml_edit::value(upstream.to_string());
    doc["upstream"]["legacy"]["tls"] = toml_edit::value(false);
    doc["logging"]["format"] = toml_edit::value("json");
    doc.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_canary_changes_one_line_of_the_reference_file_and_the_daemon_applies_it() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    let before = runnable_reference(up.local_addr().expect("addr"));
    std::fs::write(&path, &before).expect("config");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let d = Daemon::start(path.clone(), None).await;
    let cfg = path.to_str().expect("utf-8 path");
    let old = json(&cli(&["status", "--config", cfg, "--json"]).await)["configured_percent"]
        .as_f64()
        .expect("percent");
    assert_ne!(old, 25.0);

    let t0 = tokio::time::Instant::now();
    let o = cli(&["set-canary", "25", "--config", cfg]).await;
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let text = stdout(&o);
    println!("{text}(took {took:?})");
    assert!(
        text.contains(&format!("routing.canary_percent {old}% -> 25%")),
        "{text}"
    );
    assert!(text.contains("applied: 25% in force"), "{text}");
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    let s = json(&cli(&["status", "--config", cfg, "--json"]).await);
    assert_eq!(s["configured_percent"], 25.0);
    assert_eq!(s["effective_percent"], 25.0);

    // One line changed; every comment, blank line and other value as it was; mode kept.
    let after = std::fs::read_to_string(&path).expect("read");
    let (b, a): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
    assert_eq!(b.len(), a.len());
    let changed: Vec<(&str, &str)> = b
        .iter()
        .zip(&a)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| (*x, *y))
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(
        changed[0].1.starts_with("canary_percent = 25"),
        "{changed:?}"
    );
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o640);

    // Audited as a reload by the operator, with the change.
    let h = json(&cli(&["history", "--config", cfg, "--json"]).await);
    let last = h["entries"]
        .as_array()
        .and_then(|e| e.last())
        .cloned()
        .expect("an entry");
    assert_eq!(last["action"], "reload");
    assert_eq!(last["actor"], "admin");
    assert_eq!(last["changes"][0]["key"], "routing.canary_percent");
    assert_eq!(last["changes"][0]["new"], 25.0);

    // An invalid result is never written.
    let o = cli(&["set-canary", "150", "--config", cfg]).await;
    assert_eq!(o.status.code(), Some(64), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nothing was written"), "{err}");
    assert!(err.contains("routing.canary_percent"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), after);

    // While latched the file changes and the daemon says plainly that 0% is in force.
    let o = cli(&["rollback", "--config", cfg, "--reason", "drill"]).await;
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    wait_metric(d.metrics, "tcp_comm_rollback_active", 1.0).await;
    let o = cli(&["set-canary", "30", "--config", cfg]).await;
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let text = stdout(&o);
    assert!(
        text.contains(
            "applied: 30% configured, but 0% in force: the rollback latch is set (drill)"
        ),
        "{text}"
    );
    drop(d);

    // No daemon: the file is written and the command says it could not have it applied.
    let o = cli(&["set-canary", "40", "--config", cfg]).await;
    assert_eq!(o.status.code(), Some(69), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("-> 40%, but the daemon could not be asked"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_tcp_a_change_without_the_token_is_401_and_changes_nothing() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "correct-horse-battery\n").expect("token");
    let base = TestGateway::new(up.local_addr().expect("addr"))
        .set("routing.canary_percent", 10)
        .set("logging.format", "json")
        .set("admin.listen", "127.0.0.1:0");

    // check-config refuses a TCP listener without a token file.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, base.text()).expect("config");
    let o = cli(&["check-config", bad.to_str().expect("utf-8")]).await;
    assert_eq!(o.status.code(), Some(64), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("admin.token_file"));

    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        base.set("admin.token_file", token_file.display().to_string())
            .text(),
    )
    .expect("config");
    let d = Daemon::start(path.clone(), None).await;
    let admin = d.admin.expect("the admin API listens on TCP");
    let reason = r#"{"reason": "drill"}"#;

    // Reading needs no token.
    let (code, body) = http_request(admin, "GET", "/status", &[], "").await;
    assert_eq!(code, 200, "{body}");
    // A change without the token, or with a wrong one: 401, nothing changed.
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong-horse-battery")],
        vec![("Authorization", "Bearer correct-horse-batter")],
        vec![("Authorization", "correct-horse-battery")],
    ] {
        let (code, body) = http_request(admin, "POST", "/rollback", &headers, reason).await;
        assert_eq!(code, 401, "{headers:?}: {body}");
        assert!(body.contains("admin.token_file"), "{body}");
    }
    let (code, _) = http_request(admin, "POST", "/alertmanager", &[], "{}").await;
    assert_eq!(code, 401);
    let (code, _) = http_request(admin, "GET", "/trace", &[], "").await;
    assert_eq!(code, 401, "following commands needs the token too");
    let m = http_get(d.metrics, "/metrics").await.1;
    assert_eq!(sample(&m, "tcp_comm_rollback_active"), 0.0);
    assert_eq!(family_total(&m, "tcp_comm_audit_entries_total"), 0.0);

    // With it: done.
    let auth = [("Authorization", "Bearer correct-horse-battery")];
    let (code, body) = http_request(admin, "POST", "/rollback", &auth, reason).await;
    assert_eq!(code, 202, "{body}");
    wait_metric(d.metrics, "tcp_comm_rollback_active", 1.0).await;
    let (code, _) = http_request(admin, "POST", "/resume", &auth, reason).await;
    assert_eq!(code, 202);
    wait_metric(d.metrics, "tcp_comm_rollback_active", 0.0).await;

    // Alertmanager: a resolved alert and an unlabelled one change nothing; a firing one
    // labelled for rollback sets the latch, audited as Alertmanager's.
    let batch = |status: &str, label: &str| {
        serde_json::json!({
            "version": "4", "status": status, "receiver": "cync-gateway",
            "alerts": [{
                "status": status,
                "labels": { "alertname": "CyncFleetNewPathWorse", "cync_rollback": label },
                "annotations": { "summary": "new path worse than legacy fleet-wide" }
            }]
        })
        .to_string()
    };
    for (status, label) in [("resolved", "true"), ("firing", "false")] {
        let (code, body) =
            http_request(admin, "POST", "/alertmanager", &auth, &batch(status, label)).await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("nothing"), "{body}");
    }
    let (code, body) = http_request(admin, "POST", "/alertmanager", &auth, "not json").await;
    assert_eq!(code, 400, "{body}");
    let m = http_get(d.metrics, "/metrics").await.1;
    assert_eq!(sample(&m, "tcp_comm_rollback_active"), 0.0);
    let (code, body) = http_request(
        admin,
        "POST",
        "/alertmanager",
        &auth,
        &batch("firing", "true"),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    wait_metric(d.metrics, "tcp_comm_rollback_active", 1.0).await;
    // A scrape reads the families one after another, so one page can hold the gauge set and
    // the count from before it: wait for the count on its own.
    wait_metric(d.metrics, "tcp_comm_rollbacks_total{reason=\"alert\"}", 1.0).await;
    let cfg = path.to_str().expect("utf-8 path");
    let s = json(&cli(&["status", "--config", cfg, "--json"]).await);
    assert_eq!(s["latch"]["actor"], "alertmanager");
    assert_eq!(
        s["latch"]["reason"],
        "alert CyncFleetNewPathWorse: new path worse than legacy fleet-wide"
    );
    drop(d);
}
