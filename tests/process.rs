//! The real `cync-gateway` binary: `check-config` exit codes and output, shipped config files,
//! and a SIGTERM drain with a connection (and a command) in flight.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::daemon::{Daemon, BIN};

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

fn daemon_config(upstream: SocketAddr, drain: &str, extra: &str) -> String {
    format!(
        "{}[shutdown]\ndrain_timeout = \"{drain}\"\n[logging]\nformat = \"json\"\n{extra}",
        TestGateway::new(upstream).text()
    )
}

/// Starts the binary on ephemeral ports and learns them from its JSON start-up log line.
async fn start_daemon(upstream: SocketAddr, drain: &str) -> Daemon {
    start_daemon_with(upstream, drain, "").await
}

async fn start_daemon_with(upstream: SocketAddr, drain: &str, extra: &str) -> Daemon {
    start_daemon_env(upstream, drain, extra, &[]).await
}

async fn start_daemon_env(
    upstream: SocketAddr,
    drain: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, daemon_config(upstream, drain, extra)).expect("write config");
    Daemon::start_with_env(path, Some(dir), env).await
}

/// The runtime the daemon said it started: one worker gets tokio's current-thread runtime,
/// more get the multi-thread one (`main.rs`, `runtime`).
fn assert_runtime(d: &Daemon, flavor: &str, workers: usize) {
    assert!(
        d.logged(&format!("\"workers\":{workers}"))
            && d.logged(&format!("\"flavor\":\"{flavor}\"")),
        "no start-up line naming a {flavor} runtime with {workers} worker(s)"
    );
}

/// What the add-on does with a connection the gateway closes: reads to its EOF, then closes.
fn close_on_eof(mut upc: TcpStream) {
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = upc.read_to_end(&mut sink).await;
    });
}

/// A device connection through the daemon, with its hello already forwarded upstream.
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
    let addr = up.local_addr().expect("addr");
    let mut d = start_daemon_env(addr, "5s", "", &[("TOKIO_WORKER_THREADS", "2")]).await;
    assert_runtime(&d, "multi_thread", 2);
    let (mut dev, upc) = connect_device(&d, &up).await;
    close_on_eof(upc);

    let started = tokio::time::Instant::now();
    let pid = Pid::from_raw(i32::try_from(d.child.id().expect("pid")).expect("pid fits"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    // The idle connection is closed by the drain itself (a clean FIN, nothing sent), before the
    // process is gone.
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, dev.read_to_end(&mut rest))
        .await
        .expect("device closed")
        .expect("a clean close, not a reset");
    assert!(rest.is_empty());
    let closed = started.elapsed();
    let status = tokio::time::timeout(Duration::from_secs(5) + SLACK, d.child.wait())
        .await
        .expect("exits within the drain timeout")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "clean exit");
    println!(
        "idle connection closed {closed:?} after SIGTERM, process gone after {:?}",
        started.elapsed()
    );
    assert!(
        closed < Duration::from_secs(5),
        "idle connection drains before the deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_a_command_in_flight_and_readiness_drops_first() {
    // On one worker (a one-CPU host): the whole life, a command, the drain and readiness, on
    // the current-thread runtime.
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = up.local_addr().expect("addr");
    let mut d = start_daemon_env(addr, "10s", "", &[("TOKIO_WORKER_THREADS", "1")]).await;
    assert_runtime(&d, "current_thread", 1);
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
    // New devices are no longer accepted (the listener closes just after readiness drops).
    let devices = d.devices;
    eventually(
        "the device listener closed during the drain",
        || async move { TcpStream::connect(devices).await.is_err().then_some(()) },
    )
    .await;

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
            "--canary-percent",
            "50",
            "--fault-after",
            "0",
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
    assert!(
        !stdout.contains("ROLLBACK"),
        "no fault, no rollback:\n{stdout}"
    );
}

/// The default demo's story, shortened: a fault on the new path, the checks failing, the
/// latch, the canary devices re-homed, their commands answered on legacy, and the trail.
#[test]
fn demo_shows_the_automatic_rollback_of_a_faulty_new_path_and_exits_0() {
    let out = std::process::Command::new(BIN)
        .args([
            "demo",
            "--duration",
            "25s",
            "--fault-after",
            "5s",
            "--devices",
            "20",
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
    let at = |needle: &str| {
        stdout
            .find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{stdout}"))
    };
    // In this order: the fault, a failed check, the rollback.
    assert!(at("FAULT:") < at("== rollback check: fail"), "{stdout}");
    assert!(at("== rollback check: fail") < at("ROLLBACK: the latch is set"));
    // Every device ends on legacy, and legacy answers what it is sent.
    let last = stdout
        .lines()
        .rfind(|l| l.starts_with('['))
        .unwrap_or_default();
    assert!(last.contains("| new: 0 conns"), "{last}");
    assert!(last.contains("latch SET"), "{last}");
    let legacy_line = stdout
        .lines()
        .find(|l| l.contains("add-on commands to the devices first routed to legacy"))
        .unwrap_or_else(|| panic!("no legacy line:\n{stdout}"));
    assert!(
        legacy_line.ends_with(" 0 failed -> success 100.00%"),
        "{legacy_line}"
    );
    // The trail and the status view close the demo.
    assert!(stdout.contains("audit trail (cync-gateway history):"));
    assert!(stdout.contains("rollback controller 3 failed rollback checks in a row"));
    assert!(stdout.contains("latch         SET since"), "{stdout}");
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
    assert!(took < SLACK, "{took:?}");
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

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_replies_and_commands_do_not_keep_whole_read_buffers_alive() {
    use cync_gateway::protocol::{build, DeviceId, MsgId};
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let d = start_daemon_with(
        up.local_addr().expect("addr"),
        "1s",
        "[routing]\ncanary_percent = 100\n",
    )
    .await;
    let pid = d.child.id().expect("pid");
    const N: u32 = 200;
    let mut pairs = Vec::new();
    for i in 0..N {
        let id = DeviceId((0x6000_0000 + i).to_be_bytes());
        let hello = build::hello(id, b"0123456789abcdef");
        let mut dev = TcpStream::connect(d.devices).await.expect("connect");
        dev.write_all(&hello).await.expect("hello");
        let (mut upc, _) = up.accept().await.expect("accept");
        read_n(&mut upc, hello.len()).await;
        upc.write_all(&build::hello_ack()).await.expect("0x28");
        read_n(&mut dev, 7).await;
        pairs.push((id, dev, upc));
    }
    // One 16 KiB add-on read ending in a command, one 16 KiB device read ending in its reply,
    // per device. The first round also makes each connection's own read buffers resident.
    let mut rounds = Vec::new();
    for seq in [7u8, 8] {
        rounds.push(vm_rss_kib(pid));
        for (id, dev, upc) in &mut pairs {
            let cmd = build::power_command(*id, MsgId([0, 0, 0]), seq, 10, true);
            let mut down: Vec<u8> = (0..3270)
                .flat_map(|_| build::heartbeat_ack().to_vec())
                .collect();
            down.extend_from_slice(&cmd);
            upc.write_all(&down).await.expect("down");
            read_n(dev, down.len()).await;
            let mut upw: Vec<u8> = (0..15)
                .flat_map(|_| build::channel_reply(*id, MsgId([1, 2, 0])).to_vec())
                .collect();
            upw.extend_from_slice(&build::command_reply(*id, MsgId([0, 1, 0]), seq, 0xd0));
            dev.write_all(&upw).await.expect("up");
            read_n(upc, upw.len()).await;
        }
    }
    let (before, after) = (rounds[1], vm_rss_kib(pid));
    let per_conn = after.saturating_sub(before) as f64 / f64::from(N);
    println!(
        "RSS {} KiB with {N} idle connections, {} after a first 16 KiB exchange each, {after} after a second: {per_conn:.1} KiB per connection kept by the second",
        rounds[0], rounds[1]
    );
    assert!(
        per_conn < 8.0,
        "{per_conn:.1} KiB per connection kept after its reads were forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_path_that_becomes_a_fifo_freezes_nothing() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut d = start_daemon_with(
        up.local_addr().expect("addr"),
        "1s",
        "[reload]\npoll_interval = \"200ms\"\n",
    )
    .await;
    let good = std::fs::read_to_string(&d.path).expect("read");
    std::fs::remove_file(&d.path).expect("rm");
    assert!(std::process::Command::new("mkfifo")
        .arg(&d.path)
        .status()
        .expect("mkfifo")
        .success());
    // Polls come and go over two seconds; /healthz stays fast, devices stay served.
    let mut worst = Duration::ZERO;
    let end = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < end {
        let t0 = tokio::time::Instant::now();
        let (status, _) =
            tokio::time::timeout(Duration::from_secs(2), http_get(d.metrics, "/healthz"))
                .await
                .expect("/healthz answered");
        assert_eq!(status, 200);
        worst = worst.max(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("worst /healthz latency while the config path is a FIFO: {worst:?}");
    assert!(worst < Duration::from_millis(500), "{worst:?}");
    let (mut dev, upc) = connect_device(&d, &up).await;
    close_on_eof(upc);
    // A SIGHUP is handled at once: the read is refused and counted.
    d.signal(Signal::SIGHUP);
    wait_metric(
        d.metrics,
        "tcp_comm_config_reloads_total{result=\"error\"}",
        1.0,
    )
    .await;
    assert!(d.logged("not a regular file"));
    // A real file again: reloads work as before.
    std::fs::remove_file(&d.path).expect("rm fifo");
    std::fs::write(
        &d.path,
        good.replace("[reload]", "[routing]\ncanary_percent = 0.5\n[reload]"),
    )
    .expect("write");
    d.signal(Signal::SIGHUP);
    wait_metric(
        d.metrics,
        "tcp_comm_config_reloads_total{result=\"applied\"}",
        1.0,
    )
    .await;
    dev.write_all(&vector("heartbeat_0xd3"))
        .await
        .expect("still connected");
    let _ = d.child.start_kill();
}

#[test]
fn a_low_open_file_limit_is_refused_with_strict_and_warned_about_without() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        format!(
            "{}[logging]\nformat = \"json\"\n",
            TestGateway::new("127.0.0.1:1".parse().expect("addr"))
                .set("listen.max_connections", 20000)
                .text()
        ),
    )
    .expect("write");
    let run = |strict: &str| {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "ulimit -n 256 && exec timeout -s INT 2 {BIN} run --config {} {strict}",
                path.display()
            ))
            .output()
            .expect("run")
    };
    let out = run("--strict");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("open-file limit is 256"), "{err}");
    assert!(err.contains("41152"), "2 x 20000 + 1024 + 64 + 64: {err}");
    let out = run("");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("open-file limit is 256"), "warned: {err}");
    assert!(err.contains("cync-gateway listening"), "started: {err}");
}

#[test]
fn check_config_warns_about_secrets_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = cync_gateway::conn::tls::self_signed("gw").expect("cert");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.to_pem().expect("pem")).expect("write");
    std::fs::write(&key_path, cert.key.private_key_to_pem_pkcs8().expect("pem")).expect("write");
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        format!(
            "[device_tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[upstream.legacy]\naddress = \"127.0.0.1:1\"\n",
            cert_path.display(),
            key_path.display()
        ),
    )
    .expect("write");
    let check = || {
        let out = std::process::Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = check();
    assert!(
        err.contains("key.pem is readable by group or others"),
        "{err}"
    );
    assert!(err.contains("gw.toml is readable by others"), "{err}");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    assert!(
        !check().contains("warning"),
        "no warning once both are private"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_130_with_its_log_lines_flushed() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let logs = tempfile::tempdir().expect("tempdir");
    let mut d = start_daemon_with(
        up.local_addr().expect("addr"),
        "30s",
        &format!(
            "file_dir = \"{}\"\nfile_rotation = \"never\"\n",
            logs.path().display()
        ),
    )
    .await;
    // A command in flight keeps the drain waiting.
    let (_dev, mut upc) = connect_device(&d, &up).await;
    upc.write_all(&vector("legacy_power_on_0x73"))
        .await
        .expect("command");
    wait_metric(
        d.metrics,
        "tcp_comm_packets_total{direction=\"srv_to_dev\",packet_type=\"0x73\",transport=\"legacy\"}",
        1.0,
    )
    .await;
    d.signal(Signal::SIGTERM);
    eventually("the drain started", || async {
        d.logged("shutting down").then_some(())
    })
    .await;
    d.signal(Signal::SIGTERM);
    let status = tokio::time::timeout(DEADLINE, d.child.wait())
        .await
        .expect("exits at once")
        .expect("wait");
    assert_eq!(status.code(), Some(130));
    let written: String = std::fs::read_dir(logs.path())
        .expect("log dir")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).unwrap_or_default())
        .collect();
    assert!(
        written.contains("second signal: exiting now"),
        "the last line reached the file:\n{written}"
    );
}

#[test]
fn every_metric_family_is_documented_and_every_documented_one_exists() {
    let m = cync_gateway::telemetry::metrics::Metrics::new(true).expect("metrics");
    let families: std::collections::BTreeSet<String> = m.family_names().iter().cloned().collect();
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md"),
    )
    .expect("docs/metrics.md");
    let documented: std::collections::BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `tcp_comm_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("tcp_comm_{n}"))
        .collect();
    let undocumented: Vec<_> = families.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&families).collect();
    assert!(
        undocumented.is_empty(),
        "registered but not in docs/metrics.md: {undocumented:?}"
    );
    assert!(
        stale.is_empty(),
        "in docs/metrics.md but not registered: {stale:?}"
    );
    assert!(families.len() >= 38, "{families:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_an_unanswered_command_ends_at_the_drain_timeout() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut d = start_daemon(up.local_addr().expect("addr"), "2s").await;
    let (mut dev, mut upc) = connect_device(&d, &up).await;
    let cmd = vector("legacy_power_on_0x73");
    upc.write_all(&cmd).await.expect("command");
    assert_eq!(read_n(&mut dev, cmd.len()).await, cmd);
    // The device never answers: the drain waits for it, and gives up at its deadline.
    let t0 = tokio::time::Instant::now();
    d.signal(Signal::SIGTERM);
    let status = tokio::time::timeout(DEADLINE, d.child.wait())
        .await
        .expect("exits")
        .expect("wait");
    let took = t0.elapsed();
    println!("drain with an unanswered command ended after {took:?} (drain_timeout 2 s)");
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(2) + SLACK,
        "{took:?}"
    );
    assert!(d.logged("drain deadline passed"), "the timeout is logged");
}

/// The device listener's accept queue as the kernel holds it: `ss` reports a listening
/// socket's backlog in its Send-Q column.
fn accept_queue(port: u16) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no listener on {port}: {text}"));
    line.split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no Send-Q in {line:?}"))
}

#[tokio::test]
async fn the_device_listener_queues_as_many_handshakes_as_listen_backlog_says() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("somaxconn")
        .trim()
        .parse()
        .expect("a number");
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    // Not set: HAProxy's own queue at its default maxconn, 4,096, not the standard library's
    // 128 that a fleet reconnecting at once overflowed.
    for (set, expected) in [(Some(1000), 1000), (None, 4096.min(somaxconn))] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gw.toml");
        let mut gw = TestGateway::new(up.local_addr().expect("addr"));
        if let Some(n) = set {
            gw = gw.set("listen.backlog", n);
        }
        std::fs::write(
            &path,
            format!("{}[logging]\nformat = \"json\"\n", gw.text()),
        )
        .expect("write");
        let d = Daemon::start(path, Some(dir)).await;
        assert_eq!(
            accept_queue(d.devices.port()),
            expected,
            "listen.backlog = {set:?}"
        );
    }
}
