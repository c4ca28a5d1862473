//! Routing: which path a device's connection takes (design decisions 1–3), and which legacy
//! devices the dark launch shadows (decision 8).
//!
//! Pure: device id + routing config + rollback latch → route and reason. The same inputs give
//! the same answer in every process and after every restart, because buckets come from a hash
//! of the id alone and nothing is cached.
//!
//! Invariants:
//! - `bucket(id) = u64_be(SHA-256("cync-gateway/v1:" + hex(id))[0..8]) % 10_000`, and a device
//!   is on the new path by percentage iff `bucket < percent * 100`; raising the percentage only
//!   ever adds devices.
//! - Precedence: no handshake → legacy; rollback latch → legacy; `force_legacy` → legacy;
//!   `force_new` → new; then the percentage.
//! - The dark-launch bucket uses another salt, so which legacy devices are shadowed does not
//!   depend on (or coincide with) the canary cohort.

use sha2::{Digest, Sha256};

use crate::config::{DarkLaunch, DarkMode, Routing};
use crate::conn::{Route, RouteReason as Reason, Transport};
use crate::protocol::DeviceId;

/// Number of buckets: percent is resolved to 0.01 % steps.
pub const BUCKETS: u64 = 10_000;

fn salted_bucket(salt: &[u8], id: DeviceId) -> u64 {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(id.to_hex().as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) % BUCKETS
}

/// The device's stable canary bucket, 0..10_000.
pub fn bucket(id: DeviceId) -> u64 {
    salted_bucket(b"cync-gateway/v1:", id)
}

/// Whether a device in `bucket` is inside the first `percent` percent of buckets.
pub fn below(bucket: u64, percent: f64) -> bool {
    // Percent has at most two decimals (validated), so percent * 100 is an integer up to
    // rounding error; round rather than truncate so 10.01 % is 1001 buckets, not 1000.
    bucket < (percent * 100.0).round().clamp(0.0, BUCKETS as f64) as u64
}

/// The path for `id` at `percent` (0–100), by bucket alone.
pub fn by_percent(id: DeviceId, percent: f64) -> Transport {
    if below(bucket(id), percent) {
        Transport::New
    } else {
        Transport::Legacy
    }
}

/// The route of a connection from `id` (`None`: no valid hello) under `routing`, with the
/// rollback latch set or not.
pub fn route(id: Option<DeviceId>, routing: &Routing, latched: bool) -> Route {
    let (transport, reason) = match id {
        None => (Transport::Legacy, Reason::NoHandshake),
        Some(_) if latched => (Transport::Legacy, Reason::Rollback),
        Some(id) if routing.force_legacy.contains(&id) => (Transport::Legacy, Reason::ForceLegacy),
        Some(id) if routing.force_new.contains(&id) => (Transport::New, Reason::ForceNew),
        Some(id) => (by_percent(id, routing.canary_percent), Reason::Percent),
    };
    Route { transport, reason }
}

/// The percentage actually in force: the configured one, or 0 while the latch is set.
pub fn effective_percent(routing: &Routing, latched: bool) -> f64 {
    if latched {
        0.0
    } else {
        routing.canary_percent
    }
}

/// Whether a legacy connection from `id` is shadowed by the dark launch.
pub fn shadowed(id: DeviceId, dark: &DarkLaunch) -> bool {
    dark.mode != DarkMode::Off && below(salted_bucket(b"cync-gateway/v1/shadow:", id), dark.percent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::labels::Label;

    fn id(n: u32) -> DeviceId {
        DeviceId(n.to_be_bytes())
    }

    fn hex(s: &str) -> DeviceId {
        DeviceId::from_hex(s).expect("id")
    }

    // Buckets computed outside this code, with Python's hashlib:
    //   int.from_bytes(sha256(b"cync-gateway/v1:" + id.encode()).digest()[:8], "big") % 10000
    const KNOWN: [(&str, u64); 7] = [
        ("38e8cf46", 1147),
        ("00004894", 0),
        ("000003bc", 9999),
        ("0000053d", 28),
        ("00003be5", 29),
        ("000009d0", 57),
        ("00001b30", 58),
    ];

    #[test]
    fn buckets_match_values_computed_by_another_tool() {
        for (id, b) in KNOWN {
            assert_eq!(bucket(hex(id)), b, "{id}");
        }
        // The dark launch's salt ("cync-gateway/v1/shadow:"), same tool.
        assert_eq!(
            salted_bucket(b"cync-gateway/v1/shadow:", hex("38e8cf46")),
            798
        );
    }

    #[test]
    fn bucket_b_is_legacy_at_b_hundredths_of_a_percent_and_new_one_step_above() {
        for (id, b) in KNOWN {
            let at = |p: f64| by_percent(hex(id), p);
            assert_eq!(
                at(b as f64 / 100.0),
                Transport::Legacy,
                "{id} at {}",
                b as f64 / 100.0
            );
            if b < 9999 {
                assert_eq!(at((b + 1) as f64 / 100.0), Transport::New, "{id}");
            }
        }
        // The ends: nobody at 0 %, not even bucket 0; everybody at 100 %, bucket 9999 too.
        assert_eq!(by_percent(hex("00004894"), 0.0), Transport::Legacy);
        assert_eq!(by_percent(hex("00004894"), 0.01), Transport::New);
        assert_eq!(by_percent(hex("000003bc"), 99.99), Transport::Legacy);
        assert_eq!(by_percent(hex("000003bc"), 100.0), Transport::New);
        // Two-decimal percentages whose float times 100 is not an integer: 0.29 % is 29
        // buckets (0.29 * 100 = 28.999999999999996), 0.57 % is 57, 0.58 % is 58.
        assert_eq!(
            by_percent(hex("0000053d"), 0.29),
            Transport::New,
            "bucket 28 at 0.29 %"
        );
        assert_eq!(
            by_percent(hex("00003be5"), 0.29),
            Transport::Legacy,
            "bucket 29 at 0.29 %"
        );
        assert_eq!(
            by_percent(hex("000009d0"), 0.58),
            Transport::New,
            "bucket 57 at 0.58 %"
        );
        assert_eq!(
            by_percent(hex("00001b30"), 0.58),
            Transport::Legacy,
            "bucket 58 at 0.58 %"
        );
    }

    #[test]
    fn every_two_decimal_percentage_takes_exactly_its_number_of_buckets() {
        // The percentage as an operator writes it ("12.34"), parsed as the config parser does;
        // the expected count of buckets is read off the digits, not computed in floating point.
        for n in 0..=10_000u64 {
            let text = format!("{}.{:02}", n / 100, n % 100);
            let p: f64 = text.parse().expect("number");
            if n > 0 {
                assert!(below(n - 1, p), "bucket {} must be in at {text} %", n - 1);
            }
            if n < BUCKETS {
                assert!(!below(n, p), "bucket {n} must be out at {text} %");
            }
        }
    }

    #[test]
    fn reasons_are_the_documented_metric_labels() {
        let labels: Vec<&str> = [
            Reason::Percent,
            Reason::ForceNew,
            Reason::ForceLegacy,
            Reason::Rollback,
            Reason::NoHandshake,
        ]
        .iter()
        .map(|r| r.label())
        .collect();
        assert_eq!(
            labels,
            [
                "percent",
                "force_new",
                "force_legacy",
                "rollback",
                "no_handshake"
            ]
        );
    }

    #[test]
    fn bucket_follows_the_documented_formula() {
        // Computed independently: sha256("cync-gateway/v1:38e8cf46") starts with these bytes.
        let d = DeviceId([0x38, 0xe8, 0xcf, 0x46]);
        let digest = Sha256::digest(b"cync-gateway/v1:38e8cf46");
        let want = u64::from_be_bytes([
            digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
        ]) % 10_000;
        assert_eq!(bucket(d), want);
    }

    fn routing(extra: &str) -> Routing {
        let text = format!("[upstream.legacy]\naddress = \"h:1\"\n[routing]\n{extra}\n");
        crate::config::Config::parse(&text).expect("config").routing
    }

    #[test]
    fn precedence_latch_then_force_legacy_then_force_new_then_percent() {
        let a = id(1);
        let b = id(2);
        let r = routing(&format!(
            "canary_percent = 100\nforce_new = [\"{a}\", \"{b}\"]\nforce_legacy = [\"{b}\"]"
        ));
        let t = |id, latched| route(Some(id), &r, latched);
        assert_eq!(
            t(a, false),
            Route {
                transport: Transport::New,
                reason: Reason::ForceNew
            }
        );
        assert_eq!(
            t(b, false),
            Route {
                transport: Transport::Legacy,
                reason: Reason::ForceLegacy
            }
        );
        assert_eq!(
            t(id(3), false),
            Route {
                transport: Transport::New,
                reason: Reason::Percent
            }
        );
        for x in [a, b, id(3)] {
            assert_eq!(
                t(x, true),
                Route {
                    transport: Transport::Legacy,
                    reason: Reason::Rollback
                }
            );
        }
        assert_eq!(
            route(None, &r, false),
            Route {
                transport: Transport::Legacy,
                reason: Reason::NoHandshake
            }
        );
        let zero = routing(&format!("canary_percent = 0\nforce_new = [\"{a}\"]"));
        assert_eq!(route(Some(a), &zero, false).transport, Transport::New);
        assert_eq!(route(Some(b), &zero, false).transport, Transport::Legacy);
        assert_eq!(effective_percent(&r, true), 0.0);
        assert_eq!(effective_percent(&r, false), 100.0);
    }

    #[test]
    fn shadow_bucket_is_independent_of_the_canary_bucket() {
        let text = "[upstream.legacy]\naddress = \"h:1\"\n[upstream.shadow]\naddress = \"h:2\"\n[dark_launch]\nmode = \"observe\"\npercent = 10\n";
        let dark = crate::config::Config::parse(text)
            .expect("config")
            .dark_launch;
        let both = (0..10_000)
            .filter(|n| shadowed(id(*n), &dark) && by_percent(id(*n), 10.0) == Transport::New)
            .count();
        let shadow = (0..10_000).filter(|n| shadowed(id(*n), &dark)).count();
        assert!((800..=1200).contains(&shadow), "{shadow}");
        // Independent 10 % draws overlap on about 1 %, not 10 %.
        assert!((50..=150).contains(&both), "{both}");
    }

    #[test]
    fn extremes_and_monotonic_growth() {
        for n in 0..2000 {
            assert_eq!(by_percent(id(n), 0.0), Transport::Legacy);
            assert_eq!(by_percent(id(n), 100.0), Transport::New);
            if by_percent(id(n), 10.0) == Transport::New {
                assert_eq!(by_percent(id(n), 25.0), Transport::New);
            }
        }
        let share = (0..10_000)
            .filter(|n| by_percent(id(*n), 10.0) == Transport::New)
            .count();
        assert!((800..=1200).contains(&share), "{share} of 10000 at 10 %");
    }
}
