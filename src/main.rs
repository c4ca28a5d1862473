//! `cync-gateway`: the daemon and its operator commands. A thin layer: argument parsing and
//! exit codes here, everything else in the library.
//!
//! Exit codes: 0 success; 1 runtime failure (or the daemon refused a runbook command); 64
//! invalid configuration or usage; 69 the daemon cannot be reached (runbook commands); 130
//! second shutdown signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cync_gateway::config::Config;
use cync_gateway::gateway::Gateway;
use cync_gateway::shutdown::{self, DrainOutcome};

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 64;
const EXIT_SECOND_SIGNAL: u8 = 130;

#[derive(Parser)]
#[command(
    name = "cync-gateway",
    version,
    about = "Strangler gateway for Cync devices: legacy passthrough and a reliable new path, shifted a percentage at a time"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Refuse to start when the file-descriptor limit is below what the configuration
        /// may need (by default that is only a warning).
        #[arg(long)]
        strict: bool,
    },
    /// Everything in one process on loopback: fake add-on, gateway, simulated devices, live summary.
    Demo {
        /// How long to run.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// When a fault hits the new path (its devices lose 40 % of their replies), which the
        /// rollback then undoes; 0 for none.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        fault_after: std::time::Duration,
        /// Simulated devices.
        #[arg(long, default_value_t = 50)]
        devices: u32,
        /// Commands per second sent by the fake add-on.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Share of devices routed to the new path, 0-100.
        #[arg(long, default_value_t = 25.0)]
        canary_percent: f64,
    },
    /// Validate a configuration file; print every problem; exit 64 if there is any.
    CheckConfig {
        /// Configuration file.
        file: PathBuf,
    },
    /// The running daemon: canary and latch, each path's devices, success and budget, the last
    /// rollback check.
    Status {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Set the rollback latch now: every device routes to legacy, new-path connections are
    /// re-homed. Audited with the reason.
    Rollback {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Why (goes into the log, the audit log and the webhook).
        #[arg(long)]
        reason: String,
    },
    /// Clear the rollback latch: the configured canary percentage is in force again.
    Resume {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Why (goes into the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Set routing.canary_percent in the configuration file (comments and layout kept; the whole
    /// file validated before it is written, atomically) and wait until the daemon applies it.
    SetCanary {
        /// The new share of devices on the new path, 0-100 (two decimals at most).
        percent: f64,
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// How long to wait for the daemon to report the new percentage.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Move to the next of rollout.stages: refused while the latch is set or a gate fails
    /// (saying which); the daemon writes it into its configuration file and applies it.
    Promote {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Skip the bake, budget and check gates (never the latch).
        #[arg(long)]
        force: bool,
        /// Why (goes into the audit log).
        #[arg(long, default_value = "")]
        reason: String,
        /// How long to wait for the daemon to apply it.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// The rollout so far: each stage, how long it baked, the new path's commands and failures,
    /// the budget it used, rollbacks; at 100 % the 30-day validation period.
    Report {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Follow commands live, one line per finished command (like tcpdump for Cync commands):
    /// path, device, seq, msg_id, outcome, time to its 0x7b and to its f9, attempts.
    Trace {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Only this device (8 hex digits).
        #[arg(long)]
        device: Option<String>,
        /// Only commands that failed (timed out or abandoned).
        #[arg(long)]
        failures: bool,
        /// JSON lines for tools.
        #[arg(long)]
        json: bool,
        /// Stop after this many commands (default: until interrupted).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// The audit log: every routing change, who made it and why.
    History {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Newest entries shown.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

const DEFAULT_CONFIG: &str = "/etc/cync-gateway/gateway.toml";

use cync_gateway::runbook::Ask;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::CheckConfig { file } => check_config(&file),
        Cmd::Run { config, strict } => run(&config, strict),
        Cmd::Status { config, json } => runbook(&config, Ask::Status { json }),
        Cmd::Rollback { config, reason } => runbook(&config, Ask::Rollback { reason }),
        Cmd::Resume { config, reason } => runbook(&config, Ask::Resume { reason }),
        Cmd::Report { config, json } => runbook(&config, Ask::Report { json }),
        Cmd::Trace {
            config,
            device,
            failures,
            json,
            limit,
        } => trace(&config, device.as_deref(), failures, json, limit),
        Cmd::Promote {
            config,
            force,
            reason,
            wait,
        } => runbook(
            &config,
            Ask::Promote {
                force,
                reason,
                wait,
            },
        ),
        Cmd::SetCanary {
            percent,
            config,
            wait,
        } => runbook(&config, Ask::SetCanary { percent, wait }),
        Cmd::History {
            config,
            limit,
            json,
        } => runbook(&config, Ask::History { limit, json }),
        Cmd::Demo {
            duration,
            devices,
            rate,
            canary_percent,
            fault_after,
        } => demo(cync_gateway::demo::DemoOptions {
            devices,
            rate,
            duration,
            canary_percent,
            fault_after: (!fault_after.is_zero()).then_some(fault_after),
            ..Default::default()
        }),
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(c) => {
            for w in c.warnings(Some(file)) {
                eprintln!("warning: {w}");
            }
            println!("{}: OK", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let problems = e.problems();
            eprintln!("{}: {} problem(s)", file.display(), problems.len());
            for p in problems {
                eprintln!("  - {p}");
            }
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Runs one runbook command against the daemon the configuration names.
fn runbook(config: &std::path::Path, ask: Ask) -> ExitCode {
    use cync_gateway::runbook as rb;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cync-gateway: starting the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let result = rt.block_on(rb::run(config, ask));
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cync-gateway: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn trace(
    config: &std::path::Path,
    device: Option<&str>,
    failures: bool,
    json: bool,
    limit: Option<u64>,
) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cync-gateway: starting the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let follow = cync_gateway::runbook::trace(config, device, failures, json, limit, |line| {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    });
    match rt.block_on(follow) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cync-gateway: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn demo(opts: cync_gateway::demo::DemoOptions) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cync-gateway: starting the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match rt.block_on(cync_gateway::demo::run(opts)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cync-gateway demo: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// The daemon's runtime. With one worker (`TOKIO_WORKER_THREADS=1`, or one CPU available to
/// the process: a small host, a CPU quota, `taskset`) a current-thread runtime: the same work
/// on the same one thread, without the multi-thread scheduler's bookkeeping for workers that
/// do not exist (its shared queues, per-batch statistics, parking a worker through a condvar).
/// `perf stat` could not tell the two apart at 200 commands/s (docs/benchmarks.md), so this
/// is the simpler machine, not a measured saving. With more, tokio's multi-thread runtime,
/// one worker per CPU unless the variable says otherwise. An unparsable variable counts as
/// unset (tokio's own reading of it would panic).
fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

fn run(path: &std::path::Path, strict: bool) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cync-gateway: {}: {e}", path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _log_guard = match cync_gateway::telemetry::logging::init(&config.logging) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cync-gateway: logging: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for w in config.warnings(Some(path)) {
        tracing::warn!("{w}");
    }
    let needed = cync_gateway::gateway::fds_needed(&config);
    if let Some(limit) = cync_gateway::gateway::fd_limit() {
        if limit < needed {
            let msg = format!(
                "the open-file limit is {limit}, below the {needed} this configuration may need (2 per listen.max_connections, listen.max_pending, listen.http_max_connections, and 64 spare): raise LimitNOFILE / ulimit -n, or lower listen.max_connections"
            );
            if strict {
                eprintln!("cync-gateway: {msg}");
                return ExitCode::from(EXIT_RUNTIME);
            }
            tracing::warn!("{msg}");
        }
    }
    if let Some(cap) = cync_gateway::gateway::somaxconn() {
        if cap < config.listen.backlog {
            tracing::warn!(
                "listen.backlog is {} but the kernel caps accept queues at net.core.somaxconn = {cap}: a fleet reconnecting at once may see handshakes dropped; raise the sysctl",
                config.listen.backlog
            );
        }
    }
    let rt = match runtime() {
        Ok(rt) => {
            // Read back from the runtime, not from what was asked of it.
            let flavor = match rt.handle().runtime_flavor() {
                tokio::runtime::RuntimeFlavor::CurrentThread => "current_thread",
                _ => "multi_thread",
            };
            tracing::info!(workers = rt.metrics().num_workers(), flavor, "runtime");
            rt
        }
        Err(e) => {
            eprintln!("cync-gateway: starting the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let config_path = path.to_path_buf();
    let code = rt.block_on(async move {
        let drain_timeout = config.shutdown.drain_timeout;
        let signals = match shutdown::Signals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cync-gateway: installing signal handlers: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        let gw = match Gateway::builder(config)
            .config_file(&config_path)
            .start()
            .await
        {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("cync-gateway: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        let sd = gw.shutdown_handle();
        let exit_now = std::sync::Arc::new(tokio::sync::Notify::new());
        signals.spawn(sd.clone(), gw.control(), exit_now.clone());
        // Everything answers: systemd's `start` returns now; its watchdog is fed from here on,
        // through the drain too, until the process ends.
        cync_gateway::telemetry::systemd::ready();
        tokio::spawn(cync_gateway::telemetry::systemd::watchdog(
            tokio_util::sync::CancellationToken::new(),
        ));
        sd.token().cancelled().await;
        cync_gateway::telemetry::systemd::stopping();
        tokio::select! {
            outcome = gw.shutdown(drain_timeout) => match outcome {
                DrainOutcome::Clean | DrainOutcome::TimedOut { .. } => ExitCode::SUCCESS,
            },
            _ = exit_now.notified() => ExitCode::from(EXIT_SECOND_SIGNAL),
        }
    });
    // Whatever is still running (a drain cut short) is abandoned here, not waited for.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    // The log guard drops after this, flushing every line written so far.
    code
}
