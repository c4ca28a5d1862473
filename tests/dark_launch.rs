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

/// Every legacy device mirrored to `shadow` (plain TCP).
fn mirror_to(legacy: std::net::SocketAddr, shadow: std::net::SocketAddr) -> TestGateway {
    TestGateway::new(legacy)
        .set("dark_launch.mode", "mirror")
        .set("dark_launch.percent", 100)
        .set("upstream.shadow.address", shadow.to_string())
        .set("upstream.shadow.tls", false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_counts_the_shadows_differences_and_a_dead_shadow_changes_nothing() {
    let legacy = start_addon(fast_addon()).await;
    let shadow = start_addon(fast_addon()).await;
    // The shadow add-on answers everything but status reports.
    shadow.set_mode(Mode::NoStatusAck);
    let gw = mirror_to(legacy.addr(), shadow.addr())
        .set("dark_launch.compare_window", "1s")
        .start()
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
        (sample_or_zero(&m, &series("missing", "0x88")) >= 200.0).then_some(m)
    })
    .await;
    println!(
        "comparisons: 0x28 match {}, 0x48 match {}, 0x88 missing {}, 0x88 match {}",
        sample(&m, &series("match", "0x28")),
        sample(&m, &series("match", "0x48")),
        sample(&m, &series("missing", "0x88")),
        sample_or_zero(&m, &series("match", "0x88")),
    );
    assert_eq!(sample(&m, &series("match", "0x28")), 10.0);
    assert_eq!(
        sample(&m, "tcp_comm_connections_active{transport=\"shadow\"}"),
        10.0,
        "one live mirror per connection"
    );
    assert!(sample(&m, &series("match", "0x48")) >= 10.0);
    assert_eq!(sample_or_zero(&m, &series("match", "0x88")), 0.0);
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
        (sample_or_zero(
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
    // The dead shadow is seen: each mirror's loss counted, no shadow connection left, and the
    // legacy replies that could no longer be compared counted as such.
    let m = eventually(
        "the legacy replies after the loss counted uncompared",
        || async {
            let m = http_get(gw.metrics_addr, "/metrics").await.1;
            (sample_or_zero(&m, &series("uncompared", "0x88")) >= 200.0).then_some(m)
        },
    )
    .await;
    assert_eq!(
        sample(&m, "tcp_comm_shadow_upstream_lost_total{reason=\"closed\"}"),
        10.0
    );
    assert_eq!(
        sample(&m, "tcp_comm_connections_active{transport=\"shadow\"}"),
        0.0
    );
    // The shadow figures describe the shadow: it never acknowledged a status report.
    assert_eq!(
        sample_or_zero(
            &m,
            "tcp_comm_replies_total{outcome=\"matched\",request_type=\"0x83\",transport=\"shadow\"}"
        ),
        0.0,
        "the shadow's 0x83s are not the legacy upstream's"
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

/// A shadow upstream that reads nothing until `go` fires, then reads everything, counting.
async fn stalled_shadow(
    listener: tokio::net::TcpListener,
    go: Arc<tokio::sync::Notify>,
) -> Arc<std::sync::atomic::AtomicU64> {
    let got = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let g = got.clone();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        go.notified().await;
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
            if n == 0 {
                break;
            }
            g.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        }
    });
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_the_mirror_drops_is_counted_and_mirroring_resumes_on_a_frame_boundary() {
    use cync_gateway::protocol::{build, DeviceId, MsgId};
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;
    let up = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let shadow_l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let shadow_addr = shadow_l.local_addr().expect("addr");
    let go = Arc::new(tokio::sync::Notify::new());
    let shadow_got = stalled_shadow(shadow_l, go.clone()).await;
    let gw = mirror_to(up.local_addr().expect("addr"), shadow_addr)
        .set("dark_launch.mirror_queue_bytes", 4096)
        .start()
        .await;
    let hello = vector("handshake_0x23");
    let (mut dev, mut upc) = scripted_pair(gw.device_addr, &up, &hello).await;
    // 3,000 device reads of a 1,024-byte 0xab each: far more than the stalled shadow's socket
    // buffers and the 4 KiB mirror queue hold.
    let id = DeviceId([0x38, 0xe8, 0xcf, 0x46]);
    let frame = build::channel_reply(id, MsgId([1, 2, 0]));
    let n = 3000;
    let total = frame.len() * n;
    let legacy_reader = tokio::spawn(async move {
        let got = read_n(&mut upc, total).await.len();
        (upc, got)
    });
    for _ in 0..n {
        dev.write_all(&frame).await.expect("write");
        tokio::task::yield_now().await;
    }
    let (mut upc, legacy_got) = legacy_reader.await.expect("legacy reader");
    assert_eq!(legacy_got, 1024 * n, "legacy got every byte");
    let m = http_get(gw.metrics_addr, "/metrics").await.1;
    let dropped_reads = sample(
        &m,
        "tcp_comm_queue_full_total{action=\"drop\",direction=\"mirror\",transport=\"shadow\"}",
    );
    let dropped_bytes = sample(&m, "tcp_comm_mirror_dropped_bytes_total");
    println!("dropped {dropped_reads} reads, {dropped_bytes} bytes");
    assert!(
        dropped_reads > 1.0,
        "each dropped read is counted, not just the first"
    );
    // The shadow reads again: what was queued and buffered arrives, and the mirror resumes.
    go.notify_one();
    let sent_before = (1024 * n) as u64 + hello.len() as u64;
    eventually("the shadow has every byte that was not dropped", || async {
        (shadow_got.load(Ordering::SeqCst) + dropped_bytes as u64 == sent_before).then_some(())
    })
    .await;
    for _ in 0..10 {
        dev.write_all(&build::heartbeat()).await.expect("write");
        read_n(&mut upc, 5).await;
    }
    eventually("mirroring resumed", || async {
        (shadow_got.load(Ordering::SeqCst) + dropped_bytes as u64 == sent_before + 50).then_some(())
    })
    .await;
    gw.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_upstreams_0x78_notices_are_compared_too() {
    use tokio::io::AsyncWriteExt;
    let shadow = start_addon(fast_addon()).await;
    let up = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gw = mirror_to(up.local_addr().expect("addr"), shadow.addr())
        .set("dark_launch.compare_window", "500ms")
        .start()
        .await;
    let hello = vector("handshake_0x23");
    let (mut dev, mut upc) = scripted_pair(gw.device_addr, &up, &hello).await;
    // The real cloud answers a device 0x7b with a 0x78 notice; the add-on never does.
    let ack = vector("device_ack_0x7b_of_cloud_cmd");
    dev.write_all(&ack).await.expect("0x7b");
    read_n(&mut upc, ack.len()).await;
    let notice = [
        0x78, 0, 0, 0, 7, ack[5], ack[6], ack[7], ack[8], ack[9], ack[10], 0x05,
    ];
    upc.write_all(&notice).await.expect("0x78");
    read_n(&mut dev, notice.len()).await;
    wait_metric(
        gw.metrics_addr,
        "tcp_comm_shadow_comparisons_total{packet_type=\"0x78\",result=\"missing\"}",
        1.0,
    )
    .await;
    gw.shutdown(Duration::from_millis(200)).await;
}
