//! The automatic rollback, end to end over real sockets: a chaos proxy in front of the new-path
//! devices only loses the f9 replies of 30 % of their commands; the controller, judging the new
//! path against legacy, sets the latch, every new-path device is re-homed at the configured pace,
//! commands then succeed through legacy, the webhook is received and the audit log holds the
//! entry. The same fault on both paths rolls nothing back.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::gateway::TestGateway;
use common::*;
use cync_gateway::gateway::Gateway;
use cync_gateway::sim::addon::Addon;
use cync_gateway::sim::chaos::{Chaos, Plan};
use cync_gateway::sim::device::{self, DeviceConfig, DeviceStats};
use rand::SeedableRng;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SEED: u64 = 71;
const CHECK: Duration = Duration::from_secs(1);

/// Drops the f9 reply of `share` of the commands through it (device → gateway).
fn f9_loss(share: f64) -> Plan {
    Plan::parse(&format!(
        "seed = {SEED}\n[[rules]]\ndirection = \"dev_to_srv\"\nfault = \"drop\"\ntypes = [\"0x73\"]\nclass = \"f9\"\nprobability = {share}\n"
    ))
    .expect("plan")
}

async fn chaos_to(gw: &Gateway, plan: Plan) -> Chaos {
    Chaos::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        gw.device_addr,
        plan,
    )
    .expect("chaos")
}

/// The gateway for these tests: canary 0 with devices `0..new` forced onto the new path, no
/// retries (so a lost f9 is a failed command), short deadlines and one check a second.
fn gateway(addon: &Addon, new: u32) -> TestGateway {
    let ids: Vec<String> = (0..new)
        .map(|i| device::identity(SEED, i).0.to_hex())
        .collect();
    let mut force = toml_edit::Array::new();
    for id in ids {
        force.push(id);
    }
    TestGateway::new(addon.addr())
        .path("legacy")
        .set("routing.force_new", force)
        .set("routing.rehome_rate", 2.0)
        .set("protocol.command_deadline", "400ms")
        .set("reliable.max_attempts", 1)
        .set("rollback.check_interval", "1s")
        .set("rollback.window", "5s")
        .set("rollback.min_events", 20)
        .set("rollback.max_violations", 3)
}

/// Devices `range` dialling `target`.
fn devices(
    target: SocketAddr,
    range: std::ops::Range<u32>,
    stop: &CancellationToken,
) -> Vec<Arc<DeviceStats>> {
    range
        .map(|i| {
            let s = Arc::new(DeviceStats::default());
            let mut cfg = DeviceConfig::new(target, SEED, i);
            cfg.redial = (Duration::from_millis(50), Duration::from_millis(100));
            tokio::spawn(device::run(cfg, s.clone(), stop.clone()));
            s
        })
        .collect()
}

async fn metrics_of(gw: &Gateway) -> String {
    http_get(gw.metrics_addr, "/metrics").await.1
}

fn state_dir(gw: &Gateway) -> PathBuf {
    gw.live.config().state_dir.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_path_losing_f9_replies_is_rolled_back_and_its_devices_rehomed_to_legacy() {
    let addon = start_addon(fast_addon()).await;
    let (hook, mut received) = webhook_server().await;
    let token_dir = tempfile::tempdir().expect("tempdir");
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").expect("token");
    let gw = gateway(&addon, 3)
        .set(
            "rollback.webhook_url",
            format!("http://{hook}/hooks/rollback"),
        )
        .set(
            "rollback.webhook_token_file",
            token_file.display().to_string(),
        )
        .start()
        .await;
    let chaos = chaos_to(&gw, f9_loss(0.3)).await;
    let stop = CancellationToken::new();
    devices(chaos.addr(), 0..3, &stop);
    devices(gw.device_addr, 3..6, &stop);
    eventually("six devices ready, three on each path", || async {
        let m = metrics_of(&gw).await;
        (addon.connections().1 == 6
            && sample_or_zero(&m, "tcp_comm_connections_active{transport=\"new\"}") == 3.0
            && sample_or_zero(&m, "tcp_comm_connections_active{transport=\"legacy\"}") == 3.0)
            .then_some(())
    })
    .await;

    // The fault starts with the first command.
    let fault = Instant::now();
    let pumping = CancellationToken::new();
    pump(
        addon.clone(),
        Duration::from_millis(10),
        SEED,
        pumping.clone(),
    );
    let m = eventually("the latch set by the controller", || async {
        let m = metrics_of(&gw).await;
        (sample_or_zero(&m, "tcp_comm_rollback_active") == 1.0).then_some(m)
    })
    .await;
    let took = fault.elapsed();
    chaos.heal_new_connections();
    println!("fault to latch: {took:?}");
    assert!(
        took <= CHECK * 3 + Duration::from_secs(1),
        "latched {took:?} after the fault started"
    );
    assert_eq!(
        sample(&m, "tcp_comm_rollbacks_total{reason=\"success\"}"),
        1.0
    );
    assert!(sample(&m, "tcp_comm_rollback_checks_total{result=\"fail\"}") >= 3.0);
    // The lost replies were latency misses on the faulty path only, counted while waiting.
    assert!(sample(&m, "tcp_comm_commands_late_total{transport=\"new\"}") >= 1.0);
    assert_eq!(
        sample(&m, "tcp_comm_commands_late_total{transport=\"legacy\"}"),
        0.0
    );
    assert_eq!(sample(&m, "tcp_comm_canary_effective_percentage"), 0.0);

    // Re-homed one by one, no faster than rehome_rate (2/s: 0.5 s apart at the least).
    let rehomes = "tcp_comm_rehomes_total{from=\"new\",to=\"legacy\"}";
    let mut seen = Vec::new();
    let start = Instant::now();
    while seen.len() < 3 {
        let n = sample_or_zero(&metrics_of(&gw).await, rehomes) as usize;
        while seen.len() < n {
            seen.push(start.elapsed());
        }
        assert!(start.elapsed() < DEADLINE, "re-homed so far: {seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("re-homes at {seen:?} after the latch was seen");
    // Polling adds at most its own period (10 ms plus a scrape) to each sighting.
    assert!(
        seen[2] - seen[0] >= Duration::from_millis(1000 - 100),
        "three re-homes faster than 2/s: {seen:?}"
    );

    // Every device redials onto legacy; commands then succeed.
    eventually("all six back, all on legacy", || async {
        let m = metrics_of(&gw).await;
        (addon.connections().1 == 6
            && sample_or_zero(&m, "tcp_comm_connections_active{transport=\"new\"}") == 0.0
            && sample_or_zero(&m, "tcp_comm_connections_active{transport=\"legacy\"}") == 6.0)
            .then_some(())
    })
    .await;
    pumping.cancel();
    eventually("the pump's commands finished", || async {
        (addon.report().in_flight == 0).then_some(())
    })
    .await;
    addon.reset_report();
    let before = sample_or_zero(
        &metrics_of(&gw).await,
        "tcp_comm_packet_sent_total{outcome=\"success\",transport=\"legacy\"}",
    );
    let new_before = sample_or_zero(
        &metrics_of(&gw).await,
        "tcp_comm_packet_sent_total{outcome=\"success\",transport=\"new\"}",
    );
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
    let mut cursor = 0;
    for _ in 0..60 {
        assert!(addon.send_command(&mut cursor, &mut rng));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eventually("commands finished", || async {
        (addon.report().in_flight == 0).then_some(())
    })
    .await;
    let r = addon.report();
    assert_eq!((r.done, r.sent), (60, 60), "{r:?}");
    let m = eventually("the legacy path counted them", || async {
        let m = metrics_of(&gw).await;
        (sample_or_zero(
            &m,
            "tcp_comm_packet_sent_total{outcome=\"success\",transport=\"legacy\"}",
        ) >= before + 60.0)
            .then_some(m)
    })
    .await;
    assert_eq!(
        sample_or_zero(
            &m,
            "tcp_comm_packet_sent_total{outcome=\"success\",transport=\"new\"}"
        ),
        new_before,
        "nothing on the new path any more"
    );

    // The webhook: one POST, with the token and the snapshot.
    let (auth, body) = tokio::time::timeout(DEADLINE, received.recv())
        .await
        .expect("webhook in time")
        .expect("webhook");
    assert_eq!(auth, "Bearer s3cret");
    assert_eq!(body["event"], "rollback");
    assert_eq!(body["cause"], "success");
    assert_eq!(body["actor"], "controller");
    assert!(body["reason"]
        .as_str()
        .is_some_and(|r| r.contains("3 failed rollback checks in a row")));
    assert!(body["slo"]["new"]["commands"]
        .as_u64()
        .is_some_and(|n| n >= 20));
    assert!(body["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    let m = metrics_of(&gw).await;
    assert_eq!(
        sample(
            &m,
            "tcp_comm_webhook_deliveries_total{result=\"delivered\"}"
        ),
        1.0
    );

    // The audit log and the latch file.
    let dir = state_dir(&gw);
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).expect("audit log");
    let entries: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect();
    let e = entries.last().expect("an entry");
    assert_eq!(e["action"], "rollback");
    assert_eq!(e["actor"], "controller");
    assert_eq!(e["changes"][0]["key"], "rollback.latched");
    assert_eq!(e["changes"][0]["old"], false);
    assert_eq!(e["changes"][0]["new"], true);
    assert!(e["reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(e["slo"]["new"]["slos"]["success"]["sli"]
        .as_f64()
        .is_some_and(|s| s < 0.995));
    let latch: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("latch.json")).expect("latch"))
            .expect("latch JSON");
    assert_eq!(latch["latched"], true);
    assert_eq!(latch["actor"], "controller");

    stop.cancel();
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_fault_on_both_paths_rolls_nothing_back() {
    let addon = start_addon(fast_addon()).await;
    let gw = gateway(&addon, 3).start().await;
    // Both cohorts behind the same lossy network.
    let chaos = chaos_to(&gw, f9_loss(0.3)).await;
    let stop = CancellationToken::new();
    devices(chaos.addr(), 0..6, &stop);
    eventually("six devices ready, three on each path", || async {
        let m = metrics_of(&gw).await;
        (addon.connections().1 == 6
            && sample_or_zero(&m, "tcp_comm_connections_active{transport=\"new\"}") == 3.0)
            .then_some(())
    })
    .await;
    let pumping = CancellationToken::new();
    pump(
        addon.clone(),
        Duration::from_millis(10),
        SEED,
        pumping.clone(),
    );
    let checks = |m: &str| {
        ["pass", "fail", "inconclusive"]
            .iter()
            .map(|r| {
                sample_or_zero(
                    m,
                    &format!("tcp_comm_rollback_checks_total{{result=\"{r}\"}}"),
                )
            })
            .sum::<f64>()
    };
    let m = eventually("ten conclusive checks", || async {
        let m = metrics_of(&gw).await;
        let conclusive = sample_or_zero(&m, "tcp_comm_rollback_checks_total{result=\"pass\"}")
            + sample_or_zero(&m, "tcp_comm_rollback_checks_total{result=\"fail\"}");
        (conclusive >= 10.0).then_some(m)
    })
    .await;
    pumping.cancel();
    println!(
        "checks: {} (pass {}, fail {}); new success {:?}, legacy success {:?}",
        checks(&m),
        sample_or_zero(&m, "tcp_comm_rollback_checks_total{result=\"pass\"}"),
        sample_or_zero(&m, "tcp_comm_rollback_checks_total{result=\"fail\"}"),
        sample_opt(
            &m,
            "tcp_comm_slo_sli{slo=\"success\",transport=\"new\",window=\"5m\"}"
        ),
        sample_opt(
            &m,
            "tcp_comm_slo_sli{slo=\"success\",transport=\"legacy\",window=\"5m\"}"
        ),
    );
    // Both paths really were below the floor: the checks had a breach to dismiss.
    let new_sli = sample(
        &m,
        "tcp_comm_slo_sli{slo=\"success\",transport=\"new\",window=\"5m\"}",
    );
    assert!(new_sli < 0.9, "new path success {new_sli}");
    assert_eq!(
        sample_or_zero(&m, "tcp_comm_rollbacks_total{reason=\"success\"}"),
        0.0
    );
    assert_eq!(sample(&m, "tcp_comm_rollback_active"), 0.0);
    assert!(!gw.live.latched());
    assert!(
        !state_dir(&gw).join("latch.json").exists(),
        "no latch was ever written"
    );
    stop.cancel();
    gw.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fewer_commands_than_min_events_roll_nothing_back_however_bad() {
    let addon = start_addon(fast_addon()).await;
    let gw = gateway(&addon, 1)
        .set("rollback.min_events", 1000)
        .start()
        .await;
    // Every f9 of the new-path device lost.
    let chaos = chaos_to(&gw, f9_loss(1.0)).await;
    let stop = CancellationToken::new();
    devices(chaos.addr(), 0..1, &stop);
    devices(gw.device_addr, 1..2, &stop);
    eventually("both devices ready", || async {
        (addon.connections().1 == 2).then_some(())
    })
    .await;
    let pumping = CancellationToken::new();
    pump(
        addon.clone(),
        Duration::from_millis(20),
        SEED,
        pumping.clone(),
    );
    let m = eventually("five checks", || async {
        let m = metrics_of(&gw).await;
        (sample_or_zero(
            &m,
            "tcp_comm_rollback_checks_total{result=\"inconclusive\"}",
        ) >= 5.0)
            .then_some(m)
    })
    .await;
    pumping.cancel();
    let failed = sample_or_zero(
        &m,
        "tcp_comm_packet_sent_total{outcome=\"timeout\",transport=\"new\"}",
    );
    assert!(failed >= 20.0, "the new path did fail: {failed} timeouts");
    assert_eq!(
        sample_or_zero(&m, "tcp_comm_rollback_checks_total{result=\"fail\"}"),
        0.0
    );
    assert_eq!(sample(&m, "tcp_comm_rollback_active"), 0.0);
    let last = gw
        .last_check
        .lock()
        .expect("lock")
        .clone()
        .expect("a check");
    assert!(
        last.verdict
            .to_string()
            .contains("too few new-path commands"),
        "{}",
        last.verdict
    );
    stop.cancel();
    gw.shutdown(Duration::from_secs(1)).await;
}
