//! The simulator: devices, a fake add-on with a command harness, a chaos proxy and a load
//! generator, usable from tests as a library and from `cync-sim` as commands.
//!
//! Everything here speaks the real protocol (built with [`crate::protocol::build`], parsed with
//! the same codec as the gateway) and takes its randomness from explicit seeds.

pub mod addon;
pub mod chaos;
pub mod device;
pub mod load;
