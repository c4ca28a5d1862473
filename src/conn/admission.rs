//! Admission: the two connection budgets a device connection must fit in.
//!
//! Invariants:
//! - From accept until its hello a connection holds a pre-hello slot ([`PendingSlot`]:
//!   `listen.max_pending`, at most `max_pending_per_source` per source address), so a flood of
//!   stalled handshakes cannot take the slots devices need; once routed it holds one of
//!   `listen.max_connections` for its whole life. Slots are released on drop, however the
//!   handler ends.
//! - A refused connection is closed at once, counted by reason, and logged at most once per
//!   [`LIMIT_LOG_EVERY`], with how many were refused meanwhile.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::warn;

use crate::telemetry::labels::{Label, Reject};
use crate::telemetry::metrics::Metrics;

/// Minimum spacing of "connection limit reached" warnings.
pub const LIMIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The admission budgets: routed connections, and the smaller pre-hello budget (overall and
/// per source address) that a connection holds from accept until its hello has been read.
pub struct Admission {
    routed: Arc<Semaphore>,
    pending: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    max_per_source: usize,
    /// Refusals since the last warning, and when that was.
    refused: Mutex<(u64, Option<Instant>)>,
}

/// A pre-hello slot: one of `max_pending`, and one of its source's (once the source is
/// known: a connection behind a PROXY header has its source only after the header). Released
/// on drop.
pub struct PendingSlot {
    admission: Arc<Admission>,
    source: Option<IpAddr>,
    _permit: OwnedSemaphorePermit,
}

impl PendingSlot {
    /// Counts this slot against `source` from now on, or says it is over its limit (the slot
    /// is then dropped by the caller and released).
    pub fn assign_source(&mut self, source: IpAddr) -> Result<(), Reject> {
        let mut map = self
            .admission
            .per_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if map
            .get(&source)
            .is_some_and(|n| *n >= self.admission.max_per_source)
        {
            return Err(Reject::SourceLimit);
        }
        *map.entry(source).or_insert(0) += 1;
        self.source = Some(source);
        Ok(())
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let Some(source) = self.source else {
            return;
        };
        let mut map = self
            .admission
            .per_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&source);
            }
        }
    }
}

impl Admission {
    pub fn new(listen: &crate::config::Listen) -> Arc<Admission> {
        Arc::new(Admission {
            routed: Arc::new(Semaphore::new(listen.max_connections)),
            pending: Arc::new(Semaphore::new(listen.max_pending)),
            per_source: Mutex::new(HashMap::new()),
            max_per_source: listen.max_pending_per_source,
            refused: Mutex::new((0, None)),
        })
    }

    /// A pre-hello slot for a connection from `source`, or why there is none.
    pub fn pending(self: &Arc<Self>, source: IpAddr) -> Result<PendingSlot, Reject> {
        let mut map = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        // Checked without inserting: a refused source must leave no entry behind (a flood
        // from many addresses would otherwise grow the map while the budget is full).
        if map.get(&source).is_some_and(|n| *n >= self.max_per_source) {
            return Err(Reject::SourceLimit);
        }
        let permit = self
            .pending
            .clone()
            .try_acquire_owned()
            .map_err(|_| Reject::PendingLimit)?;
        *map.entry(source).or_insert(0) += 1;
        Ok(PendingSlot {
            admission: self.clone(),
            source: Some(source),
            _permit: permit,
        })
    }

    /// A pre-hello slot whose source is not known yet (a balancer's connection, whose PROXY
    /// header names the device): the per-source limit applies once
    /// [`PendingSlot::assign_source`] is called, or the balancer's one address would use it up.
    pub fn pending_unsourced(self: &Arc<Self>) -> Result<PendingSlot, Reject> {
        let permit = self
            .pending
            .clone()
            .try_acquire_owned()
            .map_err(|_| Reject::PendingLimit)?;
        Ok(PendingSlot {
            admission: self.clone(),
            source: None,
            _permit: permit,
        })
    }

    /// Source addresses holding pre-hello slots now.
    pub fn pending_sources(&self) -> usize {
        self.per_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// A routed slot, held for the connection's life; `None` when all are taken.
    pub fn routed(&self) -> Option<OwnedSemaphorePermit> {
        self.routed.clone().try_acquire_owned().ok()
    }

    /// Pre-hello slots free now.
    pub fn pending_free(&self) -> usize {
        self.pending.available_permits()
    }

    /// Routed slots free now.
    pub fn routed_free(&self) -> usize {
        self.routed.available_permits()
    }

    /// Counts a refusal and warns at most every [`LIMIT_LOG_EVERY`], with how many were
    /// refused meanwhile.
    pub fn refuse(&self, metrics: &Metrics, reason: Reject, peer: SocketAddr) {
        metrics.rejected(reason);
        let mut r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        r.0 += 1;
        if r.1.is_none_or(|t| t.elapsed() >= LIMIT_LOG_EVERY) {
            warn!(
                %peer,
                reason = reason.label(),
                refused = r.0,
                "refusing new device connections: a connection budget is full (listen.max_connections, max_pending, max_pending_per_source)"
            );
            *r = (0, Some(Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_pending: usize, per_source: usize) -> Arc<Admission> {
        let text = format!(
            "[listen]\nmax_pending = {max_pending}\nmax_pending_per_source = {per_source}\n\
             [upstream.legacy]\naddress = \"127.0.0.1:1\"\n"
        );
        let cfg = crate::config::Config::parse(&text).expect("config");
        Admission::new(&cfg.listen)
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn refusals_leave_no_per_source_entries_behind() {
        let a = admission(2, 1);
        let held: Vec<PendingSlot> = (0..2).map(|n| a.pending(ip(n)).expect("slot")).collect();
        assert_eq!(a.pending_sources(), 2);
        // The budget is full: 100 more sources are refused and remembered by none.
        for n in 2..102 {
            assert!(matches!(a.pending(ip(n)), Err(Reject::PendingLimit)));
        }
        assert!(matches!(a.pending(ip(0)), Err(Reject::SourceLimit)));
        assert_eq!(a.pending_sources(), 2);
        drop(held);
        assert_eq!(a.pending_sources(), 0);
        assert_eq!(a.pending_free(), 2);
    }

    #[test]
    fn a_slot_behind_a_proxy_header_counts_against_its_device_once_known() {
        let a = admission(4, 1);
        // Three connections from one balancer: the per-source limit (1) does not apply yet.
        let mut slots: Vec<PendingSlot> = (0..3)
            .map(|_| a.pending_unsourced().expect("slot"))
            .collect();
        assert_eq!(a.pending_sources(), 0);
        assert!(slots[0].assign_source(ip(7)).is_ok());
        assert!(matches!(
            slots[1].assign_source(ip(7)),
            Err(Reject::SourceLimit)
        ));
        assert!(slots[2].assign_source(ip(8)).is_ok());
        assert_eq!(a.pending_sources(), 2);
        assert!(matches!(a.pending(ip(7)), Err(Reject::SourceLimit)));
        drop(slots);
        assert_eq!(a.pending_sources(), 0);
        assert_eq!(a.pending_free(), 4);
    }
}
