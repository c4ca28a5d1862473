//! The configuration in force and the rollback latch: what every new connection routes and
//! runs on.
//!
//! Invariants:
//! - Readers take a snapshot ([`Live::config`]: an `ArcSwap` load, no lock) and keep it for
//!   the one connection or decision they make; nothing caches it beyond that.
//! - One writer: `Live::store` and `Live::set_latch` are visible only inside the control
//!   plane, and only its control task ([`super::apply`]) calls them, so every change goes
//!   through one place (the one the audit log hangs on).
//! - Every change of either bumps a generation on a watch channel ([`Live::subscribe`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::Config;

/// The configuration in force and the rollback latch.
pub struct Live {
    config: ArcSwap<Config>,
    latched: AtomicBool,
    /// When the latch was last cleared: what happened before it is not the resumed path's.
    cleared_at: std::sync::Mutex<Option<tokio::time::Instant>>,
    generation: watch::Sender<u64>,
}

impl Live {
    pub fn new(config: Config) -> Arc<Live> {
        Self::starting(config, false)
    }

    /// As the gateway starts: with the latch as its file says ([`super::latch::load`]).
    pub fn starting(config: Config, latched: bool) -> Arc<Live> {
        let (generation, _) = watch::channel(0);
        Arc::new(Live {
            config: ArcSwap::from_pointee(config),
            latched: AtomicBool::new(latched),
            cleared_at: std::sync::Mutex::new(None),
            generation,
        })
    }

    /// A snapshot: what a new connection uses for its whole life.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn latched(&self) -> bool {
        self.latched.load(Ordering::SeqCst)
    }

    /// Sets or clears the rollback latch; routing follows at once and open connections are
    /// re-homed. Only the control task calls this (through a [`super::Control`] event).
    pub(super) fn set_latch(&self, on: bool) {
        if !on && self.latched() {
            *self.cleared_at.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(tokio::time::Instant::now());
        }
        self.latched.store(on, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// When the latch was last cleared, if it ever was in this process.
    pub fn cleared_at(&self) -> Option<tokio::time::Instant> {
        *self.cleared_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bumps on every change of configuration or latch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Only the control task calls this (a reload it applied).
    pub(super) fn store(&self, config: Config) {
        self.config.store(Arc::new(config));
        self.generation.send_modify(|g| *g += 1);
    }
}
