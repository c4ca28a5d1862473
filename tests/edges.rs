//! Paths nothing else exercises, over real sockets: resumption running out, a drain on the new
//! path with a command in flight, bulk passthrough that fills the read buffer, resets and
//! half-close timeouts, TLS trouble on either leg, reloads of per-connection settings, the new
//! path's idle limit, and `retry_until = "ack"`.

mod common;

use std::time::Duration;

use common::*;
use cync_gateway::protocol::{build, DeviceId, MsgId};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const DEV: DeviceId = DeviceId([0x38, 0xe8, 0xcf, 0x46]);

fn closes(m: &str, path: &str, reason: &str) -> f64 {
    sample_or_zero(
        m,
        &format!("tcp_comm_connection_closes_total{{reason=\"{reason}\",transport=\"{path}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_resumption_runs_out_the_device_is_closed_with_its_reason() {
    let hello = vector("handshake_0x23");
    let cases: [(Configure, &str); 2] = [
        (
            |c| c.set("reliable.resume_window", "1s"),
            "redials refused for a second",
        ),
        (|c| c.set("reliable.resume_attempts", 0), "resumption off"),
    ];
    for (configure, why) in cases {
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gw = configure(TestGateway::new(up.local_addr().expect("addr")).path("new"))
            .start()
            .await;
        let (mut d, u) = scripted_pair(gw.device_addr, &up, &hello).await;
        // The add-on goes away for good.
        drop(u);
        drop(up);
        let t0 = Instant::now();
        assert!(read_to_eof(&mut d).await.is_empty(), "{why}");
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(1) + SLACK, "{why}: {took:?}");
        let m = wait_metric(
            gw.metrics_addr,
            "tcp_comm_connection_closes_total{reason=\"resume_failed\",transport=\"new\"}",
            1.0,
        )
        .await;
        assert_eq!(
            sample(
                &m,
                "tcp_comm_resumptions_total{outcome=\"failed\",transport=\"new\"}"
            ),
            1.0,
            "{why}"
        );
        gw.shutdown(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_on_the_new_path_waits_for_the_command_in_flight_not_for_the_deadline() {
    let hello = vector("handshake_0x23");
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(up.local_addr().expect("addr"))
        .path("new")
        .start()
        .await;
    let (mut d, mut u) = scripted_pair(gw.device_addr, &up, &hello).await;
    let cmd = vector("legacy_power_on_0x73");
    u.write_all(&cmd).await.expect("command");
    assert_eq!(read_n(&mut d, cmd.len()).await, cmd);
    let t0 = Instant::now();
    let drain = tokio::spawn(gw.shutdown(Duration::from_secs(20)));
    // The device answers 1.5 s later: the reply reaches the add-on, then the pair closes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply = build::command_reply(DEV, MsgId([0, 2, 0]), cmd[13], 0xd0);
    d.write_all(&reply).await.expect("reply");
    assert_eq!(read_n(&mut u, reply.len()).await, reply.to_vec());
    let mut tail = Vec::new();
    u.read_to_end(&mut tail).await.expect("the gateway's FIN");
    drop(u);
    assert!(read_to_eof(&mut d).await.is_empty());
    let outcome = drain.await.expect("drain");
    let took = t0.elapsed();
    println!("drained {took:?} after SIGTERM: {outcome:?}");
    assert_eq!(outcome, cync_gateway::shutdown::DrainOutcome::Clean);
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(1500) + SLACK,
        "closed after the reply (1.5 s), not at once and not at the 20 s deadline: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_random_bytes_pass_byte_exact_both_ways_in_reads_that_fill_the_buffer() {
    let hello = vector("handshake_0x23");
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(up.local_addr().expect("addr"))
        .path("legacy")
        .start()
        .await;
    let (d, u) = scripted_pair(gw.device_addr, &up, &hello).await;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    // 256 KiB each way in 64 KiB writes (every gateway read fills its 16 KiB buffer), with a
    // header declaring far more than max_frame_len among them.
    let mut make = || {
        let mut v: Vec<u8> = (0..256 * 1024).map(|_| rng.gen()).collect();
        v[1000..1005].copy_from_slice(&[0x73, 0, 0, 0xff, 0xff]);
        v
    };
    let (to_up, to_dev) = (make(), make());
    let (mut dr, mut dw) = d.into_split();
    let (mut ur, mut uw) = u.into_split();
    let (a, b) = (to_up.clone(), to_dev.clone());
    let w1 = tokio::spawn(async move {
        for c in a.chunks(64 * 1024) {
            dw.write_all(c).await.expect("device write");
        }
        dw
    });
    let w2 = tokio::spawn(async move {
        for c in b.chunks(64 * 1024) {
            uw.write_all(c).await.expect("upstream write");
        }
        uw
    });
    let got_up = read_n(&mut ur, to_up.len()).await;
    let got_dev = read_n(&mut dr, to_dev.len()).await;
    let _keep = (w1.await.expect("w1"), w2.await.expect("w2"));
    assert!(got_up == to_up, "device to upstream differs");
    assert!(got_dev == to_dev, "upstream to device differs");
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(
        sample(
            &m,
            "tcp_comm_bytes_total{direction=\"dev_to_srv\",transport=\"legacy\"}"
        ),
        (to_up.len() + hello.len()) as f64
    );
    assert_eq!(
        sample(
            &m,
            "tcp_comm_bytes_total{direction=\"srv_to_dev\",transport=\"legacy\"}"
        ),
        (to_dev.len() + 7) as f64
    );
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_reaches_the_device_as_a_reset() {
    let hello = vector("handshake_0x23");
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(up.local_addr().expect("addr"))
        .path("legacy")
        .start()
        .await;
    let (mut d, u) = scripted_pair(gw.device_addr, &up, &hello).await;
    socket2::SockRef::from(&u)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(u);
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(DEADLINE, d.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    wait_metric(
        gw.metrics_addr,
        "tcp_comm_connection_closes_total{reason=\"upstream_reset\",transport=\"legacy\"}",
        1.0,
    )
    .await;
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_pair_is_closed_at_the_half_close_timeout_on_both_paths() {
    let hello = vector("handshake_0x23");
    for path in ["legacy", "new"] {
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gw = TestGateway::new(up.local_addr().expect("addr"))
            .path(path)
            .set("protocol.half_close_timeout", "1s")
            .start()
            .await;
        let (mut d, mut u) = scripted_pair(gw.device_addr, &up, &hello).await;
        d.shutdown().await.expect("device FIN");
        assert!(
            read_to_eof(&mut u).await.is_empty(),
            "{path}: FIN passed on"
        );
        // The add-on never closes its side.
        let t0 = Instant::now();
        assert!(read_to_eof(&mut d).await.is_empty());
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(1) + SLACK,
            "{path}: {took:?}"
        );
        wait_metric(
            gw.metrics_addr,
            &format!("tcp_comm_connection_closes_total{{reason=\"half_close_timeout\",transport=\"{path}\"}}"),
            1.0,
        )
        .await;
        drop(u);
        gw.shutdown(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_tls_failure_closes_the_device_and_is_counted() {
    // A plaintext listener where the gateway expects TLS: the handshake fails.
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = up.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = up.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"HTTP/1.0 400 no\r\n\r\n").await;
            });
        }
    });
    let gw = TestGateway::new(addr)
        .set("upstream.legacy.tls", true)
        .start()
        .await;
    let mut d = TcpStream::connect(gw.device_addr).await.expect("connect");
    d.write_all(&vector("handshake_0x23")).await.expect("hello");
    assert!(read_to_eof(&mut d).await.is_empty());
    let m = wait_metric(
        gw.metrics_addr,
        "tcp_comm_upstream_connect_errors_total{reason=\"tls\",transport=\"legacy\"}",
        1.0,
    )
    .await;
    assert_eq!(closes(&m, "legacy", "upstream_connect_failed"), 1.0);
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_device_certificate_is_the_one_devices_get() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = cync_gateway::conn::tls::self_signed("configured.example").expect("cert");
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_path, cert.cert.to_pem().expect("pem")).expect("write");
    std::fs::write(&key_path, cert.key.private_key_to_pem_pkcs8().expect("pem")).expect("write");
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(up.local_addr().expect("addr"))
        .set("device_tls.mode", "tls")
        .set("device_tls.cert_file", cert_path.display().to_string())
        .set("device_tls.key_file", key_path.display().to_string())
        .start()
        .await;
    assert!(gw.generated_cert.is_none(), "nothing generated");
    let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())
        .expect("builder");
    b.set_verify(openssl::ssl::SslVerifyMode::NONE);
    b.set_cipher_list("AES256-SHA256").expect("ciphers");
    b.set_max_proto_version(Some(openssl::ssl::SslVersion::TLS1_2))
        .expect("version");
    let ssl = b
        .build()
        .configure()
        .expect("configure")
        .use_server_name_indication(false)
        .verify_hostname(false)
        .into_ssl("")
        .expect("ssl");
    let tcp = TcpStream::connect(gw.device_addr).await.expect("connect");
    let mut s = tokio_openssl::SslStream::new(ssl, tcp).expect("stream");
    std::pin::Pin::new(&mut s)
        .connect()
        .await
        .expect("handshake");
    let presented = s.ssl().peer_certificate().expect("a certificate");
    assert_eq!(
        presented
            .digest(openssl::hash::MessageDigest::sha256())
            .expect("digest")
            .to_vec(),
        cert.cert
            .digest(openssl::hash::MessageDigest::sha256())
            .expect("digest")
            .to_vec()
    );
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_reliable_and_protocol_reaches_new_connections_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = TestGateway::new(up.local_addr().expect("addr"))
        .path("new")
        .set("reload.poll_interval", 0)
        .text();
    std::fs::write(&path, &base).expect("write");
    let gw = start_watching(&path).await;
    let hello = vector("handshake_0x23");
    let (mut old_d, _old_u) = scripted_pair(gw.device_addr, &up, &hello).await;
    // New connections: idle after 1 s.
    std::fs::write(&path, format!("{base}[reliable]\nidle_timeout = \"1s\"\n")).expect("write");
    sighup(&gw).await;
    wait_metric(
        gw.metrics_addr,
        "tcp_comm_config_reloads_total{result=\"applied\"}",
        1.0,
    )
    .await;
    let (mut new_d, _new_u) = scripted_pair(gw.device_addr, &up, &hello).await;
    let t0 = Instant::now();
    assert!(read_to_eof(&mut new_d).await.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(1) + SLACK);
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(
        closes(&m, "new", "idle_timeout"),
        1.0,
        "the new connection timed out idle"
    );
    // The old one still has its 90 s: it is open, and its heartbeat still goes through.
    old_d
        .write_all(&build::heartbeat())
        .await
        .expect("old still open");
    let mut one = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(300), old_d.read(&mut one)).await;
    assert!(r.is_err(), "the old connection was not closed");
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_until_ack_stops_copying_on_the_0x7b_end_to_end() {
    let hello = vector("handshake_0x23");
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(up.local_addr().expect("addr"))
        .path("new")
        .set("reliable.retry_until", "ack")
        .start()
        .await;
    let (mut d, mut u) = scripted_pair(gw.device_addr, &up, &hello).await;
    let cmd = vector("legacy_power_on_0x73");
    u.write_all(&cmd).await.expect("command");
    assert_eq!(read_n(&mut d, cmd.len()).await, cmd);
    let ack = build::data_ack(DEV, MsgId([0, 0, 0]));
    d.write_all(&ack).await.expect("0x7b");
    assert_eq!(read_n(&mut u, ack.len()).await, ack.to_vec());
    // Received, and with retry_until = "ack" that ends the copies: nothing more for 4 s.
    let mut one = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(4), d.read(&mut one)).await;
    assert!(r.is_err(), "a copy was sent after the 0x7b");
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(
        sample_or_zero(&m, "tcp_comm_packet_retransmit_total{transport=\"new\"}"),
        0.0
    );
    assert_eq!(
        sample(
            &m,
            "tcp_comm_ack_received_total{outcome=\"received\",transport=\"new\"}"
        ),
        1.0
    );
    gw.shutdown(Duration::from_millis(200)).await;
}
