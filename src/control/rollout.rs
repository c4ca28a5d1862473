//! Staged promotion: which of `rollout.stages` the configured percentage has reached, what
//! gates the next one, and the task that promotes by itself (`rollout.auto_promote`).
//!
//! A promotion is a change of the configuration file (the file stays the source of truth):
//! [`Control::Promote`] asks the control task to set `routing.canary_percent` to the next
//! stage in the file and reload it. A file that cannot be written leaves the promotion
//! *ready* — logged, audited once, `tcp_comm_rollout_promotion_ready` 1 — for a person to
//! make, instead of failing again every second.
//!
//! Invariants:
//! - Pure gates: [`gates`] takes the evidence and `now`; the task only gathers it.
//! - Never while latched: the latch means a person has to look first.
//! - The bake is timed from when the configured percentage last changed (the newest audit
//!   entry that set it, or the start), so a restart does not make a stage look older.
//! - At most one promotion in flight: the task asks again only once the percentage changed or
//!   the ready state was cleared.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::audit;
use super::event::{Control, ControlTx, Origin};
use super::judge::CheckResult;
use super::live::Live;
use super::rollback::LastCheckCell;
use super::slo_task::{objectives, SloService};
use crate::config::Rollout;
use crate::telemetry::labels::Transport;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::slo::Slo;

/// Where the configured percentage stands among the stages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// The highest stage at or below the percentage (`None`: before the first).
    pub stage: Option<f64>,
    /// The first stage above it (`None`: the last stage is reached).
    pub next: Option<f64>,
}

pub fn position(stages: &[f64], percent: f64) -> Position {
    Position {
        stage: stages
            .iter()
            .copied()
            .filter(|s| *s <= percent)
            .reduce(f64::max),
        next: stages.iter().copied().find(|s| *s > percent),
    }
}

/// One condition of the next promotion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    pub name: String,
    pub ok: bool,
    /// What was found, in words.
    pub detail: String,
}

/// What the gates look at.
#[derive(Debug, Clone)]
pub struct Evidence {
    pub latched: bool,
    /// How long the configured percentage has been in force.
    pub baked: Duration,
    /// The new path's success error budget left, 0-1.
    pub budget: f64,
    /// The rollback controller's last check, and its failure streak.
    pub last_check: Option<(CheckResult, u32)>,
    pub rollback_enabled: bool,
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// The gates of the next promotion, in the order a person checks them.
pub fn gates(cfg: &Rollout, ev: &Evidence) -> Vec<Gate> {
    let gate = |name: &str, ok: bool, detail: String| Gate {
        name: name.into(),
        ok,
        detail,
    };
    vec![
        gate(
            "latch",
            !ev.latched,
            if ev.latched {
                "the rollback latch is set: resume first".into()
            } else {
                "clear".into()
            },
        ),
        gate(
            "bake",
            ev.baked >= cfg.bake_time,
            format!(
                "in force for {} of the {} rollout.bake_time",
                human(ev.baked),
                human(cfg.bake_time)
            ),
        ),
        gate(
            "budget",
            ev.budget >= cfg.min_budget,
            format!(
                "{:.1}% of the new path's success budget left; rollout.min_budget is {:.1}%",
                ev.budget * 100.0,
                cfg.min_budget * 100.0
            ),
        ),
        match ev.last_check {
            _ if !ev.rollback_enabled => gate(
                "checks",
                false,
                "rollback.enabled = false: nothing judges the new path, so nothing vouches for the next stage".into(),
            ),
            Some((CheckResult::Pass, _)) => gate("checks", true, "the last rollback check passed".into()),
            Some((r, streak)) => gate(
                "checks",
                false,
                format!(
                    "the last rollback check was {} ({streak} failing in a row): it must pass",
                    <&str>::from(r)
                ),
            ),
            None => gate("checks", false, "no rollback check yet".into()),
        },
    ]
}

/// A promotion the file did not let the daemon make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    pub to: f64,
    pub at: String,
    pub why: String,
}

/// The rollout as the control plane tracks it.
#[derive(Debug, Clone)]
pub struct State {
    /// The configured percentage last seen, and since when.
    pub percent: f64,
    pub since: Instant,
    pub since_at: String,
    pub ready: Option<Ready>,
    /// A promotion asked for and not applied yet (its target).
    pub asked: Option<f64>,
}

pub type RolloutCell = Arc<Mutex<State>>;

/// The rollout as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct View {
    pub stages: Vec<f64>,
    pub position: Position,
    pub since: String,
    pub auto_promote: bool,
    pub gates: Vec<Gate>,
    pub ready: Option<Ready>,
}

fn lock(cell: &RolloutCell) -> std::sync::MutexGuard<'_, State> {
    cell.lock().unwrap_or_else(|p| p.into_inner())
}

/// The state at start: the percentage in force since the newest audit entry that set it to
/// what it is, or since now.
pub async fn start(live: &Live, slo: &SloService) -> RolloutCell {
    let cfg = live.config();
    let percent = cfg.routing.canary_percent;
    let now = Instant::now();
    let clock = slo.clock();
    let dir = cfg.state_dir.clone();
    let set_at = tokio::task::spawn_blocking(move || audit::read(&dir, None))
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|h| {
            h.entries.into_iter().rev().find_map(|e| {
                e.changes
                    .iter()
                    .find(|c| c.key == "routing.canary_percent")
                    .and_then(|c| c.new.as_f64())
                    .filter(|p| *p == percent)
                    .map(|_| e.time.clone())
            })
        });
    let (since, since_at) = match set_at.as_deref().and_then(|t| clock.instant_of(t, now)) {
        Some(i) => (i, set_at.unwrap_or_default()),
        None => (now, clock.rfc3339(now)),
    };
    Arc::new(Mutex::new(State {
        percent,
        since,
        since_at,
        ready: None,
        asked: None,
    }))
}

/// Gathers the evidence and shows the rollout.
pub struct Rollouts {
    pub live: Arc<Live>,
    pub slo: Arc<SloService>,
    pub last_check: LastCheckCell,
    pub cell: RolloutCell,
    pub metrics: Arc<Metrics>,
}

impl Rollouts {
    /// Notes a change of the configured percentage (a new stage starts baking).
    fn observe(&self, now: Instant) -> State {
        let percent = self.live.config().routing.canary_percent;
        let mut s = lock(&self.cell);
        if s.percent != percent {
            s.percent = percent;
            s.since = now;
            s.since_at = self.slo.clock().rfc3339(now);
            s.asked = None;
            if s.ready.as_ref().is_some_and(|r| r.to <= percent) {
                s.ready = None;
            }
            self.metrics.set_promotion_ready(s.ready.is_some());
        }
        s.clone()
    }

    pub fn evidence(&self, now: Instant) -> Evidence {
        let s = self.observe(now);
        let cfg = self.live.config();
        let obj = objectives(&cfg.slo);
        self.slo.observe(now);
        Evidence {
            latched: self.live.latched(),
            baked: now.saturating_duration_since(s.since),
            budget: self.slo.budget(now, Transport::New, Slo::Success, &obj),
            last_check: self
                .last_check
                .lock()
                .ok()
                .and_then(|c| c.as_ref().map(|c| (c.result, c.streak))),
            rollback_enabled: cfg.rollback.enabled,
        }
    }

    pub fn view(&self, now: Instant) -> View {
        let ev = self.evidence(now);
        let cfg = self.live.config();
        let s = lock(&self.cell).clone();
        View {
            stages: cfg.rollout.stages.clone(),
            position: position(&cfg.rollout.stages, s.percent),
            since: s.since_at,
            auto_promote: cfg.rollout.auto_promote,
            gates: gates(&cfg.rollout, &ev),
            ready: s.ready,
        }
    }

    /// What a promotion asked now would do: the target, or why not (`force` skips every gate
    /// but the latch).
    pub fn next(&self, now: Instant, force: bool) -> Result<f64, String> {
        let v = self.view(now);
        let Some(to) = v.position.next else {
            return Err(format!(
                "already at the last stage ({}%)",
                v.position.stage.unwrap_or(0.0)
            ));
        };
        let failing: Vec<String> = v
            .gates
            .iter()
            .filter(|g| !g.ok && (!force || g.name == "latch"))
            .map(|g| format!("{}: {}", g.name, g.detail))
            .collect();
        if failing.is_empty() {
            Ok(to)
        } else {
            Err(format!("not promoting to {to}%: {}", failing.join("; ")))
        }
    }

    /// Marks `to` as asked for, so the task does not ask twice.
    pub fn asked(&self, to: f64) {
        lock(&self.cell).asked = Some(to);
    }
}

/// The automatic promoter: once a second, with `rollout.auto_promote`, promotes when every
/// gate is met.
pub async fn run(r: Arc<Rollouts>, control: ControlTx, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let auto = r.live.config().rollout.auto_promote;
        let state = r.observe(now);
        let stages = r.live.config().rollout.stages.clone();
        r.metrics
            .set_rollout_stage(position(&stages, state.percent).stage.unwrap_or(0.0));
        if !auto || state.asked.is_some() || state.ready.is_some() {
            continue;
        }
        if let Ok(to) = r.next(now, false) {
            info!(from = state.percent, to, "every gate met: promoting");
            r.asked(to);
            let reason = format!(
                "automatic: {}% baked {}, every gate met",
                state.percent,
                human(now.saturating_duration_since(state.since))
            );
            if control
                .send(Control::Promote {
                    origin: Origin::Controller,
                    to,
                    reason,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAGES: [f64; 6] = [10.0, 25.0, 50.0, 75.0, 90.0, 100.0];

    fn cfg() -> Rollout {
        Rollout {
            stages: STAGES.to_vec(),
            bake_time: Duration::from_secs(3600),
            min_budget: 0.5,
            auto_promote: true,
        }
    }

    fn healthy() -> Evidence {
        Evidence {
            latched: false,
            baked: Duration::from_secs(3600),
            budget: 0.5,
            last_check: Some((CheckResult::Pass, 0)),
            rollback_enabled: true,
        }
    }

    #[test]
    fn a_percentage_sits_at_the_highest_stage_it_reached_and_the_next_is_above_it() {
        let at = |p| {
            let x = position(&STAGES, p);
            (x.stage, x.next)
        };
        assert_eq!(at(0.0), (None, Some(10.0)));
        assert_eq!(at(10.0), (Some(10.0), Some(25.0)));
        assert_eq!(at(12.5), (Some(10.0), Some(25.0)));
        assert_eq!(at(99.99), (Some(90.0), Some(100.0)));
        assert_eq!(at(100.0), (Some(100.0), None));
    }

    #[test]
    fn every_gate_passes_exactly_at_its_limit() {
        let g = gates(&cfg(), &healthy());
        assert!(g.iter().all(|g| g.ok), "{g:?}");
        assert_eq!(
            g.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
            ["latch", "bake", "budget", "checks"]
        );
    }

    #[test]
    fn each_gate_fails_on_its_own_evidence_and_says_why() {
        let failing = |ev: Evidence| -> Vec<(String, String)> {
            gates(&cfg(), &ev)
                .into_iter()
                .filter(|g| !g.ok)
                .map(|g| (g.name, g.detail))
                .collect()
        };
        let f = failing(Evidence {
            latched: true,
            ..healthy()
        });
        assert_eq!(f[0].0, "latch");
        let f = failing(Evidence {
            baked: Duration::from_secs(3599),
            ..healthy()
        });
        assert_eq!(
            f,
            [(
                "bake".to_string(),
                "in force for 59m 59s of the 1h rollout.bake_time".to_string()
            )]
        );
        let f = failing(Evidence {
            budget: 0.499,
            ..healthy()
        });
        assert_eq!(f[0].0, "budget");
        assert!(
            f[0].1
                .starts_with("49.9% of the new path's success budget left"),
            "{f:?}"
        );
        for check in [
            Some((CheckResult::Inconclusive, 0)),
            Some((CheckResult::Fail, 1)),
            None,
        ] {
            let f = failing(Evidence {
                last_check: check,
                ..healthy()
            });
            assert_eq!(f.len(), 1, "{check:?}");
            assert_eq!(f[0].0, "checks");
        }
        let f = failing(Evidence {
            rollback_enabled: false,
            ..healthy()
        });
        assert_eq!(f[0].0, "checks");
    }
}
