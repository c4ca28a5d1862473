//! The systemd unit in `systemd/`: `systemd-analyze verify` says nothing about it, its
//! `systemd-analyze security` exposure is at most 2.5, and the daemon speaks the notify
//! protocol it declares (`Type=notify`, `WatchdogSec=`) to a real notify socket: READY=1 once
//! it answers, RELOADING=1 with MONOTONIC_USEC and READY=1 around a SIGHUP, WATCHDOG=1 at half
//! the watchdog period, STOPPING=1 at SIGTERM.
//!
//! And the unit booted for real: a Debian bookworm minbase with systemd, made here by
//! mmdebstrap from the machine's own apt sources, booted by `systemd-nspawn`; `systemctl
//! start` returns once the daemon answers, `systemctl reload` applies an edit, `systemctl
//! stop` drains and exits 0, and the latch is still set after `systemctl restart`.
//!
//! Needs `systemd-analyze` (Debian package `systemd`), `systemd-nspawn` (`systemd-container`)
//! and `mmdebstrap`, which `scripts/test.sh` installs when missing; without them these fail,
//! never skip.

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
    // SIGHUP by the shell's builtin kill: a minimal image has no /bin/kill.
    assert_eq!(
        value("ExecReload"),
        "/bin/sh -c 'kill -s HUP \"$$MAINPID\"'"
    );
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

/// A booted rootfs; powered off and reaped when dropped.
struct Booted {
    nspawn: tokio::process::Child,
    leader: u32,
}

impl Booted {
    /// Runs `args` inside (all namespaces of the booted systemd): (exit code, output).
    fn sh(&self, args: &[&str]) -> (i32, String) {
        let o = std::process::Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a"])
            .args(args)
            .output()
            .expect("nsenter");
        (
            o.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out) = self.sh(args);
        assert_eq!(code, 0, "{args:?}:\n{out}");
        out
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        let _ = self.sh(&["systemctl", "poweroff"]);
        let _ = self.nspawn.start_kill();
    }
}

/// The bookworm minbase with systemd, made once per build directory (about 30 s).
fn systemd_rootfs() -> PathBuf {
    let dir = root().join("target/container");
    std::fs::create_dir_all(&dir).expect("target/container");
    let rootfs = dir.join("bookworm-systemd");
    if rootfs.join("usr/lib/systemd/systemd").exists() {
        return rootfs;
    }
    let partial = dir.join(format!("bookworm-systemd.{}", std::process::id()));
    let sources = [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("the machine's apt sources");
    let o = std::process::Command::new("mmdebstrap")
        .args([
            "--quiet",
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus,libssl3,ca-certificates",
            "--customize-hook=rm -f \"$1\"/etc/apt/sources.list.d/* \"$1\"/etc/apt/sources.list",
            "bookworm",
        ])
        .arg(&partial)
        .arg(sources)
        .output()
        .unwrap_or_else(|e| {
            panic!("mmdebstrap cannot run ({e}): `bash scripts/test.sh` installs it")
        });
    assert!(
        o.status.success(),
        "mmdebstrap: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::rename(&partial, &rootfs).expect("keep the rootfs");
    rootfs
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unit_boots_in_systemd_starts_ready_reloads_drains_and_keeps_the_latch() {
    let t_all = Instant::now();
    let rootfs = systemd_rootfs();
    // Install as docs/operations.md says, into the rootfs.
    let install = |from: &Path, to: &str, mode: u32| {
        let dest = rootfs.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        let _ = std::fs::remove_file(&dest);
        std::fs::copy(from, &dest).expect("copy");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    install(Path::new(BIN), "/usr/bin/cync-gateway", 0o755);
    install(
        &root().join("systemd/cync-gateway.service"),
        "/etc/systemd/system/cync-gateway.service",
        0o644,
    );
    install(
        &root().join("systemd/cync-gateway.sysusers"),
        "/usr/lib/sysusers.d/cync-gateway.conf",
        0o644,
    );
    let _ = std::fs::remove_dir_all(rootfs.join("var/lib/cync-gateway"));
    let metrics = free_port();
    let config = |percent: u32| {
        format!(
            "[listen]\ndevices = \"127.0.0.1:{}\"\nmetrics = \"127.0.0.1:{metrics}\"\n[device_tls]\nmode = \"plain\"\n\
             [upstream.legacy]\naddress = \"127.0.0.1:1\"\ntls = false\n[routing]\ncanary_percent = {percent}\n\
             # Only `systemctl reload` (SIGHUP) reloads here, so the test sees it do so.\n[reload]\npoll_interval = 0\n\
             [logging]\nformat = \"json\"\n",
            free_port()
        )
    };
    let conf = rootfs.join("etc/cync-gateway/gateway.toml");
    std::fs::create_dir_all(conf.parent().expect("parent")).expect("mkdir");
    std::fs::write(&conf, config(10)).expect("config");

    let nspawn = tokio::process::Command::new("systemd-nspawn")
        .args(["--register=no", "--keep-unit", "--quiet", "--console=passive", "-b", "-D"])
        .arg(&rootfs)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("systemd-nspawn cannot run ({e}): `bash scripts/test.sh` installs systemd-container"));
    let pid = nspawn.id().expect("nspawn pid");
    let leader = common::eventually("the container's systemd is up", || async move {
        let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        kids.split_whitespace().next()?.parse::<u32>().ok()
    })
    .await;
    let boot = Booted { nspawn, leader };
    common::eventually("systemd has booted", || async {
        let (_, out) = boot.sh(&["systemctl", "is-system-running"]);
        matches!(out.trim(), "running" | "degraded").then_some(())
    })
    .await;
    println!("booted in {:?}", t_all.elapsed());
    boot.ok(&["systemd-sysusers"]);
    boot.ok(&["chgrp", "cync-gateway", "/etc/cync-gateway/gateway.toml"]);
    boot.ok(&["chmod", "0640", "/etc/cync-gateway/gateway.toml"]);
    boot.ok(&["systemctl", "daemon-reload"]);

    // Type=notify: `start` returns once the daemon answers, so /healthz is up at once.
    boot.ok(&["systemctl", "start", "cync-gateway"]);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], metrics).into();
    assert_eq!(common::http_get(addr, "/healthz").await.0, 200);
    assert!(boot
        .ok(&["systemctl", "show", "-p", "User", "cync-gateway"])
        .contains("User=cync-gateway"));
    let m = common::http_get(addr, "/metrics").await.1;
    assert_eq!(common::sample(&m, "tcp_comm_canary_percentage"), 10.0);

    // An edit and `systemctl reload` (polling is off: only the SIGHUP can apply it).
    std::fs::write(&conf, config(40)).expect("edit");
    boot.ok(&["systemctl", "reload", "cync-gateway"]);
    common::wait_metric(addr, "tcp_comm_canary_percentage", 40.0).await;

    // The latch survives `systemctl restart`.
    boot.ok(&[
        "cync-gateway",
        "rollback",
        "--config",
        "/etc/cync-gateway/gateway.toml",
        "--reason",
        "boot test",
    ]);
    common::wait_metric(addr, "tcp_comm_rollback_active", 1.0).await;
    boot.ok(&["systemctl", "restart", "cync-gateway"]);
    let m = common::http_get(addr, "/metrics").await.1;
    assert_eq!(common::sample(&m, "tcp_comm_rollback_active"), 1.0);
    let status = boot.ok(&[
        "cync-gateway",
        "status",
        "--json",
        "--config",
        "/etc/cync-gateway/gateway.toml",
    ]);
    let v: serde_json::Value = serde_json::from_str(&status).expect("status --json");
    assert_eq!(v["latch"]["reason"], "boot test");
    // The state is where StateDirectory= put it, owned by the service's user.
    let ls = boot.ok(&["ls", "-l", "/var/lib/cync-gateway"]);
    assert!(
        ls.contains("latch.json") && ls.contains("cync-gateway cync-gateway"),
        "{ls}"
    );

    // `systemctl stop` drains and the daemon exits 0.
    boot.ok(&["systemctl", "stop", "cync-gateway"]);
    let show = boot.ok(&[
        "systemctl",
        "show",
        "-p",
        "ExecMainStatus",
        "-p",
        "Result",
        "cync-gateway",
    ]);
    assert!(
        show.contains("ExecMainStatus=0") && show.contains("Result=success"),
        "{show}"
    );
    let journal = boot.ok(&[
        "journalctl",
        "-u",
        "cync-gateway",
        "--no-pager",
        "-o",
        "cat",
    ]);
    assert!(journal.contains("drain complete"), "{journal}");
    println!("boot test took {:?}", t_all.elapsed());
    drop(boot);
}
