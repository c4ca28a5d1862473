//! What a cheap client or an unlucky environment can do to the gateway, over real sockets:
//! silent and stalled connections, a flood from one address, idle scrapers, devices that never
//! read, made-up device ids. None of them may hold what real devices need.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cync_gateway::protocol::{build, DeviceId, MsgId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

/// An upstream that counts the connections it accepts and answers hellos.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let n = Arc::new(AtomicU64::new(0));
    let c = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut hello = [0u8; 31];
                if s.read_exact(&mut hello).await.is_ok() {
                    let _ = s.write_all(&build::hello_ack()).await;
                    let mut sink = vec![0u8; 4096];
                    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    (addr, n)
}

fn rejected(m: &str, reason: &str) -> f64 {
    sample_or_zero(
        m,
        &format!("tcp_comm_connections_rejected_total{{reason=\"{reason}\"}}"),
    )
}

/// A device that says hello and expects the 0x28.
async fn real_device(gw: SocketAddr) -> TcpStream {
    let mut d = TcpStream::connect(gw).await.expect("connect");
    d.write_all(&vector("handshake_0x23")).await.expect("hello");
    assert_eq!(
        read_n(&mut d, 7).await,
        build::hello_ack().to_vec(),
        "served"
    );
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_without_an_addon_connection_and_free_their_slots() {
    let (up, accepted) = counting_upstream().await;
    let gw = TestGateway::new(up)
        .set("listen.max_connections", 100)
        .set("listen.max_pending", 1000)
        .set("listen.max_pending_per_source", 1000)
        .set("listen.handshake_timeout", "300ms")
        .start()
        .await;
    let t0 = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(TcpStream::connect(gw.device_addr).await.expect("connect"));
    }
    for s in &mut silent {
        assert!(read_to_eof(s).await.is_empty());
    }
    println!("200 silent connections closed within {:?}", t0.elapsed());
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "no add-on connection for any of them"
    );
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(rejected(&m, "silent"), 200.0);
    // Every slot is free: a real device is served at once.
    let _d = real_device(gw.device_addr).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_device_that_goes_quiet_is_closed_after_the_idle_timeout() {
    let (up, _) = counting_upstream().await;
    let gw = TestGateway::new(up)
        .set("legacy.idle_timeout", "1s")
        .start()
        .await;
    let mut d = real_device(gw.device_addr).await;
    let t0 = Instant::now();
    assert!(read_to_eof(&mut d).await.is_empty());
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(1) + SLACK,
        "{took:?}"
    );
    wait_metric(
        gw.metrics_addr,
        "tcp_comm_connection_closes_total{reason=\"idle_timeout\",transport=\"legacy\"}",
        1.0,
    )
    .await;
    gw.shutdown(Duration::from_millis(200)).await;
}

/// Connects from the loopback address `ip` (127.0.0.0/8 is all local on Linux).
async fn connect_from(ip: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::from((ip, 0))).expect("bind source");
    s.connect(to).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_fill_only_the_pre_hello_budget_and_one_source_only_its_share() {
    let (up, _) = counting_upstream().await;
    let gw = TestGateway::new(up)
        .set("listen.max_connections", 5)
        .set("listen.max_pending", 20)
        .set("listen.max_pending_per_source", 10)
        .start()
        .await;
    // One address opens 15 connections and sends half a hello on each: 10 are held, 5 refused.
    let hello = vector("handshake_0x23");
    let mut held = Vec::new();
    for _ in 0..15 {
        let mut s = connect_from([127, 0, 0, 9], gw.device_addr).await;
        s.write_all(&hello[..10]).await.expect("half a hello");
        held.push(s);
    }
    let m = eventually("five refused for their source", || async {
        let m = scrape(gw.metrics_addr).await;
        (rejected(&m, "source_limit") == 5.0).then_some(m)
    })
    .await;
    assert_eq!(rejected(&m, "pending_limit"), 0.0);
    // Another address fills the rest of the pre-hello budget: 10 more, then refusals.
    let mut more = Vec::new();
    for _ in 0..12 {
        let mut s = connect_from([127, 0, 0, 10], gw.device_addr).await;
        s.write_all(&hello[..10]).await.expect("half a hello");
        more.push(s);
    }
    eventually("the pre-hello budget full", || async {
        let m = scrape(gw.metrics_addr).await;
        (rejected(&m, "pending_limit") + rejected(&m, "source_limit") == 7.0).then_some(())
    })
    .await;
    // The routed budget is the stalled ones' no more than anyone's: once they leave (those
    // that sent bytes go to legacy first, as any device without a hello), five devices fit.
    drop(held);
    eventually("the stalled ones gone", || async {
        (gw.admission.routed_free() == 5 && gw.admission.pending_free() == 10).then_some(())
    })
    .await;
    let mut devices = Vec::new();
    for _ in 0..5 {
        devices.push(real_device(gw.device_addr).await);
    }
    let limit_before = rejected(&scrape(gw.metrics_addr).await, "limit");
    let mut sixth = TcpStream::connect(gw.device_addr).await.expect("connect");
    sixth.write_all(&hello).await.expect("hello");
    assert!(
        read_to_eof(&mut sixth).await.is_empty(),
        "routed budget full"
    );
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(rejected(&m, "limit"), limit_before + 1.0);
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_dropped_at_the_tls_timeout_not_the_hello_timeout() {
    let (up, _) = counting_upstream().await;
    let gw = TestGateway::new(up)
        .set("device_tls.mode", "tls")
        .set("listen.handshake_timeout", "10s")
        .set("listen.tls_handshake_timeout", "300ms")
        .start()
        .await;
    let t0 = Instant::now();
    let mut s = TcpStream::connect(gw.device_addr).await.expect("connect");
    // Half a ClientHello record header, then nothing.
    s.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
    assert!(read_to_eof(&mut s).await.is_empty());
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(300) + SLACK, "{took:?}");
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(rejected(&m, "tls_timeout"), 1.0);
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_http_requests_cannot_hold_the_endpoint() {
    let (up, _) = counting_upstream().await;
    let gw = TestGateway::new(up)
        .set("listen.http_max_connections", 4)
        .set("listen.http_header_timeout", "500ms")
        .start()
        .await;
    let t0 = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(gw.metrics_addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("half");
        slow.push(s);
    }
    // All four slots taken: a fifth is closed at once (a reset, if its request was unread).
    let mut fifth = TcpStream::connect(gw.metrics_addr).await.expect("connect");
    let _ = fifth.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await;
    let mut got = Vec::new();
    let r = tokio::time::timeout(DEADLINE, fifth.read_to_end(&mut got))
        .await
        .expect("closed in time");
    assert!(got.is_empty(), "{r:?}: {}", String::from_utf8_lossy(&got));
    // The server gives up on each half-sent request at the header timeout.
    for s in &mut slow {
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut sink))
            .await
            .expect("closed in time");
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(500) + SLACK, "{took:?}");
    let (status, _) = http_get(gw.metrics_addr, "/healthz").await;
    assert_eq!(status, 200);
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(sample(&m, "tcp_comm_http_rejected_total"), 1.0);
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_path_device_that_never_reads_is_closed_once_stuck() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(up.local_addr().expect("addr"))
        .path("new")
        .set("reliable.upstream_queue_bytes", 16384)
        .set("reliable.backpressure_timeout", "200ms")
        .set("reliable.stuck_timeout", "1s")
        .start()
        .await;
    let hello = vector("handshake_0x23");
    let (dev, mut upc) = scripted_pair(gw.device_addr, &up, &hello).await;
    // The device reads nothing more; the add-on floods it.
    let flood = tokio::spawn(async move {
        let beat: Vec<u8> = (0..2000)
            .flat_map(|_| build::heartbeat_ack().to_vec())
            .collect();
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end && upc.write_all(&beat).await.is_ok() {}
    });
    let t0 = Instant::now();
    wait_metric(
        gw.metrics_addr,
        "tcp_comm_connection_closes_total{reason=\"device_stuck\",transport=\"new\"}",
        1.0,
    )
    .await;
    println!("stuck device closed after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(10));
    flood.abort();
    drop(dev);
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_device_ids_cannot_grow_the_per_device_series_without_bound() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(up.local_addr().expect("addr"))
        .path("legacy")
        .set("metrics.per_device", true)
        .set("metrics.per_device_max", 20)
        .start()
        .await;
    for i in 0..50u32 {
        let id = DeviceId((0x5000_0000 + i).to_be_bytes());
        let hello = build::hello(id, b"0123456789abcdef");
        let (mut d, mut u) = scripted_pair(gw.device_addr, &up, &hello).await;
        let cmd = build::power_command(id, MsgId([0, 0, 0]), 1, 10, true);
        u.write_all(&cmd).await.expect("command");
        read_n(&mut d, cmd.len()).await;
        let reply = build::command_reply(id, MsgId([0, 1, 0]), 1, 0xd0);
        d.write_all(&reply).await.expect("reply");
        read_n(&mut u, reply.len()).await;
    }
    let m = eventually("fifty commands counted", || async {
        let m = scrape(gw.metrics_addr).await;
        let total: f64 = m
            .lines()
            .filter(|l| l.starts_with("tcp_comm_packet_sent_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (sample_or_zero(&m, "tcp_comm_device_series_evicted_total") == 30.0).then_some((m, total))
    })
    .await;
    let series =
        m.0.lines()
            .filter(|l| l.starts_with("tcp_comm_packet_sent_total{"))
            .count();
    assert_eq!(series, 20, "one series per remembered device");
    gw.shutdown(Duration::from_millis(200)).await;
}

/// The upstream is dialled as soon as a device sends its first byte (beside its TLS
/// handshake and hello). A device that goes away before its hello leaves nothing open at the
/// add-on: the early connection closes with it, without a byte sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_dial_for_a_device_that_leaves_before_its_hello_is_closed_without_a_byte() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(l.local_addr().expect("addr"))
        .set("device_tls.mode", "tls")
        .start()
        .await;
    for _ in 0..3 {
        let mut d = TcpStream::connect(gw.device_addr).await.expect("connect");
        // The first bytes of a TLS ClientHello, then gone.
        d.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
        let (mut up, _) = tokio::time::timeout(DEADLINE, l.accept())
            .await
            .expect("dialled early, before any hello")
            .expect("accept");
        drop(d);
        assert!(
            read_to_eof(&mut up).await.is_empty(),
            "closed with the device, nothing sent"
        );
    }
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(family_total(&m, "tcp_comm_routing_decisions_total"), 0.0);
    gw.shutdown(Duration::from_millis(200)).await;
}
