//! The whole real capture through a gateway on one connection, checked byte for byte both ways
//! and counted frame by frame, on either path: shared by the legacy and the new-path suites.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use openssl::ssl::{SslAcceptor, SslConnector, SslMethod, SslVerifyMode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_openssl::SslStream;

use super::*;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub async fn device_connect(addr: SocketAddr, tls: bool) -> Box<dyn Io> {
    device_connect_wire(addr, tls, &Wire::default()).await
}

/// What sits around the replayed bytes on the wire in a mode: a PROXY header the device's
/// balancer sends first, the one the upstream must receive first, the address the device
/// connects from, and the address the upstream must see the connection come from.
#[derive(Default, Clone)]
pub struct Wire {
    pub device_prefix: Vec<u8>,
    pub upstream_prefix: Vec<u8>,
    /// Bound with `IP_TRANSPARENT`, so it may be an address the host does not have.
    pub device_from: Option<std::net::IpAddr>,
    pub upstream_sees: Option<std::net::IpAddr>,
}

pub async fn device_connect_wire(addr: SocketAddr, tls: bool, wire: &Wire) -> Box<dyn Io> {
    let mut tcp = match wire.device_from {
        None => TcpStream::connect(addr).await.expect("connect gateway"),
        Some(ip) => {
            let s = tokio::net::TcpSocket::new_v4().expect("socket");
            socket2::SockRef::from(&s)
                .set_ip_transparent(true)
                .expect("IP_TRANSPARENT");
            s.bind(SocketAddr::new(ip, 0)).expect("bind device address");
            s.connect(addr).await.expect("connect gateway")
        }
    };
    if !wire.device_prefix.is_empty() {
        tcp.write_all(&wire.device_prefix)
            .await
            .expect("balancer header");
    }
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

pub fn upstream_acceptor() -> SslAcceptor {
    let cert = cync_gateway::conn::tls::self_signed("addon").expect("cert");
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).expect("acceptor");
    b.set_certificate(&cert.cert).expect("cert");
    b.set_private_key(&cert.key).expect("key");
    b.build()
}

pub async fn upstream_accept(listener: &TcpListener, tls: Option<&SslAcceptor>) -> Box<dyn Io> {
    upstream_accept_wire(listener, tls, &Wire::default()).await
}

/// Accepts, checks where the connection comes from and the header it starts with, then
/// (with `tls`) handshakes.
pub async fn upstream_accept_wire(
    listener: &TcpListener,
    tls: Option<&SslAcceptor>,
    wire: &Wire,
) -> Box<dyn Io> {
    let (mut tcp, peer) = listener.accept().await.expect("upstream accept");
    if let Some(ip) = wire.upstream_sees {
        assert_eq!(peer.ip(), ip, "the upstream connection's source address");
    }
    if !wire.upstream_prefix.is_empty() {
        let got = read_exactly(&mut tcp, wire.upstream_prefix.len()).await;
        assert_eq!(
            got, wire.upstream_prefix,
            "the PROXY header the upstream receives"
        );
    }
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

pub async fn read_exactly(s: &mut (impl AsyncRead + Unpin + ?Sized), n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("read in time")
        .expect("read");
    buf
}

pub fn f9_reply(seq: u8, opcode: u8) -> Vec<u8> {
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
pub fn on(transport: &str, series: &str) -> String {
    series.replace(
        "transport=\"legacy\"",
        &format!("transport=\"{transport}\""),
    )
}

pub fn tsample(transport: &str, metrics: &str, series: &str) -> f64 {
    sample(metrics, &on(transport, series))
}

pub async fn replay_capture(
    device_tls: bool,
    upstream_tls: bool,
    transport: &str,
    configure: impl FnOnce(TestGateway) -> TestGateway,
) -> String {
    replay_capture_until(device_tls, upstream_tls, transport, configure, None).await
}

/// As [`replay_capture`], and the device does not close its side until `series` reads `want`
/// (for what the gateway does beside the connection, such as a shadow's failed dial, which a
/// close before it would cancel).
pub async fn replay_capture_until(
    device_tls: bool,
    upstream_tls: bool,
    transport: &str,
    configure: impl FnOnce(TestGateway) -> TestGateway,
    until: Option<(&str, f64)>,
) -> String {
    replay_capture_wire(
        device_tls,
        upstream_tls,
        transport,
        configure,
        until,
        Wire::default(),
    )
    .await
}

/// As [`replay_capture_until`], with what `wire` puts around the bytes.
pub async fn replay_capture_wire(
    device_tls: bool,
    upstream_tls: bool,
    transport: &str,
    configure: impl FnOnce(TestGateway) -> TestGateway,
    until: Option<(&str, f64)>,
    wire: Wire,
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
    let mut cfg = TestGateway::new(up_addr)
        .set("device_tls.mode", if device_tls { "tls" } else { "plain" })
        .set("upstream.legacy.tls", upstream_tls);
    if transport == "new" {
        // Every device on the new path; no retries, so the device sees exactly what the
        // upstream sent even when its replies are slow.
        cfg = cfg.path("new").set("reliable.max_attempts", 1);
    }
    let gw = configure(cfg).start().await;

    let expect_up = [dev_reads.concat(), replies.clone(), junk.clone()].concat();
    let expect_down = [cloud.clone(), commands.clone()].concat();
    let cloud_c = cloud.clone();
    let commands_c = commands.clone();
    let wire_c = wire.clone();
    let up_task = tokio::spawn(async move {
        let mut up =
            upstream_accept_wire(&up_listener, upstream_tls.then_some(&acceptor), &wire_c).await;
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

    let mut dev = device_connect_wire(gw.device_addr, device_tls, &wire).await;
    for r in &dev_reads {
        dev.write_all(r).await.expect("device write");
    }
    let down = read_exactly(&mut dev, expect_down.len()).await;
    dev.write_all(&replies).await.expect("replies");
    dev.write_all(&junk).await.expect("junk");
    // Waited for with the connection still open: what runs beside it (a shadow dial) ends
    // with it, so after the close it may never happen.
    if let Some((series, want)) = until {
        wait_metric(gw.metrics_addr, series, want).await;
    }
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
