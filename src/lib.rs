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
//! Module map (one file per concept; `docs/architecture.md` has the longer story):
//!
//! | module | owns |
//! | --- | --- |
//! | [`protocol`] | the wire format: stream codec, typed packets |
//! | [`config`] | the TOML file and its validation |
//! | [`reload`] | the configuration in force, SIGHUP and file-poll reloads |
//! | [`rehome`] | open connections, and moving them when their route changes |
//! | [`listener`] | accept loop, TLS accept, handshake peek, connection limit |
//! | [`router`] | which path a device takes: its stable bucket and the percentage |
//! | [`legacy`] | byte-exact passthrough and its passive observer |
//! | [`reliable`] | the new path: retries, duplicate suppression, bounded queues, resumption |
//! | [`shadow`] | dark launch: observe and mirror modes, reply comparison |
//! | [`transactions`] | pairing requests with replies: outcomes and latencies |
//! | [`upstream`] | dialing the add-on |
//! | [`tls`] | OpenSSL contexts and the plain-or-TLS stream |
//! | [`metrics`] | the Prometheus families |
//! | [`admin`] | `/metrics`, `/healthz`, `/readyz` |
//! | [`shutdown`] | cancellation, task tracking, signals, drain |
//! | [`logging`] | tracing output |
//! | [`gateway`] | wiring all of the above from a config |

pub mod admin;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod legacy;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod rehome;
pub mod reliable;
pub mod reload;
pub mod router;
pub mod shadow;
pub mod shutdown;
pub mod sim;
pub mod tls;
pub mod transactions;
pub mod upstream;
