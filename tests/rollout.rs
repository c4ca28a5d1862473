//! Staged promotion with the real binary: `rollout.auto_promote` walks the stages on a healthy
//! fleet and stops at a failing gate; `promote` refuses while a gate fails and says which;
//! a configuration file the daemon cannot write leaves the promotion "ready", not an error
//! loop.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::{cli, Daemon};
use common::gateway::TestGateway;
use common::*;
use cync_gateway::sim::addon::Addon;
use cync_gateway::sim::device::{self, DeviceConfig, DeviceStats};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SEED: u64 = 97;

async fn status(cfg: &str) -> Value {
    let o = cli(&["status", "--json", "--config", cfg]).await;
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    serde_json::from_slice(&o.stdout).expect("status --json")
}

fn config(addon: &Addon, extra: &[(&str, toml_edit::Value)]) -> String {
    let mut stages = toml_edit::Array::new();
    for s in [10, 25, 50, 75] {
        stages.push(s);
    }
    let mut g = TestGateway::new(addon.addr())
        .set("routing.canary_percent", 10)
        .set("rollout.stages", stages)
        .set("rollout.bake_time", "5s")
        .set("rollout.min_budget", 0.5)
        .set("rollback.check_interval", "1s")
        .set("rollback.window", "2s")
        .set("rollback.min_events", 5)
        .set("logging.format", "json");
    for (k, v) in extra {
        g = g.set(k, v.clone());
    }
    g.text()
}

fn fleet(target: std::net::SocketAddr, n: u32, stop: &CancellationToken) {
    for i in 0..n {
        let s = Arc::new(DeviceStats::default());
        let mut cfg = DeviceConfig::new(target, SEED, i);
        cfg.redial = (Duration::from_millis(50), Duration::from_millis(200));
        tokio::spawn(device::run(cfg, s, stop.clone()));
    }
}

/// The audit entries of one action, oldest first.
async fn audited(cfg: &str, action: &str) -> Vec<Value> {
    let o = cli(&["history", "--json", "--limit", "100", "--config", cfg]).await;
    let v: Value = serde_json::from_slice(&o.stdout).expect("history --json");
    v["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["action"] == action)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_promote_walks_10_25_50_on_a_healthy_fleet_and_stops_at_a_failing_gate() {
    // Stages bake 5 s; each check judges the last two seconds. Once 50 % is reached the
    // commands stop, so within about three seconds every check is inconclusive and the checks
    // gate fails before the bake at 50 % is done.
    let addon = start_addon(fast_addon()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        config(&addon, &[("rollout.auto_promote", true.into())]),
    )
    .expect("config");
    let d = Daemon::start(path.clone(), None).await;
    let cfg = path.to_str().expect("utf-8 path");
    let stop = CancellationToken::new();
    fleet(d.devices, 20, &stop);
    let pumping = CancellationToken::new();
    pump(
        addon.clone(),
        Duration::from_millis(10),
        SEED,
        pumping.clone(),
    );

    let t0 = Instant::now();
    let mut reached: Vec<f64> = Vec::new();
    loop {
        let p = status(cfg).await["configured_percent"].as_f64();
        if let Some(p) = p {
            if reached.last() != Some(&p) {
                reached.push(p);
                println!("{:?}: {p}%", t0.elapsed());
            }
        }
        if p == Some(50.0) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(45) {
            let o = cli(&["status", "--config", cfg]).await;
            panic!(
                "stages reached: {reached:?}\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reached, [10.0, 25.0, 50.0]);
    pumping.cancel();
    // Each stage baked for rollout.bake_time at least: two promotions, 5 s apart at least.
    let promotions = audited(cfg, "promote").await;
    assert_eq!(promotions.len(), 2, "{promotions:#?}");
    for (e, (from, to)) in promotions.iter().zip([(10.0, 25.0), (25.0, 50.0)]) {
        assert_eq!(e["actor"], "controller");
        assert_eq!(e["changes"][0]["key"], "routing.canary_percent");
        assert_eq!(e["changes"][0]["old"], from);
        assert_eq!(e["changes"][0]["new"], to);
        assert!(e["reason"]
            .as_str()
            .is_some_and(|r| r.contains("every gate met")));
    }
    let at = |e: &Value| {
        humantime::parse_rfc3339_weak(e["time"].as_str().expect("time")).expect("rfc3339")
    };
    let gap = at(&promotions[1])
        .duration_since(at(&promotions[0]))
        .expect("in order");
    assert!(gap >= Duration::from_secs(5), "{gap:?}");
    // The file says so too: it stays the source of truth.
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.contains("canary_percent = 50"), "{text}");

    // No more commands: the checks turn inconclusive, the checks gate fails, no promotion.
    eventually("the checks gate fails", || async {
        let s = status(cfg).await;
        let gates = s["rollout"]["gates"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        gates
            .iter()
            .any(|g| g["name"] == "checks" && g["ok"] == false)
            .then_some(())
    })
    .await;
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(5) {
        assert_eq!(status(cfg).await["configured_percent"], 50.0);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let text =
        String::from_utf8_lossy(&cli(&["status", "--config", cfg]).await.stdout).into_owned();
    println!("{text}");
    assert!(text.contains("stages 10 -> 25 -> [50] -> 75"), "{text}");
    assert!(text.contains("WAIT checks"), "{text}");
    assert_eq!(audited(cfg, "promote").await.len(), 2);

    // The report: the three stages, who set them, the new path's commands in each.
    let o = cli(&["report", "--json", "--config", cfg]).await;
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let r: Value = serde_json::from_slice(&o.stdout).expect("report --json");
    let stages = r["stages"].as_array().expect("stages");
    let got: Vec<(f64, &str)> = stages
        .iter()
        .map(|s| {
            (
                s["percent"].as_f64().unwrap_or(-1.0),
                s["set_by"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        got,
        [(10.0, "-"), (25.0, "controller"), (50.0, "controller")]
    );
    assert!(stages[1]["new_commands"].as_u64().unwrap_or(0) > 0, "{r:#}");
    assert!(stages[1]["baked_s"].as_f64().unwrap_or(0.0) >= 5.0, "{r:#}");
    assert_eq!(stages[2]["current"], true);
    assert!(r["validation"]["verdict"]
        .as_str()
        .is_some_and(|v| v.starts_with("not started")));
    let text =
        String::from_utf8_lossy(&cli(&["report", "--config", cfg]).await.stdout).into_owned();
    println!("{text}");
    assert!(text.contains("<- now"), "{text}");
    stop.cancel();
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_refuses_with_the_failing_gate_and_force_skips_all_but_the_latch() {
    let addon = start_addon(fast_addon()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, config(&addon, &[("rollout.bake_time", "1h".into())])).expect("config");
    let d = Daemon::start(path.clone(), None).await;
    let cfg = path.to_str().expect("utf-8 path");

    let o = cli(&["promote", "--config", cfg]).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains("409"), "{err}");
    assert!(err.contains("not promoting to 25%"), "{err}");
    assert!(err.contains("bake: in force for"), "{err}");
    assert!(
        err.contains("checks: no rollback check yet")
            || err.contains("checks: the last rollback check was"),
        "{err}"
    );
    assert_eq!(status(cfg).await["configured_percent"], 10.0);

    let o = cli(&["promote", "--force", "--config", cfg, "--reason", "drill"]).await;
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("promoted: 10% -> 25%"));
    assert_eq!(status(cfg).await["configured_percent"], 25.0);
    let p = audited(cfg, "promote").await;
    assert_eq!(p.len(), 1);
    assert_eq!(p[0]["actor"], "admin");
    assert_eq!(p[0]["reason"], "10% -> 25% (forced): drill");

    let o = cli(&["rollback", "--config", cfg, "--reason", "drill"]).await;
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    wait_metric(d.metrics, "tcp_comm_rollback_active", 1.0).await;
    let o = cli(&["promote", "--force", "--config", cfg]).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("latch: the rollback latch is set"));
    assert_eq!(status(cfg).await["configured_percent"], 25.0);
    drop(d);
}

/// Makes a directory immutable (`chattr +i`: even root cannot create, rename or remove in
/// it) until dropped.
struct Immutable(PathBuf);

impl Immutable {
    fn new(dir: &Path) -> Immutable {
        let o = std::process::Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .output()
            .expect("chattr (e2fsprogs)");
        assert!(o.status.success(), "chattr +i {}: {o:?}", dir.display());
        Immutable(dir.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_daemon_cannot_write_leaves_the_promotion_ready_not_an_error_loop() {
    let addon = start_addon(fast_addon()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        config(&addon, &[("rollout.auto_promote", true.into())]),
    )
    .expect("config");
    let guard = Immutable::new(dir.path());
    let d = Daemon::start(path.clone(), None).await;
    let cfg = path.to_str().expect("utf-8 path");
    let stop = CancellationToken::new();
    fleet(d.devices, 20, &stop);
    pump(addon.clone(), Duration::from_millis(10), SEED, stop.clone());

    let m = wait_metric(d.metrics, "tcp_comm_rollout_promotion_ready", 1.0).await;
    assert_eq!(sample(&m, "tcp_comm_canary_percentage"), 10.0);
    let s = status(cfg).await;
    assert_eq!(s["rollout"]["ready"]["to"], 25.0);
    assert!(s["rollout"]["ready"]["why"]
        .as_str()
        .is_some_and(|w| w.contains("cannot be replaced")));
    // It stays ready: audited once, logged once, not retried every second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ready = audited(cfg, "promotion_ready").await;
    assert_eq!(ready.len(), 1, "{ready:#?}");
    assert_eq!(ready[0]["changes"][0]["new"], 25.0);
    let warnings = d
        .log
        .lock()
        .expect("log")
        .iter()
        .filter(|l| l.contains("promotion ready, but the configuration file cannot be written"))
        .count();
    assert_eq!(warnings, 1);
    assert_eq!(status(cfg).await["configured_percent"], 10.0);
    let text =
        String::from_utf8_lossy(&cli(&["status", "--config", cfg]).await.stdout).into_owned();
    assert!(text.contains("promotion to 25% READY since"), "{text}");
    stop.cancel();
    drop(d);
    drop(guard);
}

/// The issue's own figures: a 2 s bake. The walk 10 → 25 → 50 on a healthy fleet, then an
/// operator's rollback at 50 %: the latch gate fails, and nothing is promoted however long
/// the bake has been met.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_2s_bake_auto_promote_walks_10_25_50_and_the_latch_gate_stops_it() {
    let addon = start_addon(fast_addon()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    let mut all = toml_edit::Array::new();
    for s in [10, 25, 50, 75] {
        all.push(s);
    }
    std::fs::write(
        &path,
        config(
            &addon,
            &[
                ("rollout.auto_promote", true.into()),
                ("rollout.bake_time", "2s".into()),
                ("rollout.stages", all.into()),
            ],
        ),
    )
    .expect("config");
    let d = Daemon::start(path.clone(), None).await;
    let cfg = path.to_str().expect("utf-8 path");
    let stop = CancellationToken::new();
    fleet(d.devices, 20, &stop);
    pump(addon.clone(), Duration::from_millis(10), SEED, stop.clone());
    let t0 = Instant::now();
    let mut reached: Vec<f64> = Vec::new();
    while reached.last() != Some(&50.0) {
        if let Some(p) = status(cfg).await["configured_percent"].as_f64() {
            if reached.last() != Some(&p) {
                reached.push(p);
                println!("{:?}: {p}%", t0.elapsed());
                if p == 50.0 {
                    let o = cli(&["rollback", "--config", cfg, "--reason", "hold at 50"]).await;
                    assert_eq!(o.status.code(), Some(0), "{o:?}");
                }
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(45),
            "stages reached: {reached:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reached, [10.0, 25.0, 50.0]);
    let promotions = audited(cfg, "promote").await;
    assert_eq!(promotions.len(), 2, "{promotions:#?}");
    // Three bakes' time later it is still at 50 %, the latch gate failing.
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(6) {
        assert_eq!(status(cfg).await["configured_percent"], 50.0);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let s = status(cfg).await;
    let latch_gate = s["rollout"]["gates"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == "latch").cloned())
        .expect("latch gate");
    assert_eq!(latch_gate["ok"], false, "{latch_gate}");
    assert_eq!(audited(cfg, "promote").await.len(), 2);
    stop.cancel();
    drop(d);
}
