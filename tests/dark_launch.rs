//! Dark launch, mirror mode, end to end: simulated devices on the legacy path, a legacy add-on,
//! and a shadow add-on that receives a copy of every device read and answers differently.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use cync_gateway::sim::addon::{Addon, HarnessReport, Mode};
use cync_gateway::sim::device::{self, DeviceConfig, DeviceStats};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

async fn commands(a: &Arc<Addon>, n: u64, seed: u64) -> HarnessReport {
    a.reset_report();
    let mut rng = rand::SeedableRng::seed_from_u64(seed);
    let mut cursor = 0;
    for _ in 0..n {
        assert!(a.send_command(&mut cursor, &mut rng));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eventually("commands finished", || async {
        (a.report().in_flight == 0).then_some(())
    })
    .await;
    a.report()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_counts_the_shadows_differences_and_a_dead_shadow_changes_nothing() {
    let legacy = start_addon(fast_addon()).await;
    let shadow = start_addon(fast_addon()).await;
    // The shadow add-on answers everything but status reports.
    shadow.set_mode(Mode::NoStatusAck);
    let gw = start_gateway(&config_text(
        legacy.addr(),
        &format!(
            "[device_tls]\nmode = \"plain\"\n\
             [dark_launch]\nmode = \"mirror\"\npercent = 100\ncompare_window = \"1s\"\n\
             [upstream.shadow]\naddress = \"{}\"\ntls = false\n",
            shadow.addr()
        ),
    ))
    .await;
    let stop = CancellationToken::new();
    let stats: Vec<Arc<DeviceStats>> = (0..10)
        .map(|i| {
            let s = Arc::new(DeviceStats::default());
            let mut cfg = DeviceConfig::new(gw.device_addr, 61, i);
            cfg.status_delay = (Duration::from_millis(20), Duration::from_millis(100));
            tokio::spawn(device::run(cfg, s.clone(), stop.clone()));
            s
        })
        .collect();
    eventually("devices ready at both add-ons", || async {
        (legacy.connections().1 == 10 && shadow.connections().0 == 10).then_some(())
    })
    .await;
    let before = commands(&legacy, 200, 1).await;
    assert_eq!(before.done, before.sent, "{before:?}");

    let series = |result: &str, t: &str| {
        format!("tcp_comm_shadow_comparisons_total{{packet_type=\"{t}\",result=\"{result}\"}}")
    };
    let m = eventually("status acks reported missing from the shadow", || async {
        let m = http_get(gw.metrics_addr, "/metrics").await.1;
        (sample(&m, &series("missing", "0x88")) >= 200.0).then_some(m)
    })
    .await;
    println!(
        "comparisons: 0x28 match {}, 0x48 match {}, 0x88 missing {}, 0x88 match {}",
        sample(&m, &series("match", "0x28")),
        sample(&m, &series("match", "0x48")),
        sample(&m, &series("missing", "0x88")),
        sample(&m, &series("match", "0x88")),
    );
    assert_eq!(sample(&m, &series("match", "0x28")), 10.0);
    assert!(sample(&m, &series("match", "0x48")) >= 10.0);
    assert_eq!(sample(&m, &series("match", "0x88")), 0.0);
    // What the shadow add-on sent (its own 0xa3 and mesh query) never reached a device.
    for s in &stats {
        assert_eq!(DeviceStats::get(&s.channel_opens), 1);
        assert_eq!(DeviceStats::get(&s.mesh_queries), 1);
        assert_eq!(DeviceStats::get(&s.disconnects), 0);
    }

    // Kill the shadow: legacy traffic carries on, as fast as before.
    shadow.shutdown();
    let t0 = Instant::now();
    eventually("mirror queues empty", || async {
        let m = http_get(gw.metrics_addr, "/metrics").await.1;
        (sample(
            &m,
            "tcp_comm_queue_bytes{direction=\"mirror\",transport=\"shadow\"}",
        ) == 0.0)
            .then_some(())
    })
    .await;
    let after = commands(&legacy, 200, 2).await;
    println!(
        "legacy before: p50 {} / p99 {} ms; after the shadow died: p50 {} / p99 {} ms ({:?} later)",
        before.p50_ms,
        before.p99_ms,
        after.p50_ms,
        after.p99_ms,
        t0.elapsed()
    );
    assert_eq!(after.done, after.sent, "{after:?}");
    assert!(
        after.p99_ms <= before.p99_ms.max(50.0) * 2.0 + 50.0,
        "legacy slowed: {before:?} -> {after:?}"
    );
    for s in &stats {
        assert_eq!(
            DeviceStats::get(&s.disconnects),
            0,
            "legacy connections untouched"
        );
    }
    stop.cancel();
    gw.shutdown(Duration::from_secs(1)).await;
}
