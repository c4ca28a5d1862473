//! `cync-gateway demo`: the whole product in one process on loopback with ephemeral ports —
//! a fake add-on (TLS, like the real one), the gateway (plain TCP toward the devices, so the
//! demo's chaos proxy can read their frames; a 25 % canary, the dark launch observing legacy), a
//! fleet of simulated devices
//! and the add-on's command harness — with a live one-line summary every second. After
//! `fault_after` a fault hits the new path (a chaos proxy in front of the canary devices starts
//! losing 40 % of their replies): the rollback checks fail, the latch is set, the canary
//! devices are re-homed to legacy and their commands recover. It ends with the budget, the
//! audit trail and the `status` view.
//!
//! Invariants:
//! - Loopback only, no fixed ports, its state in a temporary directory removed at the end: it
//!   runs anywhere `cargo` does.
//! - The fault belongs to the canary devices' connections at the time (the chaos proxy heals
//!   the connections opened after the rollback), as a fault of the new stack would.
//! - It stops by itself after `duration` and exits 0 when every part came up.

use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::router;
use crate::gateway::{Gateway, GatewayError};
use crate::runbook;
use crate::sim::addon::{Addon, AddonConfig, HarnessReport};
use crate::sim::chaos::{Chaos, Plan};
use crate::sim::load::{self, LoadConfig};
use crate::telemetry::labels::{Label, Transport};
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
    #[error("starting the chaos proxy: {0}")]
    Chaos(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub devices: u32,
    pub rate: f64,
    pub duration: Duration,
    pub seed: u64,
    /// Share of devices on the new path (`routing.canary_percent`).
    pub canary_percent: f64,
    /// When the fault hits the new path (`None`: never).
    pub fault_after: Option<Duration>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            devices: 50,
            rate: 20.0,
            duration: Duration::from_secs(60),
            seed: 7,
            canary_percent: 25.0,
            fault_after: Some(Duration::from_secs(20)),
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
    /// Seconds from the fault to the latch, when both happened.
    pub fault_to_latch_s: Option<f64>,
}

/// Share of the canary devices' replies the fault loses.
const FAULT_LOSS: f64 = 0.4;

fn line(t: f64, m: &Metrics, h: &HarnessReport, latched: bool) -> String {
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
        "[{t:>5.1}s]{per_path} | add-on: {} sent, {} answered, p99 {:.1} ms | latch {}",
        h.sent,
        h.done,
        h.p99_ms,
        if latched { "SET" } else { "clear" }
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
    // Checks every 2 s over the last 10 s, three failures in a row: a demo's minute, not an
    // hour (the defaults are a check a minute over 10 minutes). A command is late at 0.8 s
    // (the default 1.5 s is for Wi-Fi devices; these answer in a millisecond), so a fault is
    // evidence within a second and the latch comes one streak later.
    let cfg = Config::parse(&format!(
        "state_dir = {:?}\n\
         [listen]\ndevices = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n\
         [device_tls]\nmode = \"plain\"\n\
         [routing]\ncanary_percent = {}\n\
         [dark_launch]\nmode = \"observe\"\npercent = 100\n\
         [slo]\nlatency_threshold = \"800ms\"\n\
         [rollback]\ncheck_interval = \"2s\"\nwindow = \"10s\"\nmin_events = 10\nmax_violations = 3\n\
         [upstream.legacy]\naddress = \"{}\"\ntls = true\nverify = \"none\"\n",
        state.path().display().to_string(),
        opts.canary_percent,
        addon.addr()
    ))?;
    let gw = Gateway::start(cfg).await?;
    let plan = Plan::parse(&format!(
        "seed = {}\n[[rules]]\ndirection = \"dev_to_srv\"\nfault = \"drop\"\ntypes = [\"0x73\"]\nclass = \"f9\"\nprobability = {FAULT_LOSS}\n",
        opts.seed
    ))
    .map_err(|e| DemoError::Chaos(std::io::Error::other(e.to_string())))?;
    let chaos = Chaos::start(
        TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(DemoError::Chaos)?,
        gw.device_addr,
        plan,
    )
    .map_err(DemoError::Chaos)?;
    chaos.disarm();
    let chaos = std::sync::Arc::new(chaos);
    // Heal the moment the latch is set: the re-homed devices redial within their backoff
    // (100 ms at least), and their new connections must not inherit the new path's fault.
    {
        let (live, chaos) = (gw.live.clone(), chaos.clone());
        let mut changes = live.subscribe();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                if live.latched() {
                    chaos.heal_new_connections();
                    return;
                }
            }
        });
    }
    println!(
        "cync-gateway demo: everything on loopback, stops after {:?}",
        opts.duration
    );
    println!("  fake add-on (TLS)   {}", addon.addr());
    println!(
        "  gateway devices     {} (plain TCP here, so the chaos proxy can see the frames; real devices speak TLS)",
        gw.device_addr
    );
    println!(
        "  status page         http://{}/   (also /metrics, /healthz, /readyz)",
        gw.metrics_addr
    );
    println!(
        "  {} simulated devices, the add-on sends {} commands/s; {}% of devices (by stable hash of their id) on the new path, the dark launch observing the rest",
        opts.devices, opts.rate, opts.canary_percent
    );
    match opts.fault_after {
        Some(after) => println!(
            "  at {after:?} a fault hits the new path: a chaos proxy in front of the canary devices loses {:.0}% of their replies",
            FAULT_LOSS * 100.0
        ),
        None => println!("  no fault (--fault-after 0)"),
    }
    println!(
        "  (the gateway counts every command it carried: the add-on's harness commands and the mesh query the add-on sends each connection; the add-on counts only its harness's. Latencies leave out the add-on's 2 s start-up stall.)\n"
    );
    let canary = opts.canary_percent;
    let on_new = move |d| router::by_percent(d, canary) == Transport::New;
    let (direct, through_chaos) = (gw.device_addr, chaos.addr());
    let load_cfg = LoadConfig {
        target: gw.device_addr,
        tls: false,
        devices: opts.devices,
        seed: opts.seed,
        rate: opts.rate,
        duration: opts.duration,
        ramp_per_sec: 50,
        heartbeat: Duration::from_secs(21),
        warmup: Duration::from_secs(3),
        path_of: Some(load::PathOf::new(move |d| {
            router::by_percent(d, canary).label()
        })),
        target_of: Some(load::TargetOf(std::sync::Arc::new(move |d| {
            if on_new(d) {
                through_chaos
            } else {
                direct
            }
        }))),
    };
    let metrics = gw.metrics.clone();
    let live = gw.live.clone();
    let last_check = gw.last_check.clone();
    let mut fault_at: Option<f64> = None;
    let mut fault_instant: Option<tokio::time::Instant> = None;
    let mut latched_at: Option<f64> = None;
    let mut last_seen: Option<String> = None;
    // The progress lines come once a second; the latch is timed to the moment it is set.
    let latch_instant = {
        let live = live.clone();
        let mut changes = live.subscribe();
        tokio::spawn(async move {
            while !live.latched() {
                if changes.changed().await.is_err() {
                    return None;
                }
            }
            Some(tokio::time::Instant::now())
        })
    };
    let report = load::run(&load_cfg, &addon, |p| {
        let t = p.elapsed_s;
        if fault_at.is_none() && opts.fault_after.is_some_and(|a| t >= a.as_secs_f64()) {
            chaos.arm();
            fault_at = Some(t);
            fault_instant = Some(tokio::time::Instant::now());
            println!("== {t:.1}s: FAULT: the canary devices' connections now lose {:.0}% of their replies", FAULT_LOSS * 100.0);
        }
        if let Some(c) = last_check.lock().ok().and_then(|c| c.clone()) {
            if last_seen.as_deref() != Some(c.at.as_str()) && fault_at.is_some() {
                last_seen = Some(c.at.clone());
                println!(
                    "== rollback check: {} ({} failing in a row of the 3 that roll back): {}",
                    c.result.label(),
                    c.streak,
                    c.verdict.to_string().lines().next().unwrap_or("")
                );
            }
        }
        let latched = live.latched();
        if latched && latched_at.is_none() {
            latched_at = Some(t);
            println!(
                "== {t:.1}s: ROLLBACK: the latch is set; every device is routed to legacy and the canary devices are re-homed"
            );
        }
        println!("{}", line(t, &metrics, &p.commands, latched));
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
        // Latched (seen by the progress lines) means the watcher has its instant or is about
        // to; otherwise it would wait for ever.
        fault_to_latch_s: match (fault_instant, latched_at) {
            (Some(f), Some(_)) => latch_instant
                .await
                .ok()
                .flatten()
                .map(|l| l.saturating_duration_since(f).as_secs_f64()),
            _ => {
                latch_instant.abort();
                None
            }
        },
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
            "  add-on commands to the devices first routed to {path} ({}): {} done, {} failed -> success {:.2}%",
            r.devices,
            r.done,
            r.failed,
            100.0 * r.success_ratio
        );
    }
    println!(
        "  latency through the gateway (after the warm-up): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        report.commands.p50_ms,
        report.commands.p90_ms,
        report.commands.p99_ms,
        report.commands.max_ms
    );
    println!(
        "  gateway measured: legacy {:.0}, new {:.0} commands succeeded; the new path re-sent {:.0}",
        summary.legacy_success,
        summary.new_success,
        m.total("tcp_comm_packet_retransmit_total", &[("transport", "new")])
    );
    if let Some(s) = summary.fault_to_latch_s {
        println!(
            "  fault to latch: {s:.1}s (late past 0.8 s, checks every 2 s, 3 failures in a row)"
        );
    }
    let socket = gw.admin_socket.clone();
    if let Ok((entries, _)) = runbook::history(&socket, 10).await {
        println!("\naudit trail (cync-gateway history):");
        print!("{}", runbook::render_history(&entries));
    }
    if let Ok((status, _)) = runbook::status(&socket).await {
        println!("\ncync-gateway status:");
        print!("{}", runbook::render_status(&status));
    }
    let stop = CancellationToken::new();
    stop.cancel();
    chaos.shutdown();
    addon.shutdown();
    gw.shutdown(Duration::from_secs(5)).await;
    Ok(summary)
}
