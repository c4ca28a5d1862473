//! The real binary and its `state_dir`: a restart keeps the rollback latch and the SLO figures,
//! and a SIGKILL at any moment never leaves a state or latch file that cannot be read.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::daemon::Daemon;
use common::gateway::TestGateway;
use common::*;
use cync_gateway::sim::addon::Addon;
use cync_gateway::sim::chaos::{Chaos, Plan};
use cync_gateway::sim::device::{self, DeviceConfig, DeviceStats};
use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const SEED: u64 = 73;

/// A daemon configuration over `state_dir`: device 0 forced onto the new path, no retries,
/// short deadlines, thresholds only (legacy is not compared), one check a second.
fn config(addon: &Addon, state_dir: &Path, extra: &str) -> String {
    let mut force = toml_edit::Array::new();
    force.push(device::identity(SEED, 0).0.to_hex());
    format!(
        "{}{extra}",
        TestGateway::new(addon.addr())
            .set("state_dir", state_dir.display().to_string())
            .path("legacy")
            .set("routing.force_new", force)
            .set("protocol.command_deadline", "500ms")
            .set("reliable.max_attempts", 1)
            .set("rollback.check_interval", "1s")
            .set("rollback.window", "5s")
            .set("rollback.min_events", 10)
            .set("rollback.max_violations", 2)
            .set("rollback.compare_to_legacy", false)
            .set("slo.persist_interval", "1s")
            .set("logging.format", "json")
            .text()
    )
}

async fn scrape(d: &Daemon) -> String {
    http_get(d.metrics, "/metrics").await.1
}

fn device_to(
    target: std::net::SocketAddr,
    index: u32,
    stop: &CancellationToken,
) -> Arc<DeviceStats> {
    let s = Arc::new(DeviceStats::default());
    let mut cfg = DeviceConfig::new(target, SEED, index);
    cfg.redial = (Duration::from_millis(50), Duration::from_millis(100));
    tokio::spawn(device::run(cfg, s.clone(), stop.clone()));
    s
}

const NEW_SUCCESS_6H: &str = "tcp_comm_slo_sli{slo=\"success\",transport=\"new\",window=\"6h\"}";
const NEW_BUDGET: &str = "tcp_comm_slo_error_budget_remaining{slo=\"success\",transport=\"new\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_the_binary_keeps_the_latch_and_the_slo_figures() {
    let addon = start_addon(fast_addon()).await;
    let state = tempfile::tempdir().expect("state dir");
    let cfg_dir = tempfile::tempdir().expect("config dir");
    let path = cfg_dir.path().join("gw.toml");
    std::fs::write(&path, config(&addon, state.path(), "")).expect("config");
    let mut d = Daemon::start(path.clone(), None).await;

    // Half of device 0's f9 replies are lost on their way in: the new path fails its checks.
    let chaos = Chaos::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        d.devices,
        Plan::parse(&format!(
            "seed = {SEED}\n[[rules]]\ndirection = \"dev_to_srv\"\nfault = \"drop\"\ntypes = [\"0x73\"]\nclass = \"f9\"\nprobability = 0.5\n"
        ))
        .expect("plan"),
    )
    .expect("chaos");
    let stop = CancellationToken::new();
    device_to(chaos.addr(), 0, &stop);
    device_to(d.devices, 1, &stop);
    eventually("both devices ready", || async {
        (addon.connections().1 == 2).then_some(())
    })
    .await;
    let pumping = CancellationToken::new();
    {
        let (a, p) = (addon.clone(), pumping.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(SEED);
            let mut cursor = 0;
            while !p.is_cancelled() {
                a.send_command(&mut cursor, &mut rng);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
    eventually("the latch set", || async {
        (sample_or_zero(&scrape(&d).await, "tcp_comm_rollback_active") == 1.0).then_some(())
    })
    .await;
    pumping.cancel();
    stop.cancel();
    // Quiet, then the figures as the daemon exports them.
    eventually("commands finished", || async {
        (addon.report().in_flight == 0).then_some(())
    })
    .await;
    let before = eventually("the SLO gauges settled", || async {
        let a = scrape(&d).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let b = scrape(&d).await;
        let pick = |m: &str| (sample_opt(m, NEW_SUCCESS_6H), sample_opt(m, NEW_BUDGET));
        (pick(&a) == pick(&b) && pick(&a).0.is_some()).then_some(pick(&b))
    })
    .await;
    let (sli, budget) = (before.0.expect("sli"), before.1.expect("budget"));
    println!("before the restart: new-path success over 6 h {sli}, budget left {budget}");
    assert!(sli < 0.9, "{sli}");
    assert_eq!(budget, 0.0);

    d.signal(Signal::SIGTERM);
    let status = tokio::time::timeout(DEADLINE, d.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success(), "{status:?}");

    // The same file, a new process.
    let d = Daemon::start(path, None).await;
    let m = scrape(&d).await;
    assert_eq!(sample(&m, "tcp_comm_rollback_active"), 1.0);
    assert_eq!(sample(&m, "tcp_comm_canary_effective_percentage"), 0.0);
    assert!(d.logged("starting with the rollback latch set"));
    let m = eventually("the restored figures exported", || async {
        let m = scrape(&d).await;
        sample_opt(&m, NEW_SUCCESS_6H).is_some().then_some(m)
    })
    .await;
    assert_eq!(sample(&m, NEW_SUCCESS_6H), sli, "the same success SLI");
    assert_eq!(sample(&m, NEW_BUDGET), budget, "the same budget");
    // Device 0, forced onto the new path, now routes to legacy.
    let stop = CancellationToken::new();
    device_to(d.devices, 0, &stop);
    wait_metric(
        d.metrics,
        "tcp_comm_routing_decisions_total{reason=\"rollback\",transport=\"legacy\"}",
        1.0,
    )
    .await;
    let m = scrape(&d).await;
    assert_eq!(
        sample_or_zero(&m, "tcp_comm_connections_active{transport=\"new\"}"),
        0.0
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_at_any_moment_leaves_the_state_and_the_latch_readable() {
    let addon = start_addon(fast_addon()).await;
    let state = tempfile::tempdir().expect("state dir");
    // A latch set by an earlier run, written as an operator would find it.
    std::fs::write(
        state.path().join("latch.json"),
        "{\"version\":1,\"latched\":true,\"reason\":\"earlier run\",\"actor\":\"controller\",\"at\":\"2026-12-01T00:00:00.000Z\"}\n",
    )
    .expect("latch");
    let cfg_dir = tempfile::tempdir().expect("config dir");
    let path = cfg_dir.path().join("gw.toml");
    // The state is rewritten every 10 ms, so kills land during writes.
    std::fs::write(
        &path,
        config(&addon, state.path(), "")
            .replace("persist_interval = \"1s\"", "persist_interval = \"10ms\""),
    )
    .expect("config");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(SEED);
    let mut kills = Vec::new();
    for _ in 0..20 {
        let mut d = Daemon::start(path.clone(), None).await;
        let m = scrape(&d).await;
        assert_eq!(sample(&m, "tcp_comm_rollback_active"), 1.0);
        assert_eq!(
            family_total(&m, "tcp_comm_state_errors_total"),
            0.0,
            "the last run's files read cleanly"
        );
        let after = Duration::from_millis(rng.gen_range(0..150));
        tokio::time::sleep(after).await;
        d.signal(Signal::SIGKILL);
        let status = tokio::time::timeout(DEADLINE, d.child.wait())
            .await
            .expect("exits")
            .expect("status");
        assert!(!status.success());
        kills.push(after);
        // Killed before its first write, a run leaves the last run's file (or none yet).
        if let Ok(text) = std::fs::read_to_string(state.path().join("slo.json")) {
            let slo: serde_json::Value =
                serde_json::from_str(&text).expect("slo state is whole JSON");
            assert_eq!(slo["version"], 1);
        }
        let latch: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(state.path().join("latch.json")).expect("latch"),
        )
        .expect("latch is whole JSON");
        assert_eq!(latch["latched"], true);
    }
    println!("killed after {kills:?}");
    assert!(
        state.path().join("slo.json").exists(),
        "some run wrote its state"
    );
    let left: Vec<String> = std::fs::read_dir(state.path())
        .expect("ls")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("corrupt"))
        .collect();
    assert!(left.is_empty(), "nothing was ever set aside: {left:?}");
}
