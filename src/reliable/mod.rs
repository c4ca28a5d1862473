//! The new path: a reliable session per device connection (design decision 7).
//!
//! - [`session`]: the per-connection state machine and its I/O shell;
//! - [`retry`]: commands in flight, their re-sends, and per-connection duplicate verdicts;
//! - [`dedup`]: per-device memory of retried commands, shared across connections;
//! - [`queue`]: the bounded queues between the two sides;
//! - [`resume`]: redialling the upstream under a live device.
//!
//! Invariants shared by all of them: nothing here originates a hello, heartbeat or command,
//! rewrites an id or msg_id, or stops reading from the device; time is always passed in.

pub mod dedup;
pub mod queue;
pub mod resume;
pub mod retry;
pub mod session;

pub use dedup::DedupStore;
pub use session::{run, SessionCtx};
