//! The adaptive retry timeout of one device: how long to wait for a command's reply before
//! sending a copy, learnt from the replies that device has given (the SRTT + 4·RTTVAR
//! estimator TCP uses, RFC 6298).
//!
//! A fixed timeout is wrong both ways: below a device's real reply time every command is sent
//! twice (and a stalled link is flooded with copies that each make the device work again);
//! far above it a lost command waits for nothing. Measuring the device keeps copies for
//! commands that were really lost.
//!
//! The timeout also never falls far below the slowest recent reply (a decaying peak): replies
//! that come in bursts of slowness — a congested link holding everything behind one slow frame
//! — are exactly where a timeout that relaxes after a few fast replies would copy commands that
//! were only late.
//!
//! Invariants:
//! - Pure: samples are given, nothing reads a clock.
//! - Only replies to commands sent once are samples (Karn's rule): after a copy, which send a
//!   reply answers is unknown. So that a device slower than the timeout can still be measured,
//!   every timeout doubles the timeout used for the next commands until a sample comes (the
//!   back-off of RFC 6298 §5.5).
//! - The timeout stays within `[floor, ceiling]`: never below `reliable.ack_timeout`, never so
//!   long that no copy could be answered before the add-on's own deadline.

use std::time::Duration;

/// The timeout before the device has been measured at all.
pub const INITIAL: Duration = Duration::from_secs(1);

/// How much of the slowest recent reply each new sample keeps: about 70 samples halve it.
pub const PEAK_DECAY: f64 = 0.99;

#[derive(Debug, Clone)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    /// Doublings since the last sample.
    backoff: u32,
    /// The slowest recent reply, decaying by [`PEAK_DECAY`] per sample.
    peak: Duration,
    floor: Duration,
    ceiling: Duration,
}

impl RttEstimator {
    pub fn new(floor: Duration, ceiling: Duration) -> Self {
        Self {
            srtt: None,
            rttvar: Duration::ZERO,
            backoff: 0,
            peak: Duration::ZERO,
            floor,
            ceiling: ceiling.max(floor),
        }
    }

    /// A reply came `rtt` after its command (sent once).
    pub fn sample(&mut self, rtt: Duration) {
        self.backoff = 0;
        self.peak = rtt.max(self.peak.mul_f64(PEAK_DECAY));
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let err = srtt.abs_diff(rtt);
                self.rttvar = self.rttvar.mul_f64(0.75) + err.mul_f64(0.25);
                self.srtt = Some(srtt.mul_f64(0.875) + rtt.mul_f64(0.125));
            }
        }
    }

    /// The smoothed reply time, once there is a sample.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// A command went unanswered for its timeout.
    pub fn timed_out(&mut self) {
        self.backoff = (self.backoff + 1).min(16);
    }

    /// How long to wait before the first copy.
    pub fn rto(&self) -> Duration {
        let base = match self.srtt {
            // Nothing measured yet: TCP's conservative initial timeout (RFC 6298 §2.1).
            None => INITIAL.max(self.floor),
            Some(srtt) => (srtt + self.rttvar * 4).max(self.peak),
        };
        base.saturating_mul(1 << self.backoff)
            .clamp(self.floor, self.ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn starts_at_one_second_and_follows_rfc_6298() {
        let mut e = RttEstimator::new(ms(400), ms(2500));
        assert_eq!(e.rto(), ms(1000));
        // First sample: srtt = r, rttvar = r / 2, rto = r + 4 * r / 2 = 3r.
        e.sample(ms(200));
        assert_eq!(e.srtt(), Some(ms(200)));
        assert_eq!(e.rto(), ms(600));
        // Second: rttvar = 3/4 * 100 + 1/4 * |200 - 600| = 175; srtt = 7/8 * 200 + 1/8 * 600 = 250.
        e.sample(ms(600));
        assert_eq!(e.srtt(), Some(ms(250)));
        assert_eq!(e.rto(), ms(250 + 4 * 175));
    }

    #[test]
    fn a_fast_device_stays_at_the_floor_and_a_slow_one_is_capped() {
        let mut e = RttEstimator::new(ms(400), ms(2500));
        for _ in 0..50 {
            e.sample(ms(20));
        }
        assert_eq!(e.rto(), ms(400));
        for _ in 0..50 {
            e.sample(ms(4000));
        }
        assert_eq!(e.rto(), ms(2500));
    }

    #[test]
    fn timeouts_back_off_until_a_sample_comes() {
        let mut e = RttEstimator::new(ms(400), ms(2500));
        e.timed_out();
        assert_eq!(e.rto(), ms(2000), "1 s initial, doubled");
        // 100 ms measured: 100 + 4 x 50 = 300 ms, doubled.
        e.sample(ms(100));
        e.timed_out();
        assert_eq!(e.rto(), ms(600));
        e.timed_out();
        e.timed_out();
        e.timed_out();
        assert_eq!(e.rto(), ms(2500), "capped");
        e.sample(ms(100));
        assert_eq!(e.rto(), ms(400), "floored");
    }

    #[test]
    fn one_slow_reply_among_fast_ones_raises_the_timeout_above_it_for_a_while() {
        let mut e = RttEstimator::new(ms(400), ms(2500));
        for _ in 0..20 {
            e.sample(ms(10));
        }
        e.sample(ms(1000));
        assert!(e.rto() > ms(1000), "{:?}", e.rto());
        // Twenty fast replies later it still remembers most of it...
        for _ in 0..20 {
            e.sample(ms(10));
        }
        assert!(e.rto() >= ms(800), "{:?}", e.rto());
        // ...and after a few hundred it is back at the floor.
        for _ in 0..300 {
            e.sample(ms(10));
        }
        assert_eq!(e.rto(), ms(400));
    }
}
