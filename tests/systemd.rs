//! The systemd unit in `systemd/`: `systemd-analyze verify` says nothing about it, its
//! `systemd-analyze security` exposure is at most 2.5, and the daemon speaks the notify
//! protocol it declares (`Type=notify`, `WatchdogSec=`) to a real notify socket: READY=1 once
//! it answers, RELOADING=1 with MONOTONIC_USEC and READY=1 around a SIGHUP, WATCHDOG=1 at half
//! the watchdog period, STOPPING=1 at SIGTERM.
//!
//! Needs `systemd-analyze` (Debian package `systemd`), which `scripts/test.sh` installs when
//! missing; without it the unit tests fail, never skip.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::{Daemon, BIN};
use common::gateway::TestGateway;
use nix::sys::signal::Signal;
use tokio::net::{TcpListener, UnixDatagram};
use tokio::time::Instant;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The unit with its binary paths pointed at the one this build made, so `verify` checks a
/// command that exists.
fn unit_here(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("systemd/cync-gateway.service"))
        .expect("systemd/cync-gateway.service");
    assert!(
        text.contains("ExecStart=/usr/bin/cync-gateway run"),
        "{text}"
    );
    let path = dir.join("cync-gateway.service");
    std::fs::write(&path, text.replace("/usr/bin/cync-gateway", BIN)).expect("write unit");
    path
}

fn analyze(args: &[&str]) -> std::process::Output {
    match std::process::Command::new("systemd-analyze").args(args).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "systemd-analyze cannot run ({e}): run `bash scripts/test.sh`, which installs the Debian package `systemd` when it is missing"
        ),
    }
}

#[test]
fn systemd_analyze_verify_has_nothing_to_say_about_the_unit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_here(dir.path());
    let o = analyze(&["verify", unit.to_str().expect("utf-8")]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // It exits 0 on unknown keys and only warns: any output at all is a finding.
    assert!(o.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn the_units_security_exposure_is_at_most_2_5() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_here(dir.path());
    let o = analyze(&["security", "--offline=yes", unit.to_str().expect("utf-8")]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let score: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for cync-gateway.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    println!("systemd-analyze security: exposure {score}");
    assert!(score <= 2.5, "exposure {score}:\n{out}");
}

#[test]
fn the_unit_gives_the_drain_time_to_finish_and_enough_descriptors() {
    let text = std::fs::read_to_string(root().join("systemd/cync-gateway.service")).expect("unit");
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in the unit"))
            .to_string()
    };
    let reference = cync_gateway::config::Config::load(&root().join("config/gateway.toml"))
        .expect("reference config");
    let stop = humantime::parse_duration(&value("TimeoutStopSec")).expect("TimeoutStopSec");
    assert!(stop > reference.shutdown.drain_timeout, "{stop:?}");
    let nofile: u64 = value("LimitNOFILE").parse().expect("LimitNOFILE");
    assert!(
        nofile >= cync_gateway::gateway::fds_needed(&reference),
        "LimitNOFILE={nofile} below what the reference configuration needs"
    );
    assert_eq!(value("Type"), "notify");
    assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert!(text.contains("ExecStartPre=/usr/bin/cync-gateway check-config"));
    assert_eq!(value("StateDirectory"), "cync-gateway");
    // StateDirectory= is /var/lib/cync-gateway: the default state_dir.
    assert_eq!(reference.state_dir, PathBuf::from("/var/lib/cync-gateway"));
}

/// The next datagram on the notify socket, within `limit`.
async fn next(sock: &UnixDatagram, limit: Duration) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(limit, sock.recv(&mut buf))
        .await
        .expect("a notification in time")
        .expect("recv");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Reads notifications until one has the line `want` (within 10 s); keeps them all in `seen`.
async fn until(sock: &UnixDatagram, want: &str, seen: &mut Vec<String>) -> String {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let m = next(sock, end.saturating_duration_since(Instant::now())).await;
        seen.push(m.clone());
        if m.lines().any(|l| l == want) {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_tells_a_notify_socket_ready_reloading_watchdog_and_stopping() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket).expect("notify socket");
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        TestGateway::new(up.local_addr().expect("addr"))
            .set("logging.format", "json")
            .text(),
    )
    .expect("config");
    let socket_env = socket.to_str().expect("utf-8");
    let mut d = Daemon::start_with_env(
        path,
        None,
        &[("NOTIFY_SOCKET", socket_env), ("WATCHDOG_USEC", "400000")],
    )
    .await;
    let mut seen = Vec::new();
    until(&sock, "READY=1", &mut seen).await;
    // The watchdog: fed at half of 400 ms.
    let t0 = Instant::now();
    until(&sock, "WATCHDOG=1", &mut seen).await;
    until(&sock, "WATCHDOG=1", &mut seen).await;
    let two = t0.elapsed();
    assert!(
        two < Duration::from_millis(1500),
        "two watchdog pings took {two:?}"
    );
    // A reload: RELOADING=1 with the monotonic time, then READY=1 again.
    d.signal(Signal::SIGHUP);
    let r = until(&sock, "RELOADING=1", &mut seen).await;
    assert!(r.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{r}");
    until(&sock, "READY=1", &mut seen).await;
    // The drain.
    d.signal(Signal::SIGTERM);
    until(&sock, "STOPPING=1", &mut seen).await;
    let status = tokio::time::timeout(Duration::from_secs(20), d.child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    println!("notifications: {seen:?}");
}
