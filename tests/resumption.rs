//! Upstream resumption on the new path, over real sockets: it covers a real add-on restart,
//! leaves the restarted add-on knowing the device as a fresh connection would, and is for
//! losses only — an add-on that never accepted the device, or that closes a connection on
//! purpose, is not "resumed"; the device learns as it does on legacy.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use cync_gateway::protocol::{build, DeviceId, MsgId, PacketType};
use cync_gateway::sim::addon::{AddonConfig, OneSession};
use cync_gateway::sim::device::{self, DeviceConfig, DeviceStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    DeviceStats::get(c)
}

/// Every `outcome` of `tcp_comm_resumptions_total`.
const OUTCOMES: [&str; 7] = [
    "success",
    "failed",
    "hello_timeout",
    "not_established",
    "kicked",
    "refused",
    "mid_frame",
];

fn resumptions(m: &str, outcome: &str) -> f64 {
    sample_or_zero(
        m,
        &format!("tcp_comm_resumptions_total{{outcome=\"{outcome}\",transport=\"new\"}}"),
    )
}

/// `n` simulated devices (seed `seed`) dialling `target`.
fn fleet(
    target: std::net::SocketAddr,
    n: u32,
    seed: u64,
    stop: &CancellationToken,
) -> Vec<Arc<DeviceStats>> {
    (0..n)
        .map(|i| {
            let s = Arc::new(DeviceStats::default());
            let mut cfg = DeviceConfig::new(target, seed, i);
            cfg.redial = (Duration::from_millis(50), Duration::from_millis(500));
            tokio::spawn(device::run(cfg, s.clone(), stop.clone()));
            s
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_second_addon_outage_is_covered_and_the_addon_relearns_every_device() {
    let a = start_addon(fast_addon()).await;
    let new = TestGateway::new(a.addr()).path("new").start().await;
    let legacy = TestGateway::new(a.addr()).path("legacy").start().await;
    let stop = CancellationToken::new();
    let on_new = fleet(new.device_addr, 10, 41, &stop);
    let on_legacy = fleet(legacy.device_addr, 10, 42, &stop);
    eventually(
        "20 devices ready at the add-on, their start-up reports acknowledged",
        || async {
            let all = on_new.iter().chain(&on_legacy);
            (a.connections().1 == 20 && all.clone().all(|s| get(&s.status_acks) == 2)).then_some(())
        },
    )
    .await;
    let firmware_before = a.received(PacketType::Status);
    let info_before = a.received(PacketType::Info);
    let time_before = a.received(PacketType::TimeRequest);
    let acks_before: Vec<u64> = on_new.iter().map(|s| get(&s.status_acks)).collect();

    // The add-on goes away for 4.4 s: connections refused meanwhile, as a container restart.
    let t0 = Instant::now();
    a.restart_after(Duration::from_millis(4400))
        .await
        .expect("restart");
    eventually("every device served by the restarted add-on", || async {
        (a.connections().1 == 20).then_some(())
    })
    .await;
    // Waits for every resumption to end, however it ended, so that a failure says how.
    let m = eventually("ten resumptions ended", || async {
        let m = scrape(new.metrics_addr).await;
        let ended: f64 = OUTCOMES.iter().map(|o| resumptions(&m, o)).sum();
        (ended >= 10.0).then_some(m)
    })
    .await;
    let by: Vec<_> = OUTCOMES.iter().map(|o| (*o, resumptions(&m, o))).collect();
    // Every new-path device was resumed, and nothing else ended a resumption. A session may be
    // resumed more than once in the outage (seen in about 1 run in 10: 13 for 10 devices, all
    // successes); each is one more replay, which the counts below take into account.
    assert!(
        resumptions(&m, "success") >= 10.0 && by.iter().skip(1).all(|(_, n)| *n == 0.0),
        "resumption outcomes: {by:?}"
    );
    println!(
        "add-on back and every device served {:?} after the outage began; resumptions {by:?}; \
         the add-on accepted {} connections and kicked {}",
        t0.elapsed(),
        a.accepted(),
        a.kicked()
    );
    for s in &on_new {
        assert_eq!(get(&s.disconnects), 0, "a new-path device was disconnected");
    }
    for s in &on_legacy {
        assert!(
            get(&s.disconnects) >= 1,
            "a legacy device rides an outage only by redialling"
        );
    }
    // The restarted add-on heard, from each device on either path, the firmware pair, the TLV
    // 0x43 and the 0xc3 a fresh connection sends: replayed for the new path (once per
    // resumption), sent anew by the reconnected legacy devices.
    eventually("the add-on relearnt all 20 devices", || async {
        let m = scrape(new.metrics_addr).await;
        // Each legacy device reaches the restarted add-on once: its connections before
        // then found no upstream and sent it nothing.
        let fresh = resumptions(&m, "success") as u64 + 10;
        (a.received(PacketType::Status) - firmware_before == 2 * fresh
            && a.received(PacketType::Info) - info_before == fresh
            && a.received(PacketType::TimeRequest) - time_before == fresh)
            .then_some(())
    })
    .await;
    // The answers to what was replayed never reached the new-path devices: they had them.
    let acks_after: Vec<u64> = on_new.iter().map(|s| get(&s.status_acks)).collect();
    assert_eq!(
        acks_after, acks_before,
        "0x88s for replayed reports were swallowed"
    );
    let swallowed = sample(
        &m,
        "tcp_comm_resume_frames_total{action=\"swallowed_replay_answer\",transport=\"new\"}",
    );
    println!("replay answers swallowed: {swallowed}");
    stop.cancel();
    new.shutdown(Duration::from_millis(200)).await;
    legacy.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replayed_preamble_is_what_the_device_sent_and_its_answers_are_swallowed() {
    let dev = DeviceId([0x38, 0xe8, 0xcf, 0x46]);
    let hello = vector("handshake_0x23");
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(up.local_addr().expect("addr"))
        .path("new")
        .start()
        .await;
    let (mut d, mut u) = scripted_pair(gw.device_addr, &up, &hello).await;
    let fw_net = build::firmware_report(dev, MsgId([0, 6, 0]), false, "0");
    let fw_dev = build::firmware_report(dev, MsgId([0, 7, 0]), true, "11158");
    let tlv = build::info_tlv(dev, &[(0xc790, b"20251106:0220:-37,00006,")]);
    let startup = [
        build::time_request(),
        tlv.clone(),
        fw_net.clone(),
        fw_dev.clone(),
    ]
    .concat();
    d.write_all(&startup).await.expect("start-up reports");
    assert_eq!(read_n(&mut u, startup.len()).await, startup);
    let answers = [
        build::time_reply_stale(),
        build::info_ack(),
        build::status_ack(MsgId([0, 6, 0])),
        build::status_ack(MsgId([0, 7, 0])),
    ]
    .concat();
    u.write_all(&answers).await.expect("answers");
    assert_eq!(read_n(&mut d, answers.len()).await, answers);

    // The add-on connection drops; the gateway redials and replays, in one write.
    drop(u);
    let (mut u2, _) = tokio::time::timeout(DEADLINE, up.accept())
        .await
        .expect("redialled")
        .expect("accept");
    let replay = [hello.clone(), startup.clone()].concat();
    assert_eq!(
        read_n(&mut u2, replay.len()).await,
        replay,
        "hello, 0xc3, 0x43, 0x83 pair"
    );
    // The add-on answers all of it, then sends a heartbeat ack of its own accord, which is not
    // owed and must reach the device.
    u2.write_all(&[build::hello_ack().to_vec(), answers.clone()].concat())
        .await
        .expect("answers");
    // The device's own traffic now flows again, and answers to it are not swallowed.
    d.write_all(&build::heartbeat()).await.expect("heartbeat");
    assert_eq!(read_n(&mut u2, 5).await, build::heartbeat().to_vec());
    u2.write_all(&build::heartbeat_ack()).await.expect("d8");
    assert_eq!(
        read_n(&mut d, 5).await,
        build::heartbeat_ack().to_vec(),
        "the first bytes the device sees after the loss are its own heartbeat's answer"
    );
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(resumptions(&m, "success"), 1.0);
    assert_eq!(
        sample(
            &m,
            "tcp_comm_resume_frames_total{action=\"swallowed_replay_answer\",transport=\"new\"}"
        ),
        4.0
    );
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redialled_upstream_that_never_answers_the_hello_closes_the_device() {
    let hello = vector("handshake_0x23");
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(up.local_addr().expect("addr"))
        .path("new")
        .set("reliable.resume_hello_timeout", "1s")
        .start()
        .await;
    let (mut d, u) = scripted_pair(gw.device_addr, &up, &hello).await;
    drop(u);
    let (mut u2, _) = up.accept().await.expect("redialled");
    assert_eq!(read_n(&mut u2, hello.len()).await, hello);
    // Meanwhile the device's heartbeat is answered by the gateway itself.
    d.write_all(&build::heartbeat()).await.expect("heartbeat");
    assert_eq!(read_n(&mut d, 5).await, build::heartbeat_ack().to_vec());
    let t0 = Instant::now();
    assert!(read_to_eof(&mut d).await.is_empty(), "closed, nothing more");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(1) + SLACK,
        "closed {took:?} after, for a 1 s timeout"
    );
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(resumptions(&m, "hello_timeout"), 1.0);
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_addon_at_its_connection_limit_closes_the_device_on_both_paths_without_resuming() {
    let a = start_addon(AddonConfig {
        max_connections: Some(1),
        over_limit_hold: Duration::from_millis(800),
        ..fast_addon()
    })
    .await;
    // One direct connection takes the add-on's only slot.
    let stop = CancellationToken::new();
    let first = fleet(a.addr(), 1, 51, &stop);
    eventually("the first device served", || async {
        (get(&first[0].hello_acks) == 1).then_some(())
    })
    .await;
    let hello = vector("handshake_0x23");
    for path in ["legacy", "new"] {
        let gw = TestGateway::new(a.addr()).path(path).start().await;
        let mut d = TcpStream::connect(gw.device_addr).await.expect("connect");
        d.write_all(&hello).await.expect("hello");
        let t0 = Instant::now();
        // A heartbeat while the add-on holds the connection: nobody answers it.
        d.write_all(&build::heartbeat()).await.expect("heartbeat");
        let got = read_to_eof(&mut d).await;
        let took = t0.elapsed();
        assert!(
            got.is_empty(),
            "{path}: {} bytes reached the device",
            got.len()
        );
        assert!(
            took >= Duration::from_millis(700) && took < Duration::from_millis(800) + SLACK,
            "{path}: closed {took:?} after the hello (add-on holds 800 ms)"
        );
        if path == "new" {
            let m = scrape(gw.metrics_addr).await;
            assert_eq!(resumptions(&m, "not_established"), 1.0);
            assert_eq!(resumptions(&m, "success"), 0.0);
        }
        gw.shutdown(Duration::from_millis(200)).await;
    }
    assert_eq!(a.over_limit(), 2);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_addon_that_replaces_a_devices_older_connection_is_not_resumed_into_a_loop() {
    let hello = vector("handshake_0x23");
    let dev = DeviceId::from_hex(&hex::encode(&hello[6..10])).expect("id");
    for path in ["legacy", "new"] {
        let a = start_addon(AddonConfig {
            one_session: OneSession::Device,
            ..fast_addon()
        })
        .await;
        let gw = TestGateway::new(a.addr()).path(path).start().await;
        // An old connection of the device: it said hello, then went quiet (its Wi-Fi is gone).
        let mut old = TcpStream::connect(gw.device_addr).await.expect("connect");
        old.write_all(&hello).await.expect("hello");
        eventually("the old connection served", || async {
            (a.connections_of(dev) == 1).then_some(())
        })
        .await;
        // The device comes back on a new connection; the add-on drops the older one.
        let mut new_conn = TcpStream::connect(gw.device_addr).await.expect("connect");
        new_conn.write_all(&hello).await.expect("hello");
        let t0 = Instant::now();
        let mut sink = Vec::new();
        tokio::time::timeout(DEADLINE, old.read_to_end(&mut sink))
            .await
            .unwrap_or_else(|_| panic!("{path}: the old connection is never closed"))
            .expect("read");
        println!(
            "{path}: old connection closed {:?} after the new one came",
            t0.elapsed()
        );
        // Settled: one session at the add-on, the new connection's, and no more replacing.
        eventually("one session for the device", || async {
            (a.connections_of(dev) == 1).then_some(())
        })
        .await;
        let kicked = a.kicked();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            a.kicked(),
            kicked,
            "{path}: sessions still replacing each other"
        );
        // Two strikes per connection before it counts as kicked (one may be an add-on that
        // was still shutting down when it took a redial): old, new, old, new, old.
        assert!(kicked <= 5, "{path}: {kicked} replacements");
        // The new connection works: its heartbeat is answered by the add-on.
        new_conn
            .write_all(&build::heartbeat())
            .await
            .expect("heartbeat");
        let mut buf = Vec::new();
        eventually("the heartbeat answered", || {
            let mut tmp = [0u8; 2048];
            let n = new_conn.try_read(&mut tmp).unwrap_or(0);
            buf.extend_from_slice(&tmp[..n]);
            let found = buf.windows(5).any(|w| w == build::heartbeat_ack().as_ref());
            async move { found.then_some(()) }
        })
        .await;
        if path == "new" {
            let m = scrape(gw.metrics_addr).await;
            assert_eq!(resumptions(&m, "kicked"), 1.0, "{m}");
        }
        gw.shutdown(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_upstream_sends_before_it_refuses_a_device_reaches_the_device_on_both_paths() {
    let hello = vector("handshake_0x23");
    // Thirty frames and three stray bytes, then the add-on closes without answering the hello.
    let mut last = Vec::new();
    for _ in 0..30 {
        last.extend_from_slice(&build::info_ack());
    }
    last.extend_from_slice(&[0x00, 0x01, 0x02]);
    for path in ["legacy", "new"] {
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gw = TestGateway::new(up.local_addr().expect("addr"))
            .path(path)
            .start()
            .await;
        let mut d = TcpStream::connect(gw.device_addr).await.expect("connect");
        d.write_all(&hello).await.expect("hello");
        let (mut u, _) = tokio::time::timeout(DEADLINE, up.accept())
            .await
            .expect("dialled")
            .expect("accept");
        read_n(&mut u, hello.len()).await;
        u.write_all(&last).await.expect("write");
        drop(u);
        let got = read_to_eof(&mut d).await;
        assert_eq!(got, last, "{path}: every byte, then the FIN");
        if path == "new" {
            let m = scrape(gw.metrics_addr).await;
            assert_eq!(resumptions(&m, "not_established"), 1.0);
        }
        gw.shutdown(Duration::from_millis(200)).await;
    }
}
