//! The rollback judge: over one window, is the new path worse than legacy?
//!
//! It owns the decision rules ([`Rules`]), the significance tests ([`worse`] for proportions,
//! [`rate_worse`] for rates such as churn) and the answer ([`Verdict`]: pass, fail or
//! inconclusive, with one [`Finding`] per threshold the new path breached).
//!
//! Invariants:
//! - Pure: no I/O, no clock, no state. The same counts and rules give the same verdict, so the
//!   controller can log, replay and test every decision.
//! - Too little new-path traffic (`commands < min_events`) is [`CheckResult::Inconclusive`],
//!   never a pass or a fail.
//! - When comparing to legacy (legacy has `min_events` commands too), a breach counts only when
//!   the new path is *significantly* worse than legacy on that objective, so a bad add-on or a
//!   bad network, which hurts both paths alike, never rolls the new path back — unless
//!   legacy's sample is too small for any test to show a difference (even a legacy with no bad
//!   events would not be significant): then the threshold alone decides that finding, so a
//!   little legacy traffic cannot shield a failing canary.
//! - When legacy cannot be compared (too little legacy traffic, e.g. a 100 % canary, or the
//!   comparison is switched off), every breach counts: the thresholds alone decide.
//! - The tests are the textbook ones, from `statrs` (normal, binomial and hypergeometric
//!   distributions); nothing is hand-rolled. Small samples use Fisher's exact test instead of
//!   the normal approximation, and [`Test::method`] says which one was used.

use std::fmt;

use serde::Serialize;
use statrs::distribution::{Binomial, ContinuousCDF, DiscreteCDF, Hypergeometric, Normal};

use crate::telemetry::slo::{Counts, Slo};

/// Below this expected count of bad or good events on either side, the normal approximation
/// is not trusted and Fisher's exact test is used (the usual rule of thumb).
const MIN_EXPECTED: f64 = 5.0;

/// What the judge checks and how sure it must be. Defaults are the shipped policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rules {
    /// Fewer new-path commands than this in the window is inconclusive; legacy needs as many
    /// to be compared against (default 100).
    pub min_events: u64,
    /// Success SLI (answered commands / commands) below this is a breach (default 0.995).
    pub success_floor: f64,
    /// Share of commands answered within the latency threshold (one unanswered when it passes is
    /// late at once) below this is a breach
    /// (default 0.99).
    pub latency_floor: f64,
    /// Decode-error ratio (decode errors / frames) above this is a breach (default 0.001).
    pub decode_error_max: f64,
    /// Queue-full ratio (frames that met a full queue / frames) above this is a breach
    /// (default 0.01).
    pub queue_full_max: f64,
    /// Success burn rate over the window above this is a breach (default 14.4: a 30-day budget
    /// gone in about two days).
    pub max_burn_rate: f64,
    /// The success objective the burn rate is computed against (default 0.999).
    pub success_target: f64,
    /// Count a breach only when the new path is significantly worse than legacy (default true).
    pub compare_to_legacy: bool,
    /// Confidence of the comparison: worse when the p-value is below `1 − confidence`
    /// (default 0.99).
    pub confidence: f64,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            min_events: 100,
            success_floor: 0.995,
            latency_floor: 0.99,
            decode_error_max: 0.001,
            queue_full_max: 0.01,
            max_burn_rate: 14.4,
            success_target: 0.999,
            compare_to_legacy: true,
            confidence: 0.99,
        }
    }
}

/// Which significance test produced a [`Test`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// One-sided two-proportion z-test with pooled variance (large samples).
    ZTest,
    /// Fisher's exact one-sided test (hypergeometric tail), for small expected counts.
    Fisher,
    /// Conditional exact test of two Poisson rates: given the total number of events, the
    /// new path's share is binomial under H0 ([`rate_worse`]).
    Binomial,
}

/// The outcome of one one-sided test of "the new path is worse".
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Test {
    /// The z statistic (new minus legacy, in standard errors; for [`Method::Fisher`] and
    /// [`Method::Binomial`] the normal-approximation z, for information only). 0 when the test
    /// could not be run.
    pub z: f64,
    /// One-sided p-value of H0 "the new path is not worse", from the test named by `method`.
    pub p_value: f64,
    /// `p_value < 1 − confidence`.
    pub significant: bool,
    /// The test that produced `p_value`.
    pub method: Method,
}

impl Test {
    /// The answer when there is nothing to test (no events, no exposure, no variance).
    fn none(method: Method) -> Test {
        Test {
            z: 0.0,
            p_value: 1.0,
            significant: false,
            method,
        }
    }

    fn new(z: f64, p_value: f64, confidence: f64, method: Method) -> Test {
        let p_value = if p_value.is_nan() {
            1.0
        } else {
            p_value.clamp(0.0, 1.0)
        };
        Test {
            z: if z.is_finite() { z } else { 0.0 },
            p_value,
            significant: p_value < 1.0 - confidence,
            method,
        }
    }
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.method {
            Method::ZTest => write!(f, "z={:.1}, p={}", self.z, fmt_p(self.p_value)),
            Method::Fisher => write!(f, "Fisher exact p={}", fmt_p(self.p_value)),
            Method::Binomial => write!(f, "exact rate p={}", fmt_p(self.p_value)),
        }
    }
}

/// A p-value as a human reads it: two decimals down to 0.01, then significant digits.
fn fmt_p(p: f64) -> String {
    if p >= 0.01 {
        format!("{p:.2}")
    } else if p >= 0.001 {
        format!("{p:.4}")
    } else if p > 0.0 {
        format!("{p:.0e}")
    } else {
        "0".to_string()
    }
}

/// `P(X ≥ k)` for a discrete distribution whose `sf(x)` is `P(X > x)`.
fn at_least(sf: impl Fn(u64) -> f64, k: u64) -> f64 {
    if k == 0 {
        1.0
    } else {
        sf(k - 1)
    }
}

/// Is the new path's bad-event proportion significantly higher than legacy's?
///
/// `new` and `legacy` are `(bad, total)`. One-sided, H1: `p_new > p_legacy`, with pooled
/// variance; when either side's expected bad or good count under H0 is below 5, Fisher's exact
/// test is used instead (see [`Test::method`]). Significant when `p_value < 1 − confidence`.
/// Not significant (z 0, p 1) when either total is 0 or the pooled proportion is 0 or 1.
pub fn worse(new: (u64, u64), legacy: (u64, u64), confidence: f64) -> Test {
    let (n1, n2) = (new.1, legacy.1);
    // A bad count above its total cannot come from the counters; clamp rather than panic.
    let (a, c) = (new.0.min(n1), legacy.0.min(n2));
    if n1 == 0 || n2 == 0 {
        return Test::none(Method::ZTest);
    }
    let (n1f, n2f) = (n1 as f64, n2 as f64);
    let pooled = (a + c) as f64 / (n1f + n2f);
    if pooled <= 0.0 || pooled >= 1.0 {
        return Test::none(Method::ZTest);
    }
    let se = (pooled * (1.0 - pooled) * (1.0 / n1f + 1.0 / n2f)).sqrt();
    let z = (a as f64 / n1f - c as f64 / n2f) / se;

    let small = [n1f, n2f]
        .iter()
        .any(|&n| n * pooled < MIN_EXPECTED || n * (1.0 - pooled) < MIN_EXPECTED);
    if small {
        // The new path's bad count, given the margins, is hypergeometric under H0:
        // population n1 + n2, K = all bad events, n1 draws. p = P(X ≥ a).
        return match Hypergeometric::new(n1 + n2, a + c, n1) {
            Ok(h) => Test::new(z, at_least(|x| h.sf(x), a), confidence, Method::Fisher),
            Err(_) => Test::none(Method::Fisher),
        };
    }
    let p = Normal::standard().sf(z);
    Test::new(z, p, confidence, Method::ZTest)
}

/// Is the new path's event rate (events per unit of exposure, e.g. churn closes per
/// device-hour) significantly higher than legacy's?
///
/// `new` and `legacy` are `(events, exposure)`. Conditional exact test: given
/// `n = n_new + n_legacy`, under H0 `n_new ~ Binomial(n, e_new / (e_new + e_legacy))`, and
/// `p = P(X ≥ n_new)`. Significant when `p < 1 − confidence`. Not significant when either
/// exposure is not positive or there are no events at all.
pub fn rate_worse(new: (u64, f64), legacy: (u64, f64), confidence: f64) -> Test {
    let (k, e1) = new;
    let (c, e2) = legacy;
    let n = k + c;
    let usable = |e: f64| e.is_finite() && e > 0.0;
    if !usable(e1) || !usable(e2) || n == 0 {
        return Test::none(Method::Binomial);
    }
    let share = e1 / (e1 + e2);
    let Ok(b) = Binomial::new(share, n) else {
        return Test::none(Method::Binomial);
    };
    let nf = n as f64;
    let z = (k as f64 - nf * share) / (nf * share * (1.0 - share)).sqrt();
    Test::new(z, at_least(|x| b.sf(x), k), confidence, Method::Binomial)
}

/// A check's outcome; the `result` label of `tcp_comm_rollback_checks_total`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, strum::IntoStaticStr, strum::EnumIter,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum CheckResult {
    /// Enough traffic and no counted breach.
    Pass,
    /// At least one counted breach: the new path should be rolled back.
    Fail,
    /// Too little new-path traffic to say.
    Inconclusive,
}

/// Which rule a [`Finding`] breached; [`Slo`] alone cannot tell the success floor from the
/// success burn rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// An SLI (a share of good events) below its floor.
    Floor,
    /// A ratio of bad events above its maximum.
    Max,
    /// The burn rate of the SLO's error budget above its maximum.
    Burn,
}

/// One threshold the new path breached in the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// The objective breached.
    pub slo: Slo,
    /// The rule breached: floor, maximum or burn rate.
    pub check: Check,
    /// The new path's value: an SLI for [`Check::Floor`], a bad ratio for [`Check::Max`], a burn
    /// rate for [`Check::Burn`].
    pub value: f64,
    /// The rule's limit, in the same unit as `value`.
    pub limit: f64,
    /// The same value on the legacy path, when legacy had events for it.
    pub legacy_value: Option<f64>,
    /// The comparison with legacy, when the judge compared.
    pub test: Option<Test>,
    /// Whether this breach counts as a violation (makes the verdict a fail).
    pub counted: bool,
    /// Compared, but legacy's sample is too small for any test to show the new path worse:
    /// even a legacy with no bad events at all would not make the difference significant.
    /// The threshold alone decides this finding.
    pub legacy_too_small: bool,
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

impl Finding {
    fn show(&self, x: f64) -> String {
        match self.check {
            Check::Burn => format!("{x:.1}x"),
            Check::Floor | Check::Max => pct(x),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slo: &'static str = self.slo.into();
        let (what, op, limit) = match self.check {
            Check::Floor => ("", "<", "floor"),
            Check::Max => (" ratio", ">", "max"),
            Check::Burn => (" burn", ">", "max"),
        };
        write!(
            f,
            "{slo}{what} {} {op} {limit} {}",
            self.show(self.value),
            self.show(self.limit)
        )?;
        let legacy = self
            .legacy_value
            .map(|v| format!("legacy {}", self.show(v)));
        match (&legacy, &self.test) {
            (Some(l), Some(t)) if t.significant => write!(f, " ({l}, worse: {t})")?,
            (None, Some(t)) if t.significant => write!(f, " (worse: {t})")?,
            (Some(l), None) if self.counted => write!(f, " ({l}, not compared)")?,
            (Some(l), _) => write!(f, " ({l})")?,
            (None, _) => {}
        }
        match (&self.test, self.counted) {
            (Some(_), true) if self.legacy_too_small => write!(
                f,
                " — counted: legacy's sample is too small to show any difference, the threshold decides"
            ),
            (_, true) => write!(f, " — counted"),
            (Some(t), false) => write!(
                f,
                " — not counted: not significantly worse than legacy ({t})"
            ),
            (None, false) => write!(f, " — not counted"),
        }
    }
}

/// Whether the verdict compared the new path with legacy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    /// Legacy had enough commands: a breach counted only when significantly worse.
    Compared,
    /// Legacy had too few commands to compare (e.g. at 100 % canary): every breach counted.
    ThresholdsOnly {
        /// Legacy's commands in the window.
        legacy_commands: u64,
    },
    /// Comparison switched off (`compare_to_legacy = false`): every breach counted.
    Disabled,
}

/// The judge's answer for one window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Pass, fail or inconclusive.
    pub result: CheckResult,
    /// Every breach, counted or not; empty when inconclusive.
    pub findings: Vec<Finding>,
    /// Whether breaches were weighed against legacy.
    pub compared: Comparison,
    /// New-path commands in the window.
    pub new_commands: u64,
    /// Legacy commands in the window.
    pub legacy_commands: u64,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let result: &'static str = self.result.into();
        let counted = self.findings.iter().filter(|x| x.counted).count();
        write!(
            f,
            "{result}: {} new / {} legacy commands",
            self.new_commands, self.legacy_commands
        )?;
        if self.result == CheckResult::Inconclusive {
            return write!(f, ", too few new-path commands to judge");
        }
        match self.compared {
            Comparison::Compared => write!(f, ", compared to legacy")?,
            Comparison::ThresholdsOnly { legacy_commands } => write!(
                f,
                ", thresholds only (legacy has {legacy_commands} commands, too few to compare)"
            )?,
            Comparison::Disabled => write!(f, ", thresholds only (comparison disabled)")?,
        }
        if self.findings.is_empty() {
            return write!(f, "; no breach");
        }
        write!(f, "; {counted} of {} breaches counted", self.findings.len())?;
        for x in &self.findings {
            write!(f, "\n  - {x}")?;
        }
        Ok(())
    }
}

/// `bad / total` as an integer-count pair for the tests; `bad_total` returns whole numbers
/// as `f64` for every objective but churn.
fn counts(bt: (f64, f64)) -> (u64, u64) {
    (bt.0 as u64, bt.1 as u64)
}

/// Judge the new path's window against legacy's under `rules`. See the module invariants.
pub fn judge(new: &Counts, legacy: &Counts, rules: &Rules) -> Verdict {
    let compared = if !rules.compare_to_legacy {
        Comparison::Disabled
    } else if legacy.commands >= rules.min_events {
        Comparison::Compared
    } else {
        Comparison::ThresholdsOnly {
            legacy_commands: legacy.commands,
        }
    };
    let mut verdict = Verdict {
        result: CheckResult::Inconclusive,
        findings: Vec::new(),
        compared,
        new_commands: new.commands,
        legacy_commands: legacy.commands,
    };
    if new.commands < rules.min_events {
        return verdict;
    }

    // The good share of `slo` in `c`, if it had any events.
    let good = |slo: Slo, c: &Counts| {
        let (bad, total) = slo.bad_total(c);
        (total > 0.0).then(|| 1.0 - bad / total)
    };
    // The bad share of `slo` in `c`, if it had any events.
    let bad = |slo: Slo, c: &Counts| {
        let (bad, total) = slo.bad_total(c);
        (total > 0.0).then(|| bad / total)
    };
    let budget = 1.0 - rules.success_target;
    let burn = |c: &Counts| {
        bad(Slo::Success, c)
            .filter(|_| budget > 0.0)
            .map(|b| b / budget)
    };

    // (slo, check, new value, limit, legacy value, breached)
    let mut breaches = Vec::new();
    let floors = [
        (Slo::Success, rules.success_floor),
        (Slo::Latency, rules.latency_floor),
    ];
    for (slo, floor) in floors {
        if let Some(v) = good(slo, new) {
            if v < floor {
                breaches.push((slo, Check::Floor, v, floor, good(slo, legacy)));
            }
        }
    }
    let maxima = [
        (Slo::DecodeErrors, rules.decode_error_max),
        (Slo::QueueFull, rules.queue_full_max),
    ];
    for (slo, max) in maxima {
        if let Some(v) = bad(slo, new) {
            if v > max {
                breaches.push((slo, Check::Max, v, max, bad(slo, legacy)));
            }
        }
    }
    if let Some(v) = burn(new) {
        if v > rules.max_burn_rate {
            breaches.push((
                Slo::Success,
                Check::Burn,
                v,
                rules.max_burn_rate,
                burn(legacy),
            ));
        }
    }

    for (slo, check, value, limit, legacy_value) in breaches {
        let (test, counted, legacy_too_small) = match compared {
            Comparison::Compared => {
                let (new_bad, new_total) = counts(slo.bad_total(new));
                let (_, legacy_total) = counts(slo.bad_total(legacy));
                let t = worse(
                    (new_bad, new_total),
                    counts(slo.bad_total(legacy)),
                    rules.confidence,
                );
                // A legacy sample so small that even a flawless legacy would not make the new
                // path significantly worse cannot clear it: without this a canary at 99 %
                // (legacy a few hundred commands) would never be rolled back.
                let too_small = !t.significant
                    && !worse((new_bad, new_total), (0, legacy_total), rules.confidence)
                        .significant;
                (Some(t), t.significant || too_small, too_small)
            }
            Comparison::ThresholdsOnly { .. } | Comparison::Disabled => (None, true, false),
        };
        verdict.findings.push(Finding {
            slo,
            check,
            value,
            limit,
            legacy_value,
            test,
            counted,
            legacy_too_small,
        });
    }
    verdict.result = if verdict.findings.iter().any(|x| x.counted) {
        CheckResult::Fail
    } else {
        CheckResult::Pass
    };
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window where every objective is met: `bad` failed commands out of `commands`, every
    /// answered command fast, `10 × commands` frames with no decode error or full queue.
    fn window(commands: u64, failed: u64) -> Counts {
        Counts {
            commands,
            successes: commands - failed,
            within_latency: commands - failed,
            frames: commands * 10,
            ..Counts::default()
        }
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    // ---- worse(): z-test ----

    #[test]
    fn worse_z_test_clearly_worse() {
        // python3 -c "from math import sqrt, erfc; a,n1,c,n2=60,2000,10,10000;
        //   P=(a+c)/(n1+n2); z=(a/n1-c/n2)/sqrt(P*(1-P)*(1/n1+1/n2)); print(z, erfc(z/sqrt(2))/2)"
        // → 15.54656249197 8.393888506152257e-55   (NormalDist().cdf(-z) underflows to 0 here)
        let t = worse((60, 2000), (10, 10000), 0.99);
        assert_eq!(t.method, Method::ZTest);
        assert!(close(t.z, 15.54656249197, 1e-9), "{t:?}");
        assert!(close(t.p_value / 8.393888506152257e-55, 1.0, 1e-6), "{t:?}");
        assert!(t.significant);
    }

    #[test]
    fn worse_equal_proportions_is_not_significant() {
        // 1% on both sides: z = 0 exactly, p = 0.5.
        let t = worse((20, 2000), (100, 10000), 0.99);
        assert_eq!(t.method, Method::ZTest);
        assert!(
            close(t.z, 0.0, 1e-12) && close(t.p_value, 0.5, 1e-12),
            "{t:?}"
        );
        assert!(!t.significant);
    }

    #[test]
    fn worse_better_new_path_is_not_significant() {
        let t = worse((10, 10000), (60, 2000), 0.99);
        assert!(t.z < 0.0 && t.p_value > 0.99 && !t.significant, "{t:?}");
    }

    #[test]
    fn worse_significance_at_the_boundary() {
        // Legacy 50 bad of 10000; new 20 bad of 2185 vs of 2186 straddle p = 0.01:
        // python3 -c "from statistics import NormalDist; from math import sqrt
        // def z(a,n1,c,n2):
        //   P=(a+c)/(n1+n2); z=(a/n1-c/n2)/sqrt(P*(1-P)*(1/n1+1/n2)); return z, NormalDist().cdf(-z)
        // print(z(20,2185,50,10000), z(20,2186,50,10000))"
        // → (2.3271423549342676, 0.009978844940301657) (2.3253275807315736, 0.010027225295262676)
        // Expected bad counts 12.55 and 57.45, so the z-test applies.
        let below = worse((20, 2185), (50, 10000), 0.99);
        assert_eq!(below.method, Method::ZTest);
        assert!(close(below.z, 2.3271423549342676, 1e-9), "{below:?}");
        assert!(
            close(below.p_value, 0.009978844940301657, 1e-9),
            "{below:?}"
        );
        assert!(below.significant);

        let above = worse((20, 2186), (50, 10000), 0.99);
        assert!(close(above.z, 2.3253275807315736, 1e-9), "{above:?}");
        assert!(
            close(above.p_value, 0.010027225295262676, 1e-9),
            "{above:?}"
        );
        assert!(!above.significant);
    }

    #[test]
    fn worse_degenerate_inputs_are_not_significant() {
        for (new, legacy) in [
            ((0, 0), (10, 100)),    // no new events
            ((10, 100), (0, 0)),    // no legacy events
            ((0, 1000), (0, 1000)), // pooled p = 0
            ((1000, 1000), (5, 5)), // pooled p = 1
            ((0, 0), (0, 0)),       // nothing at all
        ] {
            let t = worse(new, legacy, 0.99);
            assert_eq!(
                (t.z, t.p_value, t.significant),
                (0.0, 1.0, false),
                "{new:?} {legacy:?}"
            );
        }
    }

    #[test]
    fn the_exact_test_takes_over_when_an_expected_count_is_below_five_and_not_at_five() {
        // 5 of 10 vs 5 of 10: every expected count is exactly 5 (10 x 0.5): the z-test.
        assert_eq!(worse((5, 10), (5, 10), 0.99).method, Method::ZTest);
        // 19 of 20 vs 30 of 40 failed: pooled 49/60, so the new path's expected *good* count
        // is 20 x 11/60 = 3.7 < 5 (its expected bad count, 16.3, is plenty): Fisher.
        assert_eq!(worse((19, 20), (30, 40), 0.99).method, Method::Fisher);
    }

    #[test]
    fn p_values_read_as_people_write_them() {
        assert_eq!(fmt_p(0.5), "0.50");
        assert_eq!(fmt_p(0.01), "0.01");
        assert_eq!(fmt_p(0.0099), "0.0099");
        assert_eq!(fmt_p(0.00002), "2e-5");
        assert_eq!(fmt_p(0.0), "0");
    }

    // ---- worse(): Fisher's exact test ----

    /// The one-sided Fisher p-value, by the definition:
    /// python3 -c "from math import comb
    /// def fisher(a,n1,c,n2):
    ///   N=n1+n2; K=a+c
    ///   return sum(comb(K,i)*comb(N-K,n1-i) for i in range(a,min(K,n1)+1))/comb(N,n1)
    /// print(fisher(3,10,0,10), fisher(5,10,0,20), fisher(4,200,1,1000), fisher(2,100,1,1000))"
    /// → 0.10526315789473684 0.0017683465959328027 0.00326889562311113 0.02310595325109265
    #[test]
    fn worse_uses_fisher_on_small_counts() {
        let cases = [
            ((3, 10), (0, 10), 0.10526315789473684, false),
            ((5, 10), (0, 20), 0.0017683465959328027, true),
            ((4, 200), (1, 1000), 0.00326889562311113, true),
            ((2, 100), (1, 1000), 0.02310595325109265, false),
        ];
        for (new, legacy, p, significant) in cases {
            let t = worse(new, legacy, 0.99);
            assert_eq!(t.method, Method::Fisher, "{new:?} {legacy:?}");
            assert!(
                close(t.p_value, p, 1e-9),
                "{new:?} {legacy:?}: {t:?} want {p}"
            );
            assert_eq!(t.significant, significant, "{new:?} {legacy:?}");
        }
    }

    #[test]
    fn fisher_is_more_cautious_than_the_z_approximation() {
        // 2 of 100 vs 1 of 1000: the z-test would call it significant
        // (python3: z=3.4736495597646977, NormalDist().cdf(-z)=0.0002567155661802878), but the
        // expected bad count on the new side is 0.27, and the exact p is 0.0231.
        let t = worse((2, 100), (1, 1000), 0.99);
        assert_eq!(t.method, Method::Fisher);
        assert!(close(t.z, 3.4736495597646977, 1e-9), "{t:?}");
        assert!(!t.significant);
    }

    // ---- rate_worse() ----

    #[test]
    fn rate_worse_both_ways() {
        // Equal exposure, so under H0 X ~ Binomial(40, 0.5):
        // python3 -c "from math import comb
        // sf=lambda k,n,p: sum(comb(n,i)*p**i*(1-p)**(n-i) for i in range(k,n+1))
        // print(sf(30,40,0.5), sf(10,40,0.5), sf(12,20,0.25))"
        // → 0.0011107168866146822 0.9996602258725034 0.000935391579332645
        let up = rate_worse((30, 10.0), (10, 10.0), 0.99);
        assert_eq!(up.method, Method::Binomial);
        assert!(close(up.p_value, 0.0011107168866146822, 1e-9), "{up:?}");
        assert!(up.significant && up.z > 0.0);

        let down = rate_worse((10, 10.0), (30, 10.0), 0.99);
        assert!(close(down.p_value, 0.9996602258725034, 1e-9), "{down:?}");
        assert!(!down.significant && down.z < 0.0);

        // Unequal exposure: 12 closes in 10 h vs 8 in 30 h; share 10/40 = 0.25.
        let skew = rate_worse((12, 10.0), (8, 30.0), 0.99);
        assert!(close(skew.p_value, 0.000935391579332645, 1e-9), "{skew:?}");
        assert!(skew.significant);
        // The z shown beside them, (k - n s) / sqrt(n s (1 - s)):
        // python3 -c "import math; print((30-40*0.5)/math.sqrt(40*0.5*0.5),
        //   (12-20*0.25)/math.sqrt(20*0.25*0.75))"  → 3.1622776601683795 3.6147844564602556
        assert!(close(up.z, 3.1622776601683795, 1e-9), "{up:?}");
        assert!(close(skew.z, 3.6147844564602556, 1e-9), "{skew:?}");
    }

    #[test]
    fn a_value_exactly_at_its_limit_is_not_a_breach() {
        // 995 of 1000 answered: exactly the 99.5 % floor.
        let v = judge(&window(1000, 5), &window(1000, 0), &Rules::default());
        assert!(v.findings.is_empty(), "{v}");
        // Decode errors exactly 0.1 % of frames.
        let at_max = Counts {
            commands: 1000,
            successes: 1000,
            within_latency: 1000,
            frames: 10_000,
            decode_errors: 10,
            ..Counts::default()
        };
        let v = judge(&at_max, &at_max, &Rules::default());
        assert!(v.findings.is_empty(), "{v}");
        // A burn of exactly the maximum: half failed against a 50 % target, at most 1x.
        let rules = Rules {
            success_target: 0.5,
            success_floor: 0.0,
            max_burn_rate: 1.0,
            ..Rules::default()
        };
        let v = judge(&window(100, 50), &window(100, 50), &rules);
        assert!(v.findings.is_empty(), "{v}");
        let v = judge(&window(100, 51), &window(100, 51), &rules);
        assert_eq!(v.findings.len(), 1, "{v}");
    }

    #[test]
    fn rate_worse_without_exposure_or_events_is_not_significant() {
        for (new, legacy) in [
            ((5, 0.0), (1, 10.0)),
            ((5, 10.0), (1, 0.0)),
            ((0, 10.0), (0, 10.0)),
            ((5, f64::NAN), (1, 10.0)),
        ] {
            let t = rate_worse(new, legacy, 0.99);
            assert_eq!(
                (t.p_value, t.significant),
                (1.0, false),
                "{new:?} {legacy:?}"
            );
        }
    }

    // ---- judge() ----

    #[test]
    fn judge_new_clearly_worse_fails() {
        // New: 60 of 2000 failed (97%); legacy 10 of 10000 (99.9%). Burn 0.03/0.001 = 30.
        let v = judge(&window(2000, 60), &window(10000, 10), &Rules::default());
        assert_eq!(v.result, CheckResult::Fail, "{v}");
        assert_eq!(v.compared, Comparison::Compared);
        assert_eq!((v.new_commands, v.legacy_commands), (2000, 10000));
        let checks: Vec<_> = v.findings.iter().map(|f| (f.slo, f.check)).collect();
        assert_eq!(
            checks,
            [(Slo::Success, Check::Floor), (Slo::Success, Check::Burn)]
        );
        assert!(v.findings.iter().all(|f| f.counted && f.test.is_some()));
        let floor = &v.findings[0];
        assert!(close(floor.value, 0.97, 1e-12) && close(floor.limit, 0.995, 1e-12));
        assert_eq!(floor.legacy_value.map(|x| (x * 1e4).round()), Some(9990.0));
        let burn = &v.findings[1];
        assert!(close(burn.value, 30.0, 1e-9) && close(burn.limit, 14.4, 1e-12));
    }

    #[test]
    fn judge_both_equally_bad_passes_with_findings_not_counted() {
        // 1% failed on both paths: the add-on or the network, not the new path.
        let v = judge(&window(2000, 20), &window(10000, 100), &Rules::default());
        assert_eq!(v.result, CheckResult::Pass, "{v}");
        assert_eq!(v.compared, Comparison::Compared);
        assert_eq!(v.findings.len(), 1, "{v}"); // floor only: burn 10 < 14.4
        let f = &v.findings[0];
        assert!(!f.counted);
        let t = f
            .test
            .unwrap_or_else(|| panic!("compared without a test: {f:?}"));
        assert!(close(t.p_value, 0.5, 1e-12), "{t:?}");
    }

    #[test]
    fn judge_too_few_new_commands_is_inconclusive() {
        let v = judge(&window(99, 50), &window(10000, 10), &Rules::default());
        assert_eq!(v.result, CheckResult::Inconclusive);
        assert!(v.findings.is_empty());
        assert_eq!(v.new_commands, 99);
    }

    #[test]
    fn judge_legacy_too_few_is_thresholds_only_and_fails() {
        // At 100 % canary legacy has almost nothing; the thresholds alone decide.
        let v = judge(&window(2000, 60), &window(50, 0), &Rules::default());
        assert_eq!(v.result, CheckResult::Fail, "{v}");
        assert_eq!(
            v.compared,
            Comparison::ThresholdsOnly {
                legacy_commands: 50
            }
        );
        assert!(!v.findings.is_empty());
        assert!(v.findings.iter().all(|f| f.counted && f.test.is_none()));
    }

    #[test]
    fn judge_comparison_disabled_counts_every_breach() {
        let rules = Rules {
            compare_to_legacy: false,
            ..Rules::default()
        };
        let v = judge(&window(2000, 20), &window(10000, 100), &rules);
        assert_eq!(v.result, CheckResult::Fail, "{v}");
        assert_eq!(v.compared, Comparison::Disabled);
        assert!(v.findings.iter().all(|f| f.counted && f.test.is_none()));
    }

    #[test]
    fn judge_healthy_new_path_passes_without_findings() {
        let v = judge(&window(2000, 0), &window(10000, 5), &Rules::default());
        assert_eq!(v.result, CheckResult::Pass);
        assert!(v.findings.is_empty());
    }

    #[test]
    fn judge_significance_boundary() {
        // Legacy breaches the floor too (60 of 10000 failed: 99.4%), so only significance
        // counts. New 30 of 2994 failed (98.998%, burn 10.0 < 14.4) is just significant, 30 of
        // 2995 just not:
        //   python3 -c "from statistics import NormalDist as N; import math
        //   def p(a,n,b,m): q=(a+b)/(n+m); z=(a/n-b/m)/math.sqrt(q*(1-q)*(1/n+1/m)); return 1-N().cdf(z)
        //   print(p(30,2994,60,10000), p(30,2995,60,10000))"
        //   0.009990063881834432 0.010031380706314819
        let legacy = window(10000, 60);
        let fail = judge(&window(2994, 30), &legacy, &Rules::default());
        assert_eq!(fail.result, CheckResult::Fail, "{fail}");
        let pass = judge(&window(2995, 30), &legacy, &Rules::default());
        assert_eq!(pass.result, CheckResult::Pass, "{pass}");
        assert_eq!(pass.findings.len(), 1);
        assert!(!pass.findings[0].counted);
        assert!(!pass.findings[0].legacy_too_small);
    }

    #[test]
    fn a_legacy_sample_too_small_to_show_any_difference_leaves_the_threshold_to_decide() {
        // The canary at ~99 %: 10 000 new-path commands, 2 % failed; legacy 0 of 150. Even a
        // flawless legacy gives Fisher p = C(10000,200)/C(10150,200) ~ 0.05 > 0.01:
        //   python3 -c "import math; print(math.comb(10000,200)/math.comb(10150,200))"
        //   0.04941380340410645
        let v = judge(&window(10_000, 200), &window(150, 0), &Rules::default());
        assert_eq!(v.result, CheckResult::Fail, "{v}");
        let f = &v.findings[0];
        assert!(f.counted && f.legacy_too_small);
        assert!(!f.test.expect("compared").significant);
        // With a legacy sample large enough to tell (1500 commands, a few failed as the new
        // path's), significance decides again: 2 % vs 1.8 % is no evidence.
        let v = judge(&window(10_000, 200), &window(1_500, 27), &Rules::default());
        assert_eq!(v.result, CheckResult::Pass, "{v}");
        assert!(!v.findings[0].legacy_too_small);
    }

    #[test]
    fn judge_small_counts_use_fisher() {
        // 2 of 100 failed (98%, burn 20) vs 1 of 1000: breaches, but the exact test says
        // p = 0.0231 (see `worse_uses_fisher_on_small_counts`), so nothing counts. (A flawless
        // legacy of 1000 would give p = C(100,2)/C(1100,2) = 0.0082: legacy can tell.)
        let v = judge(&window(100, 2), &window(1000, 1), &Rules::default());
        assert_eq!(v.result, CheckResult::Pass, "{v}");
        assert_eq!(v.findings.len(), 2);
        for f in &v.findings {
            let t = f.test.unwrap_or_else(|| panic!("no test: {f:?}"));
            assert_eq!(t.method, Method::Fisher);
            assert!(!f.counted && !f.legacy_too_small);
        }
    }

    #[test]
    fn judge_latency_decode_and_queue_thresholds() {
        let new = Counts {
            commands: 2000,
            successes: 2000,
            within_latency: 1900, // 95% < 99%
            late: 100,
            frames: 100_000,
            decode_errors: 500, // 0.5% > 0.1%
            queue_full: 2000,   // 2% > 1%, but legacy is as bad
            ..Counts::default()
        };
        let legacy = Counts {
            commands: 10000,
            successes: 10000,
            within_latency: 9990,
            late: 10,
            frames: 100_000,
            decode_errors: 50,
            queue_full: 2000,
            ..Counts::default()
        };
        let v = judge(&new, &legacy, &Rules::default());
        assert_eq!(v.result, CheckResult::Fail, "{v}");
        let got: Vec<_> = v
            .findings
            .iter()
            .map(|f| (f.slo, f.check, f.counted))
            .collect();
        assert_eq!(
            got,
            [
                (Slo::Latency, Check::Floor, true),
                (Slo::DecodeErrors, Check::Max, true),
                (Slo::QueueFull, Check::Max, false),
            ]
        );
        // python3: z(100,2000,10,10000) = 20.990096296075947 (latency, on answered commands)
        let lat = v.findings[0].test.map(|t| t.z).unwrap_or_default();
        assert!(close(lat, 20.990096296075947, 1e-9), "{lat}");
    }

    #[test]
    fn judge_new_path_with_no_latency_events_skips_latency_and_a_stall_fails_both() {
        // Commands abandoned before the threshold: success breaches, latency has nothing.
        let new = Counts {
            commands: 200,
            ..Counts::default()
        };
        let v = judge(&new, &Counts::default(), &Rules::default());
        assert_eq!(v.result, CheckResult::Fail);
        assert!(v.findings.iter().all(|f| f.slo == Slo::Success));
        // Every command timed out: each was late first, so latency breaches as well.
        let stalled = Counts { late: 200, ..new };
        let v = judge(&stalled, &Counts::default(), &Rules::default());
        assert!(v
            .findings
            .iter()
            .any(|f| f.slo == Slo::Latency && f.value == 0.0 && f.counted));
    }

    // ---- labels and Display ----

    #[test]
    fn check_result_labels() {
        let l = |r: CheckResult| -> &'static str { r.into() };
        assert_eq!(l(CheckResult::Pass), "pass");
        assert_eq!(l(CheckResult::Fail), "fail");
        assert_eq!(l(CheckResult::Inconclusive), "inconclusive");
    }

    #[test]
    fn display_is_readable() {
        let v = judge(&window(2000, 60), &window(10000, 10), &Rules::default());
        assert_eq!(
            v.findings[0].to_string(),
            "success 97.00% < floor 99.50% (legacy 99.90%, worse: z=15.5, p=8e-55) — counted"
        );
        assert_eq!(
            v.findings[1].to_string(),
            "success burn 30.0x > max 14.4x (legacy 1.0x, worse: z=15.5, p=8e-55) — counted"
        );
        assert_eq!(
            v.to_string(),
            "fail: 2000 new / 10000 legacy commands, compared to legacy; 2 of 2 breaches counted\n  \
             - success 97.00% < floor 99.50% (legacy 99.90%, worse: z=15.5, p=8e-55) — counted\n  \
             - success burn 30.0x > max 14.4x (legacy 1.0x, worse: z=15.5, p=8e-55) — counted"
        );

        let v = judge(&window(2000, 20), &window(10000, 100), &Rules::default());
        assert_eq!(
            v.findings[0].to_string(),
            "success 99.00% < floor 99.50% (legacy 99.00%) \
             — not counted: not significantly worse than legacy (z=0.0, p=0.50)"
        );

        let v = judge(&window(100, 2), &window(1000, 1), &Rules::default());
        assert_eq!(
            v.findings[0].to_string(),
            "success 98.00% < floor 99.50% (legacy 99.90%) \
             — not counted: not significantly worse than legacy (Fisher exact p=0.02)"
        );

        let v = judge(&window(2000, 60), &window(50, 0), &Rules::default());
        assert_eq!(
            v.to_string(),
            "fail: 2000 new / 50 legacy commands, thresholds only (legacy has 50 commands, too \
             few to compare); 2 of 2 breaches counted\n  \
             - success 97.00% < floor 99.50% (legacy 100.00%, not compared) — counted\n  \
             - success burn 30.0x > max 14.4x (legacy 0.0x, not compared) — counted"
        );

        let v = judge(&window(10, 5), &window(50, 0), &Rules::default());
        assert_eq!(
            v.to_string(),
            "inconclusive: 10 new / 50 legacy commands, too few new-path commands to judge"
        );

        let v = judge(&window(2000, 0), &window(10000, 5), &Rules::default());
        assert_eq!(
            v.to_string(),
            "pass: 2000 new / 10000 legacy commands, compared to legacy; no breach"
        );
    }
}
