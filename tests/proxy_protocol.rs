//! PROXY protocol toward the upstream (`proxy_protocol = "v1" | "v2"`): every upstream
//! connection starts with a header naming the device's address and the address it connected
//! to — on both paths, and on the new path's redials after an upstream loss too — then the
//! device's bytes unchanged. And from a fronting balancer (`listen.accept_proxy_protocol`):
//! the header it sends first names the device, which the gateway then treats as the device's
//! address; a connection without a valid header is closed alone, counted. Expected headers
//! are laid out here from the specification.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const HELLO: &str = "handshake_0x23";

use common::{proxy_v1 as v1, proxy_v2 as v2};

async fn accept(l: &TcpListener) -> TcpStream {
    tokio::time::timeout(DEADLINE, l.accept())
        .await
        .expect("the gateway dials")
        .expect("accept")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upstream_connection_starts_with_the_devices_proxy_header_then_its_bytes() {
    for (version, path) in [
        ("v1", "legacy"),
        ("v2", "legacy"),
        ("v1", "new"),
        ("v2", "new"),
    ] {
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gw = TestGateway::new(up.local_addr().expect("addr"))
            .path(path)
            .set("upstream.legacy.proxy_protocol", version)
            .start()
            .await;
        let mut dev = TcpStream::connect(gw.device_addr).await.expect("connect");
        let src = dev.local_addr().expect("device address");
        let want = |s, d| if version == "v1" { v1(s, d) } else { v2(s, d) };
        dev.write_all(&vector(HELLO)).await.expect("hello");
        let mut upc = accept(&up).await;
        let header = want(src, gw.device_addr);
        assert_eq!(
            read_n(&mut upc, header.len()).await,
            header,
            "{version} on {path}"
        );
        assert_eq!(
            read_n(&mut upc, 31).await,
            vector(HELLO),
            "{version} on {path}"
        );
        if path == "new" {
            // The session is established by the 0x28; then the upstream goes away and the
            // redial starts with the same header.
            let ack = vector("hello_ack_0x28");
            upc.write_all(&ack).await.expect("0x28");
            assert_eq!(read_n(&mut dev, ack.len()).await, ack);
            drop(upc);
            let mut again = accept(&up).await;
            assert_eq!(
                read_n(&mut again, header.len()).await,
                header,
                "{version}: the redial's header"
            );
            assert_eq!(
                read_n(&mut again, 31).await,
                vector(HELLO),
                "replayed hello"
            );
        }
        drop(dev);
        gw.shutdown(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_bad_proxy_protocol_value_is_refused_by_name() {
    let bad = "[upstream.legacy]\naddress = \"h:1\"\nproxy_protocol = \"v3\"\n";
    let e = cync_gateway::config::Config::parse(bad).expect_err("v3");
    assert!(
        e.to_string().contains("upstream.legacy.proxy_protocol"),
        "{e}"
    );
}

/// A gateway behind a balancer: headers required (from `sources`, when given), upstream
/// headers in `upstream` ("off" for none).
async fn behind_balancer(
    up: &TcpListener,
    path: &str,
    upstream: &str,
    sources: &[&str],
) -> cync_gateway::gateway::Gateway {
    let mut g = TestGateway::new(up.local_addr().expect("addr"))
        .path(path)
        .set("listen.accept_proxy_protocol", true)
        .set("listen.proxy_header_timeout", "300ms")
        .set("upstream.legacy.proxy_protocol", upstream);
    if !sources.is_empty() {
        let mut a = toml_edit::Array::new();
        for s in sources {
            a.push(*s);
        }
        g = g.set("listen.proxy_protocol_sources", a);
    }
    g.start().await
}

/// Connects from `from` (a loopback address) to `to`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(format!("{from}:0").parse().expect("addr"))
        .expect("bind");
    s.connect(to).await.expect("connect")
}

/// Reads until the gateway closes the connection (within the deadline); what it sent.
async fn closed_by_gateway(dev: &mut TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, dev.read_to_end(&mut rest))
        .await
        .expect("the gateway closes it")
        .map(|_| rest)
        .unwrap_or_default()
}

fn rejected(m: &str, reason: &str) -> f64 {
    sample(
        m,
        &format!("tcp_comm_connections_rejected_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancers_header_names_the_device_to_the_upstream_on_both_paths() {
    // A device on the LAN the balancer saw, and the balancer's own listening address.
    let device: SocketAddr = "192.168.7.9:40001".parse().expect("addr");
    let front: SocketAddr = "192.168.7.1:23779".parse().expect("addr");
    for (incoming, path) in [
        ("v1", "legacy"),
        ("v2", "legacy"),
        ("v1", "new"),
        ("v2", "new"),
    ] {
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gw = behind_balancer(&up, path, "v1", &[]).await;
        let mut dev = TcpStream::connect(gw.device_addr).await.expect("connect");
        let h = if incoming == "v1" {
            v1(device, front)
        } else {
            v2(device, front)
        };
        dev.write_all(&h).await.expect("balancer header");
        dev.write_all(&vector(HELLO)).await.expect("hello");
        let mut upc = accept(&up).await;
        let out = v1(device, front);
        assert_eq!(
            read_n(&mut upc, out.len()).await,
            out,
            "{incoming} on {path}"
        );
        assert_eq!(
            read_n(&mut upc, 31).await,
            vector(HELLO),
            "{incoming} on {path}"
        );
        let ack = vector("hello_ack_0x28");
        upc.write_all(&ack).await.expect("0x28");
        assert_eq!(
            read_n(&mut dev, ack.len()).await,
            ack,
            "{incoming} on {path}"
        );
        drop(dev);
        gw.shutdown(std::time::Duration::from_millis(200)).await;
    }
}

/// Next to a device that is being served, connections with no header, a malformed one, and
/// one cut short are each closed, without a byte forwarded or an upstream dialled, and
/// counted by reason; the device served before goes on as if nothing happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_malformed_or_late_header_closes_that_connection_only_and_is_counted() {
    for path in ["legacy", "new"] {
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gw = behind_balancer(&up, path, "off", &[]).await;
        let device: SocketAddr = "192.168.7.9:40001".parse().expect("addr");
        let mut good = TcpStream::connect(gw.device_addr).await.expect("connect");
        good.write_all(&[v2(device, gw.device_addr), vector(HELLO)].concat())
            .await
            .expect("good");
        let mut upc = accept(&up).await;
        assert_eq!(read_n(&mut upc, 31).await, vector(HELLO));

        // No header (a device straight in), a v1 line short of a port, a v2 header of
        // version 1, and a v1 line that never ends.
        let v2_version_1 = [&b"\r\n\r\n\0\r\nQUIT\n\x11\x11\x00\x0c"[..], &[0u8; 12]].concat();
        let bad: [&[u8]; 4] = [
            &vector(HELLO),
            b"PROXY TCP4 192.168.7.9 192.168.7.1 40001\r\n",
            &v2_version_1,
            b"PROXY TCP4 192.168.7.9 ",
        ];
        for bytes in bad {
            let mut b = TcpStream::connect(gw.device_addr).await.expect("connect");
            b.write_all(bytes).await.expect("write");
            assert_eq!(closed_by_gateway(&mut b).await, b"", "{path}: {bytes:?}");
        }
        let m = scrape(gw.metrics_addr).await;
        assert_eq!(rejected(&m, "proxy_header"), 3.0, "{path}");
        assert_eq!(rejected(&m, "proxy_header_timeout"), 1.0, "{path}");
        assert_eq!(
            family_total(&m, "tcp_comm_routing_decisions_total"),
            1.0,
            "{path}: only the good connection was routed (and dialled)"
        );
        // The device served all along still is, both ways.
        let ack = vector("hello_ack_0x28");
        upc.write_all(&ack).await.expect("0x28");
        assert_eq!(read_n(&mut good, ack.len()).await, ack, "{path}");
        let hb = vector("heartbeat_0xd3");
        good.write_all(&hb).await.expect("heartbeat");
        assert_eq!(read_n(&mut upc, hb.len()).await, hb, "{path}");
        drop(good);
        gw.shutdown(std::time::Duration::from_millis(200)).await;
    }
}

/// With `proxy_protocol_sources`, only the listed sources (the balancer) must send a header;
/// a device connecting directly from elsewhere is served as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_listed_sources_must_send_a_header() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = behind_balancer(&up, "legacy", "v1", &["127.0.0.2"]).await;
    // Directly, from 127.0.0.1: no header, and the upstream hears of the real address.
    let mut direct = connect_from("127.0.0.1", gw.device_addr).await;
    let src = direct.local_addr().expect("addr");
    direct.write_all(&vector(HELLO)).await.expect("hello");
    let mut upc = accept(&up).await;
    let out = v1(src, gw.device_addr);
    assert_eq!(read_n(&mut upc, out.len()).await, out);
    assert_eq!(read_n(&mut upc, 31).await, vector(HELLO));
    // From the balancer (127.0.0.2): without a header, refused; with one, the claimed device.
    let mut bare = connect_from("127.0.0.2", gw.device_addr).await;
    bare.write_all(&vector(HELLO)).await.expect("hello");
    assert_eq!(closed_by_gateway(&mut bare).await, b"");
    let device: SocketAddr = "192.168.7.10:40002".parse().expect("addr");
    let mut via = connect_from("127.0.0.2", gw.device_addr).await;
    via.write_all(&[v1(device, gw.device_addr), vector(HELLO)].concat())
        .await
        .expect("header and hello");
    let mut upc2 = accept(&up).await;
    let out = v1(device, gw.device_addr);
    assert_eq!(read_n(&mut upc2, out.len()).await, out);
    assert_eq!(read_n(&mut upc2, 31).await, vector(HELLO));
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(rejected(&m, "proxy_header"), 1.0);
    gw.shutdown(std::time::Duration::from_millis(200)).await;
}

/// Behind one balancer every connection comes from its address: the per-source pre-hello
/// limit applies to the device each header names, not to the balancer. Two connections name
/// device A and one device B, at a limit of 1 per source: one of A's is refused, B's is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_source_limit_counts_the_device_a_header_names_not_the_balancer() {
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = TestGateway::new(up.local_addr().expect("addr"))
        .set("listen.accept_proxy_protocol", true)
        .set("listen.max_pending", 8)
        .set("listen.max_pending_per_source", 1)
        .set("upstream.legacy.proxy_protocol", "v1")
        .start()
        .await;
    let a: SocketAddr = "192.168.7.20:40000".parse().expect("addr");
    let b: SocketAddr = "192.168.7.21:40000".parse().expect("addr");
    // Headers in, hellos not yet: each connection the gateway admits holds a pre-hello slot.
    let mut conns = Vec::new();
    for d in [a, a, b] {
        let mut c = TcpStream::connect(gw.device_addr).await.expect("connect");
        c.write_all(&v1(d, gw.device_addr)).await.expect("header");
        conns.push(c);
    }
    wait_metric(
        gw.metrics_addr,
        "tcp_comm_connections_rejected_total{reason=\"source_limit\"}",
        1.0,
    )
    .await;
    for c in &mut conns {
        // The refused one may already be closed: its write can fail.
        let _ = c.write_all(&vector(HELLO)).await;
    }
    let mut named = Vec::new();
    for _ in 0..2 {
        let mut u = accept(&up).await;
        let h = read_n(&mut u, v1(a, gw.device_addr).len()).await;
        assert_eq!(read_n(&mut u, 31).await, vector(HELLO));
        named.push(h);
    }
    named.sort();
    let mut want = vec![v1(a, gw.device_addr), v1(b, gw.device_addr)];
    want.sort();
    assert_eq!(named, want, "one connection per device got through");
    let m = scrape(gw.metrics_addr).await;
    assert_eq!(rejected(&m, "source_limit"), 1.0);
    assert_eq!(family_total(&m, "tcp_comm_routing_decisions_total"), 2.0);
    gw.shutdown(std::time::Duration::from_millis(200)).await;
}
