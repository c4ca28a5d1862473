//! The legacy path end to end over loopback: real capture traffic through the gateway (plain
//! and TLS device side) to a scripted upstream; byte-exactness, half-close, reset, dead
//! upstream, connection limit, no-handshake routing, and the metrics that result.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use common::*;
use openssl::ssl::{SslAcceptor, SslConnector, SslMethod, SslVerifyMode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_openssl::SslStream;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn device_connect(addr: SocketAddr, tls: bool) -> Box<dyn Io> {
    let tcp = TcpStream::connect(addr).await.expect("connect gateway");
    if !tls {
        return Box::new(tcp);
    }
    let mut b = SslConnector::builder(SslMethod::tls_client()).expect("connector");
    b.set_verify(SslVerifyMode::NONE);
    // What the 88-byte device ClientHello offers: static RSA with AES-CBC only.
    b.set_cipher_list("AES256-SHA256:AES256-SHA:AES128-SHA256:AES128-SHA")
        .expect("ciphers");
    b.set_max_proto_version(Some(openssl::ssl::SslVersion::TLS1_2))
        .expect("max version");
    let ssl = b
        .build()
        .configure()
        .expect("configure")
        .use_server_name_indication(false)
        .verify_hostname(false)
        .into_ssl("")
        .expect("ssl");
    let mut s = SslStream::new(ssl, tcp).expect("stream");
    Pin::new(&mut s)
        .connect()
        .await
        .expect("device TLS handshake");
    assert_eq!(
        s.ssl().current_cipher().map(|c| c.name()),
        Some("AES256-SHA256")
    );
    Box::new(s)
}

fn upstream_acceptor() -> SslAcceptor {
    let cert = cync_gateway::conn::tls::self_signed("addon").expect("cert");
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).expect("acceptor");
    b.set_certificate(&cert.cert).expect("cert");
    b.set_private_key(&cert.key).expect("key");
    b.build()
}

async fn upstream_accept(listener: &TcpListener, tls: Option<&SslAcceptor>) -> Box<dyn Io> {
    let (tcp, _) = listener.accept().await.expect("upstream accept");
    match tls {
        None => Box::new(tcp),
        Some(acc) => {
            let ssl = openssl::ssl::Ssl::new(acc.context()).expect("ssl");
            let mut s = SslStream::new(ssl, tcp).expect("stream");
            Pin::new(&mut s)
                .accept()
                .await
                .expect("upstream TLS accept");
            Box::new(s)
        }
    }
}

async fn read_exactly(s: &mut (impl AsyncRead + Unpin + ?Sized), n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("read in time")
        .expect("read");
    buf
}

fn f9_reply(seq: u8, opcode: u8) -> Vec<u8> {
    // 0x73 class f9, body 00 00, inner length 1; checksum = opcode + 1.
    let mut p = hex::decode("730000001338e8cf46000200").expect("hex");
    p.extend_from_slice(&[0x7e, seq, 0, 0, 0, 0xf9, opcode, 0x01, 0x00, 0x00]);
    p.push(opcode.wrapping_add(1));
    p.push(0x7e);
    p
}

/// Replays the whole real capture through the gateway on one connection, then two add-on
/// commands and their device replies, then malformed frames.
/// `series` (written for the legacy path) on `transport` instead.
fn on(transport: &str, series: &str) -> String {
    series.replace(
        "transport=\"legacy\"",
        &format!("transport=\"{transport}\""),
    )
}

fn tsample(transport: &str, metrics: &str, series: &str) -> f64 {
    sample(metrics, &on(transport, series))
}

async fn replay_capture(
    device_tls: bool,
    upstream_tls: bool,
    transport: &str,
    extra_cfg: &str,
) -> String {
    let reads = capture_reads("capture_20251106_082038.jsonl");
    let dev_reads: Vec<Vec<u8>> = reads
        .iter()
        .filter(|(d, _)| d == "dev_to_cloud")
        .map(|(_, b)| b.clone())
        .collect();
    let cloud: Vec<u8> = reads
        .iter()
        .filter(|(d, _)| d == "cloud_to_dev")
        .flat_map(|(_, b)| b.clone())
        .collect();
    let dev_total: usize = dev_reads.iter().map(Vec::len).sum();
    let commands = [
        vector("legacy_power_on_0x73"),
        vector("legacy_brightness_0x73"),
    ]
    .concat();
    let replies = [
        f9_reply(0x01, 0xd0),
        // The device acknowledges the add-on's command (channel 38e8cf46, msg_id 00 00 00).
        hex::decode("7b0000000738e8cf46000000").expect("hex"),
        f9_reply(0x03, 0xf0),
    ]
    .concat();
    // Malformed but forwarded: a bad checksum and an unknown type.
    let junk = [vector("bad_checksum_0x83"), vector("unknown_type_0x99")].concat();

    let up_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up_addr = up_listener.local_addr().expect("addr");
    let acceptor = upstream_acceptor();
    let mut extra = if device_tls {
        "[device_tls]\nmode = \"tls\"\n".to_string()
    } else {
        "[device_tls]\nmode = \"plain\"\n".to_string()
    };
    if transport == "new" {
        // Every device on the new path; no retries, so the device sees exactly what the
        // upstream sent even when its replies are slow.
        extra.push_str("[routing]\ncanary_percent = 100\n[reliable]\nmax_attempts = 1\n");
    }
    extra.push_str(extra_cfg);
    let mut text = config_text(up_addr, &extra);
    if upstream_tls {
        text = text.replace("tls = false", "tls = true");
    }
    let gw = start_gateway(&text).await;

    let expect_up = [dev_reads.concat(), replies.clone(), junk.clone()].concat();
    let expect_down = [cloud.clone(), commands.clone()].concat();
    let cloud_c = cloud.clone();
    let commands_c = commands.clone();
    let up_task = tokio::spawn(async move {
        let mut up = upstream_accept(&up_listener, upstream_tls.then_some(&acceptor)).await;
        // Answer only once every device packet has arrived, so each request is observed
        // before its reply (as with a real server).
        let got = read_exactly(&mut up, dev_total).await;
        up.write_all(&cloud_c).await.expect("write cloud");
        up.write_all(&commands_c).await.expect("write commands");
        let mut rest = Vec::new();
        tokio::time::timeout(DEADLINE, up.read_to_end(&mut rest))
            .await
            .expect("device side finishes")
            .expect("read rest");
        up.shutdown().await.expect("upstream close");
        [got, rest].concat()
    });

    let mut dev = device_connect(gw.device_addr, device_tls).await;
    for r in &dev_reads {
        dev.write_all(r).await.expect("device write");
    }
    let down = read_exactly(&mut dev, expect_down.len()).await;
    dev.write_all(&replies).await.expect("replies");
    dev.write_all(&junk).await.expect("junk");
    dev.shutdown().await.expect("device FIN");
    let mut tail = Vec::new();
    tokio::time::timeout(DEADLINE, dev.read_to_end(&mut tail))
        .await
        .expect("upstream close reaches device")
        .expect("read to end");
    let up = up_task.await.expect("upstream task");

    assert!(tail.is_empty(), "nothing after the scripted bytes");
    assert_eq!(down.len(), expect_down.len());
    assert!(down == expect_down, "upstream->device bytes differ");
    assert_eq!(up.len(), expect_up.len());
    assert!(up == expect_up, "device->upstream bytes differ");

    let m = wait_metric(
        gw.metrics_addr,
        &on(
            transport,
            "tcp_comm_connection_closes_total{reason=\"device_closed\",transport=\"legacy\"}",
        ),
        1.0,
    )
    .await;
    let pk = |dir: &str, t: &str| {
        tsample(transport,
            &m,
            &format!("tcp_comm_packets_total{{direction=\"{dir}\",packet_type=\"{t}\",transport=\"legacy\"}}"),
        )
    };
    for (t, n) in [
        ("0x23", 25.0),
        ("0xc3", 25.0),
        ("0x43", 381.0),
        ("0x83", 101.0),
        ("0xd3", 658.0),
        ("0x73", 2.0),
        ("0x7b", 1.0),
    ] {
        assert_eq!(pk("dev_to_srv", t), n, "dev_to_srv {t}");
    }
    for (t, n) in [
        ("0x28", 25.0),
        ("0xc8", 25.0),
        ("0x48", 381.0),
        ("0x88", 101.0),
        ("0xd8", 658.0),
        ("0x73", 2.0),
    ] {
        assert_eq!(pk("srv_to_dev", t), n, "srv_to_dev {t}");
    }
    assert_eq!(
        tsample(
            transport,
            &m,
            "tcp_comm_packet_sent_total{outcome=\"success\",transport=\"legacy\"}"
        ),
        2.0
    );
    assert_eq!(
        tsample(
            transport,
            &m,
            "tcp_comm_packet_latency_seconds_count{transport=\"legacy\"}"
        ),
        2.0
    );
    // The add-on reuses msg_id 00 00 00, so the single 0x7b pairs with the oldest command.
    assert_eq!(
        tsample(
            transport,
            &m,
            "tcp_comm_ack_received_total{outcome=\"received\",transport=\"legacy\"}"
        ),
        1.0
    );
    assert_eq!(
        tsample(
            transport,
            &m,
            "tcp_comm_heartbeats_total{outcome=\"acked\",transport=\"legacy\"}"
        ),
        658.0
    );
    assert_eq!(
        tsample(transport, &m, "tcp_comm_replies_total{outcome=\"matched\",request_type=\"0x83\",transport=\"legacy\"}"),
        101.0
    );
    for reason in ["checksum_mismatch", "unknown_type"] {
        assert_eq!(
            tsample(transport,
                &m,
                &format!("tcp_comm_decode_errors_total{{direction=\"dev_to_srv\",reason=\"{reason}\",transport=\"legacy\"}}")
            ),
            1.0,
            "{reason}"
        );
    }
    let dev_bytes = expect_up.len() as f64;
    assert_eq!(
        tsample(
            transport,
            &m,
            "tcp_comm_bytes_total{direction=\"dev_to_srv\",transport=\"legacy\"}"
        ),
        dev_bytes
    );
    assert_eq!(
        tsample(
            transport,
            &m,
            "tcp_comm_connections_active{transport=\"legacy\"}"
        ),
        0.0
    );
    gw.shutdown(Duration::from_secs(5)).await;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_plain_is_byte_exact_and_measured() {
    replay_capture(false, false, "legacy", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_tls_device_side_is_byte_exact_and_measured() {
    replay_capture(true, false, "legacy", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_tls_both_legs() {
    replay_capture(true, true, "legacy", "").await;
}

/// The new path forwards the same capture byte for byte when nothing is duplicated or lost,
/// and measures it the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_new_path_is_byte_exact_and_measured() {
    replay_capture(false, false, "new", "").await;
}

/// Dark launch, observe mode: the reliable-session logic runs on a copy of every byte and
/// reports as `transport="shadow"`, and the device and upstream still see exactly their bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_with_observe_dark_launch_is_byte_exact_and_shadowed() {
    let m = replay_capture(
        false,
        false,
        "legacy",
        "[dark_launch]\nmode = \"observe\"\npercent = 100\n",
    )
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
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let m = replay_capture(
        false,
        false,
        "legacy",
        &format!("[dark_launch]\nmode = \"mirror\"\npercent = 100\n[upstream.shadow]\naddress = \"{dead}\"\ntls = false\n"),
    )
    .await;
    assert_eq!(
        sample(
            &m,
            "tcp_comm_upstream_connect_errors_total{reason=\"connect\",transport=\"shadow\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_new_path_tls_both_legs() {
    replay_capture(true, true, "new", "").await;
}

const HELLO: &str = "handshake_0x23";

async fn plain_pair(extra: &str) -> (cync_gateway::gateway::Gateway, TcpStream, TcpStream) {
    let up_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = start_gateway(&config_text(
        up_listener.local_addr().expect("addr"),
        &format!("{extra}[device_tls]\nmode = \"plain\"\n"),
    ))
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
    let (gw, mut dev, mut up) = plain_pair("").await;
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
    let (gw, dev, mut up) = plain_pair("").await;
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
    let gw = start_gateway(&config_text(addr, "[device_tls]\nmode = \"plain\"\n")).await;
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
    let (gw, _dev, _up) = plain_pair("max_connections = 1\n").await;
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
    let gw = start_gateway(&config_text(
        up_listener.local_addr().expect("addr"),
        "[device_tls]\nmode = \"plain\"\n",
    ))
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
    let gw = start_gateway(&config_text(
        up_listener.local_addr().expect("addr"),
        "handshake_timeout = \"200ms\"\n[device_tls]\nmode = \"plain\"\n",
    ))
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
    let (gw, _dev, _up) = plain_pair("").await;
    let (status, _) = http_get(gw.metrics_addr, "/readyz").await;
    assert_eq!(status, 200);
    let (status, body) = http_get(gw.metrics_addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    gw.health.set_draining();
    let (status, _) = http_get(gw.metrics_addr, "/readyz").await;
    assert_eq!(status, 503);
}
