//! `cync-gateway trace` against the running binary: a command the fake add-on sends shows up
//! as one event with its device, path, seq, outcome and timings, within a second; a command
//! whose reply was lost once shows its two attempts; `--failures` and bad filters.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::daemon::{Daemon, BIN};
use common::gateway::TestGateway;
use common::*;
use cync_gateway::sim::chaos::{Chaos, Plan};
use cync_gateway::sim::device::{self, DeviceConfig, DeviceStats};
use rand::SeedableRng;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SEED: u64 = 101;

/// A `trace` follower: its JSON lines as they come.
struct Follower {
    _child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Follower {
    fn start(cfg: &str, extra: &[&str]) -> Follower {
        let mut child = Command::new(BIN)
            .args(["trace", "--json", "--config", cfg])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("trace");
        let out = child.stdout.take().expect("stdout");
        Follower {
            _child: child,
            lines: BufReader::new(out).lines(),
        }
    }

    /// The next event that `pick` accepts, within `limit`.
    async fn next(&mut self, limit: Duration, pick: impl Fn(&Value) -> bool) -> Value {
        tokio::time::timeout(limit, async {
            loop {
                let line = self
                    .lines
                    .next_line()
                    .await
                    .expect("read trace")
                    .expect("the trace ended");
                let v: Value = serde_json::from_str(&line).expect("a JSON line");
                if pick(&v) {
                    return v;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no matching trace event within {limit:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_shows_each_command_of_the_device_with_its_outcome_and_a_retried_ones_attempts() {
    let addon = start_addon(fast_addon()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        TestGateway::new(addon.addr())
            .path("new")
            .set("logging.format", "json")
            .text(),
    )
    .expect("config");
    let d = Daemon::start(path.clone(), None).await;
    let cfg = path.to_str().expect("utf-8 path");
    let id = device::identity(SEED, 0).0.to_hex();

    // The follower first, then the device: through a chaos proxy that loses its first f9.
    let mut all = Follower::start(cfg, &["--device", &id]);
    let mut failures = Follower::start(cfg, &["--failures"]);
    let chaos = Chaos::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        d.devices,
        Plan::parse(
            "seed = 1\n[[rules]]\ndirection = \"dev_to_srv\"\nfault = \"drop\"\ntypes = [\"0x73\"]\nclass = \"f9\"\nnth = 1\n",
        )
        .expect("plan"),
    )
    .expect("chaos");
    let stop = CancellationToken::new();
    let mut dc = DeviceConfig::new(chaos.addr(), SEED, 0);
    dc.redial = (Duration::from_millis(50), Duration::from_millis(200));
    tokio::spawn(device::run(
        dc,
        Arc::new(DeviceStats::default()),
        stop.clone(),
    ));

    // Its first command (the add-on's mesh query) lost its reply once: two attempts, and
    // still a success.
    let retried = all
        .next(Duration::from_secs(20), |v| {
            v["attempts"].as_u64() >= Some(2)
        })
        .await;
    println!("retried: {retried}");
    assert_eq!(retried["outcome"], "success");
    assert_eq!(retried["device"], id.as_str());
    assert_eq!(retried["path"], "new");
    // Its 0x7b came before the reply (the copy waited for evidence, then the blind wait).
    assert!(retried["ack_ms"].as_f64().is_some(), "{retried}");
    assert!(
        retried["reply_ms"].as_f64() > retried["ack_ms"].as_f64(),
        "{retried}"
    );

    // A command sent by the add-on's harness appears within a second, with its timings.
    eventually("the device is ready at the add-on", || async {
        (addon.connections().1 >= 1).then_some(())
    })
    .await;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(SEED);
    let mut cursor = 0;
    let sent = Instant::now();
    assert!(addon.send_command(&mut cursor, &mut rng));
    // The harness numbers its commands from seq 1 (the add-on's own mesh query and mesh ack
    // use seq 0).
    let ev = all
        .next(Duration::from_secs(1), |v| v["seq"].as_u64() >= Some(1))
        .await;
    println!("{:?} after the send: {ev}", sent.elapsed());
    assert_eq!(ev["device"], id.as_str());
    assert_eq!(ev["path"], "new");
    assert_eq!(ev["outcome"], "success");
    assert_eq!(ev["attempts"], 1);
    assert!(ev["reply_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{ev}");
    assert!(ev["msg_id"].is_string() && ev["seq"].is_u64(), "{ev}");
    assert!(
        ev["id"].as_u64() > retried["id"].as_u64(),
        "ids in order: {ev} after {retried}"
    );

    // The failures follower has seen no success.
    let stop_pump = CancellationToken::new();
    pump(
        addon.clone(),
        Duration::from_millis(100),
        SEED,
        stop_pump.clone(),
    );
    let quiet = tokio::time::timeout(Duration::from_millis(1500), failures.lines.next_line()).await;
    assert!(
        quiet.is_err(),
        "a success reached the failures follower: {quiet:?}"
    );
    stop_pump.cancel();

    // A bad filter is refused with what to send.
    let o = Command::new(BIN)
        .args(["trace", "--config", cfg, "--device", "zz"])
        .output()
        .await
        .expect("trace");
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("400"), "{o:?}");

    // The human form: one readable line per command.
    let text = Command::new(BIN)
        .args(["trace", "--config", cfg, "--limit", "1"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("trace");
    let stop_pump = CancellationToken::new();
    pump(
        addon.clone(),
        Duration::from_millis(100),
        SEED,
        stop_pump.clone(),
    );
    let out = tokio::time::timeout(Duration::from_secs(10), text.wait_with_output())
        .await
        .expect("one line, then exit")
        .expect("output");
    stop_pump.cancel();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{line}");
    assert!(
        line.starts_with('#') && line.contains(" new ") && line.contains(&id),
        "{line}"
    );
    assert!(
        line.contains("success") && line.contains("0x7b") && line.contains("f9"),
        "{line}"
    );
    stop.cancel();
    drop(d);
}
