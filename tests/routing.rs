//! Canary routing, hot reload and re-homing through the in-process gateway over loopback:
//! the share and stickiness of the cohort across a restart, reload by editing the file, paced
//! re-homing that waits for commands in flight, and broken edits that change nothing.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use cync_gateway::conn::Transport;
use cync_gateway::control::{Control, Origin, RollbackCause};
use cync_gateway::gateway::Gateway;
use cync_gateway::protocol::{build, DeviceId, MsgId};
use cync_gateway::sim::device::{self, DeviceConfig, DeviceStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn gateway_text(upstream: SocketAddr, devices: &str, routing: &str) -> String {
    TestGateway::new(upstream)
        .set("listen.devices", devices)
        .set("reload.poll_interval", "200ms")
        .raw(&format!("[routing]\n{routing}"))
        .text()
}

fn on_path(gw: &Gateway, t: Transport) -> BTreeSet<DeviceId> {
    gw.registry
        .snapshot()
        .into_iter()
        .filter(|(_, tr)| *tr == t)
        .map(|(d, _)| d)
        .collect()
}

/// Lightweight simulated devices (no time request or start-up reports).
fn fleet(
    target: SocketAddr,
    n: u32,
    seed: u64,
    stop: &CancellationToken,
) -> Vec<(DeviceId, Arc<DeviceStats>)> {
    (0..n)
        .map(|i| {
            let stats = Arc::new(DeviceStats::default());
            let mut cfg = DeviceConfig::new(target, seed, i);
            cfg.time_request = false;
            cfg.startup_reports = false;
            cfg.redial = (Duration::from_millis(20), Duration::from_millis(300));
            tokio::spawn(device::run(cfg, stats.clone(), stop.clone()));
            (device::identity(seed, i).0, stats)
        })
        .collect()
}

async fn wait_connected(gw: &Gateway, n: usize) {
    eventually(&format!("{n} devices routed"), || async {
        (gw.registry.len() == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_split_at_ten_percent_stick_across_restart_and_grow_to_25() {
    const N: u32 = 1000;
    let a = start_addon(fast_addon()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        gateway_text(
            a.addr(),
            "127.0.0.1:0",
            "canary_percent = 10\nrehome_rate = 1000",
        ),
    )
    .expect("write");
    let gw = start_watching(&path).await;
    let device_addr = gw.device_addr;
    let stop = CancellationToken::new();
    let devices = fleet(device_addr, N, 99, &stop);
    wait_connected(&gw, N as usize).await;
    let cohort = on_path(&gw, Transport::New);
    let share = cohort.len() as f64 / f64::from(N);
    println!(
        "canary 10 %: {} of {N} devices on the new path",
        cohort.len()
    );
    assert!((0.08..=0.12).contains(&share), "share {share}");
    let expected: BTreeSet<DeviceId> = devices
        .iter()
        .map(|(d, _)| *d)
        .filter(|d| reference_on_new(*d, 10.0))
        .collect();
    assert_eq!(
        cohort, expected,
        "exactly the devices whose bucket is below 1000"
    );

    // Restart the gateway on the same address: every device redials, the same ones go new.
    gw.shutdown(Duration::from_secs(2)).await;
    let text = std::fs::read_to_string(&path).expect("read").replace(
        "127.0.0.1:0\"\nmetrics",
        &format!("{device_addr}\"\nmetrics"),
    );
    std::fs::write(&path, text).expect("write");
    let gw = start_watching(&path).await;
    assert_eq!(gw.device_addr, device_addr);
    wait_connected(&gw, N as usize).await;
    assert_eq!(
        on_path(&gw, Transport::New),
        cohort,
        "same cohort after a restart"
    );
    let connects: HashMap<DeviceId, u64> = devices
        .iter()
        .map(|(d, s)| (*d, DeviceStats::get(&s.connects)))
        .collect();

    // Raise to 25 %: the first cohort keeps its connections, the newcomers are re-homed.
    let raised = std::fs::read_to_string(&path)
        .expect("read")
        .replace("canary_percent = 10", "canary_percent = 25");
    std::fs::write(&path, raised).expect("write");
    eventually("a quarter of the fleet on the new path", || async {
        let new = on_path(&gw, Transport::New);
        (gw.registry.len() == N as usize
            && new.len() as f64 / f64::from(N) >= 0.23
            && new.len()
                == devices
                    .iter()
                    .filter(|(d, _)| reference_on_new(*d, 25.0))
                    .count())
        .then_some(())
    })
    .await;
    let grown = on_path(&gw, Transport::New);
    println!(
        "canary 25 %: {} of {N} devices on the new path",
        grown.len()
    );
    assert!(
        cohort.is_subset(&grown),
        "every first-cohort device stays new"
    );
    for (d, s) in &devices {
        if cohort.contains(d) {
            assert_eq!(
                DeviceStats::get(&s.connects),
                connects[d],
                "{d} kept its connection"
            );
        }
    }
    stop.cancel();
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A raw device: sends its hello, answers each command with its `f9` reply after
/// `answer_after` (if set), and reads until EOF, recording when that came.
struct RawDevice {
    id: DeviceId,
    closed_at: Arc<Mutex<Option<Instant>>>,
}

async fn raw_device(
    gw: SocketAddr,
    seed: u64,
    index: u32,
    answer_after: Option<Duration>,
) -> RawDevice {
    let (id, auth) = device::identity(seed, index);
    let s = TcpStream::connect(gw).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    w.write_all(&build::hello(id, &auth)).await.expect("hello");
    let closed_at = Arc::new(Mutex::new(None));
    let c = closed_at.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let mut carry = Vec::new();
        loop {
            let n = match r.read(&mut buf).await {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            carry.extend_from_slice(&buf[..n]);
            let (frames, rest) = cync_gateway::protocol::split_packets(&carry, 4096);
            carry = rest.to_vec();
            for (_, p) in frames {
                let Ok(p) = p else { continue };
                let Some(f) = p
                    .inner()
                    .filter(|f| f.class() == cync_gateway::protocol::FrameClass::Request)
                else {
                    continue;
                };
                if let Some(delay) = answer_after {
                    tokio::time::sleep(delay).await;
                    let reply = build::command_reply(id, MsgId([0, 1, 0]), f.seq, 0xd0);
                    let _ = w.write_all(&reply).await;
                }
            }
        }
        *c.lock().expect("lock") = Some(Instant::now());
    });
    RawDevice { id, closed_at }
}

/// What the upstream saw per device: when a device 0x73 arrived and when the connection ended.
#[derive(Default)]
struct UpstreamLog {
    writers: HashMap<DeviceId, tokio::net::tcp::OwnedWriteHalf>,
    replies: HashMap<DeviceId, Instant>,
    eofs: HashMap<DeviceId, Instant>,
}

/// An upstream that answers hellos and otherwise listens.
async fn raw_upstream(listener: TcpListener) -> Arc<Mutex<UpstreamLog>> {
    let log = Arc::new(Mutex::new(UpstreamLog::default()));
    let l = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let l = l.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut hello = vec![0u8; 31];
                if r.read_exact(&mut hello).await.is_err() {
                    return;
                }
                let id = DeviceId([hello[6], hello[7], hello[8], hello[9]]);
                if w.write_all(&build::hello_ack()).await.is_err() {
                    return;
                }
                l.lock().expect("lock").writers.insert(id, w);
                let mut buf = vec![0u8; 4096];
                loop {
                    match r.read(&mut buf).await {
                        Ok(n) if n > 0 => {
                            if buf[0] == 0x73 {
                                l.lock().expect("lock").replies.insert(id, Instant::now());
                            }
                        }
                        _ => break,
                    }
                }
                l.lock().expect("lock").eofs.insert(id, Instant::now());
            });
        }
    });
    log
}

/// A gateway in front of [`raw_upstream`], configured from a file it watches.
async fn raw_gateway(
    routing: &str,
) -> (
    Gateway,
    Arc<Mutex<UpstreamLog>>,
    std::path::PathBuf,
    tempfile::TempDir,
) {
    let up_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up_addr = up_listener.local_addr().expect("addr");
    let upstream = raw_upstream(up_listener).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, gateway_text(up_addr, "127.0.0.1:0", routing)).expect("write");
    let gw = start_watching(&path).await;
    (gw, upstream, path, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_the_percentage_rehomes_only_the_leavers_at_the_configured_pace() {
    const RATE: f64 = 5.0;
    const SEED: u64 = 7;
    let (gw, upstream, path, _dir) =
        raw_gateway("canary_percent = 100\nrehome_rate = 5\ndrain_grace = \"10s\"").await;
    let leaves = |i: u32| !reference_on_new(device::identity(SEED, i).0, 50.0);
    // The first leaver (re-homed first: the oldest connection) answers commands slowly.
    let busy_index = (0..30).find(|i| leaves(*i)).expect("a leaver");
    let mut devices = Vec::new();
    for i in 0..30 {
        let slow = (i == busy_index).then_some(Duration::from_millis(1500));
        devices.push(raw_device(gw.device_addr, SEED, i, slow).await);
        wait_connected(&gw, i as usize + 1).await;
    }
    let busy = devices[busy_index as usize].id;
    eventually("upstream saw every hello", || async {
        (upstream.lock().expect("lock").writers.len() == 30).then_some(())
    })
    .await;
    let leaving: BTreeSet<DeviceId> = (0..30)
        .filter(|i| leaves(*i))
        .map(|i| device::identity(SEED, i).0)
        .collect();
    assert!(
        leaving.len() >= 8 && leaving.len() <= 22,
        "{}",
        leaving.len()
    );

    let mut w = upstream
        .lock()
        .expect("lock")
        .writers
        .remove(&busy)
        .expect("busy upstream");
    w.write_all(&build::power_command(busy, MsgId([0, 0, 0]), 9, 10, true))
        .await
        .expect("command");
    let t0 = Instant::now();
    let lowered = std::fs::read_to_string(&path)
        .expect("read")
        .replace("canary_percent = 100", "canary_percent = 50");
    std::fs::write(&path, lowered).expect("write");

    eventually("every leaver closed", || async {
        let all = devices
            .iter()
            .filter(|d| leaving.contains(&d.id))
            .all(|d| d.closed_at.lock().expect("lock").is_some());
        all.then_some(())
    })
    .await;
    // The busy device was asked first but closed only after its reply reached the upstream.
    {
        let log = upstream.lock().expect("lock");
        let replied = log
            .replies
            .get(&busy)
            .copied()
            .expect("the f9 reached the upstream");
        let busy_closed = devices[busy_index as usize]
            .closed_at
            .lock()
            .expect("lock")
            .expect("closed");
        assert!(
            replied <= busy_closed,
            "closed before its command completed"
        );
        assert!(
            replied - t0 >= Duration::from_millis(1000),
            "the reply was slow"
        );
    }
    let mut closes: Vec<Duration> = devices
        .iter()
        .filter(|d| d.id != busy)
        .filter_map(|d| d.closed_at.lock().expect("lock").map(|t| t - t0))
        .collect();
    closes.sort();
    println!(
        "re-homed {} connections (plus the busy one) at {closes:?}",
        closes.len()
    );
    // Nobody who stays in the cohort was touched.
    for d in &devices {
        if !leaving.contains(&d.id) {
            assert!(
                d.closed_at.lock().expect("lock").is_none(),
                "{} stays",
                d.id
            );
        }
    }
    assert_eq!(closes.len() + 1, leaving.len());
    // Never more than RATE closes within any one second (one slot of slack for timing).
    let per_window = RATE as usize + 1;
    for w in closes.windows(per_window + 1) {
        assert!(
            w[per_window] - w[0] >= Duration::from_millis(950),
            "more than {per_window} re-homes within a second: {w:?}"
        );
    }
    let span = *closes.last().expect("closes") - closes[0];
    let min_span = Duration::from_secs_f64((closes.len() - 1) as f64 / RATE * 0.9);
    assert!(span >= min_span, "{span:?} for {} closes", closes.len());
    let m = http_get(gw.metrics_addr, "/metrics").await.1;
    assert_eq!(
        sample(&m, "tcp_comm_rehomes_total{from=\"new\",to=\"legacy\"}"),
        leaving.len() as f64
    );
    gw.shutdown(Duration::from_secs(1)).await;
}

/// Writes `text` to `path` through a temporary file renamed over it, as editors and
/// configuration managers do.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_in_place_and_by_rename_move_only_the_named_devices_and_broken_edits_change_nothing()
{
    let a = start_addon(fast_addon()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    let base = gateway_text(
        a.addr(),
        "127.0.0.1:0",
        "canary_percent = 0\nrehome_rate = 100",
    );
    std::fs::write(&path, &base).expect("write");
    let gw = start_watching(&path).await;
    let stop = CancellationToken::new();
    let devices = fleet(gw.device_addr, 20, 5, &stop);
    wait_connected(&gw, 20).await;
    assert!(on_path(&gw, Transport::New).is_empty());
    let connects = |i: usize| DeviceStats::get(&devices[i].1.connects);
    let id = |i: usize| devices[i].0;
    let moved_within = |ids: Vec<DeviceId>, t: Transport| {
        let gw = &gw;
        async move {
            let t0 = Instant::now();
            eventually("routing follows the edit", || async {
                let on = on_path(gw, t);
                (gw.registry.len() == 20 && ids.iter().all(|d| on.contains(d))).then_some(())
            })
            .await;
            t0.elapsed()
        }
    };

    // 1. Edit in place: force one device onto the new path.
    std::fs::write(
        &path,
        base.replace(
            "canary_percent = 0",
            &format!("canary_percent = 0\nforce_new = [\"{}\"]", id(3)),
        ),
    )
    .expect("write");
    let took = moved_within(vec![id(3)], Transport::New).await;
    println!("in-place edit: device on its new path after {took:?}");
    // Two 200 ms polls (the change settles over a second read), then the re-home.
    assert!(took < Duration::from_millis(400) + SLACK, "{took:?}");

    // 2. Atomic rename: a second device.
    write_atomically(
        &path,
        &base.replace(
            "canary_percent = 0",
            &format!(
                "canary_percent = 0\nforce_new = [\"{}\", \"{}\"]",
                id(3),
                id(4)
            ),
        ),
    );
    let took = moved_within(vec![id(3), id(4)], Transport::New).await;
    println!("atomic rename: device on its new path after {took:?}");
    assert!(took < Duration::from_millis(400) + SLACK, "{took:?}");
    assert_eq!(on_path(&gw, Transport::New).len(), 2);
    for i in (0..20).filter(|i| ![3, 4].contains(i)) {
        assert_eq!(connects(i), 1, "device {i} kept its only connection");
    }

    // 3. Broken edits are rejected and counted; routing and traffic carry on as before.
    let before = gw.live.config();
    for (n, bad) in [
        "[routing\ncanary_percent = 5\n".to_string(),
        base.replace("rehome_rate = 100", "rehome_rate = 100\nbogus_key = 1"),
        base.replace("canary_percent = 0", "canary_percent = 150"),
    ]
    .iter()
    .enumerate()
    {
        write_atomically(&path, bad);
        wait_metric(
            gw.metrics_addr,
            "tcp_comm_config_reloads_total{result=\"error\"}",
            (n + 1) as f64,
        )
        .await;
    }
    assert_eq!(
        *gw.live.config(),
        *before,
        "running configuration untouched"
    );
    let report = {
        let mut rng = rand::SeedableRng::seed_from_u64(3);
        let mut cursor = 0;
        for _ in 0..40 {
            assert!(a.send_command(&mut cursor, &mut rng));
        }
        eventually("commands finish", || async {
            (a.report().in_flight == 0).then_some(())
        })
        .await;
        a.report()
    };
    assert_eq!(report.done, report.sent, "{report:?}");
    assert_eq!(on_path(&gw, Transport::New).len(), 2);

    // 4. force_legacy beats the percentage: everything new except one device.
    write_atomically(
        &path,
        &base.replace(
            "canary_percent = 0",
            &format!("canary_percent = 100\nforce_legacy = [\"{}\"]", id(0)),
        ),
    );
    let ids: Vec<DeviceId> = (1..20).map(id).collect();
    moved_within(ids, Transport::New).await;
    assert_eq!(on_path(&gw, Transport::Legacy), BTreeSet::from([id(0)]));
    let m = http_get(gw.metrics_addr, "/metrics").await.1;
    assert!(
        sample(
            &m,
            "tcp_comm_routing_decisions_total{reason=\"force_new\",transport=\"new\"}"
        ) >= 2.0
    );
    assert_eq!(sample(&m, "tcp_comm_canary_percentage"), 100.0);
    assert_eq!(sample(&m, "tcp_comm_canary_effective_percentage"), 100.0);
    stop.cancel();
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollback_latch_sends_everyone_to_legacy_and_rehomes_the_new_path() {
    let (gw, _upstream, _path, _dir) = raw_gateway("canary_percent = 100\nrehome_rate = 100").await;
    let mut devices = Vec::new();
    for i in 0..5 {
        devices.push(raw_device(gw.device_addr, 3, i, None).await);
    }
    wait_connected(&gw, 5).await;
    assert_eq!(on_path(&gw, Transport::New).len(), 5);
    gw.control()
        .send(Control::Rollback {
            origin: Origin::Operator,
            cause: RollbackCause::Operator,
            reason: "test".into(),
        })
        .await
        .expect("control task running");
    eventually("every new-path connection re-homed", || async {
        devices
            .iter()
            .all(|d| d.closed_at.lock().expect("lock").is_some())
            .then_some(())
    })
    .await;
    let again = raw_device(gw.device_addr, 3, 0, None).await;
    let m = wait_metric(
        gw.metrics_addr,
        "tcp_comm_routing_decisions_total{reason=\"rollback\",transport=\"legacy\"}",
        1.0,
    )
    .await;
    assert_eq!(on_path(&gw, Transport::Legacy), BTreeSet::from([again.id]));
    assert_eq!(
        sample(&m, "tcp_comm_rehomes_total{from=\"new\",to=\"legacy\"}"),
        5.0
    );
    assert_eq!(sample(&m, "tcp_comm_canary_percentage"), 100.0);
    assert_eq!(sample(&m, "tcp_comm_canary_effective_percentage"), 0.0);
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehome_never_leaves_open_connections_where_they_are() {
    let (gw, _upstream, path, _dir) =
        raw_gateway("canary_percent = 100\nrehome = \"never\"\nrehome_rate = 100").await;
    let mut devices = Vec::new();
    for i in 0..5 {
        devices.push(raw_device(gw.device_addr, 4, i, None).await);
    }
    wait_connected(&gw, 5).await;
    let lowered = std::fs::read_to_string(&path)
        .expect("read")
        .replace("canary_percent = 100", "canary_percent = 0");
    std::fs::write(&path, lowered).expect("write");
    wait_metric(
        gw.metrics_addr,
        "tcp_comm_config_reloads_total{result=\"applied\"}",
        1.0,
    )
    .await;
    // New connections follow the new percentage; the open ones stay on their path.
    let late = raw_device(gw.device_addr, 4, 9, None).await;
    wait_connected(&gw, 6).await;
    assert_eq!(on_path(&gw, Transport::Legacy), BTreeSet::from([late.id]));
    assert_eq!(on_path(&gw, Transport::New).len(), 5);
    for d in &devices {
        assert!(d.closed_at.lock().expect("lock").is_none());
    }
    let m = http_get(gw.metrics_addr, "/metrics").await.1;
    assert_eq!(
        sample_or_zero(&m, "tcp_comm_rehomes_total{from=\"new\",to=\"legacy\"}"),
        0.0
    );
    gw.shutdown(Duration::from_secs(1)).await;
}

/// An add-on that, when the gateway's FIN reaches it, still writes one command before it
/// closes: the command was on its way as the gateway closed for a re-home.
async fn addon_writing_a_last_command(listener: TcpListener, cmd: Vec<u8>) {
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut hello = vec![0u8; 31];
        if s.read_exact(&mut hello).await.is_err() {
            return;
        }
        let _ = s.write_all(&build::hello_ack()).await;
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
        let _ = s.write_all(&cmd).await;
        let _ = s.shutdown().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_the_addon_writes_as_a_rehome_closes_reaches_the_device_and_is_counted() {
    let (id, auth) = device::identity(71, 0);
    let cmd = build::power_command(id, MsgId([0, 0, 0]), 5, 10, true).to_vec();
    for path in ["legacy", "new"] {
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let up_addr = up.local_addr().expect("addr");
        addon_writing_a_last_command(up, cmd.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("gateway.toml");
        let routing = if path == "new" {
            "canary_percent = 100"
        } else {
            "canary_percent = 0"
        };
        std::fs::write(&file, gateway_text(up_addr, "127.0.0.1:0", routing)).expect("write");
        let gw = start_watching(&file).await;
        let mut dev = TcpStream::connect(gw.device_addr).await.expect("connect");
        dev.write_all(&build::hello(id, &auth))
            .await
            .expect("hello");
        assert_eq!(read_n(&mut dev, 7).await, build::hello_ack().to_vec());
        // Move the device to the other path.
        let moved = if path == "new" {
            "canary_percent = 0"
        } else {
            "canary_percent = 100"
        };
        std::fs::write(&file, gateway_text(up_addr, "127.0.0.1:0", moved)).expect("write");
        sighup(&gw).await;
        // Closed upstream first: the add-on's last command is delivered, then the EOF.
        let rest = read_to_eof(&mut dev).await;
        assert_eq!(rest, cmd, "{path}: the command written as the pair closed");
        let m = wait_metric(
            gw.metrics_addr,
            &format!("tcp_comm_connection_closes_total{{reason=\"rehomed\",transport=\"{path}\"}}"),
            1.0,
        )
        .await;
        assert_eq!(
            sample(
                &m,
                &format!(
                    "tcp_comm_packet_sent_total{{outcome=\"abandoned\",transport=\"{path}\"}}"
                )
            ),
            1.0,
            "{path}: its reply had nowhere to go: counted, not lost unseen"
        );
        gw.shutdown(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehome_rate_paces_the_closes_even_when_replies_release_them_together() {
    const SEED: u64 = 9;
    let (gw, upstream, path, _dir) =
        raw_gateway("canary_percent = 100\nrehome_rate = 4\ndrain_grace = \"10s\"").await;
    // Six devices, each with a command in flight that all of them answer 2.5 s later.
    let mut devices = Vec::new();
    for i in 0..6 {
        devices.push(raw_device(gw.device_addr, SEED, i, Some(Duration::from_millis(2500))).await);
        wait_connected(&gw, i as usize + 1).await;
    }
    eventually("upstream saw every hello", || async {
        (upstream.lock().expect("lock").writers.len() == 6).then_some(())
    })
    .await;
    let writers: Vec<_> = upstream.lock().expect("lock").writers.drain().collect();
    let mut keep = Vec::new();
    for (id, mut w) in writers {
        w.write_all(&build::power_command(id, MsgId([0, 0, 0]), 3, 10, true))
            .await
            .expect("command");
        keep.push(w);
    }
    let t0 = Instant::now();
    let lowered = std::fs::read_to_string(&path)
        .expect("read")
        .replace("canary_percent = 100", "canary_percent = 0");
    std::fs::write(&path, lowered).expect("write");
    eventually("every device closed", || async {
        devices
            .iter()
            .all(|d| d.closed_at.lock().expect("lock").is_some())
            .then_some(())
    })
    .await;
    let mut closes: Vec<Duration> = devices
        .iter()
        .filter_map(|d| d.closed_at.lock().expect("lock").map(|t| t - t0))
        .collect();
    closes.sort();
    println!("closes at {closes:?}");
    // The replies come together; the closes still follow one another at 4 per second.
    assert!(closes[0] >= Duration::from_millis(2400), "{closes:?}");
    for w in closes.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(200),
            "closes bunched: {closes:?}"
        );
    }
    drop(keep);
    gw.shutdown(Duration::from_secs(1)).await;
}

/// Accepts on `l` and sends the device id of each connection's hello (its first 31 bytes) to
/// `tx`, then lets the connection go.
fn hello_collector(l: TcpListener, tx: tokio::sync::mpsc::UnboundedSender<DeviceId>) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut hello = [0u8; 31];
                if s.read_exact(&mut hello).await.is_ok() {
                    let id = DeviceId([hello[6], hello[7], hello[8], hello[9]]);
                    let _ = tx.send(id);
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_upstream_new_each_of_1000_devices_lands_on_the_upstream_its_bucket_says() {
    use tokio::sync::mpsc;
    let ids: Vec<DeviceId> = (0..1000u32)
        .map(|i| {
            let mut b = [0u8; 4];
            use sha2::Digest as _;
            b.copy_from_slice(&sha2::Sha256::digest(format!("strangler-{i}").as_bytes())[..4]);
            DeviceId(b)
        })
        .collect();
    for percent in [10.0, 25.0, 50.0] {
        let legacy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let new = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let new_addr = new.local_addr().expect("addr");
        let gw = TestGateway::new(legacy.local_addr().expect("addr"))
            .set("routing.canary_percent", percent)
            .set("upstream.new.address", new_addr.to_string())
            .set("upstream.new.tls", false)
            .start()
            .await;
        let (ltx, mut lrx) = mpsc::unbounded_channel();
        let (ntx, mut nrx) = mpsc::unbounded_channel();
        hello_collector(legacy, ltx);
        hello_collector(new, ntx);
        // 50 at a time; each device sends its hello and closes once an upstream has it.
        for chunk in ids.chunks(50) {
            let mut open = Vec::new();
            for id in chunk {
                let mut s = TcpStream::connect(gw.device_addr).await.expect("connect");
                s.write_all(&cync_gateway::protocol::build::hello(*id, &[7; 16]))
                    .await
                    .expect("hello");
                open.push(s);
            }
            let (mut l, mut n) = (BTreeSet::new(), BTreeSet::new());
            while l.len() + n.len() < chunk.len() {
                tokio::select! {
                    Some(id) = lrx.recv() => { l.insert(id); }
                    Some(id) = nrx.recv() => { n.insert(id); }
                    _ = tokio::time::sleep(DEADLINE) => panic!("hellos missing at {percent}%"),
                }
            }
            for id in chunk {
                let want_new = reference_on_new(*id, percent);
                assert_eq!(n.contains(id), want_new, "{id:?} at {percent}%");
                assert_eq!(l.contains(id), !want_new, "{id:?} at {percent}%");
            }
            drop(open);
        }
        let m = scrape(gw.metrics_addr).await;
        let on_new = ids
            .iter()
            .filter(|id| reference_on_new(**id, percent))
            .count() as f64;
        println!("{percent}%: {on_new} of 1000 devices on [upstream.new]");
        assert_eq!(
            sample(
                &m,
                "tcp_comm_routing_decisions_total{reason=\"percent\",transport=\"new\"}"
            ),
            on_new
        );
        gw.shutdown(Duration::from_millis(200)).await;
    }
}

/// A server that keys sessions by the peer's IP (like the PyPI `cync-lan`): the fake add-on
/// closes a source address's older connection when a newer one arrives. Three devices
/// through the gateway: from one address only one keeps its session; with a source pool
/// each device has its own address and all three stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_keying_sessions_by_peer_ip_keeps_every_device_only_with_a_source_pool() {
    use cync_gateway::sim::addon::{AddonConfig, OneSession};
    // The pool addresses the documented rule gives the three devices, computed here.
    let pool: Vec<std::net::IpAddr> = (1..=254u8)
        .map(|h| std::net::IpAddr::from([127, 1, 0, h]))
        .collect();
    let address_of = |i: u32| {
        use sha2::Digest as _;
        let id = device::identity(7, i).0;
        let d = sha2::Sha256::digest(format!("cync-gateway/v1/source:{}", id.to_hex()).as_bytes());
        let n = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
        pool[(n % pool.len() as u64) as usize]
    };
    let mut addrs: Vec<_> = (0..3).map(address_of).collect();
    addrs.sort_unstable();
    addrs.dedup();
    assert_eq!(addrs.len(), 3, "three distinct pool addresses: {addrs:?}");
    for with_pool in [false, true] {
        let a = start_addon(AddonConfig {
            one_session: OneSession::Source,
            ..fast_addon()
        })
        .await;
        let mut g = TestGateway::new(a.addr()).path("legacy");
        if with_pool {
            let mut p = toml_edit::Array::new();
            p.push("127.1.0.0/24");
            g = g
                .set("upstream.legacy.source_address", "pool")
                .set("upstream.legacy.source_pool", p);
        }
        let gw = g.start().await;
        let stop = CancellationToken::new();
        for i in 0..3 {
            let mut cfg = DeviceConfig::new(gw.device_addr, 7, i);
            cfg.redial = (Duration::from_millis(50), Duration::from_millis(200));
            tokio::spawn(device::run(
                cfg,
                Arc::new(DeviceStats::default()),
                stop.clone(),
            ));
        }
        if with_pool {
            eventually("all three sessions ready at the add-on", || async {
                (a.connections().1 == 3).then_some(())
            })
            .await;
            // And they stay: nothing is kicked over a few seconds.
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(2) {
                assert_eq!(a.connections().1, 3);
                assert_eq!(a.kicked(), 0);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        } else {
            // From one address the devices knock each other out: the second and the third
            // each close an older session, and at most one is ready at any time.
            eventually("the add-on kicks the devices' sessions", || async {
                (a.kicked() >= 2).then_some(())
            })
            .await;
            assert!(a.connections().1 <= 1, "{:?}", a.connections());
        }
        println!(
            "pool {with_pool}: {:?} connections (served, ready), {} kicked",
            a.connections(),
            a.kicked()
        );
        stop.cancel();
        gw.shutdown(Duration::from_millis(200)).await;
    }
}

/// Two devices whose preferred pool address (by the documented rule, computed here) is the
/// same: the second gets the pool's other address instead, counted as a collision, and at a
/// server that keys sessions by peer IP both keep their sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_preferring_one_pool_address_get_two_addresses_and_the_collision_is_counted() {
    use cync_gateway::sim::addon::{AddonConfig, OneSession};
    let pool = ["127.1.1.1", "127.1.1.2"];
    let preferred = |i: u32| {
        use sha2::Digest as _;
        let id = device::identity(9, i).0;
        let d = sha2::Sha256::digest(format!("cync-gateway/v1/source:{}", id.to_hex()).as_bytes());
        u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]) % 2
    };
    let first = 0u32;
    let second = (1..64)
        .find(|i| preferred(*i) == preferred(first))
        .expect("a second device with the same preferred address");
    let mut p = toml_edit::Array::new();
    for ip in pool {
        p.push(ip);
    }
    for path in ["legacy", "new"] {
        let a = start_addon(AddonConfig {
            one_session: OneSession::Source,
            ..fast_addon()
        })
        .await;
        let gw = TestGateway::new(a.addr())
            .path(path)
            .set("upstream.legacy.source_address", "pool")
            .set("upstream.legacy.source_pool", p.clone())
            .start()
            .await;
        let stop = CancellationToken::new();
        for (n, i) in [first, second].into_iter().enumerate() {
            let mut cfg = DeviceConfig::new(gw.device_addr, 9, i);
            cfg.redial = (Duration::from_millis(50), Duration::from_millis(200));
            tokio::spawn(device::run(
                cfg,
                Arc::new(DeviceStats::default()),
                stop.clone(),
            ));
            // One after the other, so which of the two is moved is known.
            eventually("the device's session is ready", || async {
                (a.connections().1 == n + 1).then_some(())
            })
            .await;
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(1) {
            assert_eq!(a.connections().1, 2, "{path}: both sessions stay");
            assert_eq!(a.kicked(), 0, "{path}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let m = scrape(gw.metrics_addr).await;
        let c = |how: &str| {
            sample(
                &m,
                &format!("tcp_comm_source_pool_collisions_total{{outcome=\"{how}\",transport=\"{path}\"}}"),
            )
        };
        assert_eq!((c("moved"), c("shared")), (1.0, 0.0), "{path}");
        println!("{path}: devices 9/{first} and 9/{second} prefer one address; moved 1, kicked 0");
        stop.cancel();
        gw.shutdown(Duration::from_millis(200)).await;
    }
}
