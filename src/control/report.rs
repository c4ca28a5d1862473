//! `cync-gateway report`: the rollout so far, from the audit log (when each percentage came
//! into force, who set it, every rollback and resume) and the SLO state (what the new path did
//! during each stage), and at 100 % the design's validation period: 30 days with the SLOs met.
//!
//! Invariants:
//! - Pure: [`build`] takes the audit entries, a way to count the new path's commands over a
//!   span of time, and `now`; the daemon gathers them ([`super::admin::Admin::report`]).
//! - Only what the audit log proves is reported: a stage whose start predates the log is shown
//!   from the log's first entry, and said so.
//! - Counts older than the SLO state's reach (30 days, at 1-hour resolution past 6 hours) are
//!   as coarse as that state; the budget used by a stage is its failed commands over what the
//!   30-day success budget allows for the commands of the period.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::audit::Entry;

/// The validation period at 100 % (design: 30 days with the SLOs met).
pub const VALIDATION: Duration = Duration::from_secs(30 * 86_400);

/// One rollback or resume during a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time: String,
    pub action: String,
    pub actor: String,
    pub reason: String,
}

/// One stage: a configured percentage and how it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub percent: f64,
    /// Empty for the percentage in force before the audit log's first change.
    pub started: String,
    /// Who set it (`file`, `admin`, `controller`, …); `None` for the percentage in force
    /// before the audit log's first change.
    pub set_by: Option<String>,
    /// Until the next stage, or until now for the current one (`None`: it started before the
    /// log).
    pub baked_s: Option<f64>,
    pub current: bool,
    pub new_commands: u64,
    pub new_failed: u64,
    /// Share of the 30-day success budget these failures used, 0-1 (`None`: no commands).
    pub budget_used: Option<f64>,
    pub events: Vec<Event>,
}

/// The validation period at 100 %.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// Since when 100 % has been in force (`None`: not at 100 %).
    pub since: Option<String>,
    pub days_done: f64,
    pub days_needed: f64,
    /// At 100 %, no rollback since, and the success budget not spent.
    pub holding: bool,
    pub verdict: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub stages: Vec<StageReport>,
    pub validation: Validation,
    pub latched: bool,
    /// The new path's success budget left now, 0-1.
    pub budget_left: f64,
}

/// The new path's (commands, failed) between two ages (seconds before now, older first).
pub trait Counter {
    fn between(&self, from_age: Duration, to_age: Duration) -> (u64, u64);
    /// The age of an RFC 3339 stamp (`None` when it does not parse).
    fn age(&self, stamp: &str) -> Option<Duration>;
}

/// Builds the report. `entries` oldest first; `current` the configured percentage now;
/// `allowed` the success budget's allowed failure ratio (1 − target); `period_commands` the
/// new path's commands over the budget's period.
pub fn build(
    entries: &[Entry],
    current: f64,
    latched: bool,
    budget_left: f64,
    allowed: f64,
    period_commands: u64,
    counter: &dyn Counter,
) -> Report {
    struct Open {
        percent: f64,
        started: String,
        set_by: Option<String>,
        events: Vec<Event>,
    }
    let percent_change = |e: &Entry| {
        e.changes
            .iter()
            .find(|c| c.key == "routing.canary_percent")
            .and_then(|c| Some((c.old.as_f64()?, c.new.as_f64()?)))
    };
    let first_old = entries.iter().find_map(percent_change).map(|(old, _)| old);
    // In force since before the log: no start to show, and counted over all the SLO state
    // holds before the first change.
    let mut open = Open {
        percent: first_old.unwrap_or(current),
        started: String::new(),
        set_by: None,
        events: Vec::new(),
    };
    let mut closed: Vec<(Open, String)> = Vec::new();
    for e in entries {
        // A promotion that was only ready changed nothing.
        if e.action != "promotion_ready" {
            if let Some((_, new)) = percent_change(e) {
                let next = Open {
                    percent: new,
                    started: e.time.clone(),
                    set_by: Some(e.actor.clone()),
                    events: Vec::new(),
                };
                closed.push((std::mem::replace(&mut open, next), e.time.clone()));
                continue;
            }
        }
        if e.action == "rollback" || e.action == "resume" {
            open.events.push(Event {
                time: e.time.clone(),
                action: e.action.clone(),
                actor: e.actor.clone(),
                reason: e.reason.clone(),
            });
        }
    }
    let stage = |o: Open, end: Option<&str>| {
        let from = counter.age(&o.started).unwrap_or(VALIDATION);
        let to = end.and_then(|t| counter.age(t)).unwrap_or_default();
        let (n, failed) = counter.between(from, to);
        let budget_used = (period_commands > 0 && allowed > 0.0)
            .then(|| failed as f64 / (allowed * period_commands as f64));
        let known = !o.started.is_empty();
        StageReport {
            percent: o.percent,
            started: o.started,
            set_by: o.set_by,
            baked_s: known.then(|| from.saturating_sub(to).as_secs_f64()),
            current: end.is_none(),
            new_commands: n,
            new_failed: failed,
            budget_used,
            events: o.events,
        }
    };
    let mut stages: Vec<StageReport> = closed
        .into_iter()
        .map(|(o, end)| stage(o, Some(&end)))
        .collect();
    stages.push(stage(open, None));
    let days = |s: f64| s / 86_400.0;
    let needed = days(VALIDATION.as_secs_f64());
    let validation = match stages.last() {
        Some(s) if s.current && s.percent >= 100.0 => {
            let rolled_back = s.events.iter().any(|e| e.action == "rollback");
            let holding = !latched && !rolled_back && budget_left > 0.0;
            let done = days(s.baked_s.unwrap_or(0.0));
            let verdict = match (holding, done >= needed) {
                (true, true) => format!("VALIDATED: {done:.1} days at 100 % with the SLOs met"),
                (true, false) => format!(
                    "holding: day {done:.1} of {needed:.0} at 100 % with the SLOs met so far"
                ),
                (false, _) => format!(
                    "not holding: {} — the {needed:.0} days start again once it holds",
                    if latched || rolled_back {
                        "a rollback happened at 100 %"
                    } else {
                        "the success budget is spent"
                    }
                ),
            };
            Validation {
                since: Some(s.started.clone()),
                days_done: done,
                days_needed: needed,
                holding,
                verdict,
            }
        }
        _ => Validation {
            since: None,
            days_done: 0.0,
            days_needed: needed,
            holding: false,
            verdict: format!("not started: it needs {needed:.0} days at 100 % with the SLOs met"),
        },
    };
    Report {
        stages,
        validation,
        latched,
        budget_left,
    }
}

/// The new path's counts from the daemon's SLO state.
struct SloCounter<'a> {
    slo: &'a super::slo_task::SloService,
    now: tokio::time::Instant,
}

impl Counter for SloCounter<'_> {
    fn between(&self, from_age: Duration, to_age: Duration) -> (u64, u64) {
        use crate::telemetry::labels::Transport;
        let t = Transport::New;
        let span = self.slo.window(self.now, t, from_age) - self.slo.window(self.now, t, to_age);
        (span.commands, span.commands.saturating_sub(span.successes))
    }

    fn age(&self, stamp: &str) -> Option<Duration> {
        let at = self.slo.clock().instant_of(stamp, self.now)?;
        Some(self.now.saturating_duration_since(at))
    }
}

impl super::admin::Admin {
    /// The rollout report now.
    pub async fn report(&self) -> Result<Report, String> {
        use crate::telemetry::labels::Transport;
        use crate::telemetry::slo::Slo;
        let cfg = self.live.config();
        let dir = cfg.state_dir.clone();
        let history = tokio::task::spawn_blocking(move || super::audit::read(&dir, None))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let now = tokio::time::Instant::now();
        self.slo.observe(now);
        let obj = super::slo_task::objectives(&cfg.slo);
        let counter = SloCounter {
            slo: &self.slo,
            now,
        };
        let period = self.slo.window(now, Transport::New, VALIDATION).commands;
        Ok(build(
            &history.entries,
            cfg.routing.canary_percent,
            self.live.latched(),
            self.slo.budget(now, Transport::New, Slo::Success, &obj),
            1.0 - cfg.slo.success_target,
            period,
            &counter,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::audit::Change;

    /// Ages from stamps `…T00:MM:00Z` (minutes into the hour) with "now" at minute 60; every
    /// minute of the new path had 10 commands and, from minute 30 on, 2 failures.
    struct Minutes;

    fn minute(stamp: &str) -> Option<u64> {
        stamp.get(14..16)?.parse().ok()
    }

    impl Counter for Minutes {
        fn age(&self, stamp: &str) -> Option<Duration> {
            Some(Duration::from_secs((60 - minute(stamp)?) * 60))
        }
        fn between(&self, from_age: Duration, to_age: Duration) -> (u64, u64) {
            let m = |age: Duration| 60u64.saturating_sub(age.as_secs() / 60);
            let (a, b) = (m(from_age), m(to_age));
            let failed = (a..b).filter(|m| *m >= 30).count() as u64 * 2;
            ((b - a) * 10, failed)
        }
    }

    fn entry(
        min: u32,
        actor: &str,
        action: &str,
        change: Option<(f64, f64)>,
        reason: &str,
    ) -> Entry {
        Entry {
            time: format!("2026-12-01T00:{min:02}:00.000Z"),
            actor: actor.into(),
            action: action.into(),
            changes: change
                .map(|(old, new)| {
                    vec![Change {
                        key: "routing.canary_percent".into(),
                        old: serde_json::json!(old),
                        new: serde_json::json!(new),
                    }]
                })
                .unwrap_or_default(),
            reason: reason.into(),
            slo: serde_json::Value::Null,
        }
    }

    #[test]
    fn stages_come_from_the_percentage_changes_with_their_bake_counts_and_rollbacks() {
        let log = [
            entry(0, "file", "reload", Some((0.0, 10.0)), ""),
            entry(
                20,
                "controller",
                "promote",
                Some((10.0, 25.0)),
                "every gate met",
            ),
            entry(40, "controller", "rollback", None, "3 failed checks"),
            entry(45, "admin", "resume", None, "fixed"),
            entry(50, "admin", "promote", Some((25.0, 50.0)), "forced"),
        ];
        // 10 % of a 0.1 % budget over 6,000 commands allows 6 failures.
        let r = build(&log, 50.0, false, 0.5, 0.001, 6_000, &Minutes);
        type Row<'a> = (f64, Option<&'a str>, Option<f64>, u64, u64);
        let got: Vec<Row> = r
            .stages
            .iter()
            .map(|s| {
                (
                    s.percent,
                    s.set_by.as_deref(),
                    s.baked_s,
                    s.new_commands,
                    s.new_failed,
                )
            })
            .collect();
        // The 0 % before the log's first change comes first, with no start and no bake.
        assert_eq!(r.stages[0].percent, 0.0);
        assert_eq!(r.stages[0].set_by, None);
        assert_eq!(r.stages[0].baked_s, None);
        assert_eq!(
            got[1..],
            [
                (10.0, Some("file"), Some(1200.0), 200, 0),
                (25.0, Some("controller"), Some(1800.0), 300, 40),
                (50.0, Some("admin"), Some(600.0), 100, 20),
            ]
        );
        assert_eq!(r.stages[2].events.len(), 2);
        assert_eq!(r.stages[2].events[0].reason, "3 failed checks");
        let used = r.stages[2].budget_used.expect("commands");
        assert!((used - 40.0 / 6.0).abs() < 1e-9, "{used}");
        assert!(r.stages[3].current && !r.stages[2].current);
        assert!(
            r.validation.verdict.starts_with("not started"),
            "{:?}",
            r.validation
        );
    }

    #[test]
    fn at_100_percent_the_validation_period_holds_only_without_rollback_and_with_budget() {
        let log = [entry(30, "admin", "promote", Some((90.0, 100.0)), "")];
        let r = build(&log, 100.0, false, 0.4, 0.001, 1_000, &Minutes);
        assert!(r.validation.holding);
        assert!(
            r.validation.verdict.starts_with("holding: day 0.0 of 30"),
            "{:?}",
            r.validation
        );
        let spent = build(&log, 100.0, false, 0.0, 0.001, 1_000, &Minutes);
        assert!(!spent.validation.holding);
        assert!(spent.validation.verdict.contains("budget is spent"));
        let rolled = [
            entry(30, "admin", "promote", Some((90.0, 100.0)), ""),
            entry(40, "controller", "rollback", None, "x"),
        ];
        let r = build(&rolled, 100.0, true, 0.4, 0.001, 1_000, &Minutes);
        assert!(!r.validation.holding);
        assert!(r
            .validation
            .verdict
            .contains("a rollback happened at 100 %"));
    }

    #[test]
    fn a_ready_promotion_that_was_not_written_is_no_stage() {
        let log = [
            entry(0, "file", "reload", Some((0.0, 10.0)), ""),
            entry(
                30,
                "controller",
                "promotion_ready",
                Some((10.0, 25.0)),
                "not written",
            ),
        ];
        let r = build(&log, 10.0, false, 1.0, 0.001, 0, &Minutes);
        let percents: Vec<f64> = r.stages.iter().map(|s| s.percent).collect();
        assert_eq!(percents, [0.0, 10.0], "{:?}", r.stages);
        assert_eq!(r.stages[1].budget_used, None);
    }
}
