//! The observability kit against the real tools, live: the real gateway binary carrying
//! simulated traffic on both paths, a real Prometheus scraping it every second with
//! `alerts/*.yml` loaded, a real Alertmanager routing to a webhook receiver in this test, the
//! Grafana dashboard's queries asked of that Prometheus, and the built-in status page rendered
//! by headless Chromium.
//!
//! Needs `prometheus`, `prometheus-alertmanager` (with `amtool`) and `chromium` (Debian
//! packages), which `scripts/test.sh` installs when missing. Without them these tests fail with
//! what to install; they never skip. Ports are picked free; every wait polls with a deadline.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::daemon::{Daemon, BIN};
use common::*;
use cync_gateway::sim::device::{self, DeviceConfig, DeviceStats};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SEED: u64 = 91;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tool` on the PATH, or a failure that says what installs it.
fn need(tool: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(tool))
                .find(|f| f.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`{tool}` is not installed: run `bash scripts/test.sh` (it installs the Debian \
                 package `{package}`), or `apt-get install --no-install-recommends {package}`"
            )
        })
}

/// A loopback port nothing listens on now (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// GET over HTTP/1.0 (so the answer is never chunked): (status, body).
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
    Some((status, body))
}

/// A PromQL instant query's result vector (empty while Prometheus is not up yet).
async fn query(prom: SocketAddr, promql: &str) -> Vec<Value> {
    let path = format!(
        "/api/v1/query?query={}",
        utf8_percent_encode(promql, NON_ALPHANUMERIC)
    );
    let Some((200, body)) = get(prom, &path).await else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn value_of(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A child process killed when the test ends, with its output kept in `dir` for a failure.
struct Tool {
    _child: Child,
    log: PathBuf,
}

impl Tool {
    fn spawn(bin: &Path, args: &[String], dir: &Path, name: &str) -> Tool {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Tool { _child: child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Polls `f` until it gives `Some`, for at most `limit`; fails with `what` and `context()`.
async fn within<T, F, Fut>(limit: Duration, what: &str, context: impl Fn() -> String, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < end,
            "{what} within {limit:?}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn devices(target: SocketAddr, n: u32, stop: &CancellationToken) -> Vec<Arc<DeviceStats>> {
    (0..n)
        .map(|i| {
            let s = Arc::new(DeviceStats::default());
            let mut cfg = DeviceConfig::new(target, SEED, i);
            cfg.redial = (Duration::from_millis(50), Duration::from_millis(200));
            tokio::spawn(device::run(cfg, s.clone(), stop.clone()));
            s
        })
        .collect()
}

/// Every `tcp_comm_*` name in `text`, histogram suffixes stripped.
fn families_named(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("tcp_comm_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

/// The dashboard's panel queries (annotations left out: they only return data around a
/// rollback), with its variables given the values a user's "All" gives them.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = root().join("dashboards/cync-gateway.json");
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("dashboard JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                let title = p["title"].as_str().unwrap_or("?").to_string();
                out.push((title, e.replace("$instance", ".*")));
            }
        }
    }
    assert!(out.len() > 20, "too few dashboard queries: {}", out.len());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_alertmanager_dashboard_and_status_page_work_on_live_gateway_data() {
    let prometheus = need("prometheus", "prometheus");
    let alertmanager = need("prometheus-alertmanager", "prometheus-alertmanager");
    let chromium = need("chromium", "chromium");
    let dir = tempfile::tempdir().expect("tempdir");

    // The gateway: half the devices on the new path, the dark launch observing the rest.
    let addon = start_addon(fast_addon()).await;
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        TestGateway::new(addon.addr())
            .set("routing.canary_percent", 50)
            .set("dark_launch.mode", "observe")
            .set("dark_launch.percent", 100)
            .set("logging.format", "json")
            .text(),
    )
    .expect("config");
    let gw = Daemon::start(config.clone(), None).await;
    let stop = CancellationToken::new();
    let fleet = devices(gw.devices, 12, &stop);
    let pumping = CancellationToken::new();
    pump(
        addon.clone(),
        Duration::from_millis(20),
        SEED,
        pumping.clone(),
    );

    // The webhook receiver Alertmanager delivers to.
    let (hook, mut alerts) = webhook_server().await;
    let am_port = free_port();
    std::fs::write(
        dir.path().join("alertmanager.yml"),
        format!(
            "route:\n  receiver: test\n  group_by: [alertname]\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\n\
             receivers:\n  - name: test\n    webhook_configs:\n      - url: http://{hook}/alerts\n        send_resolved: false\n"
        ),
    )
    .expect("alertmanager.yml");
    let am = Tool::spawn(
        &alertmanager,
        &[
            format!(
                "--config.file={}",
                dir.path().join("alertmanager.yml").display()
            ),
            format!("--storage.path={}", dir.path().join("am").display()),
            format!("--web.listen-address=127.0.0.1:{am_port}"),
            "--cluster.listen-address=".into(),
        ],
        dir.path(),
        "alertmanager",
    );
    let prom_port = free_port();
    let rules: Vec<String> = [
        "alerts/cync-gateway.rules.yml",
        "alerts/cync-gateway.alerts.yml",
    ]
    .iter()
    .map(|f| format!("  - {}\n", root().join(f).display()))
    .collect();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{am_port}']\n\
             scrape_configs:\n  - job_name: cync-gateway\n    static_configs:\n      - targets: ['{}']\n",
            rules.concat(),
            gw.metrics
        ),
    )
    .expect("prometheus.yml");
    let prom = Tool::spawn(
        &prometheus,
        &[
            format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ),
            format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
        dir.path(),
        "prometheus",
    );
    let prom_addr: SocketAddr = ([127, 0, 0, 1], prom_port).into();
    let logs = || {
        format!(
            "prometheus:\n{}\nalertmanager:\n{}",
            prom.output(),
            am.output()
        )
    };

    // Its first scrape comes a few seconds after start: wait for `up`, never a fixed time.
    within(
        Duration::from_secs(30),
        "Prometheus scrapes the gateway",
        logs,
        || async {
            let up = query(prom_addr, "up{job=\"cync-gateway\"} == 1").await;
            (!up.is_empty()).then_some(())
        },
    )
    .await;
    assert!(
        fleet.iter().all(|s| DeviceStats::get(&s.connects) >= 1),
        "every device connected"
    );

    // The recording rules give a success ratio for both paths, from real commands.
    within(
        Duration::from_secs(30),
        "recording rules give both paths' success ratio",
        logs,
        || async {
            let r = query(prom_addr, "cync:sli_success:ratio_rate5m").await;
            let paths: BTreeSet<String> = r
                .iter()
                .filter(|s| value_of(s) > 0.9)
                .filter_map(|s| s["metric"]["transport"].as_str().map(String::from))
                .collect();
            (paths.contains("new") && paths.contains("legacy")).then_some(())
        },
    )
    .await;

    // Every metric the rules and the dashboard name is on the gateway's /metrics page.
    let page = http_get(gw.metrics, "/metrics").await.1;
    let exposed: BTreeSet<String> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect();
    let mut named = BTreeSet::new();
    for f in [
        "alerts/cync-gateway.rules.yml",
        "alerts/cync-gateway.alerts.yml",
        "dashboards/cync-gateway.json",
    ] {
        named.extend(families_named(
            &std::fs::read_to_string(root().join(f)).expect("read"),
        ));
    }
    let missing: Vec<_> = named.difference(&exposed).collect();
    assert!(missing.is_empty(), "named but not exposed: {missing:?}");

    // Every dashboard query returns data from this Prometheus.
    let queries = dashboard_queries();
    within(
        Duration::from_secs(20),
        "every dashboard query returns data",
        logs,
        || async {
            let mut empty = Vec::new();
            for (title, q) in &queries {
                if query(prom_addr, q).await.is_empty() {
                    empty.push(format!("{title}: {q}"));
                }
            }
            if empty.is_empty() {
                Some(())
            } else {
                println!("still empty:\n{}", empty.join("\n"));
                None
            }
        },
    )
    .await;

    // A gateway that just started with healthy traffic has nothing firing (its counters
    // appear at 0, which no event alert may take for an event), and nothing reached the
    // receiver; the rules have been evaluated every second since the first scrape.
    let firing = query(prom_addr, "ALERTS{alertstate=\"firing\"}").await;
    assert!(
        firing.is_empty(),
        "firing before anything happened: {firing:?}"
    );
    if let Ok((_, body)) = alerts.try_recv() {
        panic!("an alert before anything happened: {body}");
    }

    // An operator rollback: the alert reaches the receiver through Alertmanager.
    let cfg = config.to_str().expect("utf-8 path");
    let out = Command::new(BIN)
        .args(["rollback", "--config", cfg, "--reason", "pipeline test"])
        .output()
        .await
        .expect("rollback");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let rolled = Instant::now();
    let alert = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some((_, body)) = alerts.recv().await {
            let hit = body["alerts"].as_array().into_iter().flatten().find(|a| {
                a["labels"]["alertname"] == "CyncGatewayRollback"
                    && a["labels"]["reason"] == "operator"
                    && a["status"] == "firing"
            });
            if let Some(a) = hit {
                return a.clone();
            }
        }
        panic!("the webhook receiver stopped")
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the rollback alert reaches the webhook receiver within 30 s\n{}",
            logs()
        )
    });
    println!(
        "rollback alert delivered {:?} after the rollback: {}",
        rolled.elapsed(),
        alert["annotations"]["summary"]
    );
    assert_eq!(alert["labels"]["severity"], "ticket");
    assert!(alert["annotations"]["runbook_url"]
        .as_str()
        .is_some_and(|u| root().join(u).is_file()));

    // The status page, rendered by a real browser, once the figures have settled (the
    // commands stopped, the new path's devices re-homed).
    pumping.cancel();
    let status_json = || async {
        let o = Command::new(BIN)
            .args(["status", "--json", "--config", cfg])
            .output()
            .await
            .expect("status");
        serde_json::from_slice::<Value>(&o.stdout).expect("status --json")
    };
    let commands_5m = |s: &Value, t: &str| -> u64 {
        s["paths"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["transport"] == t)
            .and_then(|p| p["windows"][0]["commands"].as_u64())
            .unwrap_or(0)
    };
    let settled = within(
        Duration::from_secs(20),
        "the figures settle",
        String::new,
        || async {
            let a = status_json().await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let b = status_json().await;
            let same = |t: &str| commands_5m(&a, t) == commands_5m(&b, t);
            (same("new") && same("legacy") && a["paths"] == b["paths"]).then_some(b)
        },
    )
    .await;
    let shots = root().join("target/observability");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let png = shots.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let url = format!("http://{}/", gw.metrics);
    let browser = |extra: Vec<String>| {
        let mut args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            // This machine's network is closed: Chromium's own background connections would
            // only fail, many at a time.
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            format!("--user-data-dir={}", dir.path().join("chromium").display()),
            "--window-size=1280,900".into(),
        ];
        args.extend(extra);
        args.push(url.clone());
        Command::new(&chromium)
            .args(args)
            .stdin(Stdio::null())
            .output()
    };
    let dom = browser(vec!["--dump-dom".into()]).await.expect("chromium");
    assert!(dom.status.success(), "{dom:?}");
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let shot = browser(vec![format!("--screenshot={}", png.display())])
        .await
        .expect("chromium");
    assert!(shot.status.success(), "{shot:?}");
    let image = std::fs::read(&png).expect("screenshot written");
    assert!(
        image.starts_with(b"\x89PNG") && image.len() > 10_000,
        "{} bytes",
        image.len()
    );
    println!("status page screenshot: {}", png.display());
    for want in [
        "configured <b id=\"configured\">50.00 %</b>".to_string(),
        "in force <b id=\"effective\">0.00 %</b>".to_string(),
        "Rollback latch SET".to_string(),
        "pipeline test".to_string(),
        format!(
            "<td>new</td><td>{}</td><td>{}</td>",
            settled["paths"][0]["connections"],
            commands_5m(&settled, "new")
        ),
        format!(
            "<td>legacy</td><td>{}</td><td>{}</td>",
            settled["paths"][1]["connections"],
            commands_5m(&settled, "legacy")
        ),
        "<rect ".to_string(),
    ] {
        assert!(dom.contains(&want), "the page lacks {want:?}:\n{dom}");
    }
    stop.cancel();
    drop(gw);
}

#[test]
fn amtool_accepts_the_shipped_alertmanager_example() {
    let amtool = need("amtool", "prometheus-alertmanager");
    let out = std::process::Command::new(amtool)
        .arg("check-config")
        .arg(root().join("deploy/alertmanager.yml"))
        .output()
        .expect("amtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
