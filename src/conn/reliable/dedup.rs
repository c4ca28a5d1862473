//! Per-device memory of retried commands, shared by every session of the gateway, so a late
//! duplicate reply caused by a retry is recognised even after the device has reconnected.
//!
//! A retry makes the device answer twice; within one connection [`super::retry::Outstanding`]
//! already drops the second answer. This store covers what that table cannot: answers that
//! come after the table forgot the command, or on the device's next connection.
//!
//! Invariants:
//! - Bounded: at most `capacity` entries per device (least recently retried evicted first),
//!   each valid for `ttl`; [`DedupStore::sweep`] drops devices whose entries have all expired.
//! - Only retried commands are remembered, and an entry is forgotten as soon as the upstream
//!   sends a new command with the same inner seq for that device, so a legitimate reply is
//!   never taken for a late duplicate.
//! - Never consulted for anything but `f9` replies and 0x7b acks of commands.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use lru::LruCache;
use tokio::time::Instant;

use super::retry::AckKey;
use crate::protocol::DeviceId;

type Entries = LruCache<(u8, AckKey), Instant>;

#[derive(Debug)]
pub struct DedupStore {
    capacity: NonZeroUsize,
    ttl: Duration,
    devices: Mutex<HashMap<DeviceId, Entries>>,
    last_sweep: Mutex<Option<Instant>>,
}

/// Spacing of whole-store sweeps; devices that never return are dropped at this pace.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

impl DedupStore {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity: NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            ttl,
            devices: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, Entries>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn purge(entries: &mut Entries, ttl: Duration, now: Instant) {
        while let Some((_, at)) = entries.peek_lru() {
            if now.saturating_duration_since(*at) < ttl {
                break;
            }
            entries.pop_lru();
        }
    }

    /// A command was re-sent to `device`.
    pub fn remember(&self, device: DeviceId, seq: u8, key: AckKey, now: Instant) {
        let mut map = self.lock();
        let entries = map
            .entry(device)
            .or_insert_with(|| LruCache::new(self.capacity));
        entries.put((seq, key), now);
        Self::purge(entries, self.ttl, now);
    }

    /// The upstream sent `device` a new command with this inner seq: replies to it are new.
    pub fn forget_seq(&self, device: DeviceId, seq: u8) {
        let mut map = self.lock();
        let Some(entries) = map.get_mut(&device) else {
            return;
        };
        let stale: Vec<(u8, AckKey)> = entries
            .iter()
            .filter(|((s, _), _)| *s == seq)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            entries.pop(&k);
        }
    }

    fn find(&self, device: DeviceId, now: Instant, hit: impl Fn(&(u8, AckKey)) -> bool) -> bool {
        let mut map = self.lock();
        let Some(entries) = map.get_mut(&device) else {
            return false;
        };
        Self::purge(entries, self.ttl, now);
        let found = entries.iter().any(|(k, _)| hit(k));
        found
    }

    /// Is an `f9` reply with this seq a late answer to a retried command?
    pub fn late_reply(&self, device: DeviceId, seq: u8, now: Instant) -> bool {
        self.find(device, now, |(s, _)| *s == seq)
    }

    /// Is a 0x7b echoing `key` a late answer to a retried command?
    pub fn late_ack(&self, device: DeviceId, key: AckKey, now: Instant) -> bool {
        self.find(device, now, |(_, k)| *k == key)
    }

    /// Entries held for `device` (expired ones included until the next purge).
    pub fn len(&self, device: DeviceId) -> usize {
        self.lock().get(&device).map_or(0, |e| e.len())
    }

    /// Number of devices with entries.
    pub fn devices(&self) -> usize {
        self.lock().len()
    }

    /// A session of `device` ended: drops its expired entries now, and sweeps the whole store
    /// if the last sweep is older than [`SWEEP_EVERY`] (so the cost is not paid per close).
    pub fn session_closed(&self, device: DeviceId, now: Instant) {
        {
            let mut map = self.lock();
            if let Some(e) = map.get_mut(&device) {
                Self::purge(e, self.ttl, now);
                if e.is_empty() {
                    map.remove(&device);
                }
            }
        }
        let due = {
            let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            self.sweep(now);
        }
    }

    /// Drops expired entries everywhere, and devices left with none.
    pub fn sweep(&self, now: Instant) {
        let ttl = self.ttl;
        self.lock().retain(|_, e| {
            Self::purge(e, ttl, now);
            !e.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MsgId;

    const DEV: DeviceId = DeviceId([1, 2, 3, 4]);
    const KEY: AckKey = (DEV, MsgId([0, 0, 0]));

    #[tokio::test(start_paused = true)]
    async fn remembers_for_the_ttl_then_forgets() {
        let s = DedupStore::new(1000, Duration::from_secs(300));
        s.remember(DEV, 7, KEY, Instant::now());
        assert!(s.late_reply(DEV, 7, Instant::now()));
        assert!(s.late_ack(DEV, KEY, Instant::now()));
        assert!(!s.late_reply(DEV, 8, Instant::now()));
        assert!(!s.late_reply(DeviceId([9, 9, 9, 9]), 7, Instant::now()));
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(s.late_reply(DEV, 7, Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!s.late_reply(DEV, 7, Instant::now()));
        s.sweep(Instant::now());
        assert_eq!(s.devices(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_sessions_sweep_other_devices_at_most_once_a_minute() {
        let s = DedupStore::new(1000, Duration::from_secs(300));
        let other = DeviceId([9, 9, 9, 9]);
        s.remember(other, 1, (other, MsgId([0, 0, 0])), Instant::now());
        tokio::time::advance(Duration::from_secs(250)).await;
        s.session_closed(DEV, Instant::now());
        assert_eq!(s.devices(), 1, "swept at 250 s; the entry is still fresh");
        tokio::time::advance(Duration::from_secs(55)).await;
        s.session_closed(DEV, Instant::now());
        assert_eq!(s.devices(), 1, "expired, but the last sweep was 55 s ago");
        tokio::time::advance(Duration::from_secs(5)).await;
        s.session_closed(DEV, Instant::now());
        assert_eq!(s.devices(), 0);
    }

    #[test]
    fn capacity_evicts_the_least_recent() {
        let s = DedupStore::new(1000, Duration::from_secs(300));
        let now = Instant::now();
        for i in 0..1500u32 {
            let b = i.to_be_bytes();
            s.remember(DEV, (i % 256) as u8, (DEV, MsgId([b[2], b[3], 0])), now);
        }
        assert_eq!(s.len(DEV), 1000);
        assert!(
            !s.late_ack(DEV, (DEV, MsgId([0, 0, 0])), now),
            "oldest evicted"
        );
        let b = 1499u32.to_be_bytes();
        assert!(s.late_ack(DEV, (DEV, MsgId([b[2], b[3], 0])), now));
    }

    #[test]
    fn a_new_command_with_the_seq_clears_it() {
        let s = DedupStore::new(1000, Duration::from_secs(300));
        let now = Instant::now();
        s.remember(DEV, 7, KEY, now);
        s.forget_seq(DEV, 7);
        assert!(!s.late_reply(DEV, 7, now));
    }
}
