//! The simulator against itself, against real packet layouts, and through the gateway with
//! chaos: device ↔ fake add-on sessions, packet layouts, timing, and every chaos fault kind.
// Byte ranges compared field by field; a single range per packet type is intended.
#![allow(clippy::single_range_in_vec_init)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use cync_gateway::protocol::{split_packets, DecodeError, Packet, PacketType};
use cync_gateway::sim::addon::Addon;
use cync_gateway::sim::chaos::{Chaos, Fault, Plan};
use cync_gateway::sim::device::{self, DeviceConfig, DeviceStats};
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    DeviceStats::get(c)
}

/// Sends `n` commands one after another, each once the previous is done or timed out.
async fn send_sequential(a: &Arc<Addon>, n: u64, seed: u64) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut cursor = 0;
    for i in 0..n {
        assert!(a.send_command(&mut cursor, &mut rng), "a ready connection");
        eventually(&format!("command {i} finished"), || async {
            let r = a.report();
            (r.in_flight == 0).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_against_addon_completes_session_and_100_commands() {
    let a = start_addon(fast_addon()).await;
    let stats = Arc::new(DeviceStats::default());
    let stop = CancellationToken::new();
    let mut cfg = DeviceConfig::new(a.addr(), 3, 0);
    cfg.heartbeat = Duration::from_millis(300);
    tokio::spawn(device::run(cfg, stats.clone(), stop.clone()));
    eventually(
        "hello, channel open, mesh query, two heartbeats",
        || async {
            (get(&stats.hello_acks) == 1
                && get(&stats.channel_opens) == 1
                && get(&stats.mesh_queries) == 1
                && get(&stats.time_replies) == 1
                && get(&stats.info_acks) == 1
                && get(&stats.status_acks) == 2
                && get(&stats.heartbeat_acks) >= 2)
                .then_some(())
        },
    )
    .await;
    send_sequential(&a, 100, 9).await;
    let r = a.report();
    assert_eq!(
        (r.sent, r.done, r.timed_out, r.lost),
        (100, 100, 0, 0),
        "{r:?}"
    );
    assert_eq!(r.success_ratio(), 1.0);
    assert_eq!(
        get(&stats.commands_applied),
        100 + 1,
        "100 commands + the mesh ack"
    );
    assert_eq!(get(&stats.connects), 1);
    assert_eq!(a.received(PacketType::ChannelReply), 1);
    stop.cancel();
}

/// Records everything one simulated device sends to a scripted server that answers like the
/// add-on, and returns (arrival time, packet) pairs.
async fn scripted_session() -> Vec<(Instant, Packet)> {
    let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let stats = Arc::new(DeviceStats::default());
    let stop = CancellationToken::new();
    let mut cfg = DeviceConfig::new(server.local_addr().expect("addr"), 11, 4);
    cfg.heartbeat = Duration::from_millis(400);
    tokio::spawn(device::run(cfg, stats, stop.clone()));
    let (mut s, _) = server.accept().await.expect("accept");
    let mut got: Vec<(Instant, Packet)> = Vec::new();
    let mut buf = bytes::BytesMut::new();
    let mut sent_setup = false;
    let end = Instant::now() + Duration::from_secs(3);
    let mut tmp = [0u8; 4096];
    while Instant::now() < end {
        let n = match tokio::time::timeout_at(end, s.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        let now = Instant::now();
        buf.extend_from_slice(&tmp[..n]);
        let (pkts, rest) = split_packets(&buf, 4096);
        let whole = buf.len() - rest.len();
        let _ = buf.split_to(whole);
        for p in pkts {
            got.push((now, p.1.expect("device sends valid packets")));
        }
        if !sent_setup && got.iter().any(|(_, p)| p.ptype() == PacketType::Hello) {
            sent_setup = true;
            let mut out = vector("hello_ack_0x28");
            out.extend(vector("legacy_channel_open_0xa3"));
            out.extend(vector("legacy_power_on_0x73"));
            s.write_all(&out).await.expect("write");
        }
    }
    stop.cancel();
    got
}

fn same_at(ours: &[u8], real: &[u8], ranges: &[std::ops::Range<usize>], what: &str) {
    assert_eq!(ours.len(), real.len(), "{what}: length");
    for r in ranges {
        assert_eq!(&ours[r.clone()], &real[r.clone()], "{what}: bytes {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_packets_match_real_layouts_and_timing() {
    let got = scripted_session().await;
    let find = |t: PacketType, pred: &dyn Fn(&Packet) -> bool| {
        got.iter()
            .find(|(_, p)| p.ptype() == t && pred(p))
            .map(|(at, p)| (*at, p.raw().to_vec()))
            .unwrap_or_else(|| panic!("device never sent {t}"))
    };
    // The hello is the first packet, the time request right behind it (§9).
    assert_eq!(got[0].1.ptype(), PacketType::Hello);
    assert_eq!(got[1].1.ptype(), PacketType::TimeRequest);
    let (_, hello) = find(PacketType::Hello, &|_| true);
    same_at(
        &hello,
        &vector("handshake_0x23"),
        &[0..6, 10..12, 28..31],
        "0x23",
    );
    assert!(hello[12..28]
        .iter()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    same_at(
        &find(PacketType::TimeRequest, &|_| true).1,
        &vector("time_request_0xc3"),
        &[0..6],
        "0xc3",
    );
    same_at(
        &find(PacketType::Info, &|_| true).1,
        &vector("device_info_0x43_timestamp"),
        &[0..5, 9..15],
        "0x43 TLV",
    );
    let fw = find(PacketType::Status, &|p| {
        p.firmware().is_some_and(|f| f.0 == 1)
    })
    .1;
    same_at(
        &fw,
        &vector("status_0x83_fw_device"),
        &[0..5, 12..53, 54..55],
        "0x83 firmware",
    );
    same_at(
        &find(PacketType::ChannelReply, &|_| true).1,
        &vector("device_channel_reply_0xab"),
        &[0..5, 12..1024],
        "0xab",
    );
    let (reply_at, reply) = find(PacketType::Data, &|p| p.is_command_reply());
    same_at(
        &reply,
        &vector("device_power_reply_f9d0"),
        &[0..5, 12..13, 14..22, 23..24],
        "f9 reply",
    );
    assert_eq!(reply[13], 0x01, "echoes the command's inner seq");
    same_at(
        &find(PacketType::DataAck, &|_| true).1,
        &vector("device_ack_0x7b_of_cloud_cmd"),
        &[0..5],
        "0x7b",
    );
    let ack = find(PacketType::DataAck, &|_| true).1;
    assert_eq!(
        &ack[5..12],
        &vector("legacy_power_on_0x73")[5..12],
        "0x7b echoes id + msg_id"
    );
    let (status_at, status) = find(PacketType::Status, &|p| p.mesh_status().is_some());
    same_at(
        &status,
        &vector("status_0x83_fadb13"),
        &[0..5, 12..13, 14..21, 22..24, 25..26, 27..32, 38..40, 41..42],
        "0x83 fa db 13",
    );
    assert_eq!(
        status[13], 0x01,
        "status after a command echoes its inner seq"
    );
    let gap = status_at - reply_at;
    assert!(
        gap >= Duration::from_millis(80) && gap <= Duration::from_millis(1100),
        "status {gap:?} after the reply (0.08-1 s)"
    );
    same_at(
        &find(PacketType::Heartbeat, &|_| true).1,
        &vector("heartbeat_0xd3"),
        &[0..5],
        "0xd3",
    );
    let beats: Vec<Instant> = got
        .iter()
        .filter(|(_, p)| p.ptype() == PacketType::Heartbeat)
        .map(|(t, _)| *t)
        .collect();
    assert!(beats.len() >= 2, "heartbeats while idle");
    for w in beats.windows(2) {
        let d = w[1] - w[0];
        assert!(
            d >= Duration::from_millis(390) && d < Duration::from_millis(800),
            "spacing {d:?}"
        );
    }
    assert_eq!(
        DeviceConfig::new("127.0.0.1:1".parse().expect("addr"), 0, 0).heartbeat,
        Duration::from_secs(21),
        "real devices heartbeat after 21 s idle"
    );
}

// ---------------------------------------------------------------------------------------------
// Chaos
// ---------------------------------------------------------------------------------------------

/// client -> chaos -> scripted server; returns (client, server side, chaos).
async fn chaos_pair(plan: &str) -> (TcpStream, TcpStream, Chaos) {
    let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let chaos = Chaos::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        server.local_addr().expect("addr"),
        Plan::parse(plan).expect("plan"),
    )
    .expect("chaos");
    let client = TcpStream::connect(chaos.addr()).await.expect("connect");
    // The proxy seeds from the device's first bytes, so the first write goes out before accept.
    (client, server.accept().await.expect("accept").0, chaos)
}

fn beats(n: usize) -> Vec<u8> {
    vector("heartbeat_0xd3").repeat(n)
}

#[tokio::test]
async fn chaos_drop_duplicate_and_storm() {
    let (mut c, mut s, ch) = chaos_pair(
        "[[rules]]\ndirection = \"dev_to_srv\"\nfault = \"drop\"\ntypes = [\"0xd3\"]\nnth = 2\n",
    )
    .await;
    c.write_all(&beats(3)).await.expect("write");
    c.write_all(&vector("hello_ack_0x28"))
        .await
        .expect("marker");
    assert_eq!(
        read_n(&mut s, 10 + 7).await,
        [beats(2), vector("hello_ack_0x28")].concat()
    );
    assert_eq!(ch.stats.fired(Fault::Drop), 1);

    let (mut c, mut s, ch) =
        chaos_pair("[[rules]]\nfault = \"duplicate\"\ntypes = [\"0xd3\"]\n").await;
    c.write_all(&beats(2)).await.expect("write");
    assert_eq!(read_n(&mut s, 20).await, beats(4));
    assert_eq!(ch.stats.fired(Fault::Duplicate), 2);

    let (mut c, mut s, ch) = chaos_pair(
        "[[rules]]\nfault = \"heartbeat_storm\"\ntypes = [\"0xd3\"]\nnth = 1\ncount = 20\n",
    )
    .await;
    c.write_all(&beats(1)).await.expect("write");
    assert_eq!(read_n(&mut s, 21 * 5).await, beats(21));
    assert_eq!(ch.stats.fired(Fault::HeartbeatStorm), 1);
}

#[tokio::test]
async fn chaos_reorder_and_corruptions() {
    let (mut c, mut s, ch) =
        chaos_pair("[[rules]]\nfault = \"reorder\"\ntypes = [\"0x23\"]\n").await;
    let hello = vector("handshake_0x23");
    c.write_all(&[hello.clone(), beats(1)].concat())
        .await
        .expect("write");
    assert_eq!(read_n(&mut s, 36).await, [beats(1), hello].concat());
    assert_eq!(ch.stats.fired(Fault::Reorder), 1);

    let status = vector("status_0x83_fadb13");
    let (mut c, mut s, ch) =
        chaos_pair("[[rules]]\nfault = \"corrupt_checksum\"\ntypes = [\"0x83\"]\n").await;
    c.write_all(&status).await.expect("write");
    let got = read_n(&mut s, status.len()).await;
    let err = Packet::parse(got.into(), 4096).expect_err("corrupted");
    assert!(
        matches!(err, DecodeError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    assert_eq!(ch.stats.fired(Fault::CorruptChecksum), 1);

    let (mut c, mut s, ch) =
        chaos_pair("[[rules]]\nfault = \"corrupt_length\"\ntypes = [\"0x83\"]\n").await;
    c.write_all(&status).await.expect("write");
    let got = read_n(&mut s, status.len()).await;
    assert_eq!(got[4], status[4].wrapping_add(1), "length field changed");
    assert_eq!(ch.stats.fired(Fault::CorruptLength), 1);
}

#[tokio::test]
async fn chaos_delay_bandwidth_and_slow_close_take_time() {
    let (mut c, mut s, ch) = chaos_pair(
        "[[rules]]\nfault = \"delay\"\ntypes = [\"0xd3\"]\ndelay_ms = 300\njitter_ms = 50\n",
    )
    .await;
    let t0 = Instant::now();
    c.write_all(&beats(1)).await.expect("write");
    read_n(&mut s, 5).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(ch.stats.fired(Fault::Delay), 1);

    let (mut c, mut s, ch) =
        chaos_pair("[[rules]]\nfault = \"bandwidth\"\nbytes_per_sec = 2000\n").await;
    let big = vector("device_channel_reply_0xab");
    let t0 = Instant::now();
    c.write_all(&big).await.expect("write");
    read_n(&mut s, big.len()).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(450),
        "1,024 bytes at 2,000 B/s: {:?}",
        t0.elapsed()
    );
    drop(ch);

    let (mut c, mut s, ch) =
        chaos_pair("[[rules]]\nfault = \"slow_close\"\ndelay_ms = 300\n").await;
    c.write_all(&beats(1)).await.expect("write");
    read_n(&mut s, 5).await;
    let t0 = Instant::now();
    c.shutdown().await.expect("FIN");
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
        .await
        .expect("EOF")
        .expect("read");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(ch.stats.fired(Fault::SlowClose), 1);
}

#[tokio::test]
async fn chaos_reset_and_stall() {
    let (mut c, mut s, ch) =
        chaos_pair("[[rules]]\nfault = \"reset\"\ntypes = [\"0xd3\"]\nnth = 1\n").await;
    c.write_all(&beats(1)).await.expect("write");
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert_eq!(ch.stats.fired(Fault::Reset), 1);

    let (mut c, mut s, ch) =
        chaos_pair("[[rules]]\nfault = \"stall\"\ntypes = [\"0x23\"]\nnth = 1\n").await;
    c.write_all(&[vector("handshake_0x23"), beats(2)].concat())
        .await
        .expect("write");
    assert_eq!(
        read_n(&mut s, 15).await,
        vector("handshake_0x23")[..15].to_vec()
    );
    let mut more = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(300), s.read(&mut more)).await;
    assert!(r.is_err(), "nothing more is forwarded after a stall");
    assert_eq!(ch.stats.fired(Fault::Stall), 1);
}

/// device -> chaos (drops 5 % of f9 replies) -> gateway (legacy) -> fake add-on.
async fn legacy_run_with_f9_drops(seed: u64) -> (u64, u64, u64) {
    let a = start_addon(fast_addon()).await;
    let gw = TestGateway::new(a.addr()).start().await;
    let chaos = Chaos::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        gw.device_addr,
        Plan::parse(&format!(
            "seed = {seed}\n[[rules]]\ndirection = \"dev_to_srv\"\nfault = \"drop\"\ntypes = [\"0x73\"]\nclass = \"f9\"\nprobability = 0.05\n"
        ))
        .expect("plan"),
    )
    .expect("chaos");
    let stop = CancellationToken::new();
    let stats = Arc::new(DeviceStats::default());
    let mut cfg = DeviceConfig::new(chaos.addr(), 5, 0);
    cfg.redial = (Duration::from_secs(60), Duration::from_secs(60));
    tokio::spawn(device::run(cfg, stats.clone(), stop.clone()));
    eventually("device ready at the add-on", || async {
        (a.connections().1 == 1).then_some(())
    })
    .await;
    // Mesh query reply may itself be dropped; wait until the add-on's loop is unblocked.
    eventually("mesh query sent", || async {
        (get(&stats.mesh_queries) == 1).then_some(())
    })
    .await;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let mut cursor = 0;
    for _ in 0..250 {
        assert!(a.send_command(&mut cursor, &mut rng));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eventually("every command done or timed out", || async {
        let r = a.report();
        (r.in_flight == 0).then_some(())
    })
    .await;
    let r = a.report();
    stop.cancel();
    // The gateway sees the same dropped replies; its tracker expires them on its own tick, up to
    // a second after the harness gave up, so poll for them. The mesh query is a command to the
    // gateway (not to the harness), hence at most one more.
    let series = "tcp_comm_packet_sent_total{outcome=\"timeout\",transport=\"legacy\"}";
    let want = r.timed_out as f64;
    let gw_timeouts = eventually("the gateway counts the harness's timeouts", || async {
        let m = http_get(gw.metrics_addr, "/metrics").await.1;
        let v = sample_or_zero(&m, series);
        (v >= want).then_some(v)
    })
    .await;
    assert!(
        gw_timeouts <= want + 1.0,
        "gateway {gw_timeouts} timeouts vs harness {want}"
    );
    (r.done, r.timed_out + r.lost, chaos.stats.fired(Fault::Drop))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_f9_drops_lower_legacy_success_reproducibly() {
    let first = legacy_run_with_f9_drops(42).await;
    let second = legacy_run_with_f9_drops(42).await;
    println!("done, failed, dropped: {first:?} / {second:?}");
    assert_eq!(first, second, "same seed, same faults, same outcome");
    assert!(
        first.2 >= 3,
        "about 5 % of 251 f9 replies dropped: {}",
        first.2
    );
    assert!(first.1 >= 1, "commands failed");
    let ratio = first.0 as f64 / (first.0 + first.1) as f64;
    assert!(ratio < 0.995, "success {ratio} is measurably below 100 %");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addon_modes_and_restart() {
    let a = start_addon(fast_addon()).await;
    let stats = Arc::new(DeviceStats::default());
    let stop = CancellationToken::new();
    let mut cfg = DeviceConfig::new(a.addr(), 8, 1);
    cfg.heartbeat = Duration::from_millis(100);
    cfg.redial = (Duration::from_millis(20), Duration::from_millis(50));
    tokio::spawn(device::run(cfg, stats.clone(), stop.clone()));
    eventually("heartbeats answered", || async {
        (get(&stats.heartbeat_acks) >= 1).then_some(())
    })
    .await;

    // Silent: heartbeats still arrive at the add-on but are not answered.
    a.set_mode(cync_gateway::sim::addon::Mode::Silent);
    let acks = get(&stats.heartbeat_acks);
    let seen = a.received(PacketType::Heartbeat);
    eventually("three more heartbeats received", || async {
        (a.received(PacketType::Heartbeat) >= seen + 3).then_some(())
    })
    .await;
    assert!(
        get(&stats.heartbeat_acks) <= acks + 1,
        "at most one answer was already in flight"
    );

    // Slow: answers come, but each takes slow_delay.
    a.set_mode(cync_gateway::sim::addon::Mode::Normal);
    eventually("answers resume", || async {
        (get(&stats.heartbeat_acks) > acks + 1).then_some(())
    })
    .await;

    // Restart: every connection dropped, the device redials the same port and is served again.
    let connects = get(&stats.connects);
    let accepted = a.accepted();
    a.restart().await.expect("restart");
    eventually("device reconnected after the restart", || async {
        (get(&stats.connects) > connects && a.accepted() > accepted && a.connections().1 == 1)
            .then_some(())
    })
    .await;
    assert!(get(&stats.disconnects) >= 1);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addon_slow_and_no_status_ack_modes() {
    let mut cfg = fast_addon();
    cfg.slow_delay = Duration::from_millis(300);
    let a = start_addon(cfg).await;
    let mut dev = TcpStream::connect(a.addr()).await.expect("connect");
    dev.write_all(&vector("handshake_0x23"))
        .await
        .expect("hello");
    assert_eq!(read_n(&mut dev, 7).await, vector("hello_ack_0x28"));
    // Read past the add-on's start-up (0xa3 at +50 ms, mesh query at +200 ms): its receive loop
    // is blocked until the mesh query has gone out.
    loop {
        let head = read_n(&mut dev, 5).await;
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        read_n(&mut dev, len).await;
        if head[0] == 0x73 {
            break;
        }
    }
    a.set_mode(cync_gateway::sim::addon::Mode::NoStatusAck);
    dev.write_all(&[vector("status_0x83_fadb13"), vector("heartbeat_0xd3")].concat())
        .await
        .expect("write");
    assert_eq!(
        read_n(&mut dev, 5).await,
        vector("heartbeat_ack_0xd8"),
        "0x83 unanswered, 0xd3 answered"
    );
    a.set_mode(cync_gateway::sim::addon::Mode::Slow);
    let t0 = Instant::now();
    dev.write_all(&vector("heartbeat_0xd3"))
        .await
        .expect("write");
    assert_eq!(read_n(&mut dev, 5).await, vector("heartbeat_ack_0xd8"));
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "slow answer: {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_progress_percentiles_and_each_path() {
    let a = start_addon(fast_addon()).await;
    let gw = TestGateway::new(a.addr())
        .set("routing.canary_percent", 50)
        .start()
        .await;
    let cfg = cync_gateway::sim::load::LoadConfig {
        target: gw.device_addr,
        tls: false,
        devices: 10,
        seed: 4,
        rate: 40.0,
        duration: Duration::from_secs(3),
        ramp_per_sec: 100,
        heartbeat: Duration::from_secs(21),
        warmup: Duration::from_millis(300),
        path_of: Some(cync_gateway::sim::load::PathOf::new(|d| {
            cync_gateway::telemetry::labels::Label::label(
                cync_gateway::control::router::by_percent(d, 50.0),
            )
        })),
        target_of: None,
    };
    let mut ticks = 0;
    let report = cync_gateway::sim::load::run(&cfg, &a, |_| ticks += 1).await;
    assert!(ticks >= 2, "progress every second");
    assert_eq!(report.device_connects, 10);
    assert!(report.commands.sent >= 60, "{report:?}");
    assert_eq!(report.commands.done, report.commands.sent, "{report:?}");
    assert_eq!(report.success_ratio, 1.0);
    assert!(report.commands.p50_ms > 0.0 && report.commands.p99_ms >= report.commands.p50_ms);
    // Per path, by the gateway's own buckets: both paths used, every command accounted for.
    let paths = report.by_path.expect("per-path report");
    println!("{paths:?}");
    assert_eq!(paths.values().map(|p| p.devices).sum::<u32>(), 10);
    assert_eq!(
        paths.values().map(|p| p.done).sum::<u64>(),
        report.commands.done
    );
    // The gateway's own count of connections it routed to the new path (one per device).
    let m = http_get(gw.metrics_addr, "/metrics").await.1;
    let new_devices = sample(&m, "tcp_comm_connections_total{transport=\"new\"}") as u32;
    assert_eq!(paths.get("new").map_or(0, |p| p.devices), new_devices);
    assert!(new_devices > 0 && new_devices < 10, "{new_devices}");
    gw.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn the_simulated_mesh_reply_has_the_real_firmwares_layout() {
    use cync_gateway::protocol::build::{mesh_reply, MeshDevice};
    use cync_gateway::protocol::{DeviceId, MsgId};
    let real = vector("device_mesh_reply_f952");
    let p = Packet::parse(bytes::Bytes::from(real.clone()), 4096).expect("valid vector");
    // The real records start at 27, after a 7-byte lead; read them the way the add-on does.
    let records: Vec<&[u8]> = real[27..real.len() - 2].chunks(24).collect();
    assert_eq!(records.len(), 4);
    let devices: Vec<MeshDevice> = records
        .iter()
        .map(|r| MeshDevice {
            mesh_id: r[0],
            kind: r[2],
            state: r[8],
            brightness: r[12],
            temp: r[16],
            rgb: [r[20], r[21], r[22]],
        })
        .collect();
    let ours = mesh_reply(
        DeviceId([real[5], real[6], real[7], real[8]]),
        MsgId([real[9], real[10], real[11]]),
        real[13],
        &devices,
    );
    assert_eq!(ours.len(), real.len());
    assert_eq!(
        &ours[..27],
        &real[..27],
        "header, frame, inner length and lead"
    );
    for (i, r) in records.iter().enumerate() {
        let at = 27 + 24 * i;
        for off in [0usize, 2, 8, 12, 16, 20, 21, 22] {
            assert_eq!(ours[at + off], r[off], "record {i} byte {off}");
        }
    }
    assert!(Packet::parse(ours, 4096).is_ok());
    assert!(p.inner().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_addon_keeps_one_session_per_source_when_asked_and_can_stall_its_reads() {
    use cync_gateway::sim::addon::{AddonConfig, Mode, OneSession};
    let a = start_addon(AddonConfig {
        one_session: OneSession::Source,
        ..fast_addon()
    })
    .await;
    let hello = vector("handshake_0x23");
    let mut first = TcpStream::connect(a.addr()).await.expect("connect");
    first.write_all(&hello).await.expect("hello");
    assert_eq!(read_n(&mut first, 7).await, vector("hello_ack_0x28"));
    // A second connection from the same address replaces the first.
    let mut second = TcpStream::connect(a.addr()).await.expect("connect");
    second.write_all(&hello).await.expect("hello");
    assert_eq!(read_n(&mut second, 7).await, vector("hello_ack_0x28"));
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, first.read_to_end(&mut rest))
        .await
        .expect("the first is closed")
        .expect("read");
    assert_eq!(a.kicked(), 1);
    // Past its start-up (0xa3 at 50 ms, mesh query at 200 ms), then stalled: a heartbeat gets
    // no answer until reading resumes.
    eventually("the mesh query sent", || async {
        (a.data_sent() >= 1).then_some(())
    })
    .await;
    let mut drained = vec![0u8; 12 + 29];
    second
        .read_exact(&mut drained)
        .await
        .expect("0xa3 and mesh query");
    a.set_mode(Mode::StallReads);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = a.received(PacketType::Heartbeat);
    second.write_all(&beats(1)).await.expect("heartbeat");
    let mut one = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(300), second.read(&mut one)).await;
    assert!(r.is_err(), "nothing answered while stalled");
    assert_eq!(a.received(PacketType::Heartbeat), seen, "not even read");
    a.set_mode(Mode::Normal);
    assert_eq!(read_n(&mut second, 5).await, vector("heartbeat_ack_0xd8"));
}

#[test]
fn cync_sim_addon_takes_its_modes_on_the_command_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cync-sim"))
        .args([
            "addon",
            "--listen",
            "127.0.0.1:0",
            "--mode",
            "no-status-ack",
            "--max-connections",
            "3",
            "--one-session",
            "device",
            "--duration",
            "100ms",
        ])
        .output()
        .expect("run cync-sim");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("mode NoStatusAck"), "{err}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_cync-sim"))
        .args(["addon", "--listen", "127.0.0.1:0", "--mode", "sleepy"])
        .output()
        .expect("run cync-sim");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("silent"));
}
