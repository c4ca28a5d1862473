//! The byte-exact capture replay (`tests/common/replay.rs`: the whole real capture on one
//! connection, checked byte for byte both ways and counted frame by frame) in every upstream
//! mode, on both paths: from a source pool address, to a separate `[upstream.new]`, and
//! behind a balancer's PROXY header with a PROXY header of the other version toward the
//! upstream, plain and with TLS on both legs. (Transparent sources need a network namespace:
//! `tests/transparent.rs`.)

mod common;

use std::net::SocketAddr;

use common::replay::{replay_capture_wire, Wire};
use common::*;

/// A device on the LAN as its balancer names it, and the balancer's listening address.
const DEVICE: &str = "192.168.7.9:40001";
const FRONT: &str = "192.168.7.1:23779";

use common::{proxy_v1 as v1, proxy_v2 as v2};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_from_a_source_pool_address_is_byte_exact_on_both_paths() {
    for path in ["legacy", "new"] {
        let wire = Wire {
            upstream_sees: Some("127.3.0.9".parse().expect("ip")),
            ..Wire::default()
        };
        replay_capture_wire(
            false,
            false,
            path,
            |g| {
                let mut p = toml_edit::Array::new();
                p.push("127.3.0.9");
                g.set("upstream.legacy.source_address", "pool")
                    .set("upstream.legacy.source_pool", p)
            },
            None,
            wire,
        )
        .await;
    }
}

/// `[upstream.new]` is where the replay's upstream listens; the path's other upstream
/// refuses connections, so a device dialled to the wrong one fails the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_to_a_separate_new_upstream_is_byte_exact_tls_both_legs() {
    for path in ["legacy", "new"] {
        let (_held, refused) = refused_addr();
        replay_capture_wire(
            true,
            true,
            path,
            |g| {
                let here = g.config().upstream_legacy.address.clone();
                if path == "new" {
                    g.set("upstream.new.address", here)
                        .set("upstream.new.tls", true)
                        .set("upstream.legacy.address", refused.to_string())
                } else {
                    g.set("upstream.new.address", refused.to_string())
                        .set("upstream.new.tls", true)
                }
            },
            None,
            Wire::default(),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_behind_a_balancer_with_proxy_headers_both_ways_is_byte_exact() {
    let (device, front) = (addr(DEVICE), addr(FRONT));
    // (header in, header out, TLS on both legs)
    for (incoming, outgoing, tls) in [("v1", "v2", false), ("v2", "v1", true)] {
        for path in ["legacy", "new"] {
            let h = |v: &str| {
                if v == "v1" {
                    v1(device, front)
                } else {
                    v2(device, front)
                }
            };
            let wire = Wire {
                device_prefix: h(incoming),
                upstream_prefix: h(outgoing),
                ..Wire::default()
            };
            replay_capture_wire(
                tls,
                tls,
                path,
                |g| {
                    g.set("listen.accept_proxy_protocol", true)
                        .set("upstream.legacy.proxy_protocol", outgoing)
                },
                None,
                wire,
            )
            .await;
            println!("{incoming} in, {outgoing} out, tls {tls}, {path}: byte-exact");
        }
    }
}
