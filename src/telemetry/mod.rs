//! Telemetry: what the gateway tells its operators.
//!
//! - [`labels`]: the label vocabulary shared by every layer above (path, direction, outcomes),
//!   spelled once by a derive.
//! - [`metrics`]: every Prometheus family, its name in one place, and typed record methods so a
//!   call site cannot get a label's arity or spelling wrong.
//! - [`logging`]: tracing output and rate-limited warnings.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`, the status page's slot.
//! - [`trace`]: one structured event per command, logged and followed live.
//! - [`systemd`]: readiness, reload, stop and watchdog notifications (`Type=notify`).
//!
//! Imports only [`crate::protocol`] and [`crate::config`].

pub mod http;
pub mod labels;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod slo;
pub mod slo_feed;
pub mod systemd;
pub mod tasks;
pub mod trace;
pub mod wallclock;
