//! Load generation: a fleet of simulated devices plus the fake add-on's command harness at a
//! target rate, reporting commands/s and latency percentiles as progress and at the end.
//!
//! Invariants:
//! - The fleet and the command stream are seeded: the same arguments give the same devices and
//!   the same command sequence (timing on a loaded machine still varies).
//! - With the gateway's canary percentage given, outcomes are also reported per path, each
//!   device placed by the same stable bucket the gateway routes by.
//! - The run stops by itself after `duration`, and waits up to the add-on's 5 s command wait so
//!   the last commands are counted as done or timed out, never silently dropped.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::addon::{Addon, HarnessReport};
use super::device::{self, DeviceConfig, DeviceStats};
use crate::protocol::DeviceId;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Where devices dial: the gateway, or the add-on itself for a direct baseline.
    pub target: SocketAddr,
    pub tls: bool,
    pub devices: u32,
    pub seed: u64,
    /// Commands per second across the fleet.
    pub rate: f64,
    pub duration: Duration,
    /// Devices are started this many per second, like a fleet coming back after an outage.
    pub ramp_per_sec: u32,
    pub heartbeat: Duration,
    /// Commands start only after this, and once every device is ready at the add-on, so the
    /// add-on's own start-up (its receive loop is blocked for 2 s per connection) is left out
    /// of the latencies. Zero: commands start at once.
    pub warmup: Duration,
    /// The path the gateway gives each device (`legacy`, `new`), to report each path apart.
    /// The simulator does not route; whoever runs it and knows the gateway's routing does.
    pub path_of: Option<PathOf>,
    /// Where each device dials instead of `target` (the demo sends the new path's devices
    /// through a chaos proxy).
    pub target_of: Option<TargetOf>,
}

/// Where a device dials.
#[derive(Clone)]
pub struct TargetOf(pub std::sync::Arc<dyn Fn(DeviceId) -> SocketAddr + Send + Sync>);

/// Which path a device takes, by name.
#[derive(Clone)]
pub struct PathOf(pub std::sync::Arc<dyn Fn(DeviceId) -> &'static str + Send + Sync>);

impl PathOf {
    pub fn new(f: impl Fn(DeviceId) -> &'static str + Send + Sync + 'static) -> PathOf {
        PathOf(std::sync::Arc::new(f))
    }
}

impl std::fmt::Debug for TargetOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TargetOf(..)")
    }
}

impl std::fmt::Debug for PathOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PathOf(..)")
    }
}

/// Commands of the devices on one path.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PathReport {
    pub devices: u32,
    pub done: u64,
    pub failed: u64,
    pub success_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub elapsed_s: f64,
    pub connected: usize,
    pub ready: usize,
    pub commands: HarnessReport,
    pub rate_per_s: f64,
    /// The p99 of the commands answered in this second alone (`commands` is cumulative).
    pub interval_p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub devices: u32,
    pub duration_s: f64,
    pub commands: HarnessReport,
    pub success_ratio: f64,
    pub commands_per_s: f64,
    pub device_connects: u64,
    pub device_disconnects: u64,
    /// Per path ("legacy", "new") when the canary percentage was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_path: Option<BTreeMap<&'static str, PathReport>>,
}

/// Groups per-device outcomes by the path `path_of` gives each device.
pub fn by_path(
    devices: &[DeviceId],
    outcomes: &HashMap<DeviceId, (u64, u64)>,
    path_of: &PathOf,
) -> BTreeMap<&'static str, PathReport> {
    let mut out: BTreeMap<&'static str, PathReport> = BTreeMap::new();
    for d in devices {
        let r = out.entry((path_of.0)(*d)).or_default();
        r.devices += 1;
        if let Some((done, failed)) = outcomes.get(d) {
            r.done += done;
            r.failed += failed;
        }
    }
    for r in out.values_mut() {
        let total = r.done + r.failed;
        r.success_ratio = if total == 0 {
            1.0
        } else {
            r.done as f64 / total as f64
        };
    }
    out
}

/// Starts `cfg.devices` simulated devices against `cfg.target`.
pub fn spawn_fleet(cfg: &LoadConfig, stop: &CancellationToken) -> Vec<Arc<DeviceStats>> {
    let mut all = Vec::new();
    for i in 0..cfg.devices {
        let target = match &cfg.target_of {
            Some(f) => (f.0)(device::identity(cfg.seed, i).0),
            None => cfg.target,
        };
        let mut d = DeviceConfig::new(target, cfg.seed, i);
        d.tls = cfg.tls;
        d.heartbeat = cfg.heartbeat;
        let stats = Arc::new(DeviceStats::default());
        all.push(stats.clone());
        let stop = stop.clone();
        let ramp = cfg.ramp_per_sec.max(1);
        let start_after = Duration::from_secs_f64(f64::from(i / ramp));
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(start_after) => {}
            }
            device::run(d, stats, stop).await;
        });
    }
    all
}

/// Runs devices + harness against an already running add-on; calls `progress` every second.
pub async fn run(
    cfg: &LoadConfig,
    addon: &Arc<Addon>,
    mut progress: impl FnMut(&Progress),
) -> LoadReport {
    let stop = CancellationToken::new();
    let fleet = spawn_fleet(cfg, &stop);
    if !cfg.warmup.is_zero() {
        // The warm-up runs from the moment the last device is ready, not from the first
        // spawn: a device's first second after its hello (start-up reports and their acks)
        // is start-up traffic, and counting commands over it measured the ramp's tail as a
        // latency p99 of 0.2-0.6 s at 500 commands/s with no proxy in the way.
        let give_up = Instant::now() + Duration::from_secs(60);
        while Instant::now() < give_up && addon.connections().1 < cfg.devices as usize {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(cfg.warmup).await;
    }
    let started = Instant::now();
    let harness_stop = CancellationToken::new();
    let h = {
        let addon = addon.clone();
        let (rate, seed, hs) = (cfg.rate, cfg.seed, harness_stop.clone());
        tokio::spawn(async move { addon.run_harness(rate, seed, hs).await })
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last_done = 0u64;
    while started.elapsed() < cfg.duration {
        tick.tick().await;
        let (connected, ready) = addon.connections();
        let commands = addon.report();
        let (interval_p99_ms, _) = addon.take_interval_p99();
        let rate_per_s = (commands.done - last_done) as f64;
        last_done = commands.done;
        progress(&Progress {
            elapsed_s: started.elapsed().as_secs_f64(),
            connected,
            ready,
            commands,
            rate_per_s,
            interval_p99_ms,
        });
    }
    harness_stop.cancel();
    let _ = h.await;
    // Let the last commands finish or time out.
    let settle = Instant::now() + super::addon::COMMAND_WAIT + Duration::from_millis(100);
    while addon.report().in_flight > 0 && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.cancel();
    let commands = addon.report();
    LoadReport {
        devices: cfg.devices,
        duration_s: elapsed,
        success_ratio: commands.success_ratio(),
        commands_per_s: commands.done as f64 / cfg.duration.as_secs_f64().max(0.001),
        commands,
        device_connects: fleet.iter().map(|s| DeviceStats::get(&s.connects)).sum(),
        device_disconnects: fleet.iter().map(|s| DeviceStats::get(&s.disconnects)).sum(),
        by_path: cfg.path_of.as_ref().map(|p| {
            let ids: Vec<DeviceId> = (0..cfg.devices)
                .map(|i| device::identity(cfg.seed, i).0)
                .collect();
            by_path(&ids, &addon.outcomes_by_device(), p)
        }),
    }
}
