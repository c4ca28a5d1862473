//! The SLO engine: per path, fixed-size rings of event counts, and from them each SLI over a
//! window, its burn rate and the error budget left. Pure: every method takes `now`.
//!
//! Invariants:
//! - Memory is fixed at construction and independent of traffic (see [`RINGS`]).
//! - Counts are fed as cumulative totals (the same counters the metrics family counts, one
//!   sink); the engine keeps the deltas, so a missed tick loses resolution, never events.
//! - Buckets are addressed by wall-clock slot numbers (`unix_ms / resolution`), so a restored
//!   state lines up with the time that passed while the daemon was down.

use std::ops::{Add, Sub};

use serde::{Deserialize, Serialize};

/// What one bucket holds for one path: every SLI's good and total events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Commands (server 0x73 of class f8) that ended: success, timeout or abandoned.
    pub commands: u64,
    /// Commands whose f9 reply arrived within `command_deadline`.
    pub successes: u64,
    /// Successful commands answered within `slo.latency_threshold`.
    pub within_latency: u64,
    /// Frames decoded (both directions): the denominator of the decode-error and queue-full
    /// ratios.
    pub frames: u64,
    pub decode_errors: u64,
    /// Frames that met a full queue.
    pub queue_full: u64,
    pub retransmits: u64,
    /// Device connections that ended without the gateway asking (not a drain, not a re-home).
    pub churn_closes: u64,
    /// Connected device time, in milliseconds: the exposure churn is measured against.
    pub device_ms: u64,
}

impl Add for Counts {
    type Output = Counts;
    fn add(self, o: Counts) -> Counts {
        Counts {
            commands: self.commands + o.commands,
            successes: self.successes + o.successes,
            within_latency: self.within_latency + o.within_latency,
            frames: self.frames + o.frames,
            decode_errors: self.decode_errors + o.decode_errors,
            queue_full: self.queue_full + o.queue_full,
            retransmits: self.retransmits + o.retransmits,
            churn_closes: self.churn_closes + o.churn_closes,
            device_ms: self.device_ms + o.device_ms,
        }
    }
}

impl Sub for Counts {
    type Output = Counts;
    /// Saturating: a counter that went backwards (it cannot, in one process) yields 0, not a
    /// wrapped huge delta.
    fn sub(self, o: Counts) -> Counts {
        Counts {
            commands: self.commands.saturating_sub(o.commands),
            successes: self.successes.saturating_sub(o.successes),
            within_latency: self.within_latency.saturating_sub(o.within_latency),
            frames: self.frames.saturating_sub(o.frames),
            decode_errors: self.decode_errors.saturating_sub(o.decode_errors),
            queue_full: self.queue_full.saturating_sub(o.queue_full),
            retransmits: self.retransmits.saturating_sub(o.retransmits),
            churn_closes: self.churn_closes.saturating_sub(o.churn_closes),
            device_ms: self.device_ms.saturating_sub(o.device_ms),
        }
    }
}

/// One objective; the `slo` label.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumIter, Serialize,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Slo {
    /// Share of commands answered (f9) within `command_deadline`.
    Success,
    /// Share of answered commands answered within `slo.latency_threshold`.
    Latency,
    /// Share of frames that decoded (the SLI is 1 − decode-error ratio).
    DecodeErrors,
    /// Share of frames that did not meet a full queue.
    QueueFull,
    /// Share of commands not re-sent.
    Retransmits,
    /// Device-connection closes the gateway did not ask for, per connected device-hour.
    Churn,
}

impl Slo {
    /// `(bad, total)` events of this objective in `c`; for [`Slo::Churn`] the total is the
    /// exposure in device-hours.
    pub fn bad_total(self, c: &Counts) -> (f64, f64) {
        let f = |n: u64| n as f64;
        match self {
            Slo::Success => (f(c.commands.saturating_sub(c.successes)), f(c.commands)),
            Slo::Latency => (
                f(c.successes.saturating_sub(c.within_latency)),
                f(c.successes),
            ),
            Slo::DecodeErrors => (f(c.decode_errors), f(c.frames)),
            Slo::QueueFull => (f(c.queue_full), f(c.frames)),
            Slo::Retransmits => (f(c.retransmits), f(c.commands)),
            Slo::Churn => (f(c.churn_closes), c.device_ms as f64 / 3_600_000.0),
        }
    }
}
