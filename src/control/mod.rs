//! The control plane: what decides where connections go, and every change to it.
//!
//! - [`live`]: the configuration in force and the rollback latch;
//! - [`router`]: the pure routing function (device id + routing config + latch → path);
//! - [`event`]: the one [`Control`] event stream every source sends on;
//! - [`apply`]: the control task, the single writer that applies those events;
//! - [`reload`]: reading, validating and merging the configuration file, and the file poll;
//! - [`rehome`]: moving open connections when their route changes;
//! - [`rollout`]: the stages, the gates of the next one, and automatic promotion;
//! - [`report`]: the rollout so far, stage by stage, and the validation period at 100 %;
//! - [`series`]: the metric series this layer and the data plane label, created at 0;
//! - [`status_page`]: the HTML status page served at `/` on the metrics address;
//! - [`hass`] and [`mqtt`]: the gateway as a Home Assistant device over MQTT.
//!
//! The data plane sees this layer only through [`ControlPlane`], its [`Routes`]
//! implementation.
//!
//! Invariants:
//! - Imports go down only: to [`crate::conn`] and the layers below it, never to the top.
//! - One writer: every change to [`live::Live`] is made by the control task, in event order.

pub mod admin;
pub mod apply;
pub mod audit;
pub mod event;
pub mod hass;
pub mod judge;
pub mod latch;
pub mod live;
pub mod mqtt;
pub mod rehome;
pub mod reload;
pub mod report;
pub mod rollback;
pub mod rollout;
pub mod router;
pub mod series;
pub mod slo_task;
pub mod state;
pub mod status_page;
pub mod webhook;

use std::sync::Arc;

pub use event::{Control, ControlTx, Origin, RollbackCause};
pub use live::Live;

use crate::config::Config;
use crate::conn::{Route, Routes};
use crate::protocol::DeviceId;

/// The control plane as the data plane asks it: the configuration in force and routes under
/// the current latch.
pub struct ControlPlane {
    live: Arc<Live>,
}

impl ControlPlane {
    pub fn new(live: Arc<Live>) -> Arc<ControlPlane> {
        Arc::new(ControlPlane { live })
    }
}

impl Routes for ControlPlane {
    fn config(&self) -> Arc<Config> {
        self.live.config()
    }

    fn route(&self, cfg: &Config, device: Option<DeviceId>) -> Route {
        router::route(device, &cfg.routing, self.live.latched())
    }

    fn shadowed(&self, cfg: &Config, device: DeviceId) -> bool {
        router::shadowed(device, &cfg.dark_launch)
    }
}
