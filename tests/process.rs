//! The real `cync-gateway` binary: `check-config` exit codes and output, shipped config files,
//! and a SIGTERM drain with a connection (and a command) in flight.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_cync-gateway");

#[test]
fn check_config_names_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[listen]\ndevices = \"999.1.1.1:23779\"\nhandshake_timeout = \"-3s\"\ncolour = \"blue\"\n[upstream.legacy]\naddress = \"127.0.0.1:23780\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "listen.colour",
        "listen.devices",
        "listen.handshake_timeout",
    ] {
        assert!(err.contains(key), "{key} not named in:\n{err}");
    }
    assert!(err.contains("unknown key"), "{err}");
    assert!(err.contains("negative"), "{err}");
    assert!(err.contains("3 problem(s)"), "{err}");
}

#[test]
fn the_reference_config_states_the_real_defaults() {
    // Every key in config/gateway.toml is set to its documented default, so the file parsed
    // must equal a file that sets nothing but the required upstream address.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
    let reference = cync_gateway::config::Config::load(&path).expect("reference parses");
    let minimal = cync_gateway::config::Config::parse(&format!(
        "[upstream.legacy]\naddress = \"{}\"\n",
        reference.upstream_legacy.address
    ))
    .expect("minimal parses");
    assert_eq!(reference, minimal);
}

#[test]
fn every_shipped_config_file_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("config dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        if let Err(e) = cync_gateway::config::Config::load(&path) {
            panic!("{}: {e}", path.display());
        }
        let out = std::process::Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(0), "{}", path.display());
        n += 1;
    }
    assert!(n >= 1, "no config files found");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = std::process::Command::new(BIN)
        .args(["check-config", "/nonexistent/gateway.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/gateway.toml"));
}

struct Daemon {
    child: Child,
    devices: SocketAddr,
    metrics: SocketAddr,
    path: std::path::PathBuf,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id().expect("pid")).expect("pid fits"));
        kill(pid, sig).expect("signal");
    }

    fn logged(&self, needle: &str) -> bool {
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains(needle))
    }
}

fn daemon_config(upstream: SocketAddr, drain: &str, extra: &str) -> String {
    format!(
        "{}[shutdown]\ndrain_timeout = \"{drain}\"\n[logging]\nformat = \"json\"\n{extra}",
        config_text(upstream, "[device_tls]\nmode = \"plain\"\n")
    )
}

/// Starts the binary on ephemeral ports and learns them from its JSON start-up log line.
async fn start_daemon(upstream: SocketAddr, drain: &str) -> Daemon {
    start_daemon_with(upstream, drain, "").await
}

async fn start_daemon_with(upstream: SocketAddr, drain: &str, extra: &str) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    let text = daemon_config(upstream, drain, extra);
    std::fs::write(&path, text).expect("write config");
    let mut child = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn daemon");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let (devices, metrics) = tokio::time::timeout(DEADLINE, async {
        loop {
            let line = lines
                .next_line()
                .await
                .expect("read log")
                .expect("daemon exited before listening");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let f = &v["fields"];
            if f["message"] == "cync-gateway listening" {
                let d = f["devices"]
                    .as_str()
                    .expect("devices")
                    .parse()
                    .expect("addr");
                let m = f["metrics"]
                    .as_str()
                    .expect("metrics")
                    .parse()
                    .expect("addr");
                return (d, m);
            }
        }
    })
    .await
    .expect("daemon logs its addresses");
    // Keep draining stderr so the daemon never blocks on a full pipe; keep it for asserts.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            l.lock().expect("log").push(line);
        }
    });
    Daemon {
        child,
        devices,
        metrics,
        path,
        log,
        _dir: dir,
    }
}

/// A device connection through the daemon, with its hello already forwarded upstream.
/// What the add-on does with a connection the gateway closes: reads to its EOF, then closes.
fn close_on_eof(mut upc: TcpStream) {
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = upc.read_to_end(&mut sink).await;
    });
}

async fn connect_device(d: &Daemon, up: &TcpListener) -> (TcpStream, TcpStream) {
    let mut dev = TcpStream::connect(d.devices).await.expect("connect");
    dev.write_all(&vector("handshake_0x23"))
        .await
        .expect("hello");
    let (mut upc, _) = up.accept().await.expect("accept");
    let mut hello = [0u8; 31];
    upc.read_exact(&mut hello).await.expect("hello forwarded");
    (dev, upc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_an_open_connection_exits_cleanly_within_the_drain_timeout() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut d = start_daemon(up.local_addr().expect("addr"), "5s").await;
    let (mut dev, _upc) = connect_device(&d, &up).await;

    let started = tokio::time::Instant::now();
    let pid = Pid::from_raw(i32::try_from(d.child.id().expect("pid")).expect("pid fits"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(
        Duration::from_secs(5) + Duration::from_secs(3),
        d.child.wait(),
    )
    .await
    .expect("exits within the drain timeout")
    .expect("wait");
    assert_eq!(status.code(), Some(0), "clean exit");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "idle connection drains at once"
    );
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, dev.read_to_end(&mut rest))
        .await
        .expect("device closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_a_command_in_flight_and_readiness_drops_first() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut d = start_daemon(up.local_addr().expect("addr"), "10s").await;
    let (mut dev, mut upc) = connect_device(&d, &up).await;
    let cmd = vector("legacy_power_on_0x73");
    upc.write_all(&cmd).await.expect("command");
    let mut got = vec![0u8; cmd.len()];
    dev.read_exact(&mut got).await.expect("command forwarded");
    assert_eq!(got, cmd);

    let pid = Pid::from_raw(i32::try_from(d.child.id().expect("pid")).expect("pid fits"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let metrics = d.metrics;
    eventually("readyz reports 503 while draining", || async move {
        let (status, _) = http_get(metrics, "/readyz").await;
        (status == 503).then_some(())
    })
    .await;
    // Still running: the command has not been answered.
    assert!(d.child.try_wait().expect("try_wait").is_none());
    // New devices are no longer accepted.
    let refused = TcpStream::connect(d.devices).await;
    assert!(refused.is_err(), "listener closed during drain");

    // The device answers; the reply reaches the add-on, then the pair closes.
    let reply = hex::decode("730000001338e8cf460002007e01000000f9d0010000d17e").expect("hex");
    dev.write_all(&reply).await.expect("reply");
    let mut fwd = vec![0u8; reply.len()];
    upc.read_exact(&mut fwd)
        .await
        .expect("reply forwarded during drain");
    assert_eq!(fwd, reply);
    let status = tokio::time::timeout(Duration::from_secs(10), d.child.wait())
        .await
        .expect("exits once the command completed")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn demo_shows_a_live_summary_and_exits_0_after_its_duration() {
    let out = std::process::Command::new(BIN)
        .args([
            "demo",
            "--duration",
            "4s",
            "--devices",
            "10",
            "--rate",
            "10",
        ])
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live = stdout.lines().filter(|l| l.starts_with('[')).count();
    assert!(live >= 3, "a summary line every second:\n{stdout}");
    assert!(stdout.contains("summary after"), "{stdout}");
    // Default canary 50 %: the ten devices split between the paths by their stable buckets.
    let last = stdout
        .lines()
        .rfind(|l| l.starts_with('['))
        .unwrap_or_default();
    let conns = |path: &str| -> u32 {
        last.split(&format!("{path}: "))
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {path} count in {last:?}"))
    };
    assert_eq!(
        conns("legacy") + conns("new"),
        10,
        "all devices connected through the gateway:\n{stdout}"
    );
    assert!(conns("new") > 0 && conns("legacy") > 0, "{last}");
    assert!(stdout.contains("success 100.00%"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rehomes_the_moved_device_and_rejects_a_broken_file() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = up.local_addr().expect("addr");
    // Polling off: only SIGHUP can reload.
    let mut d = start_daemon_with(upstream, "5s", "[reload]\npoll_interval = 0\n").await;
    let hello = vector("handshake_0x23");
    let id = hex::encode(&hello[6..10]);
    let (mut dev, upc) = connect_device(&d, &up).await;
    close_on_eof(upc);
    let reloads = |result: &str| format!("tcp_comm_config_reloads_total{{result=\"{result}\"}}");

    std::fs::write(
        &d.path,
        daemon_config(
            upstream,
            "5s",
            &format!("[reload]\npoll_interval = 0\n[routing]\nforce_new = [\"{id}\"]\n"),
        ),
    )
    .expect("edit");
    let t0 = tokio::time::Instant::now();
    d.signal(Signal::SIGHUP);
    wait_metric(d.metrics, &reloads("applied"), 1.0).await;
    // The device's route changed, so its legacy connection is closed for it to redial.
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, dev.read_to_end(&mut rest))
        .await
        .expect("re-homed")
        .expect("read");
    let took = t0.elapsed();
    println!("SIGHUP to re-homed connection: {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let (mut dev, mut upc) = connect_device(&d, &up).await;
    wait_metric(
        d.metrics,
        "tcp_comm_routing_decisions_total{reason=\"force_new\",transport=\"new\"}",
        1.0,
    )
    .await;

    // A broken file: rejected, logged with its reason, counted; the connection carries on.
    std::fs::write(
        &d.path,
        daemon_config(
            upstream,
            "5s",
            "[reload]\npoll_interval = 0\n[routing]\ncanary_percent = 150\n",
        ),
    )
    .expect("edit");
    d.signal(Signal::SIGHUP);
    wait_metric(d.metrics, &reloads("error"), 1.0).await;
    eventually("the reason is logged", || async {
        d.logged("routing.canary_percent").then_some(())
    })
    .await;
    let cmd = vector("legacy_power_on_0x73");
    upc.write_all(&cmd).await.expect("command");
    let mut got = vec![0u8; cmd.len()];
    tokio::time::timeout(DEADLINE, dev.read_exact(&mut got))
        .await
        .expect("still forwarding")
        .expect("read");
    assert_eq!(got, cmd);
    let m = http_get(d.metrics, "/metrics").await.1;
    assert_eq!(
        sample(&m, "tcp_comm_connections_active{transport=\"new\"}"),
        1.0
    );
    d.signal(Signal::SIGTERM);
    let _ = tokio::time::timeout(DEADLINE, d.child.wait()).await;
}
