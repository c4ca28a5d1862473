//! Routing: which path a device's connection takes (design decisions 2 and 3).
//!
//! Owns the stable bucket of a device and the percentage rule. It is pure: the same device id
//! and percentage give the same answer in every process and after every restart, because the
//! bucket comes from a hash of the id alone and nothing is cached.
//!
//! Invariants:
//! - `bucket(id) = u64_be(SHA-256("cync-gateway/v1:" + hex(id))[0..8]) % 10_000`, and a device
//!   is on the new path iff `bucket < percent * 100`; raising the percentage only ever adds
//!   devices.
//! - Percent 0 routes nothing to the new path and 100 routes everything.

use sha2::{Digest, Sha256};

use crate::metrics::Transport;
use crate::protocol::DeviceId;

/// Number of buckets: percent is resolved to 0.01 % steps.
pub const BUCKETS: u64 = 10_000;

/// The device's stable bucket, 0..10_000.
pub fn bucket(id: DeviceId) -> u64 {
    let mut h = Sha256::new();
    h.update(b"cync-gateway/v1:");
    h.update(id.to_hex().as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) % BUCKETS
}

/// The path for `id` at `percent` (0–100).
pub fn by_percent(id: DeviceId, percent: f64) -> Transport {
    // Percent has at most two decimals (validated), so percent * 100 is an integer up to
    // rounding error; round rather than truncate so 10.01 % is 1001 buckets, not 1000.
    let threshold = (percent * 100.0).round().clamp(0.0, BUCKETS as f64) as u64;
    if bucket(id) < threshold {
        Transport::New
    } else {
        Transport::Legacy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> DeviceId {
        DeviceId(n.to_be_bytes())
    }

    #[test]
    fn bucket_follows_the_documented_formula() {
        // Computed independently: sha256("cync-gateway/v1:38e8cf46") starts with these bytes.
        let d = DeviceId([0x38, 0xe8, 0xcf, 0x46]);
        let digest = Sha256::digest(b"cync-gateway/v1:38e8cf46");
        let want = u64::from_be_bytes([
            digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
        ]) % 10_000;
        assert_eq!(bucket(d), want);
    }

    #[test]
    fn extremes_and_monotonic_growth() {
        for n in 0..2000 {
            assert_eq!(by_percent(id(n), 0.0), Transport::Legacy);
            assert_eq!(by_percent(id(n), 100.0), Transport::New);
            if by_percent(id(n), 10.0) == Transport::New {
                assert_eq!(by_percent(id(n), 25.0), Transport::New);
            }
        }
        let share = (0..10_000)
            .filter(|n| by_percent(id(*n), 10.0) == Transport::New)
            .count();
        assert!((800..=1200).contains(&share), "{share} of 10000 at 10 %");
    }
}
