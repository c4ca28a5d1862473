//! # cync-gateway
//!
//! A strangler gateway for Cync (GE) Wi-Fi devices: a TCP/TLS proxy between the devices and the
//! Home Assistant add-on that serves them, which moves devices a percentage at a time from the
//! legacy path (byte-exact passthrough) to a reliable stack, measures both, and rolls back by
//! itself when the new path burns its error budget.
//!
//! ```text
//!  devices ──TLS 23779──▶ cync-gateway ──▶ legacy path: byte-exact passthrough ──▶ add-on
//!                             │        └─▶ new path:    reliable session      ──▶ add-on / new server
//!                             ├─ router (sticky per device, % from config, rollback latch)
//!                             ├─ SLO engine ─▶ rollback controller
//!                             └─ :9400 /metrics /healthz /readyz
//! ```
//!
//! Layers, bottom to top; a module imports only from layers below it (or its own), which
//! `tests/layers.rs` checks on every file (`CONTRIBUTING.md` has the rule and the checklists):
//!
//! | layer | owns |
//! | --- | --- |
//! | [`protocol`] | the wire format: stream codec, resynchronising tap, typed packets, builders |
//! | [`config`] | the TOML file: its serde shape, the typed configuration, every problem at once |
//! | [`telemetry`] | metric names and families with typed record methods, logging, the HTTP endpoints |
//! | [`conn`] | the data plane: accept, one handler per connection, the legacy and new paths, dark launch |
//! | [`control`] | the control plane: the configuration in force, routing, reloads, re-homing, one event stream, SLOs, the rollback controller, the admin API |
//! | [`gateway`], [`shutdown`], [`demo`], [`runbook`] | wiring, signals and drain, the demo, the runbook commands' client |
//! | [`sim`] | simulated devices and add-on; uses only [`protocol`] and the TLS helpers of [`conn::tls`] |

// `deny`, not `forbid`: one audited block (offering a TLS session again, `conn::tls`) allows it.
#![deny(unsafe_code)]

pub mod config;
pub mod conn;
pub mod control;
pub mod demo;
pub mod gateway;
pub mod protocol;
pub mod runbook;
pub mod shutdown;
pub mod sim;
pub mod telemetry;
