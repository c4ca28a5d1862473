//! `source_address = "transparent"`: the upstream sees each device's own address, also one
//! the host does not have (a LAN device's), which only works with `IP_TRANSPARENT` and
//! routing that brings the replies back. The test makes that set-up itself in a fresh
//! network namespace (`unshare -n`, then the documented `ip rule` / `ip route ... table 100`
//! for the devices' range) and re-runs itself inside; without the privileges for one it says
//! why and skips. Outside, the binary without `CAP_NET_ADMIN` or `CAP_NET_RAW` refuses to
//! start, naming them.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use common::replay::{replay_capture_wire, Wire};
use common::*;

/// Set in the namespace child.
const CHILD: &str = "CYNC_GATEWAY_TEST_IN_NETNS";
/// The devices' LAN, routed to this host inside the namespace (as docs/operations.md says).
const LAN: &str = "10.77.0.0/16";

fn run(cmd: &[&str]) {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why this machine cannot make the namespace, if it cannot.
fn cannot_make_a_namespace() -> Option<String> {
    match Command::new("unshare").args(["-n", "true"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`unshare -n` fails here (no CAP_SYS_ADMIN?): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no `unshare` (util-linux): {e}")),
    }
}

#[test]
fn transparent_sources_show_the_upstream_each_devices_own_address() {
    if std::env::var_os(CHILD).is_some() {
        return inside();
    }
    if let Some(why) = cannot_make_a_namespace() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("unshare")
        .arg("-n")
        .arg(&exe)
        .args([
            "--exact",
            "transparent_sources_show_the_upstream_each_devices_own_address",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .expect("run the test in a namespace");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "in the namespace: {text}");
    assert!(
        text.contains("1 passed"),
        "the test ran in the namespace: {text}"
    );
}

/// In the namespace: loopback up, replies to the devices' range delivered locally.
fn inside() {
    run(&["ip", "link", "set", "lo", "up"]);
    run(&[
        "ip", "route", "add", "local", LAN, "dev", "lo", "table", "100",
    ]);
    run(&["ip", "rule", "add", "to", LAN, "lookup", "100"]);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let transparent =
                |g: TestGateway| g.set("upstream.legacy.source_address", "transparent");
            for path in ["legacy", "new"] {
                // A device with its own LAN address, straight in.
                let own: IpAddr = "10.77.0.5".parse().expect("ip");
                let wire = Wire {
                    device_from: Some(own),
                    upstream_sees: Some(own),
                    ..Wire::default()
                };
                replay_capture_wire(false, false, path, transparent, None, wire).await;
                println!("{path}: a device from {own} reaches the upstream from {own}");
                // Behind a balancer on this host: the address its PROXY header names.
                let named: SocketAddr = "10.77.0.9:40001".parse().expect("addr");
                let wire = Wire {
                    device_prefix: format!("PROXY TCP4 {} 10.77.0.1 40001 23779\r\n", named.ip())
                        .into_bytes(),
                    upstream_sees: Some(named.ip()),
                    ..Wire::default()
                };
                replay_capture_wire(
                    true,
                    true,
                    path,
                    |g| transparent(g).set("listen.accept_proxy_protocol", true),
                    None,
                    wire,
                )
                .await;
                println!(
                    "{path}: a device named {} by its balancer reaches the upstream from it",
                    named.ip()
                );
            }
        });
}

/// Without `CAP_NET_ADMIN` and `CAP_NET_RAW` (dropped from the bounding set, so not even
/// root has them; either allows `IP_TRANSPARENT`) the daemon does not start, and says what it
/// needs.
#[tokio::test]
async fn without_cap_net_admin_the_daemon_refuses_to_start_and_names_the_capability() {
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no setpriv (util-linux)");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.toml");
    let text = TestGateway::new("127.0.0.1:9".parse().expect("addr"))
        .set("upstream.legacy.source_address", "transparent")
        .text();
    std::fs::write(&path, text).expect("write");
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new("setpriv")
            .args(["--bounding-set=-net_admin,-net_raw", "--"])
            .arg(common::daemon::BIN)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the daemon exits")
    .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(
            "upstream.legacy.source_address = \"transparent\" needs CAP_NET_ADMIN or CAP_NET_RAW"
        ),
        "{err}"
    );
}
