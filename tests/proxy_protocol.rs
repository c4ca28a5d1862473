//! PROXY protocol toward the upstream (`proxy_protocol = "v1" | "v2"`): every upstream
//! connection starts with a header naming the device's address and the address it connected
//! to — on both paths, and on the new path's redials after an upstream loss too — then the
//! device's bytes unchanged. Expected headers are laid out here from the specification.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const HELLO: &str = "handshake_0x23";

fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 loopback expected");
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

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
