//! `cync-sim`: simulated devices, a fake add-on with a command harness, a chaos proxy and a
//! load generator, for tests, demos and benchmarks. Thin: arguments here, behaviour in
//! `cync_gateway::sim`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use cync_gateway::control::router;
use cync_gateway::sim::addon::{Addon, AddonConfig, Mode, OneSession};
use cync_gateway::sim::chaos::{Chaos, Plan};
use cync_gateway::sim::device::DeviceStats;
use cync_gateway::sim::load::{self, LoadConfig};
use cync_gateway::telemetry::labels::Label;

/// The fake add-on's (and the chaos proxy's) accept queue: the gateway's default, so that in a
/// benchmark a thousand devices connecting at once are not held back by the tool in front of
/// or behind the proxy under test (the standard library's 128 overflowed there).
const BACKLOG: u32 = cync_gateway::config::DEFAULT_BACKLOG;

fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    cync_gateway::conn::listener::bind(addr, BACKLOG)
}

#[derive(Parser)]
#[command(
    name = "cync-sim",
    version,
    about = "Cync device/add-on simulator, chaos proxy and load generator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Simulated devices dialing TARGET until interrupted (or --duration).
    Devices {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10)]
        count: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        tls: bool,
        /// Heartbeat after this many seconds without sending (real devices: 21).
        #[arg(long, default_value_t = 21.0)]
        heartbeat: f64,
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
    },
    /// The fake add-on, optionally sending commands at --rate per second.
    Addon {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        tls: bool,
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// How it answers devices.
        #[arg(long, value_enum, default_value = "normal")]
        mode: Mode,
        /// How long each answer takes in --mode slow.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        slow_delay: Duration,
        /// Connections served at once; further ones are held unanswered, then closed.
        #[arg(long)]
        max_connections: Option<usize>,
        /// How long a connection beyond --max-connections is held before it is closed.
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        over_limit_hold: Duration,
        /// Keep one session per device or per peer address, closing the older connection.
        #[arg(long, value_enum, default_value = "none")]
        one_session: OneSession,
    },
    /// A protocol-aware fault proxy from LISTEN to TARGET following a plan file (TOML).
    Chaos {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        plan: PathBuf,
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
    },
    /// A fake add-on and a fleet of devices that only connect, say hello and heartbeat: once
    /// every device has its 0x28, one JSON line (time to all ready, hello -> 0x28 latency),
    /// then held until `--hold` or Ctrl-C. For connection-scale and connect-latency
    /// benchmarks.
    Fleet {
        /// Where devices dial (the proxy). Omit to dial the add-on directly.
        #[arg(long)]
        target: Option<SocketAddr>,
        #[arg(long, default_value = "127.0.0.1:0")]
        addon_listen: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        devices: u32,
        #[arg(long)]
        tls: bool,
        #[arg(long)]
        addon_tls: bool,
        /// Devices started per second (all at once: the fleet size).
        #[arg(long, default_value_t = 1000)]
        ramp_per_sec: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, value_parser = humantime::parse_duration)]
        hold: Option<Duration>,
        /// Give up waiting for every 0x28 after this long.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Devices + add-on harness at a target rate; progress every second, report at the end.
    Load {
        /// Where devices dial (the gateway). Omit to dial the add-on directly (baseline).
        #[arg(long)]
        target: Option<SocketAddr>,
        /// Where the fake add-on listens (the gateway's upstream).
        #[arg(long, default_value = "127.0.0.1:0")]
        addon_listen: SocketAddr,
        #[arg(long, default_value_t = 100)]
        devices: u32,
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        tls: bool,
        #[arg(long)]
        addon_tls: bool,
        #[arg(long, default_value_t = 200)]
        ramp_per_sec: u32,
        /// Start commands this long after every device is ready (leaves the fleet's
        /// start-up traffic out of the latencies).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// The gateway's routing.canary_percent: also report legacy and new devices apart.
        #[arg(long)]
        canary_percent: Option<f64>,
        /// Print JSON lines (progress and the final report) instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cync-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cync-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn until(duration: Option<Duration>) {
    match duration {
        Some(d) => {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run(cmd: Cmd) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        Cmd::Devices {
            target,
            count,
            seed,
            tls,
            heartbeat,
            duration,
        } => {
            let stop = CancellationToken::new();
            let cfg = LoadConfig {
                target,
                tls,
                devices: count,
                seed,
                rate: 0.0,
                duration: Duration::ZERO,
                ramp_per_sec: 200,
                heartbeat: Duration::from_secs_f64(heartbeat),
                warmup: Duration::ZERO,
                path_of: None,
                target_of: None,
            };
            let fleet = load::spawn_fleet(&cfg, &stop);
            eprintln!("cync-sim: {count} devices dialing {target}");
            until(duration).await;
            stop.cancel();
            let sum = |f: fn(&DeviceStats) -> u64| fleet.iter().map(|s| f(s)).sum::<u64>();
            println!(
                "connects={} commands_received={} replies_sent={} heartbeats_sent={} heartbeat_acks={}",
                sum(|s| DeviceStats::get(&s.connects)),
                sum(|s| DeviceStats::get(&s.commands_received)),
                sum(|s| DeviceStats::get(&s.replies_sent)),
                sum(|s| DeviceStats::get(&s.heartbeats_sent)),
                sum(|s| DeviceStats::get(&s.heartbeat_acks)),
            );
        }
        Cmd::Fleet {
            target,
            addon_listen,
            devices,
            tls,
            addon_tls,
            ramp_per_sec,
            seed,
            hold,
            timeout,
        } => {
            let addon = Addon::start(
                bind_listener(addon_listen)?,
                AddonConfig {
                    tls: addon_tls,
                    ..AddonConfig::default()
                },
            )?;
            let target = target.unwrap_or(addon.addr());
            let cfg = LoadConfig {
                target,
                tls,
                devices,
                seed,
                rate: 0.0,
                duration: Duration::ZERO,
                ramp_per_sec,
                heartbeat: Duration::from_secs(21),
                warmup: Duration::ZERO,
                path_of: None,
                target_of: None,
            };
            eprintln!(
                "cync-sim: fake add-on on {}, {devices} devices dialing {target}",
                addon.addr()
            );
            let stop = CancellationToken::new();
            let started = tokio::time::Instant::now();
            let fleet = load::spawn_fleet(&cfg, &stop);
            let acked = || {
                fleet
                    .iter()
                    .filter(|s| DeviceStats::get(&s.hello_acks) > 0)
                    .count()
            };
            while acked() < devices as usize && started.elapsed() < timeout {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let ready_after = started.elapsed();
            let mut us: Vec<u64> = fleet
                .iter()
                .flat_map(|s| {
                    s.hello_ack_us
                        .lock()
                        .map(|v| v.first().copied())
                        .ok()
                        .flatten()
                })
                .collect();
            us.sort_unstable();
            let q = |p: f64| {
                us.get(((us.len() as f64 * p).ceil() as usize).saturating_sub(1))
                    .map_or(f64::NAN, |v| *v as f64 / 1000.0)
            };
            let connects: u64 = fleet.iter().map(|s| DeviceStats::get(&s.connects)).sum();
            println!(
                "{}",
                serde_json::json!({
                    "devices": devices,
                    "ready": acked(),
                    "connects": connects,
                    "addon_resumed": addon.resumed(),
                    "ready_after_ms": ready_after.as_secs_f64() * 1000.0,
                    "hello_ack_ms": { "p50": q(0.5), "p99": q(0.99), "max": q(1.0) },
                })
            );
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            until(hold).await;
            stop.cancel();
        }
        Cmd::Addon {
            listen,
            tls,
            rate,
            seed,
            duration,
            mode,
            slow_delay,
            max_connections,
            over_limit_hold,
            one_session,
        } => {
            let addon = Addon::start(
                bind_listener(listen)?,
                AddonConfig {
                    tls,
                    seed,
                    slow_delay,
                    max_connections,
                    over_limit_hold,
                    one_session,
                    ..AddonConfig::default()
                },
            )?;
            addon.set_mode(mode);
            eprintln!(
                "cync-sim: fake add-on on {} (tls={tls}, mode {mode:?}), {rate} commands/s",
                addon.addr()
            );
            let stop = CancellationToken::new();
            let h = {
                let (a, s) = (addon.clone(), stop.clone());
                tokio::spawn(async move { a.run_harness(rate, seed, s).await })
            };
            until(duration).await;
            stop.cancel();
            let _ = h.await;
            println!("{}", serde_json::to_string(&addon.report())?);
        }
        Cmd::Chaos {
            listen,
            target,
            plan,
            duration,
        } => {
            let plan = Plan::load(&plan)?;
            let chaos = Chaos::start(bind_listener(listen)?, target, plan)?;
            eprintln!("cync-sim: chaos proxy {} -> {target}", chaos.addr());
            until(duration).await;
            println!("{}", serde_json::to_string(&chaos.stats.snapshot())?);
        }
        Cmd::Load {
            target,
            addon_listen,
            devices,
            rate,
            duration,
            seed,
            tls,
            addon_tls,
            ramp_per_sec,
            warmup,
            canary_percent,
            json,
        } => {
            let addon: Arc<Addon> = Addon::start(
                bind_listener(addon_listen)?,
                AddonConfig {
                    tls: addon_tls,
                    seed,
                    ..AddonConfig::default()
                },
            )?;
            let target = target.unwrap_or(addon.addr());
            eprintln!("cync-sim: add-on on {}, {devices} devices dialing {target}, {rate} commands/s for {duration:?}", addon.addr());
            let cfg = LoadConfig {
                target,
                tls,
                devices,
                seed,
                rate,
                duration,
                ramp_per_sec,
                heartbeat: Duration::from_secs(21),
                warmup,
                // Devices are put on a path by the same stable bucket the gateway uses; force
                // lists are not known here.
                path_of: canary_percent
                    .map(|p| load::PathOf::new(move |d| router::by_percent(d, p).label())),
                target_of: None,
            };
            let report = load::run(&cfg, &addon, |p| {
                if json {
                    if let Ok(s) = serde_json::to_string(p) { println!("{s}"); }
                } else {
                    eprintln!(
                        "[{:>5.1}s] devices {}/{} ready | commands sent {} done {} timeout {} | {:.0}/s | p50 {:.1} ms p99 {:.1} ms",
                        p.elapsed_s, p.ready, p.connected, p.commands.sent, p.commands.done, p.commands.timed_out,
                        p.rate_per_s, p.commands.p50_ms, p.commands.p99_ms
                    );
                }
            }).await;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}
