//! The SLO service: owns the running [`Engine`], feeds it from the metrics' counters every
//! second, exports its SLIs, budgets and burn rates as gauges, and keeps its state in
//! `state_dir` across restarts.
//!
//! Invariants:
//! - The engine is fed only from [`crate::telemetry::slo_feed`] (the record methods' own
//!   counters), so the windows and the exported counters agree.
//! - The state is written atomically every `slo.persist_interval` and once more when the task
//!   stops (after the drain, so the last commands are in it); at start a missing file means a
//!   fresh engine, and a corrupt or foreign one is moved aside, logged and counted — the daemon
//!   always starts.
//! - File I/O runs on the blocking pool, never on a runtime thread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use strum::IntoEnumIterator;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::live::Live;
use super::state::{self, Loaded, SLO_FILE};
use crate::config::SloConfig;
use crate::telemetry::labels::{Label, Transport};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::slo::{Counts, Engine, Objectives, Persisted, Slo, STATE_VERSION};
use crate::telemetry::wallclock::WallClock;

/// The burn-rate windows exported (the SRE Workbook's multiwindow pairs: 5 m with 1 h, 30 m
/// with 6 h), with their label.
pub const WINDOWS: [(&str, Duration); 4] = [
    ("5m", Duration::from_secs(300)),
    ("30m", Duration::from_secs(1800)),
    ("1h", Duration::from_secs(3600)),
    ("6h", Duration::from_secs(6 * 3600)),
];

/// How often the counters are folded into the engine and the gauges refreshed.
pub const TICK: Duration = Duration::from_secs(1);

/// Which file a state problem concerns; the `file` label of `tcp_comm_state_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum StateFile {
    Slo,
    Latch,
    Audit,
}

/// What went wrong with it; the `error` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum StateProblem {
    /// Not parseable, or another version: moved aside, started fresh.
    Corrupt,
    /// Exists but could not be read (the latch: treated as set).
    Unreadable,
    /// Could not be written.
    Write,
}

/// The objectives as the engine wants them.
pub fn objectives(c: &SloConfig) -> Objectives {
    Objectives {
        success: c.success_target,
        latency: c.latency_target,
        latency_threshold: c.latency_threshold,
        decode_errors: c.decode_error_max,
        queue_full: c.queue_full_max,
        retransmits: c.retransmit_max,
        churn_per_device_hour: c.churn_max_per_device_hour,
        ..Objectives::default()
    }
}

/// The running SLO engine and what it needs to feed, export and persist itself.
pub struct SloService {
    engine: Mutex<Engine>,
    metrics: Arc<Metrics>,
    live: Arc<Live>,
    clock: WallClock,
    dir: PathBuf,
}

impl SloService {
    /// Restores the engine from `state_dir` (or starts fresh) and returns the service.
    pub async fn start(live: Arc<Live>, metrics: Arc<Metrics>, clock: WallClock) -> Arc<Self> {
        let cfg = live.config();
        let dir = cfg.state_dir.clone();
        let (base, base_ms) = clock.base();
        let now_ms = clock.unix_ms(Instant::now());
        let read_dir = dir.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            state::read_json::<Persisted>(&read_dir, SLO_FILE, STATE_VERSION, now_ms)
        })
        .await
        .unwrap_or_else(|e| Loaded::Corrupt {
            error: format!("reading task failed: {e}"),
            moved_to: None,
        });
        let engine = match loaded {
            Loaded::Missing => {
                info!(dir = %dir.display(), "no SLO state yet; starting fresh");
                Engine::new(base, base_ms)
            }
            Loaded::Ok(p) => match restore(p, base, base_ms, now_ms) {
                Ok(e) => {
                    info!(dir = %dir.display(), "SLO state restored");
                    e
                }
                Err(e) => {
                    set_aside(&dir, now_ms).await;
                    error!(dir = %dir.display(), error = %e, "SLO state does not fit this version; moved aside, starting fresh");
                    metrics.state_error(StateFile::Slo, StateProblem::Corrupt);
                    Engine::new(base, base_ms)
                }
            },
            Loaded::Corrupt { error, moved_to } => {
                error!(
                    dir = %dir.display(),
                    error,
                    moved_to = ?moved_to,
                    "SLO state unreadable; moved aside, starting fresh"
                );
                metrics.state_error(StateFile::Slo, StateProblem::Corrupt);
                Engine::new(base, base_ms)
            }
        };
        metrics
            .feeds()
            .set_latency_threshold(cfg.slo.latency_threshold);
        let objectives = objectives(&cfg.slo);
        for slo in Slo::iter() {
            metrics.slo_target(slo, objectives.target(slo));
        }
        Arc::new(SloService {
            engine: Mutex::new(engine),
            metrics,
            live,
            clock,
            dir,
        })
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        // A panic while holding the lock cannot leave the rings inconsistent in a way that
        // matters more than losing the SLO figures would; keep going.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Folds the counters so far into the engine.
    pub fn observe(&self, now: Instant) {
        let mut e = self.engine();
        for t in Transport::iter() {
            let feed = self.metrics.feeds().path(t);
            e.observe(now, t, feed.counts(), self.metrics.active(t));
        }
    }

    /// The counts of `t` over the last `window`.
    pub fn window(&self, now: Instant, t: Transport, window: Duration) -> Counts {
        self.engine().window(now, t, window)
    }

    /// One SLI of `t` over `window` (NaN with no events).
    pub fn sli(&self, now: Instant, t: Transport, slo: Slo, window: Duration) -> f64 {
        self.engine().sli(now, t, slo, window)
    }

    /// The error budget of `slo` left on `t` over its period.
    pub fn budget(&self, now: Instant, t: Transport, slo: Slo, obj: &Objectives) -> f64 {
        self.engine().budget_remaining(now, t, slo, obj)
    }

    /// The burn rate of `slo` on `t` over `window`.
    pub fn burn(
        &self,
        now: Instant,
        t: Transport,
        slo: Slo,
        obj: &Objectives,
        window: Duration,
    ) -> f64 {
        self.engine().burn_rate(now, t, slo, obj, window)
    }

    /// Refreshes every SLO gauge.
    pub fn export(&self, now: Instant) {
        let cfg = self.live.config();
        self.metrics
            .feeds()
            .set_latency_threshold(cfg.slo.latency_threshold);
        let obj = objectives(&cfg.slo);
        let e = self.engine();
        for t in Transport::iter() {
            for slo in Slo::iter() {
                for (label, w) in WINDOWS {
                    self.metrics.slo_sli(t, slo, label, e.sli(now, t, slo, w));
                    self.metrics
                        .slo_burn(t, slo, label, e.burn_rate(now, t, slo, &obj, w));
                }
                self.metrics
                    .slo_budget(t, slo, e.budget_remaining(now, t, slo, &obj));
            }
        }
        for slo in Slo::iter() {
            self.metrics.slo_target(slo, obj.target(slo));
        }
    }

    /// What the audit log, the webhook and the rollback log line carry: per path, each SLI
    /// over `window` (the rollback window) and its budget left.
    pub fn snapshot(&self, now: Instant, window: Duration) -> Value {
        let obj = objectives(&self.live.config().slo);
        let e = self.engine();
        let mut out = serde_json::Map::new();
        for t in [Transport::New, Transport::Legacy] {
            let c = e.window(now, t, window);
            let mut slos = serde_json::Map::new();
            for slo in Slo::iter() {
                let sli = e.sli(now, t, slo, window);
                slos.insert(
                    slo.label().to_string(),
                    json!({
                        "sli": finite(sli),
                        "target": obj.target(slo),
                        "budget_remaining": finite(e.budget_remaining(now, t, slo, &obj)),
                    }),
                );
            }
            out.insert(
                t.label().to_string(),
                json!({ "window_s": window.as_secs(), "commands": c.commands, "slos": slos }),
            );
        }
        Value::Object(out)
    }

    /// Writes the state now.
    pub async fn persist(&self, now: Instant) {
        let bytes = {
            let p = self.engine().snapshot(now);
            match serde_json::to_vec(&p) {
                Ok(b) => b,
                Err(e) => {
                    error!(error = %e, "SLO state: cannot serialise");
                    return;
                }
            }
        };
        let dir = self.dir.clone();
        let res =
            tokio::task::spawn_blocking(move || state::write_atomic(&dir, SLO_FILE, &bytes)).await;
        match res {
            Ok(Ok(())) => debug!("SLO state written"),
            Ok(Err(e)) => {
                warn!(error = %e, "SLO state: write failed; the running figures are kept");
                self.metrics
                    .state_error(StateFile::Slo, StateProblem::Write);
            }
            Err(e) => {
                warn!(error = %e, "SLO state: write task failed");
                self.metrics
                    .state_error(StateFile::Slo, StateProblem::Write);
            }
        }
    }

    /// Ticks until `stop`, then folds, exports and persists one last time.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_persist = Instant::now() + self.live.config().slo.persist_interval;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
                _ = tokio::time::sleep_until(next_persist) => {}
            }
            let now = Instant::now();
            self.observe(now);
            self.export(now);
            if now >= next_persist {
                self.persist(now).await;
                next_persist = Instant::now() + self.live.config().slo.persist_interval;
            }
        }
        let now = Instant::now();
        self.observe(now);
        self.export(now);
        self.persist(now).await;
    }

    /// The wall clock the service stamps with.
    pub fn clock(&self) -> WallClock {
        self.clock
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The engine from its saved state, warning about a clock behind the one that saved it.
fn restore(
    p: Persisted,
    base: Instant,
    base_ms: u64,
    now_ms: u64,
) -> Result<Engine, crate::telemetry::slo::RestoreError> {
    if p.saved_unix_ms > now_ms.saturating_add(60_000) {
        // A clock behind the one that wrote the state (a Raspberry Pi before NTP): the newest
        // buckets are in this clock's future until it catches up.
        warn!(
            saved_unix_ms = p.saved_unix_ms,
            now_unix_ms = now_ms,
            "the SLO state was saved in this clock's future: is the system clock set? budgets are misdated until it is"
        );
    }
    Engine::restore(p, base, base_ms)
}

/// JSON has no NaN: an SLI over no events is `null`.
fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// Moves the state file aside when it parsed but does not fit (another ring shape).
async fn set_aside(dir: &Path, now_ms: u64) {
    let from = dir.join(SLO_FILE);
    let to = dir.join(format!("{SLO_FILE}.corrupt-{now_ms}"));
    let moved = tokio::task::spawn_blocking(move || std::fs::rename(from, to)).await;
    if !matches!(moved, Ok(Ok(()))) {
        warn!(dir = %dir.display(), "could not move the SLO state aside; it will be overwritten");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::telemetry::labels::CommandOutcome;

    fn live(dir: &Path) -> Arc<Live> {
        Live::new(
            Config::parse(&format!(
                "state_dir = {:?}\n[upstream.legacy]\naddress = \"127.0.0.1:1\"\n",
                dir.display().to_string()
            ))
            .expect("config"),
        )
    }

    const T0_MS: u64 = 1_796_083_200_000;

    async fn service(dir: &Path, metrics: &Arc<Metrics>) -> Arc<SloService> {
        let clock = WallClock::at(Instant::now(), T0_MS);
        SloService::start(live(dir), metrics.clone(), clock).await
    }

    fn budget(m: &Metrics) -> f64 {
        m.total(
            "tcp_comm_slo_error_budget_remaining",
            &[("transport", "new"), ("slo", "success")],
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_keeps_the_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Arc::new(Metrics::new(false).expect("metrics"));
        let s = service(dir.path(), &m).await;
        // 10 000 commands, 5 failed, target 99.9 %: half the budget spent, 0.5 left.
        for i in 0..10_000 {
            let outcome = if i < 5 {
                CommandOutcome::Timeout
            } else {
                CommandOutcome::Success
            };
            m.command(
                Transport::New,
                outcome,
                Some(Duration::from_millis(5)),
                None,
            );
        }
        let now = Instant::now();
        s.observe(now);
        s.export(now);
        assert!((budget(&m) - 0.5).abs() < 1e-9, "{}", budget(&m));
        s.persist(now).await;

        // A new process: new metrics, the same state_dir, a minute later.
        tokio::time::advance(Duration::from_secs(60)).await;
        let m2 = Arc::new(Metrics::new(false).expect("metrics"));
        let s2 = service(dir.path(), &m2).await;
        let now = Instant::now();
        s2.observe(now);
        s2.export(now);
        assert!((budget(&m2) - 0.5).abs() < 1e-9, "{}", budget(&m2));
        assert_eq!(m2.total("tcp_comm_state_errors_total", &[]), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_corrupt_state_file_is_set_aside_counted_and_the_engine_starts_fresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(SLO_FILE), b"{\"version\": 1, \"transp").expect("write");
        let m = Arc::new(Metrics::new(false).expect("metrics"));
        let s = service(dir.path(), &m).await;
        assert_eq!(
            m.total(
                "tcp_comm_state_errors_total",
                &[("file", "slo"), ("error", "corrupt")]
            ),
            1.0
        );
        let aside: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("slo.json.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        let now = Instant::now();
        s.export(now);
        assert_eq!(budget(&m), 1.0, "fresh: nothing spent");
        // And the next write is a good file again.
        s.persist(now).await;
        let text = std::fs::read_to_string(dir.path().join(SLO_FILE)).expect("state");
        let v: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(v["version"], STATE_VERSION);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_engines_state_file_is_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Arc::new(Metrics::new(false).expect("metrics"));
        let s = service(dir.path(), &m).await;
        s.persist(Instant::now()).await;
        let len = std::fs::metadata(dir.path().join(SLO_FILE))
            .expect("state")
            .len();
        // 9 rings of up to 720 buckets, none filled: headers only.
        assert!(len < 2048, "{len} bytes");
    }
}
