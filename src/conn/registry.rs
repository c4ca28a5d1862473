//! The routed connections that are open now: each with its device, its path and its
//! [`ConnStop`], so the control plane can find those a routing change moves and ask them to
//! finish.
//!
//! Invariants:
//! - A connection is registered before its handler awaits anything after routing, and
//!   unregistered when its [`Registration`] drops, however the handler ends.
//! - The registry decides nothing: who is misrouted is the caller's question, asked with the
//!   route function it passes in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::stop::{ClosePacer, ConnStop};
use super::Transport;
use crate::protocol::DeviceId;

struct Entry {
    device: DeviceId,
    transport: Transport,
    stop: Arc<ConnStop>,
}

/// The routed connections that are open now.
pub struct Registry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
    pacer: Arc<ClosePacer>,
}

/// Removes its connection from the registry when dropped.
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registry {
    pub fn new(rehome_rate: f64) -> Registry {
        Registry {
            next: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            pacer: Arc::new(ClosePacer::new(rehome_rate)),
        }
    }

    /// The pacer every re-homed connection of this registry takes its close slot from.
    pub fn pacer(&self) -> Arc<ClosePacer> {
        self.pacer.clone()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(
        self: &Arc<Self>,
        device: DeviceId,
        transport: Transport,
        stop: Arc<ConnStop>,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            Entry {
                device,
                transport,
                stop,
            },
        );
        Registration {
            registry: self.clone(),
            id,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every open connection's device and path.
    pub fn snapshot(&self) -> Vec<(DeviceId, Transport)> {
        self.lock()
            .values()
            .map(|e| (e.device, e.transport))
            .collect()
    }

    /// Connections on `transport` now.
    pub fn count(&self, transport: Transport) -> usize {
        self.lock()
            .values()
            .filter(|e| e.transport == transport)
            .count()
    }

    /// Connections not yet asked to re-home whose route under `route_of` differs from their
    /// path, oldest first.
    pub fn misrouted(&self, route_of: impl Fn(DeviceId) -> Transport) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .lock()
            .iter()
            .filter(|(_, e)| !e.stop.is_rehome() && route_of(e.device) != e.transport)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Asks connection `id` to re-home if it is still open, not yet asked, and `route_of` now
    /// gives it another path; returns its move (device, from, to).
    pub fn rehome(
        &self,
        id: u64,
        route_of: impl Fn(DeviceId) -> Transport,
    ) -> Option<(DeviceId, Transport, Transport)> {
        let map = self.lock();
        let e = map.get(&id)?;
        let to = route_of(e.device);
        if to == e.transport || e.stop.is_rehome() {
            return None;
        }
        e.stop.rehome();
        Some((e.device, e.transport, to))
    }
}
