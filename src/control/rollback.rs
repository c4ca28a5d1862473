//! The rollback controller: every `rollback.check_interval` it judges the new path against
//! legacy over `rollback.window` ([`super::judge`]), and after `rollback.max_violations`
//! failed checks in a row it asks the control task to set the latch.
//!
//! Invariants:
//! - It only sends: the latch, its file, the audit entry, the re-homing and the webhook all
//!   follow from the one [`Control::Rollback`] event the control task applies.
//! - A streak is consecutive *conclusive* failures: a pass resets it, and so does an
//!   inconclusive check (too few commands), so thin traffic can never add up to a rollback.
//! - Every strike needs fresh evidence: a failed window counts only if the new path also had a
//!   bad event of a breached objective within the last `check_interval`. Windows overlap (10
//!   minutes judged every minute), so without this one short burst would fail every check
//!   that still holds it and roll back a path healthy for minutes.
//! - After the latch is cleared only what happened since counts: the failures that caused the
//!   rollback are still in the window, and must not roll the path back again.
//! - While the latch is set, or with `rollback.enabled = false`, nothing is judged (the new
//!   path has no traffic to judge) and the streak is zero.
//! - Reads its settings from the configuration in force at every check: `[rollback]` is
//!   reloadable.

use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::event::{Control, ControlTx, Origin, RollbackCause};
use super::judge::{self, Check, CheckResult, Rules, Verdict};
use super::live::Live;
use super::slo_task::SloService;
use crate::config::Config;
use crate::telemetry::labels::{Label, Transport};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::slo::Slo;

/// The judge's rules from the configuration in force.
pub fn rules(cfg: &Config) -> Rules {
    let r = &cfg.rollback;
    Rules {
        min_events: r.min_events,
        success_floor: r.success_floor,
        latency_floor: r.latency_floor,
        decode_error_max: cfg.slo.decode_error_max,
        queue_full_max: cfg.slo.queue_full_max,
        max_burn_rate: r.max_burn_rate,
        success_target: cfg.slo.success_target,
        compare_to_legacy: r.compare_to_legacy,
        confidence: r.confidence,
    }
}

/// The last check, for `status` and the tests.
#[derive(Debug, Clone)]
pub struct LastCheck {
    pub at: String,
    /// What the check counted as: the verdict's, or inconclusive for a failure with no fresh
    /// evidence.
    pub result: CheckResult,
    /// Why the result differs from the verdict's, when it does.
    pub note: Option<String>,
    pub verdict: Verdict,
    /// Consecutive failures including this check.
    pub streak: u32,
}

/// Shared view of the controller's last check.
pub type LastCheckCell = Arc<Mutex<Option<LastCheck>>>;

pub struct Controller {
    slo: Arc<SloService>,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    control: ControlTx,
    streak: u32,
    last: LastCheckCell,
}

/// Which counted finding names the rollback: the first one, in the judge's order.
fn cause(v: &Verdict) -> RollbackCause {
    let first = v.findings.iter().find(|f| f.counted);
    match first.map(|f| (f.slo, f.check)) {
        Some((_, Check::Burn)) => RollbackCause::BurnRate,
        Some((Slo::Latency, _)) => RollbackCause::Latency,
        Some((Slo::DecodeErrors, _)) => RollbackCause::DecodeErrors,
        Some((Slo::QueueFull, _)) => RollbackCause::QueueFull,
        _ => RollbackCause::Success,
    }
}

impl Controller {
    pub fn new(
        slo: Arc<SloService>,
        live: Arc<Live>,
        metrics: Arc<Metrics>,
        control: ControlTx,
    ) -> Controller {
        Controller {
            slo,
            live,
            metrics,
            control,
            streak: 0,
            last: Arc::default(),
        }
    }

    /// The cell the last check is kept in.
    pub fn last_check(&self) -> LastCheckCell {
        self.last.clone()
    }

    /// One check at `now`: the event to send, if this check completes a streak.
    pub fn check(&mut self, now: Instant) -> Option<Control> {
        let cfg = self.live.config();
        if self.live.latched() {
            self.streak = 0;
            return None;
        }
        if !cfg.rollback.enabled {
            self.streak = 0;
            return None;
        }
        self.slo.observe(now);
        let window = self.live.cleared_at().map_or(cfg.rollback.window, |t| {
            cfg.rollback.window.min(now.saturating_duration_since(t))
        });
        let new = self.slo.window(now, Transport::New, window);
        let legacy = self.slo.window(now, Transport::Legacy, window);
        let verdict = judge::judge(&new, &legacy, &rules(&cfg));
        let (result, note) = match verdict.result {
            CheckResult::Fail => {
                let recent = self
                    .slo
                    .window(now, Transport::New, cfg.rollback.check_interval);
                let fresh = verdict.findings.iter().filter(|f| f.counted).any(|f| {
                    let slo = if f.check == Check::Burn {
                        Slo::Success
                    } else {
                        f.slo
                    };
                    slo.bad_total(&recent).0 > 0.0
                });
                if fresh {
                    (CheckResult::Fail, None)
                } else {
                    (
                        CheckResult::Inconclusive,
                        Some(format!(
                            "the window fails, but the new path has had no such failure in the last {}: the breach is older",
                            humantime::format_duration(cfg.rollback.check_interval)
                        )),
                    )
                }
            }
            r => (r, None),
        };
        self.metrics.rollback_check(result);
        self.streak = match result {
            CheckResult::Fail => self.streak + 1,
            CheckResult::Pass | CheckResult::Inconclusive => 0,
        };
        let streak = self.streak;
        match result {
            CheckResult::Fail => warn!(
                streak,
                max_violations = cfg.rollback.max_violations,
                verdict = %verdict,
                "rollback check failed"
            ),
            CheckResult::Pass => info!(verdict = %verdict, "rollback check passed"),
            CheckResult::Inconclusive => {
                info!(verdict = %verdict, note = note.as_deref().unwrap_or(""), "rollback check inconclusive")
            }
        }
        let event = (streak >= cfg.rollback.max_violations).then(|| {
            let cause = cause(&verdict);
            let reason = format!(
                "{} failed rollback checks in a row over {}: {verdict}",
                streak,
                humantime::format_duration(window)
            );
            error!(
                cause = cause.label(),
                slo = %self.slo.snapshot(now, window),
                reason,
                "rolling back: every device goes to legacy"
            );
            self.streak = 0;
            Control::Rollback {
                origin: Origin::Controller,
                cause,
                reason,
            }
        });
        if let Ok(mut cell) = self.last.lock() {
            *cell = Some(LastCheck {
                at: self.slo.clock().rfc3339(now),
                result,
                note,
                verdict,
                streak,
            });
        }
        event
    }

    /// Checks every `rollback.check_interval` until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let every = self.live.config().rollback.check_interval;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Some(event) = self.check(Instant::now()) {
                if self.control.send(event).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::control::event::{self, ControlRx};
    use crate::control::judge::Comparison;
    use crate::telemetry::labels::CommandOutcome;
    use crate::telemetry::wallclock::WallClock;

    struct Rig {
        controller: Controller,
        metrics: Arc<Metrics>,
        live: Arc<Live>,
        _rx: ControlRx,
        _dir: tempfile::TempDir,
    }

    /// A controller over a 2 s window, 20 commands at the least, three strikes.
    async fn rig(extra: &str) -> Rig {
        rig_over("2s", extra).await
    }

    async fn rig_over(window: &str, extra: &str) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "state_dir = {:?}\n[upstream.legacy]\naddress = \"127.0.0.1:1\"\n\
             [rollback]\nwindow = \"{window}\"\ncheck_interval = \"1s\"\nmin_events = 20\nmax_violations = 3\n{extra}",
            dir.path().display().to_string()
        );
        let live = Live::new(Config::parse(&text).expect("config"));
        let metrics = Arc::new(Metrics::new(false).expect("metrics"));
        let clock = WallClock::at(Instant::now(), 1_796_083_200_000);
        let slo = SloService::start(live.clone(), metrics.clone(), clock).await;
        let (tx, rx) = event::channel();
        Rig {
            controller: Controller::new(slo, live.clone(), metrics.clone(), tx),
            metrics,
            live,
            _rx: rx,
            _dir: dir,
        }
    }

    /// `ok` answered and `failed` timed-out commands on `t`.
    fn feed(m: &Metrics, t: Transport, ok: u32, failed: u32) {
        for _ in 0..ok {
            m.command(
                t,
                CommandOutcome::Success,
                Some(Duration::from_millis(20)),
                None,
            );
        }
        for _ in 0..failed {
            m.command(t, CommandOutcome::Timeout, None, None);
        }
    }

    /// One window later (so windows never overlap), after `new` and `legacy` traffic.
    async fn round(r: &mut Rig, new: (u32, u32), legacy: (u32, u32)) -> Option<Control> {
        tokio::time::advance(Duration::from_secs(3)).await;
        feed(&r.metrics, Transport::New, new.0, new.1);
        feed(&r.metrics, Transport::Legacy, legacy.0, legacy.1);
        r.controller.check(Instant::now())
    }

    fn checks(r: &Rig, result: &str) -> f64 {
        r.metrics
            .total("tcp_comm_rollback_checks_total", &[("result", result)])
    }

    #[tokio::test(start_paused = true)]
    async fn three_failed_checks_in_a_row_ask_for_a_rollback_naming_the_success_floor() {
        let mut r = rig("").await;
        // New path: 70 of 100 answered; legacy: all 100.
        assert_eq!(round(&mut r, (70, 30), (100, 0)).await, None);
        assert_eq!(round(&mut r, (70, 30), (100, 0)).await, None);
        let Some(Control::Rollback {
            origin,
            cause,
            reason,
        }) = round(&mut r, (70, 30), (100, 0)).await
        else {
            panic!("no rollback after three failed checks");
        };
        assert_eq!(origin, Origin::Controller);
        assert_eq!(cause, RollbackCause::Success);
        assert!(
            reason.starts_with("3 failed rollback checks in a row over 2s"),
            "{reason}"
        );
        assert!(reason.contains("success 70.00% < floor 99.50%"), "{reason}");
        assert_eq!(checks(&r, "fail"), 3.0);
        let last = r.controller.last_check().lock().expect("lock").clone();
        let last = last.expect("a last check");
        assert_eq!(last.streak, 3);
        assert_eq!(last.verdict.compared, Comparison::Compared);
        // The streak starts again after asking.
        assert_eq!(round(&mut r, (70, 30), (100, 0)).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_passing_check_between_failures_restarts_the_streak() {
        let mut r = rig("").await;
        assert_eq!(round(&mut r, (70, 30), (100, 0)).await, None);
        assert_eq!(round(&mut r, (70, 30), (100, 0)).await, None);
        assert_eq!(round(&mut r, (100, 0), (100, 0)).await, None);
        assert_eq!(checks(&r, "pass"), 1.0);
        assert_eq!(round(&mut r, (70, 30), (100, 0)).await, None);
        assert_eq!(round(&mut r, (70, 30), (100, 0)).await, None);
        assert!(round(&mut r, (70, 30), (100, 0)).await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_failure_rate_on_legacy_is_not_the_canarys_fault() {
        let mut r = rig("").await;
        for _ in 0..10 {
            assert_eq!(round(&mut r, (70, 30), (700, 300)).await, None);
        }
        assert_eq!(checks(&r, "pass"), 10.0);
        assert_eq!(checks(&r, "fail"), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn too_few_commands_are_inconclusive_and_never_add_up_to_a_rollback() {
        let mut r = rig("").await;
        // 19 commands a window, every one failed: below min_events (20).
        for _ in 0..10 {
            assert_eq!(round(&mut r, (0, 19), (100, 0)).await, None);
        }
        assert_eq!(checks(&r, "inconclusive"), 10.0);
        // Thin traffic between failures breaks the streak too.
        assert_eq!(round(&mut r, (70, 30), (100, 0)).await, None);
        assert_eq!(round(&mut r, (70, 30), (100, 0)).await, None);
        assert_eq!(round(&mut r, (0, 5), (100, 0)).await, None);
        assert_eq!(round(&mut r, (70, 30), (100, 0)).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn with_legacy_too_small_to_compare_the_thresholds_alone_decide() {
        let mut r = rig("").await;
        // At 100 % canary legacy has nothing to compare with.
        assert_eq!(round(&mut r, (70, 30), (3, 0)).await, None);
        let last = r.controller.last_check().lock().expect("lock").clone();
        assert_eq!(
            last.expect("a check").verdict.compared,
            Comparison::ThresholdsOnly { legacy_commands: 3 }
        );
        assert_eq!(round(&mut r, (70, 30), (3, 0)).await, None);
        assert!(round(&mut r, (70, 30), (3, 0)).await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_judged_while_disabled() {
        let mut r = rig("enabled = false\n").await;
        for _ in 0..5 {
            assert_eq!(round(&mut r, (0, 100), (100, 0)).await, None);
        }
        assert_eq!(r.metrics.total("tcp_comm_rollback_checks_total", &[]), 0.0);
        assert!(!r.live.latched());
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_that_has_ended_is_one_strike_not_three() {
        // A 10 s window judged every second: a burst stays in it for ten checks.
        let mut r = rig_over("10s", "").await;
        let mut results = Vec::new();
        for k in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let failed = if k == 0 { 30 } else { 0 };
            feed(&r.metrics, Transport::New, 20, failed);
            feed(&r.metrics, Transport::Legacy, 50, 0);
            assert_eq!(r.controller.check(Instant::now()), None, "check {k}");
            let last = r.controller.last_check().lock().expect("lock").clone();
            results.push(last.expect("a check").result);
        }
        assert_eq!(results[0], CheckResult::Fail);
        assert!(
            results[1..].iter().all(|r| *r == CheckResult::Inconclusive),
            "{results:?}"
        );
        // A fault that goes on strikes every time.
        for k in 0..3 {
            tokio::time::advance(Duration::from_secs(1)).await;
            feed(&r.metrics, Transport::New, 20, 10);
            feed(&r.metrics, Transport::Legacy, 50, 0);
            let ev = r.controller.check(Instant::now());
            assert_eq!(ev.is_some(), k == 2, "check {k}: {ev:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_resume_only_what_happened_since_is_judged() {
        let mut r = rig_over("60s", "").await;
        for _ in 0..2 {
            assert_eq!(round(&mut r, (70, 30), (100, 0)).await, None);
        }
        assert!(round(&mut r, (70, 30), (100, 0)).await.is_some());
        r.live.set_latch(true);
        tokio::time::advance(Duration::from_secs(10)).await;
        r.live.set_latch(false);
        // The failures before the rollback are still in the 60 s window; the path since the
        // resume is healthy, and that is what is judged.
        for _ in 0..5 {
            assert_eq!(round(&mut r, (100, 0), (100, 0)).await, None);
        }
        assert_eq!(checks(&r, "fail"), 3.0);
        assert_eq!(checks(&r, "pass"), 5.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_latency_breach_names_latency() {
        let mut r = rig("").await;
        let slow = |m: &Metrics, n: u32| {
            for _ in 0..n {
                m.command(
                    Transport::New,
                    CommandOutcome::Success,
                    Some(Duration::from_secs(2)),
                    None,
                );
            }
        };
        for k in 0..3 {
            tokio::time::advance(Duration::from_secs(3)).await;
            // All answered, 40 of 100 slower than the 1.5 s threshold.
            feed(&r.metrics, Transport::New, 60, 0);
            slow(&r.metrics, 40);
            feed(&r.metrics, Transport::Legacy, 100, 0);
            let ev = r.controller.check(Instant::now());
            if k < 2 {
                assert_eq!(ev, None);
            } else {
                assert!(
                    matches!(
                        ev,
                        Some(Control::Rollback {
                            cause: RollbackCause::Latency,
                            ..
                        })
                    ),
                    "{ev:?}"
                );
            }
        }
    }
}
