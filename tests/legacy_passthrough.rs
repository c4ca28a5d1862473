//! The legacy path end to end over loopback: real capture traffic through the gateway (plain
//! and TLS device side) to a scripted upstream; byte-exactness, half-close, reset, dead
//! upstream, connection limit, no-handshake routing, and the metrics that result.

mod common;

use std::time::Duration;

use common::replay::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_plain_is_byte_exact_and_measured() {
    replay_capture(false, false, "legacy", |c| c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_tls_device_side_is_byte_exact_and_measured() {
    replay_capture(true, false, "legacy", |c| c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_tls_both_legs() {
    replay_capture(true, true, "legacy", |c| c).await;
}

/// Dark launch, observe mode: the reliable-session logic runs on a copy of every byte and
/// reports as `transport="shadow"`, and the device and upstream still see exactly their bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_with_observe_dark_launch_is_byte_exact_and_shadowed() {
    let m = replay_capture(false, false, "legacy", |c| {
        c.set("dark_launch.mode", "observe")
            .set("dark_launch.percent", 100)
    })
    .await;
    let shadow = |series: &str| sample(&m, &on("shadow", series));
    assert_eq!(
        shadow("tcp_comm_packets_total{direction=\"dev_to_srv\",packet_type=\"0x83\",transport=\"legacy\"}"),
        101.0
    );
    assert_eq!(
        shadow("tcp_comm_heartbeats_total{outcome=\"acked\",transport=\"legacy\"}"),
        658.0
    );
    assert_eq!(
        shadow("tcp_comm_packet_sent_total{outcome=\"success\",transport=\"legacy\"}"),
        2.0
    );
    assert_eq!(
        shadow("tcp_comm_connections_total{transport=\"legacy\"}"),
        1.0
    );
    assert_eq!(
        shadow("tcp_comm_connections_active{transport=\"legacy\"}"),
        0.0
    );
}

/// Mirror mode toward a shadow upstream that refuses connections: legacy is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_with_mirror_to_a_dead_shadow_is_byte_exact() {
    let (_reserved, dead) = refused_addr();
    // The shadow is dialled beside the connection and the dial is cancelled when the
    // connection ends, so the device holds its side open until the failure is counted
    // (exactly one: one connection, one dial).
    let series = "tcp_comm_upstream_connect_errors_total{reason=\"connect\",transport=\"shadow\"}";
    let m = replay_capture_until(
        false,
        false,
        "legacy",
        |c| {
            c.set("dark_launch.mode", "mirror")
                .set("dark_launch.percent", 100)
                .set("upstream.shadow.address", dead.to_string())
                .set("upstream.shadow.tls", false)
        },
        Some((series, 1.0)),
    )
    .await;
    assert_eq!(sample(&m, series), 1.0);
}

const HELLO: &str = "handshake_0x23";

async fn plain_pair(
    configure: impl FnOnce(TestGateway) -> TestGateway,
) -> (cync_gateway::gateway::Gateway, TcpStream, TcpStream) {
    let up_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = configure(TestGateway::new(up_listener.local_addr().expect("addr")))
        .start()
        .await;
    let mut dev = TcpStream::connect(gw.device_addr).await.expect("connect");
    dev.write_all(&vector(HELLO)).await.expect("hello");
    let (mut up, _) = tokio::time::timeout(DEADLINE, up_listener.accept())
        .await
        .expect("gateway dials upstream")
        .expect("accept");
    assert_eq!(read_exactly(&mut up, 31).await, vector(HELLO));
    (gw, dev, up)
}

#[tokio::test]
async fn half_close_is_passed_on_and_the_other_direction_keeps_flowing() {
    let (gw, mut dev, mut up) = plain_pair(|c| c).await;
    dev.shutdown().await.expect("device FIN");
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, up.read_to_end(&mut rest))
        .await
        .expect("FIN reaches upstream")
        .expect("read");
    assert!(rest.is_empty());
    up.write_all(&vector("heartbeat_ack_0xd8"))
        .await
        .expect("write after half-close");
    assert_eq!(
        read_exactly(&mut dev, 5).await,
        vector("heartbeat_ack_0xd8")
    );
    drop(up);
    let mut tail = Vec::new();
    tokio::time::timeout(DEADLINE, dev.read_to_end(&mut tail))
        .await
        .expect("close reaches device")
        .expect("read");
    wait_metric(
        gw.metrics_addr,
        "tcp_comm_connection_closes_total{reason=\"device_closed\",transport=\"legacy\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn device_reset_reaches_upstream_as_reset() {
    let (gw, dev, mut up) = plain_pair(|c| c).await;
    socket2::SockRef::from(&dev)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(dev);
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(DEADLINE, up.read(&mut buf))
        .await
        .expect("upstream sees the close");
    let err = r.expect_err("a reset, not a clean EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    wait_metric(
        gw.metrics_addr,
        "tcp_comm_connection_closes_total{reason=\"device_reset\",transport=\"legacy\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn dead_upstream_closes_the_device_with_a_counted_reason() {
    let gone = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = gone.local_addr().expect("addr");
    drop(gone);
    let gw = TestGateway::new(addr).start().await;
    let mut dev = TcpStream::connect(gw.device_addr).await.expect("connect");
    dev.write_all(&vector(HELLO)).await.expect("hello");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, dev.read_to_end(&mut rest))
        .await
        .expect("device side closed");
    assert!(rest.is_empty());
    let m = wait_metric(
        gw.metrics_addr,
        "tcp_comm_connection_closes_total{reason=\"upstream_connect_failed\",transport=\"legacy\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &m,
            "tcp_comm_upstream_connect_errors_total{reason=\"connect\",transport=\"legacy\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn connection_limit_refuses_and_counts() {
    let (gw, _dev, _up) = plain_pair(|c| c.set("listen.max_connections", 1)).await;
    // The routed budget is taken once the hello is read: a second device is refused then.
    let mut second = TcpStream::connect(gw.device_addr).await.expect("connect");
    second.write_all(&vector(HELLO)).await.expect("hello");
    let mut buf = Vec::new();
    // Closed by the gateway without an answer; either EOF or a reset is a refusal.
    let r = tokio::time::timeout(DEADLINE, second.read_to_end(&mut buf))
        .await
        .expect("second connection is closed");
    assert!(buf.is_empty(), "{r:?}");
    wait_metric(
        gw.metrics_addr,
        "tcp_comm_connections_rejected_total{reason=\"limit\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn no_handshake_goes_to_legacy_with_the_bytes_replayed_verbatim() {
    let up_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(up_listener.local_addr().expect("addr"))
        .start()
        .await;
    // A TLS ClientHello at a plain listener frames as an unknown type 0x16.
    let junk = vector("tls_client_hello_on_cync_port");
    let mut dev = TcpStream::connect(gw.device_addr).await.expect("connect");
    dev.write_all(&junk).await.expect("write");
    let (mut up, _) = up_listener.accept().await.expect("accept");
    assert_eq!(read_exactly(&mut up, junk.len()).await, junk);
    wait_metric(
        gw.metrics_addr,
        "tcp_comm_routing_decisions_total{reason=\"no_handshake\",transport=\"legacy\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_handshake_timeout_without_dialling() {
    let up_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(up_listener.local_addr().expect("addr"))
        .set("listen.handshake_timeout", "200ms")
        .start()
        .await;
    let mut dev = TcpStream::connect(gw.device_addr).await.expect("connect");
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, dev.read_to_end(&mut buf))
        .await
        .expect("closed after the timeout")
        .expect("read");
    assert!(buf.is_empty());
    wait_metric(
        gw.metrics_addr,
        "tcp_comm_connections_rejected_total{reason=\"silent\"}",
        1.0,
    )
    .await;
    // Nothing reached the add-on.
    let accepted = tokio::time::timeout(Duration::from_millis(300), up_listener.accept()).await;
    assert!(
        accepted.is_err(),
        "the add-on was dialled for a silent connection"
    );
}

#[tokio::test]
async fn readiness_drops_when_draining() {
    let (gw, _dev, _up) = plain_pair(|c| c).await;
    let (status, _) = http_get(gw.metrics_addr, "/readyz").await;
    assert_eq!(status, 200);
    let (status, body) = http_get(gw.metrics_addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    gw.health.set_draining();
    let (status, _) = http_get(gw.metrics_addr, "/readyz").await;
    assert_eq!(status, 503);
}
