//! The data plane: everything that touches a device connection's bytes.
//!
//! One frame from accept to the upstream: [`listener`] accepts and admits, [`handler`] runs the
//! per-connection steps (TLS accept, hello peek, route, register, dial), then one of the two
//! paths runs the pair — [`legacy`] (byte-exact passthrough, with its observer and maybe a
//! [`shadow`]) or [`reliable`] (the new path's session) — writing to the stream [`upstream`]
//! dialled.
//!
//! The shared vocabulary lives here and in [`crate::telemetry::labels`]: the path
//! ([`Transport`]), the direction, why a pair ended ([`CloseReason`], with the side that caused
//! it), how a connection is asked to finish ([`stop`]), and what the control plane answers
//! ([`Routes`], [`Route`]).
//!
//! Invariants:
//! - Imports go to [`crate::protocol`], [`crate::config`], [`crate::telemetry`] only; the
//!   control plane is reached through the [`Routes`] trait it implements, injected at wiring.
//! - Both paths are started through one signature ([`pair::Path`]).

pub mod admission;
pub mod close;
pub mod fifo;
pub mod handler;
pub mod legacy;
pub mod listener;
pub mod pair;
pub mod proxy_protocol;
pub mod registry;
pub mod reliable;
pub mod route;
pub mod shadow;
pub mod source;
pub mod stop;
pub mod tls;
pub mod transactions;
pub mod upstream;

pub use crate::telemetry::labels::{Direction, Transport};
pub use close::{CloseReason, Side};
pub use route::{Route, RouteReason, Routes};
pub use stop::{ClosePacer, ConnStop, Finishing};
