//! What the control plane answers the data plane: the path a connection takes and why, and
//! the configuration in force. The data plane asks through [`Routes`]; the control plane
//! implements it, so the connection handler never imports routing or reload code.
//!
//! Invariants:
//! - A route is decided on the configuration in force when asked, never cached by the caller
//!   beyond the one connection it routes.

use std::sync::Arc;

use crate::config::Config;
use crate::protocol::DeviceId;
use crate::telemetry::labels::Transport;

/// Why a connection took its path; the `reason` label of `tcp_comm_routing_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum RouteReason {
    Percent,
    ForceNew,
    ForceLegacy,
    Rollback,
    NoHandshake,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub transport: Transport,
    pub reason: RouteReason,
}

/// The control plane, as the data plane sees it.
pub trait Routes: Send + Sync {
    /// The configuration in force now.
    fn config(&self) -> Arc<Config>;

    /// The route of a connection from `device` (`None`: no valid hello) under `cfg`, with the
    /// rollback latch as it is now.
    fn route(&self, cfg: &Config, device: Option<DeviceId>) -> Route;

    /// Whether the dark launch shadows a legacy connection from `device` under `cfg`.
    fn shadowed(&self, cfg: &Config, device: DeviceId) -> bool;
}
