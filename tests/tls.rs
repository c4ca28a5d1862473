//! TLS on both legs, over real sockets on 127.0.0.1.
//!
//! Device side: the three ClientHello records real devices sent (shared/captures/
//! client_hellos.jsonl) must each get a ServerHello from the default acceptor, choosing one of
//! the suites that ClientHello offered; an OpenSSL client restricted to one device suite must
//! complete the handshake; `device_tls.min_version` decides the lowest version.
//! Upstream side: every verification policy of the dialer, plaintext, and the three ways a dial
//! fails (TLS, connect, timeout); the add-on's session offered again, and never in place of a
//! pinned certificate check.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use cync_gateway::config::Config;
use cync_gateway::conn::tls::{self, Stream};
use cync_gateway::conn::upstream::{DialError, Dialer};
use cync_gateway::telemetry::labels::Label;
use openssl::hash::MessageDigest;
use openssl::ssl::{Ssl, SslAcceptor, SslConnector, SslMethod, SslVerifyMode, SslVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_openssl::SslStream;

const MINIMAL: &str = "[upstream.legacy]\naddress = \"127.0.0.1:1\"\n";

/// Upper bound for any single network wait in these tests.
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Echoes everything read back to the writer until EOF or an error.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes `msg` and expects exactly the same bytes back within [`WAIT`].
async fn assert_echo<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.expect("write to echo server");
    s.flush().await.expect("flush to echo server");
    let mut back = vec![0u8; msg.len()];
    timeout(WAIT, s.read_exact(&mut back))
        .await
        .expect("echo reply within 5 s")
        .expect("read echo reply");
    assert_eq!(back, msg, "echo server returned different bytes");
}

/// Starts the device-facing accept loop: every accepted socket goes through
/// `cync_gateway::conn::tls::accept`; the negotiated cipher (or the handshake error) of each is sent on
/// the returned channel, then the stream is echoed until the peer closes.
async fn device_server(
    acceptor: SslAcceptor,
) -> (SocketAddr, mpsc::UnboundedReceiver<Result<String, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind device listener");
    let addr = listener.local_addr().expect("device listener address");
    let acceptor = Arc::new(acceptor);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tls::accept(&acceptor, tcp).await {
                    Ok(stream) => {
                        let cipher = stream.cipher_name().unwrap_or("(none)").to_string();
                        let _ = tx.send(Ok(cipher));
                        echo(stream).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn default_device_acceptor() -> SslAcceptor {
    let config = Config::parse(MINIMAL).expect("minimal config is valid");
    let (acceptor, generated) =
        tls::device_acceptor(&config.device_tls).expect("device acceptor from defaults");
    assert!(
        generated.is_some(),
        "no cert configured, so one must be generated"
    );
    acceptor
}

/// One captured ClientHello record.
struct Hello {
    t: String,
    bytes: Vec<u8>,
}

fn client_hellos() -> Vec<Hello> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/captures/client_hellos.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: serde_json::Value =
                serde_json::from_str(line).expect("client_hellos line is JSON");
            let hex_text = v["hex"].as_str().expect("hex field is a string");
            let bytes = hex::decode(hex_text).expect("hex field decodes");
            if let Some(n) = v["bytes"].as_u64() {
                assert_eq!(
                    bytes.len() as u64,
                    n,
                    "bytes field disagrees with hex length"
                );
            }
            Hello {
                t: v["t"].as_str().unwrap_or("?").to_string(),
                bytes,
            }
        })
        .collect()
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The cipher suites a ClientHello record offers, in its order. Layout: record header (5),
/// handshake header (4), client_version (2), random (32), session_id (u8-prefixed),
/// cipher_suites (u16-prefixed list of u16).
fn offered_suites(record: &[u8]) -> Vec<u16> {
    assert_eq!(record[0], 0x16, "not a handshake record");
    assert_eq!(record[5], 0x01, "not a ClientHello");
    let mut p = 5 + 4 + 2 + 32;
    p += 1 + usize::from(record[p]);
    let len = usize::from(u16_at(record, p));
    p += 2;
    assert!(
        p + len <= record.len(),
        "ClientHello suite list runs past the record"
    );
    (0..len / 2).map(|i| u16_at(record, p + 2 * i)).collect()
}

/// The (server_version, cipher_suite) of a ServerHello at the start of `resp`.
fn server_hello_choice(resp: &[u8]) -> (u16, u16) {
    let mut p = 5 + 4;
    let version = u16_at(resp, p);
    p += 2 + 32;
    p += 1 + usize::from(resp[p]);
    (version, u16_at(resp, p))
}

/// OpenSSL name of the suites these ClientHellos offer, for readable output.
fn suite_name(code: u16) -> String {
    let name = match code {
        0x002f => "AES128-SHA",
        0x0035 => "AES256-SHA",
        0x003c => "AES128-SHA256",
        0x003d => "AES256-SHA256",
        0x0041 => "CAMELLIA128-SHA",
        0x0084 => "CAMELLIA256-SHA",
        0x00ba => "CAMELLIA128-SHA256",
        0x00c0 => "CAMELLIA256-SHA256",
        0xc09c => "AES128-CCM",
        0xc09d => "AES256-CCM",
        0xc0a0 => "AES128-CCM8",
        0xc0a1 => "AES256-CCM8",
        0xc023 => "ECDHE-ECDSA-AES128-SHA256",
        0xc024 => "ECDHE-ECDSA-AES256-SHA384",
        0xc009 => "ECDHE-ECDSA-AES128-SHA",
        0xc00a => "ECDHE-ECDSA-AES256-SHA",
        0xc0ac => "ECDHE-ECDSA-AES128-CCM",
        0xc0ad => "ECDHE-ECDSA-AES256-CCM",
        _ => "?",
    };
    format!("0x{code:04x} {name}")
}

/// Reads until `buf` holds the whole first TLS record (or at least its 5-byte header and 1
/// byte), failing on EOF or after [`WAIT`].
async fn read_first_record(tcp: &mut TcpStream) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let want = if buf.len() >= 5 {
            (5 + usize::from(u16_at(&buf, 3))).max(6)
        } else {
            6
        };
        if buf.len() >= want {
            return buf;
        }
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no complete TLS record within 5 s (got {buf:02x?})"))
            .expect("read server response");
        assert!(n > 0, "server closed after {} bytes: {buf:02x?}", buf.len());
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// Device side
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn device_client_hellos_get_server_hello() {
    let (addr, _results) = device_server(default_device_acceptor()).await;
    let hellos = client_hellos();
    assert_eq!(
        hellos.len(),
        3,
        "expected the three captured ClientHello variants"
    );
    for hello in &hellos {
        let offered = offered_suites(&hello.bytes);
        let mut tcp = timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect within 5 s")
            .expect("connect to device listener");
        tcp.write_all(&hello.bytes)
            .await
            .expect("write ClientHello");
        let resp = read_first_record(&mut tcp).await;
        assert_eq!(
            resp[0],
            0x16,
            "ClientHello {} ({} bytes): expected a handshake record, got {:02x?}",
            hello.t,
            hello.bytes.len(),
            &resp[..resp.len().min(16)]
        );
        assert_eq!(
            resp[5],
            0x02,
            "ClientHello {} ({} bytes): first handshake message is not a ServerHello",
            hello.t,
            hello.bytes.len()
        );
        let (version, chosen) = server_hello_choice(&resp);
        println!(
            "ClientHello {} ({} bytes, {} suites offered): ServerHello version 0x{version:04x}, suite {}",
            hello.t,
            hello.bytes.len(),
            offered.len(),
            suite_name(chosen)
        );
        assert_eq!(version, 0x0303, "devices get TLS 1.2");
        assert_ne!(chosen, 0x00ff, "the renegotiation SCSV is not a real suite");
        assert!(
            offered.contains(&chosen),
            "ClientHello {}: server chose {} which was not offered ({:04x?})",
            hello.t,
            suite_name(chosen),
            offered
        );
    }
}

/// An OpenSSL client (no verification, no SNI) limited to `versions` and `ciphers`.
fn device_client(versions: (SslVersion, SslVersion), ciphers: &str) -> Ssl {
    let mut b = SslConnector::builder(SslMethod::tls_client()).expect("connector builder");
    b.set_verify(SslVerifyMode::NONE);
    b.set_min_proto_version(Some(versions.0))
        .expect("client min version");
    b.set_max_proto_version(Some(versions.1))
        .expect("client max version");
    b.set_cipher_list(ciphers).expect("client cipher list");
    b.build()
        .configure()
        .expect("configure")
        .use_server_name_indication(false)
        .verify_hostname(false)
        .into_ssl("")
        .expect("client ssl")
}

/// Connects `ssl` to `addr` and runs the client handshake within [`WAIT`].
async fn handshake(addr: SocketAddr, ssl: Ssl) -> Result<SslStream<TcpStream>, String> {
    let tcp = timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect within 5 s")
        .expect("connect to device listener");
    let mut client = SslStream::new(ssl, tcp).expect("client stream");
    timeout(WAIT, Pin::new(&mut client).connect())
        .await
        .expect("handshake finished within 5 s")
        .map_err(|e| e.to_string())?;
    Ok(client)
}

#[tokio::test]
async fn device_side_openssl_client_restricted_to_device_suites() {
    let (addr, mut results) = device_server(default_device_acceptor()).await;
    for cipher in ["AES256-SHA256", "AES128-SHA"] {
        let ssl = device_client((SslVersion::TLS1, SslVersion::TLS1_2), cipher);
        let mut client = handshake(addr, ssl)
            .await
            .unwrap_or_else(|e| panic!("handshake restricted to {cipher} failed: {e}"));
        let client_cipher = client
            .ssl()
            .current_cipher()
            .map(|c| c.name())
            .expect("a negotiated cipher");
        let client_version = client.ssl().version_str();
        println!(
            "OpenSSL client limited to {cipher}: negotiated {client_cipher} ({client_version})"
        );
        assert_eq!(client_cipher, cipher);
        assert_eq!(client_version, "TLSv1.2");
        let server_cipher = timeout(WAIT, results.recv())
            .await
            .expect("server side result within 5 s")
            .expect("accept loop alive")
            .unwrap_or_else(|e| panic!("server-side accept failed: {e}"));
        assert_eq!(
            server_cipher, cipher,
            "server and client disagree on the cipher"
        );
        assert_echo(&mut client, b"device says hi").await;
    }
}

/// `device_tls.min_version` decides: TLS 1.0 is refused by default, and accepted when configured
/// (with the "@SECLEVEL=0" OpenSSL 3 needs for 1.0/1.1). The Mozilla profile the acceptor starts
/// from used to disable 1.0/1.1 whatever `min_version` said.
#[tokio::test]
async fn device_min_version_is_honoured() {
    let tls10 = (SslVersion::TLS1, SslVersion::TLS1);
    let client_ciphers = "AES128-SHA:@SECLEVEL=0";

    let (addr, _results) = device_server(default_device_acceptor()).await;
    let refused = handshake(addr, device_client(tls10, client_ciphers)).await;
    assert!(
        refused.is_err(),
        "default min_version tls1.2 accepted TLS 1.0"
    );

    let text = format!(
        "{MINIMAL}[device_tls]\nmin_version = \"tls1.0\"\nciphers = \"AES128-SHA:@SECLEVEL=0\"\n"
    );
    let config = Config::parse(&text).expect("tls1.0 config is valid");
    let (acceptor, _) = tls::device_acceptor(&config.device_tls).expect("tls1.0 acceptor");
    let (addr, _results) = device_server(acceptor).await;
    let mut client = handshake(addr, device_client(tls10, client_ciphers))
        .await
        .unwrap_or_else(|e| panic!("min_version = tls1.0 refused TLS 1.0: {e}"));
    assert_eq!(client.ssl().version_str(), "TLSv1");
    assert_echo(&mut client, b"old device").await;
}

/// `device_tls.max_version` decides whether TLS 1.3 is offered: by default a TLS 1.3 client
/// gets 1.3; with max_version = "tls1.2" it is refused (it allows nothing lower).
#[tokio::test]
async fn device_max_version_turns_tls_1_3_off() {
    let tls13 = (SslVersion::TLS1_3, SslVersion::TLS1_3);
    let (addr, _results) = device_server(default_device_acceptor()).await;
    let mut client = handshake(addr, device_client(tls13, "DEFAULT"))
        .await
        .unwrap_or_else(|e| panic!("TLS 1.3 refused by default: {e}"));
    assert_eq!(client.ssl().version_str(), "TLSv1.3");
    assert_echo(&mut client, b"modern client").await;

    let text = format!("{MINIMAL}[device_tls]\nmax_version = \"tls1.2\"\n");
    let config = Config::parse(&text).expect("valid");
    let (acceptor, _) = tls::device_acceptor(&config.device_tls).expect("acceptor");
    let (addr, _results) = device_server(acceptor).await;
    assert!(
        handshake(addr, device_client(tls13, "DEFAULT"))
            .await
            .is_err(),
        "max_version = tls1.2 accepted TLS 1.3"
    );
    let mut old = handshake(
        addr,
        device_client((SslVersion::TLS1_2, SslVersion::TLS1_2), "AES256-SHA256"),
    )
    .await
    .expect("TLS 1.2 still accepted");
    assert_echo(&mut old, b"device").await;
    let bad =
        format!("{MINIMAL}[device_tls]\nmax_version = \"tls1.2\"\nmin_version = \"tls1.3\"\n");
    assert!(Config::parse(&bad).is_err(), "max below min");
}

// ---------------------------------------------------------------------------------------------
// Upstream side
// ---------------------------------------------------------------------------------------------

/// A TLS echo server with a fresh `self_signed("addon")` certificate, like the add-on's.
struct Addon {
    addr: SocketAddr,
    cert: openssl::x509::X509,
}

async fn tls_echo_server() -> Addon {
    let (acceptor, cert) = addon_acceptor();
    // Nobody listens for its handshake reports; it echoes all the same.
    let (addr, _) = reporting_server(vec![acceptor]).await;
    Addon { addr, cert }
}

async fn plain_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind plain echo");
    let addr = listener.local_addr().expect("plain echo address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(echo(tcp));
        }
    });
    addr
}

fn dialer(addr: SocketAddr, extra: &str) -> Dialer {
    let text = format!("[upstream.legacy]\naddress = \"{addr}\"\n{extra}");
    let config = Config::parse(&text).unwrap_or_else(|e| panic!("config {text:?} invalid: {e}"));
    Dialer::new(&config.upstream_legacy).expect("dialer from config")
}

async fn dial(d: &Dialer) -> Result<Stream, DialError> {
    timeout(WAIT, d.dial())
        .await
        .expect("dial returned within the 5 s guard")
}

async fn dial_ok_and_echo(d: &Dialer, expect_tls: bool) {
    let mut s = dial(d)
        .await
        .unwrap_or_else(|e| panic!("dial {} failed ({}): {e}", d.address(), Label::label(&e)));
    assert_eq!(s.is_tls(), expect_tls);
    assert_eq!(s.cipher_name().is_some(), expect_tls);
    assert_echo(&mut s, b"gateway to addon").await;
}

fn expect_dial_err(r: Result<Stream, DialError>, reason: &str) -> DialError {
    match r {
        Ok(_) => panic!("dial succeeded; expected a {reason:?} failure"),
        Err(e) => {
            assert_eq!(Label::label(&e), reason, "wrong failure: {e}");
            e
        }
    }
}

fn sha256_hex(cert: &openssl::x509::X509Ref) -> String {
    hex::encode(cert.digest(MessageDigest::sha256()).expect("cert digest"))
}

#[tokio::test]
async fn upstream_verify_none_dials_and_echoes() {
    let addon = tls_echo_server().await;
    dial_ok_and_echo(&dialer(addon.addr, "verify = \"none\"\n"), true).await;
}

#[tokio::test]
async fn upstream_fingerprint_match_dials() {
    let addon = tls_echo_server().await;
    let fp = sha256_hex(&addon.cert);
    let extra = format!("verify = \"fingerprint\"\nfingerprint_sha256 = \"{fp}\"\n");
    dial_ok_and_echo(&dialer(addon.addr, &extra), true).await;
    // The colon-separated upper-case form operators copy from `openssl x509 -fingerprint`.
    let colons = fp
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect::<Vec<_>>()
        .join(":");
    let extra = format!("verify = \"fingerprint\"\nfingerprint_sha256 = \"{colons}\"\n");
    dial_ok_and_echo(&dialer(addon.addr, &extra), true).await;
}

#[tokio::test]
async fn upstream_fingerprint_mismatch_is_tls_error() {
    let addon = tls_echo_server().await;
    let mut digest = addon
        .cert
        .digest(MessageDigest::sha256())
        .expect("cert digest")
        .to_vec();
    digest[0] ^= 0xff;
    let extra = format!(
        "verify = \"fingerprint\"\nfingerprint_sha256 = \"{}\"\n",
        hex::encode(&digest)
    );
    let e = expect_dial_err(dial(&dialer(addon.addr, &extra)).await, "tls");
    println!("wrong fingerprint: {e}");
}

#[tokio::test]
async fn upstream_ca_file_with_self_signed_cert_dials() {
    let addon = tls_echo_server().await;
    let mut pem = tempfile::NamedTempFile::new().expect("temp CA file");
    pem.write_all(&addon.cert.to_pem().expect("cert to PEM"))
        .expect("write CA file");
    pem.flush().expect("flush CA file");
    let extra = format!(
        "verify = \"ca\"\nca_file = {:?}\n",
        pem.path().to_str().expect("utf-8 temp path")
    );
    dial_ok_and_echo(&dialer(addon.addr, &extra), true).await;

    // A different self-signed certificate as the CA must not verify this add-on.
    let other = tls::self_signed("someone-else").expect("other cert");
    let mut wrong = tempfile::NamedTempFile::new().expect("temp CA file");
    wrong
        .write_all(&other.cert.to_pem().expect("cert to PEM"))
        .expect("write CA file");
    wrong.flush().expect("flush CA file");
    let extra = format!(
        "verify = \"ca\"\nca_file = {:?}\n",
        wrong.path().to_str().expect("utf-8 temp path")
    );
    expect_dial_err(dial(&dialer(addon.addr, &extra)).await, "tls");
}

#[tokio::test]
async fn upstream_plaintext_dials_and_echoes() {
    let addr = plain_echo_server().await;
    dial_ok_and_echo(&dialer(addr, "tls = false\n"), false).await;
}

#[tokio::test]
async fn upstream_nothing_listening_is_connect_error() {
    let (_reserved, addr) = common::refused_addr();
    let e = expect_dial_err(dial(&dialer(addr, "")).await, "connect");
    println!("nothing listening: {e}");
}

#[tokio::test]
async fn upstream_connect_timeout_covers_a_silent_tls_handshake() {
    // Accepts TCP, then never reads or writes: the TLS handshake can only time out.
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind silent listener");
    let addr = listener.local_addr().expect("silent listener address");
    let (accepted_tx, mut accepted_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
            let _ = accepted_tx.send(());
        }
    });
    let d = dialer(addr, "connect_timeout = \"300ms\"\n");
    let started = Instant::now();
    let r = dial(&d).await;
    let elapsed = started.elapsed();
    let e = expect_dial_err(r, "tls_timeout");
    println!("silent TLS peer: {e} after {elapsed:?}");
    assert!(
        matches!(e, DialError::TlsTimeout { after, .. } if after == Duration::from_millis(300)),
        "{e:?}"
    );
    assert!(e.to_string().contains("does the server speak TLS"), "{e}");
    assert!(
        elapsed >= Duration::from_millis(300),
        "gave up before the timeout: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(300) + Duration::from_secs(3),
        "ignored connect_timeout: {elapsed:?}"
    );
    timeout(WAIT, accepted_rx.recv())
        .await
        .expect("the silent listener saw the TCP connection")
        .expect("accept loop alive");
}

// ---------------------------------------------------------------------------------------------
// Upstream session reuse
// ---------------------------------------------------------------------------------------------

/// An acceptor with a fresh self-signed certificate (so its own session-ticket keys), and that
/// certificate.
fn addon_acceptor() -> (SslAcceptor, openssl::x509::X509) {
    let s = tls::self_signed("addon").expect("self-signed addon cert");
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).expect("acceptor");
    b.set_certificate(&s.cert).expect("set cert");
    b.set_private_key(&s.key).expect("set key");
    (b.build(), s.cert)
}

/// A TLS echo server whose n-th connection is served by `acceptors[n]` (the last one from then
/// on, as an add-on restarted with a new certificate would be); it sends on the channel, for
/// each handshake it completed, whether OpenSSL's server side resumed a session.
async fn reporting_server(acceptors: Vec<SslAcceptor>) -> (SocketAddr, mpsc::Receiver<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind addon");
    let addr = listener.local_addr().expect("addon address");
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let acceptors: Vec<Arc<SslAcceptor>> = acceptors.into_iter().map(Arc::new).collect();
        let mut n = 0;
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptors[n.min(acceptors.len() - 1)].clone();
            n += 1;
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(ssl) = Ssl::new(acceptor.context()) else {
                    return;
                };
                let Ok(mut s) = SslStream::new(ssl, tcp) else {
                    return;
                };
                if Pin::new(&mut s).accept().await.is_ok() {
                    let _ = tx.send(s.ssl().session_reused()).await;
                    echo(s).await;
                }
            });
        }
    });
    (addr, rx)
}

async fn handshake_report(rx: &mut mpsc::Receiver<bool>) -> bool {
    timeout(WAIT, rx.recv())
        .await
        .expect("the add-on reported its handshake within 5 s")
        .expect("the add-on is still running")
}

/// By default the second and later connections resume the session the add-on handed out on
/// the first (as HAProxy's servers do): the add-on's own OpenSSL says so, and so does the
/// gateway's side of the connection.
#[tokio::test]
async fn upstream_dials_after_the_first_resume_the_addons_session() {
    let (acceptor, _) = addon_acceptor();
    let (addr, mut reports) = reporting_server(vec![acceptor]).await;
    let d = dialer(addr, "");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let mut s = dial(&d).await.expect("dial");
        // The echo reads the TLS 1.3 ticket, which arrives after the handshake.
        assert_echo(&mut s, b"hello").await;
        seen.push((handshake_report(&mut reports).await, s.session_reused()));
        // A clean close (close_notify), as the gateway's pairs end: OpenSSL will not offer
        // the session of a connection dropped without one.
        s.shutdown().await.expect("close_notify");
    }
    assert_eq!(seen, [(false, false), (true, true), (true, true)]);
}

/// `tls_session_reuse = false`: every connection is a full handshake.
#[tokio::test]
async fn upstream_session_reuse_off_makes_every_handshake_full() {
    let (acceptor, _) = addon_acceptor();
    let (addr, mut reports) = reporting_server(vec![acceptor]).await;
    let d = dialer(addr, "tls_session_reuse = false\n");
    for _ in 0..3 {
        let mut s = dial(&d).await.expect("dial");
        assert_echo(&mut s, b"hello").await;
        assert!(
            !handshake_report(&mut reports).await,
            "the add-on resumed a session"
        );
        assert!(!s.session_reused());
        s.shutdown().await.expect("close_notify");
    }
}

/// An add-on that comes back with another certificate does not know the old session: the
/// handshake is full, so a pinned fingerprint is checked again, and the new certificate is
/// refused rather than let through on the strength of the old session.
#[tokio::test]
async fn a_pinned_upstream_that_changes_certificate_is_refused_despite_an_old_session() {
    let (first, cert) = addon_acceptor();
    let (second, _) = addon_acceptor();
    let (addr, mut reports) = reporting_server(vec![first, second]).await;
    let extra = format!(
        "verify = \"fingerprint\"\nfingerprint_sha256 = \"{}\"\n",
        sha256_hex(&cert)
    );
    let d = dialer(addr, &extra);
    let mut s = dial(&d).await.expect("first dial, pinned certificate");
    assert_echo(&mut s, b"hello").await;
    assert!(!handshake_report(&mut reports).await);
    s.shutdown().await.expect("close_notify");
    let e = expect_dial_err(dial(&d).await, "tls");
    println!("new certificate after a session: {e}");
}

// ---------------------------------------------------------------------------------------------
// Records that arrive together (OpenSSL reads ahead)
// ---------------------------------------------------------------------------------------------

/// A blocking socket that holds what OpenSSL writes while `hold` is set, so that several TLS
/// records can be sent in one `write`: what a real device's burst, or a slow proxy reading
/// late, puts in one segment.
struct Coalescing {
    tcp: std::net::TcpStream,
    hold: bool,
    held: Vec<u8>,
}

impl std::io::Read for Coalescing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::io::Read::read(&mut self.tcp, buf)
    }
}

impl std::io::Write for Coalescing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.hold {
            self.held.extend_from_slice(buf);
            Ok(buf.len())
        } else {
            self.tcp.write(buf)
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

#[tokio::test]
async fn records_that_arrive_in_one_segment_are_each_read_without_more_bytes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let client = std::thread::spawn(move || {
        let tcp = std::net::TcpStream::connect(addr).expect("connect");
        let ssl = device_client((SslVersion::TLS1_2, SslVersion::TLS1_2), "AES256-SHA256");
        let io = Coalescing {
            tcp,
            hold: false,
            held: Vec::new(),
        };
        let mut s = openssl::ssl::SslStream::new(ssl, io).expect("ssl stream");
        s.connect().expect("handshake");
        s.get_mut().hold = true;
        // Three records, one segment; the third says the burst is over.
        for record in [&b"first"[..], b"second", b"third"] {
            s.write_all(record).expect("write record");
        }
        let io = s.get_mut();
        io.hold = false;
        let burst = std::mem::take(&mut io.held);
        io.tcp.write_all(&burst).expect("one write for all three");
        // Nothing more is sent, and the connection stays open until the reader has all.
        let _ = done_rx.recv_timeout(WAIT * 2);
    });
    let (tcp, _) = timeout(WAIT, listener.accept())
        .await
        .expect("accept in time")
        .expect("accept");
    let stream = tls::accept(&default_device_acceptor(), tcp)
        .await
        .expect("device handshake");
    let (mut r, _w) = stream.split();
    let mut got = Vec::new();
    while got.len() < b"firstsecondthird".len() {
        let chunk = timeout(WAIT, r.read_ready(16 * 1024))
            .await
            .expect("each record read without the peer sending more")
            .expect("read");
        assert!(!chunk.is_empty(), "EOF before all three records");
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"firstsecondthird");
    let _ = done_tx.send(());
    client.join().expect("client thread");
}
