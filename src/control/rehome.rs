//! Re-homing (design decision 4): open connections follow a routing change.
//!
//! Every routed connection with a device id is in the data plane's [`Registry`]. When the
//! configuration or the rollback latch changes, [`run`] finds the connections whose route now
//! differs and asks them, one after another, to finish (the data plane's
//! [`Finishing`](crate::conn::Finishing) closes them between frames, paced by the close
//! pacer). The device redials and is routed afresh.
//!
//! Invariants:
//! - A connection whose route did not change is never touched; each candidate is checked
//!   again against the configuration in force right before it is asked to close, so a change
//!   that is undone in time re-homes nobody.
//! - `rehome = "never"` leaves open connections where they are after a configuration change;
//!   the rollback latch still moves new-path connections to legacy (design decision 10).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::live::Live;
use super::router;
use crate::config::Rehome;
use crate::conn::registry::Registry;
use crate::conn::Transport;
use crate::protocol::DeviceId;
use crate::telemetry::labels::Label;
use crate::telemetry::metrics::Metrics;

/// The path `device` takes under the configuration in force now.
fn route_now(live: &Live) -> impl Fn(DeviceId) -> Transport {
    let cfg = live.config();
    let latched = live.latched();
    move |d| router::route(Some(d), &cfg.routing, latched).transport
}

/// Follows configuration changes and re-homes misrouted connections at the configured pace.
pub async fn run(
    live: Arc<Live>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut changes = live.subscribe();
    let mut queue: VecDeque<u64> = VecDeque::new();
    let mut next_slot = Instant::now();
    loop {
        let changed = if queue.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => { if r.is_err() { return; } true }
            }
        } else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => { if r.is_err() { return; } true }
                _ = tokio::time::sleep_until(next_slot) => false,
            }
        };
        if changed {
            changes.borrow_and_update();
            // The latch can change without a reload; keep the effective-percentage gauge true.
            super::reload::publish(&metrics, &live);
            let rate = live.config().routing.rehome_rate;
            registry.pacer().set_rate(rate);
            if live.config().routing.rehome == Rehome::Never && !live.latched() {
                queue.clear();
                continue;
            }
            // Whom this configuration moves, afresh: a change that was undone meanwhile
            // leaves nobody behind in the queue.
            let before = queue.len();
            queue = registry.misrouted(route_now(&live)).into();
            if !queue.is_empty() && queue.len() != before {
                info!(
                    connections = queue.len(),
                    rate_per_s = rate,
                    "routing changed; re-homing connections whose path changed"
                );
            }
            continue;
        }
        let Some(id) = queue.pop_front() else {
            continue;
        };
        // `rehome = "never"` is about configuration changes; a rollback moves everyone.
        if live.config().routing.rehome == Rehome::Never && !live.latched() {
            continue;
        }
        if let Some((device, from, to)) = registry.rehome(id, route_now(&live)) {
            metrics.rehomed(from, to);
            info!(%device, from = from.label(), to = to.label(), "re-homing connection");
            let rate = live.config().routing.rehome_rate;
            next_slot = Instant::now() + Duration::from_secs_f64(1.0 / rate);
        }
    }
}
