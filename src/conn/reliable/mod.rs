//! The new path: a reliable session per device connection (design decision 7).
//!
//! - [`core`]: the per-connection state machine (no I/O, time passed in);
//! - [`session`]: its I/O shell, and the new path's entry point;
//! - [`retry`]: commands in flight, their re-sends, and per-connection duplicate verdicts;
//! - [`rto`]: each device's adaptive retry timeout;
//! - [`budget`]: the path-wide cap on retries;
//! - [`dedup`]: per-device memory of retried commands, shared across connections;
//! - [`queue`]: the bounded queues between the two sides;
//! - [`resume`]: redialling the upstream under a live device;
//! - [`preamble`]: what a device told the server after connecting, replayed on resumption;
//! - [`signal`]: the wake-ups between the parts of one session.
//!
//! Invariants shared by all of them: nothing here originates a hello, heartbeat or command,
//! rewrites an id or msg_id, or stops reading from the device; time is always passed in.

pub mod budget;
pub mod core;
pub mod dedup;
pub mod preamble;
pub mod queue;
pub mod resume;
pub mod retry;
pub mod rto;
pub mod session;
pub mod signal;

pub use self::core::SessionCtx;
pub use dedup::DedupStore;
