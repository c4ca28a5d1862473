//! Wall-clock time for what leaves the process — audit entries, state files, webhook bodies —
//! derived from the tokio clock, so timers stay pausable in tests.
//!
//! Invariants:
//! - The system clock is read once, when the [`WallClock`] is made; every later time stamp is
//!   that reading plus the tokio clock's elapsed time. Paused-time tests therefore get
//!   consistent stamps, and a wall-clock step (NTP) after start cannot reorder entries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Maps tokio instants to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    base: Instant,
    base_unix_ms: u64,
}

impl WallClock {
    /// Reads the system clock now (the one place that does).
    #[allow(clippy::disallowed_methods)] // the single wall-clock read; see the module header
    pub fn start() -> WallClock {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        WallClock::at(Instant::now(), unix_ms)
    }

    /// A clock on which `base` is `base_unix_ms` (for tests).
    pub fn at(base: Instant, base_unix_ms: u64) -> WallClock {
        WallClock { base, base_unix_ms }
    }

    pub fn base(&self) -> (Instant, u64) {
        (self.base, self.base_unix_ms)
    }

    /// Milliseconds since the Unix epoch at `now`.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.base);
        self.base_unix_ms
            .saturating_add(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// The instant an RFC 3339 stamp names, seen from `now` (for an age: a stamp in the future
    /// is `now`); `None` when it does not parse.
    pub fn instant_of(&self, stamp: &str, now: Instant) -> Option<Instant> {
        let t = humantime::parse_rfc3339_weak(stamp).ok()?;
        let ms = u64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()?;
        let age = self.unix_ms(now).saturating_sub(ms);
        Some(now.checked_sub(Duration::from_millis(age)).unwrap_or(now))
    }

    /// RFC 3339 with milliseconds, UTC (`2026-12-01T11:00:25.123Z`).
    pub fn rfc3339(&self, now: Instant) -> String {
        let t = UNIX_EPOCH + Duration::from_millis(self.unix_ms(now));
        humantime::format_rfc3339_millis(t).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_follow_the_tokio_clock_from_one_reading() {
        let t0 = Instant::now();
        // 2026-12-01T00:00:00Z = 1_796_083_200 s since the epoch (`date -u -d 2026-12-01 +%s`).
        let c = WallClock::at(t0, 1_796_083_200_000);
        assert_eq!(c.rfc3339(t0), "2026-12-01T00:00:00.000Z");
        let later = t0 + Duration::from_millis(90_061_500);
        assert_eq!(c.unix_ms(later), 1_796_083_200_000 + 90_061_500);
        assert_eq!(c.rfc3339(later), "2026-12-02T01:01:01.500Z");
        // Back again: the stamp of an hour before `later` is an hour before it.
        let hour_before = c.instant_of("2026-12-02T00:01:01.500Z", later);
        assert_eq!(hour_before, Some(later - Duration::from_secs(3600)));
        assert_eq!(c.instant_of("not a time", later), None);
    }
}
