//! `cync-gateway demo`: the whole product in one process on loopback with ephemeral ports —
//! a fake add-on (TLS, like the real one), the gateway (TLS toward devices with a generated
//! certificate), a fleet of simulated devices and the add-on's command harness — with a live
//! one-line summary every second and a final summary.
//!
//! Invariants:
//! - Loopback only, nothing written to disk, no fixed ports: it runs anywhere `cargo` does.
//! - It stops by itself after `duration` and exits 0 when every part came up.

use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::router;
use crate::gateway::{Gateway, GatewayError};
use crate::sim::addon::{Addon, AddonConfig, HarnessReport};
use crate::sim::load::{self, LoadConfig};
use crate::telemetry::labels::Label;
use crate::telemetry::metrics::Metrics;

#[derive(Debug, Error)]
pub enum DemoError {
    #[error("starting the fake add-on: {0}")]
    Addon(std::io::Error),
    #[error("making the demo's state directory: {0}")]
    StateDir(std::io::Error),
    #[error("demo configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub devices: u32,
    pub rate: f64,
    pub duration: Duration,
    pub seed: u64,
    /// Share of devices on the new path (`routing.canary_percent`).
    pub canary_percent: f64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            devices: 50,
            rate: 20.0,
            duration: Duration::from_secs(30),
            seed: 7,
            canary_percent: 50.0,
        }
    }
}

/// The demo's summary, also returned for tests.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub harness: HarnessReport,
    pub legacy_connections: f64,
    pub new_connections: f64,
    pub legacy_success: f64,
    pub new_success: f64,
}

fn line(t: f64, m: &Metrics, h: &HarnessReport) -> String {
    let conns = |tr: &str| m.total("tcp_comm_connections_active", &[("transport", tr)]);
    let cmds = |tr: &str, o: &str| {
        m.total(
            "tcp_comm_packet_sent_total",
            &[("transport", tr), ("outcome", o)],
        )
    };
    let mut per_path = String::new();
    for tr in ["legacy", "new"] {
        let ok = cmds(tr, "success");
        let failed = cmds(tr, "timeout") + cmds(tr, "abandoned");
        let ratio = if ok + failed > 0.0 {
            format!("{:.2}%", 100.0 * ok / (ok + failed))
        } else {
            "-".into()
        };
        per_path.push_str(&format!(
            " | {tr}: {:.0} conns, {ok:.0} ok {failed:.0} failed ({ratio})",
            conns(tr)
        ));
    }
    format!(
        "[{t:>5.1}s]{per_path} | add-on: {} sent, p50 {:.1} ms p99 {:.1} ms",
        h.sent, h.p50_ms, h.p99_ms
    )
}

/// Runs the demo, printing to stdout.
pub async fn run(opts: DemoOptions) -> Result<DemoSummary, DemoError> {
    let addon_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::Addon)?;
    let addon = Addon::start(
        addon_listener,
        AddonConfig {
            tls: true,
            seed: opts.seed,
            ..AddonConfig::default()
        },
    )
    .map_err(DemoError::Addon)?;
    // The demo's latch, SLO state and audit log live and die with it.
    let state = tempfile::Builder::new()
        .prefix("cync-gateway-demo-")
        .tempdir()
        .map_err(DemoError::StateDir)?;
    let cfg = Config::parse(&format!(
        "state_dir = {:?}\n\
         [listen]\ndevices = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n\
         [device_tls]\nmode = \"tls\"\n\
         [routing]\ncanary_percent = {}\n\
         [upstream.legacy]\naddress = \"{}\"\ntls = true\nverify = \"none\"\n",
        state.path().display().to_string(),
        opts.canary_percent,
        addon.addr()
    ))?;
    let gw = Gateway::start(cfg).await?;
    println!(
        "cync-gateway demo: everything on loopback, stops after {:?}",
        opts.duration
    );
    println!("  fake add-on (TLS)   {}", addon.addr());
    println!(
        "  gateway devices     {} (TLS, generated self-signed RSA certificate)",
        gw.device_addr
    );
    println!(
        "  metrics             http://{}/metrics  (/healthz, /readyz)",
        gw.metrics_addr
    );
    println!(
        "  {} simulated devices, the add-on sends {} commands/s; routing: {}% of devices (by stable hash of their id) on the new path",
        opts.devices, opts.rate, opts.canary_percent
    );
    let load_cfg = LoadConfig {
        target: gw.device_addr,
        tls: true,
        devices: opts.devices,
        seed: opts.seed,
        rate: opts.rate,
        duration: opts.duration,
        ramp_per_sec: 50,
        heartbeat: Duration::from_secs(21),
        warmup: Duration::ZERO,
        path_of: {
            let p = opts.canary_percent;
            Some(load::PathOf::new(move |d| router::by_percent(d, p).label()))
        },
    };
    let metrics = gw.metrics.clone();
    let report = load::run(&load_cfg, &addon, |p| {
        println!("{}", line(p.elapsed_s, &metrics, &p.commands));
    })
    .await;
    let m = &gw.metrics;
    let summary = DemoSummary {
        harness: report.commands.clone(),
        legacy_connections: m.total("tcp_comm_connections_total", &[("transport", "legacy")]),
        new_connections: m.total("tcp_comm_connections_total", &[("transport", "new")]),
        legacy_success: m.total(
            "tcp_comm_packet_sent_total",
            &[("transport", "legacy"), ("outcome", "success")],
        ),
        new_success: m.total(
            "tcp_comm_packet_sent_total",
            &[("transport", "new"), ("outcome", "success")],
        ),
    };
    println!("\nsummary after {:.1}s:", report.duration_s);
    println!(
        "  connections routed: legacy {:.0}, new {:.0}",
        summary.legacy_connections, summary.new_connections
    );
    println!(
        "  add-on commands: {} sent, {} done, {} timed out, {} lost -> success {:.2}%",
        report.commands.sent,
        report.commands.done,
        report.commands.timed_out,
        report.commands.lost,
        100.0 * report.success_ratio
    );
    for (path, r) in report.by_path.iter().flatten() {
        println!(
            "  add-on commands to {path} devices ({}): {} done, {} failed -> success {:.2}%",
            r.devices,
            r.done,
            r.failed,
            100.0 * r.success_ratio
        );
    }
    println!(
        "  latency through the gateway: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        report.commands.p50_ms,
        report.commands.p90_ms,
        report.commands.p99_ms,
        report.commands.max_ms
    );
    println!(
        "  gateway measured: legacy {:.0}, new {:.0} commands succeeded (the add-on's, plus its mesh query and mesh ack per connection); new path re-sent {:.0}",
        summary.legacy_success,
        summary.new_success,
        m.total("tcp_comm_packet_retransmit_total", &[("transport", "new")])
    );
    let stop = CancellationToken::new();
    stop.cancel();
    addon.shutdown();
    gw.shutdown(Duration::from_secs(5)).await;
    Ok(summary)
}
