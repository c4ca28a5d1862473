//! A routed connection ready to run, and the one signature both paths are started through.
//!
//! Invariants:
//! - The handler hands over everything a path needs in one [`Pair`]; a path owns both sockets
//!   from then on and returns why the pair ended.
//! - The new path needs a device id; legacy also carries connections without one (no valid
//!   hello), hence the id's type is the path's ([`Path::Id`]).

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use super::stop::ConnStop;
use super::tls::Stream;
use super::upstream::Dialer;
use super::CloseReason;
use crate::config::Config;

/// One routed connection and its upstream.
pub struct Pair<Id> {
    pub device: Stream,
    pub upstream: Stream,
    /// Bytes already read from the device (the hello peek), to be written upstream first.
    pub first: Bytes,
    pub device_id: Id,
    /// The configuration snapshot the connection runs on for its whole life.
    pub cfg: Arc<Config>,
    /// How it is asked to finish (drain or re-home).
    pub stop: Arc<ConnStop>,
    /// The connection's own dialer (its PROXY header, its source address), for the new
    /// path's redials; holding it holds the device's pool address.
    pub dialer: Dialer,
}

/// A path a routed connection can take.
pub trait Path {
    type Id;

    /// Runs `pair` until it ends.
    fn run(&self, pair: Pair<Self::Id>) -> impl Future<Output = CloseReason> + Send;
}
