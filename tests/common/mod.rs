//! Helpers shared by the integration tests: captures, an in-process gateway, metric scrapes,
//! deadline polling. Tests never sleep to wait; they poll with a deadline.
#![allow(dead_code)]

pub mod daemon;
pub mod gateway;
pub mod replay;

#[allow(unused_imports)]
pub use gateway::{Configure, TestGateway};

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use cync_gateway::config::Config;
use cync_gateway::gateway::Gateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// The fake add-on with its start-up delays shortened (0xa3 at 50 ms, mesh query at 200 ms),
/// so tests reach the ready state quickly; the order of events is the real add-on's.
pub fn fast_addon() -> cync_gateway::sim::addon::AddonConfig {
    cync_gateway::sim::addon::AddonConfig {
        channel_open_after: Duration::from_millis(50),
        mesh_query_after: Duration::from_millis(200),
        ..cync_gateway::sim::addon::AddonConfig::default()
    }
}

/// A fake add-on on an ephemeral loopback port.
pub async fn start_addon(
    cfg: cync_gateway::sim::addon::AddonConfig,
) -> std::sync::Arc<cync_gateway::sim::addon::Addon> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    cync_gateway::sim::addon::Addon::start(l, cfg).expect("addon")
}

/// `../shared/captures` beside the checkout, or `$CYNC_CAPTURES` when the tree is tested from a
/// copy (scripts/mutants.sh).
pub fn shared_dir() -> PathBuf {
    std::env::var_os("CYNC_CAPTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/captures"))
}

/// The reads of a capture file, in order, as (dir, bytes).
pub fn capture_reads(name: &str) -> Vec<(String, Vec<u8>)> {
    let path = shared_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("capture line is JSON");
            let dir = v["dir"].as_str().expect("dir").to_string();
            let bytes = hex::decode(v["hex"].as_str().expect("hex")).expect("hex decodes");
            (dir, bytes)
        })
        .collect()
}

/// A named vector's bytes.
pub fn vector(name: &str) -> Vec<u8> {
    let path = shared_dir().join("vectors.jsonl");
    let text = std::fs::read_to_string(&path).expect("vectors.jsonl");
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).expect("json");
        if v["name"] == name {
            return hex::decode(v["hex"].as_str().expect("hex")).expect("hex decodes");
        }
    }
    panic!("no vector {name}");
}

/// GET a path over plain HTTP/1.1; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[], "").await
}

/// The value of one sample line (exact name and label set as rendered), if it is there.
pub fn sample_opt(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().expect("sample value"))
}

/// The value of one sample line. A series that is not there is an error, not a zero: a renamed
/// metric or label must fail the check, not pass `== 0` by vanishing.
pub fn sample(metrics: &str, series: &str) -> f64 {
    sample_opt(metrics, series).unwrap_or_else(|| panic!("no series {series} in the metrics page"))
}

/// One HTTP/1.1 request with `headers` and `body`: (status, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect http");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.expect("write req");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read resp");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The sum of every series of `family` on the page; the family itself must be there (its
/// `# TYPE` line), so a renamed family fails instead of summing to 0.
pub fn family_total(metrics: &str, family: &str) -> f64 {
    assert!(
        metrics
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .any(|l| l.split_whitespace().next() == Some(family)),
        "no family {family} in the metrics page"
    );
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of one sample line, or 0 when it is not there: for series that are only created
/// once something happens, where "never happened" is the expected answer. The family itself
/// must exist on the page (its `# TYPE` line), so a renamed family still fails.
pub fn sample_or_zero(metrics: &str, series: &str) -> f64 {
    let family = series.split('{').next().unwrap_or(series);
    let base = family
        .trim_end_matches("_bucket")
        .trim_end_matches("_count")
        .trim_end_matches("_sum");
    let known = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .any(|l| l.split_whitespace().next() == Some(base))
        || cync_gateway::telemetry::metrics::Metrics::new(true)
            .map(|m| m.family_names().iter().any(|n| n == base))
            .unwrap_or(false);
    assert!(known, "no metric family {base}");
    sample_opt(metrics, series).unwrap_or(0.0)
}

/// Polls `check` until it returns Some or the deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > end {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the gateway's /metrics until `series` exists and reaches `want`.
pub async fn wait_metric(addr: SocketAddr, series: &str, want: f64) -> String {
    eventually(&format!("{series} == {want}"), || async {
        let (_, body) = http_get(addr, "/metrics").await;
        (sample_opt(&body, series) == Some(want)).then_some(body)
    })
    .await
}

/// Starts a gateway from the configuration file at `path`, reloading from it (on
/// [`sighup`], and by polling per its `reload.poll_interval`).
/// A file without a `state_dir` gets one of its own first (see [`gateway::fresh_state_dir`]).
pub async fn start_watching(path: &std::path::Path) -> Gateway {
    let text = std::fs::read_to_string(path).expect("test config");
    let own = gateway::with_own_state_dir(&text);
    if own != text {
        std::fs::write(path, own).expect("test config");
    }
    let cfg = Config::load(path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
    Gateway::builder(cfg)
        .config_file(path)
        .start()
        .await
        .expect("gateway starts")
}

/// What the daemon does on SIGHUP: asks the control task to reload the file.
pub async fn sighup(gw: &Gateway) {
    gw.control()
        .send(cync_gateway::control::Control::Reload {
            origin: cync_gateway::control::Origin::Signal,
        })
        .await
        .expect("control task running");
}

/// Reads exactly `n` bytes, or panics after the deadline.
pub async fn read_n(s: &mut (impl tokio::io::AsyncRead + Unpin), n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("timed out reading {n} bytes"))
        .expect("read");
    buf
}

/// Reads to EOF, or panics after the deadline.
pub async fn read_to_eof(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("EOF in time")
        .expect("read to end");
    buf
}

/// A device connection through the gateway at `devices` and the upstream side of it accepted
/// on `up`, with `hello` already through; on the new path the upstream's 0x28 establishes the
/// session (the device has read it).
pub async fn scripted_pair(
    devices: SocketAddr,
    up: &tokio::net::TcpListener,
    hello: &[u8],
) -> (TcpStream, TcpStream) {
    let mut dev = TcpStream::connect(devices).await.expect("connect gateway");
    dev.set_nodelay(true).expect("nodelay");
    dev.write_all(hello).await.expect("hello");
    let (mut upc, _) = tokio::time::timeout(DEADLINE, up.accept())
        .await
        .expect("upstream dialled")
        .expect("accept");
    upc.set_nodelay(true).expect("nodelay");
    assert_eq!(
        read_n(&mut upc, hello.len()).await,
        hello,
        "hello forwarded"
    );
    let ack = cync_gateway::protocol::build::hello_ack();
    upc.write_all(&ack).await.expect("0x28");
    assert_eq!(read_n(&mut dev, ack.len()).await, ack.to_vec());
    (dev, upc)
}

/// The metrics page.
pub async fn scrape(addr: SocketAddr) -> String {
    http_get(addr, "/metrics").await.1
}

/// The documented canary bucket, computed here from the formula (design decision 2), not by
/// the gateway's router: `u64_be(SHA-256("cync-gateway/v1:" + hex(id))[0..8]) % 10000`.
pub fn reference_bucket(id: cync_gateway::protocol::DeviceId) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("cync-gateway/v1:{}", hex::encode(id.0)).as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]) % 10_000
}

/// Whether the documented rule puts `id` on the new path at `percent` (two decimals).
pub fn reference_on_new(id: cync_gateway::protocol::DeviceId, percent: f64) -> bool {
    reference_bucket(id) < (percent * 100.0).round() as u64
}

/// How late a timer may fire on a loaded 2-core machine running the suite twice over: upper
/// bounds of timing checks are the mechanism's own time plus this, never a tight guess.
pub const SLACK: Duration = Duration::from_secs(3);

/// An address nothing answers on, reserved for as long as the returned socket lives: bound but
/// never listening, so a connect is refused, and no other test — nor a second copy of the suite
/// running alongside — can be given the port meanwhile (a listener bound and dropped frees it).
pub fn refused_addr() -> (socket2::Socket, SocketAddr) {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let addr = s
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("an IP address");
    (s, addr)
}

/// One POST the test webhook received: its Authorization header and JSON body.
pub type Received = (String, serde_json::Value);

/// A real HTTP server (hyper) that records every POST and answers 200.
pub async fn webhook_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = http_body_util::BodyExt::collect(req.into_body())
                                .await?
                                .to_bytes();
                            let json =
                                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                            let _ = tx.send((auth, json));
                            Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::new(),
                            )))
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(s);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// Sends the fake add-on's harness commands, one every `every`, from an RNG seeded with `seed`,
/// until `stop`.
pub fn pump(
    addon: std::sync::Arc<cync_gateway::sim::addon::Addon>,
    every: Duration,
    seed: u64,
    stop: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
        let mut cursor = 0;
        while !stop.is_cancelled() {
            addon.send_command(&mut cursor, &mut rng);
            tokio::time::sleep(every).await;
        }
    });
}

/// Runs the add-on's harness at `rate` until `commands` have been sent, then waits for every
/// one of them to finish (done, timed out or lost).
pub async fn drive(
    a: &std::sync::Arc<cync_gateway::sim::addon::Addon>,
    commands: u64,
    rate: f64,
    seed: u64,
) -> cync_gateway::sim::addon::HarnessReport {
    let stop = tokio_util::sync::CancellationToken::new();
    let h = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move { a.run_harness(rate, seed, stop).await })
    };
    let deadline = Duration::from_secs_f64(commands as f64 / rate) + DEADLINE;
    let end = tokio::time::Instant::now() + deadline;
    while a.report().sent < commands {
        assert!(
            tokio::time::Instant::now() < end,
            "harness stalled: {:?}",
            a.report()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let _ = h.await;
    eventually("every command finished", || async {
        (a.report().in_flight == 0).then_some(())
    })
    .await;
    a.report()
}

/// A PROXY protocol v1 header for TCP over IPv4/IPv6, laid out from the specification.
pub fn proxy_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A PROXY protocol v2 header for TCP over IPv4, laid out from the specification's section
/// 2.2: the signature, 0x21 (version 2, PROXY), 0x11 (TCP over IPv4), the length, then
/// source, destination and ports.
pub fn proxy_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 expected");
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}
