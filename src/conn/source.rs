//! Where an upstream connection comes from (`upstream.*.source_address`): the host's choice,
//! a device's own address of a pool, or the device's own address (transparent).
//!
//! Invariants:
//! - A pool address is chosen stably from the device id (its *preferred* address), so a device
//!   keeps it across reconnects, restarts and instances; while another device holds that
//!   address the next free one of the pool is taken instead (*moved*), and only when every
//!   address is held are two devices put on one (*shared*). Both are collisions, counted.
//! - An address is held by a [`Lease`] for the whole device connection (the new path's
//!   redials included) and released when the connection ends; one device may hold its address
//!   several times (a re-homed connection and its successor overlap).
//! - Transparent binds need `CAP_NET_ADMIN` or `CAP_NET_RAW`; [`transparent_available`] is checked at start so
//!   a missing capability is one clear error, not a failed dial per device.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpSocket, TcpStream};

use crate::protocol::DeviceId;
use crate::telemetry::labels::SourceCollision;

/// The preferred pool address of `device`: `u64_be(SHA-256("cync-gateway/v1/source:" +
/// hex(id))[0..8]) % len`.
pub fn pool_index(len: usize, device: DeviceId) -> Option<usize> {
    use sha2::{Digest, Sha256};
    if len == 0 {
        return None;
    }
    let d = Sha256::digest(format!("cync-gateway/v1/source:{}", device.to_hex()).as_bytes());
    let n = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    Some((n % len as u64) as usize)
}

/// One upstream's pool and who holds which address.
pub struct Pool {
    addresses: Vec<IpAddr>,
    held: Mutex<HashMap<IpAddr, HashMap<DeviceId, usize>>>,
}

/// An address held for one device connection; released on drop.
pub struct Lease {
    pool: Arc<Pool>,
    device: DeviceId,
    pub address: IpAddr,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut held = self.pool.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(devices) = held.get_mut(&self.address) {
            if let Some(n) = devices.get_mut(&self.device) {
                *n -= 1;
                if *n == 0 {
                    devices.remove(&self.device);
                }
            }
            if devices.is_empty() {
                held.remove(&self.address);
            }
        }
    }
}

impl Pool {
    pub fn new(addresses: Vec<IpAddr>) -> Arc<Pool> {
        Arc::new(Pool {
            addresses,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// An address for `device`: its preferred one unless another device holds it, then the
    /// next free one, and the preferred one shared when none is free; with the collision, if
    /// there was one. `None`: an empty pool.
    pub fn lease(self: &Arc<Self>, device: DeviceId) -> Option<(Lease, Option<SourceCollision>)> {
        let len = self.addresses.len();
        let start = pool_index(len, device)?;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let free_for = |ip: &IpAddr| {
            held.get(ip)
                .is_none_or(|d| d.keys().all(|holder| *holder == device))
        };
        let (address, how) = (0..len)
            .map(|i| self.addresses[(start + i) % len])
            .enumerate()
            .find(|(_, ip)| free_for(ip))
            .map(|(i, ip)| (ip, (i > 0).then_some(SourceCollision::Moved)))
            .unwrap_or((self.addresses[start], Some(SourceCollision::Shared)));
        *held.entry(address).or_default().entry(device).or_insert(0) += 1;
        drop(held);
        Some((
            Lease {
                pool: self.clone(),
                device,
                address,
            },
            how,
        ))
    }

    /// Addresses held by at least one device now.
    pub fn in_use(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Connects to `target` from `from`; `transparent` lets `from` be an address that is not the
/// host's own (`IP_TRANSPARENT`).
pub async fn connect_from(
    from: IpAddr,
    target: SocketAddr,
    transparent: bool,
) -> std::io::Result<TcpStream> {
    let socket = if from.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if transparent {
        socket2::SockRef::from(&socket).set_ip_transparent(true)?;
    }
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(target).await
}

/// Whether this process may make transparent connections (it needs `CAP_NET_ADMIN` or
/// `CAP_NET_RAW`).
pub fn transparent_available() -> std::io::Result<()> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_ip_transparent(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 9, 0, n])
    }

    /// Device ids whose preferred index in a pool of `len` is `want`, by the formula in the
    /// configuration reference.
    fn ids_preferring(len: usize, want: usize, count: usize) -> Vec<DeviceId> {
        (0u32..)
            .map(|n| DeviceId(n.to_be_bytes()))
            .filter(|d| pool_index(len, *d) == Some(want))
            .take(count)
            .collect()
    }

    #[test]
    fn the_preferred_address_follows_the_documented_formula() {
        use sha2::{Digest, Sha256};
        for id in [0u32, 1, 0x1234_5678, u32::MAX] {
            let d = DeviceId(id.to_be_bytes());
            let h = Sha256::digest(format!("cync-gateway/v1/source:{id:08x}").as_bytes());
            let n = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
            assert_eq!(pool_index(7, d), Some((n % 7) as usize));
        }
        assert_eq!(pool_index(0, DeviceId([0, 0, 0, 1])), None);
    }

    #[test]
    fn a_collision_moves_the_second_device_to_a_free_address_and_back_when_it_frees() {
        let pool = Pool::new((0..4).map(ip).collect());
        let ids = ids_preferring(4, 2, 2);
        let (a, how_a) = pool.lease(ids[0]).expect("lease");
        assert_eq!((a.address, how_a), (ip(2), None));
        let (b, how_b) = pool.lease(ids[1]).expect("lease");
        assert_eq!((b.address, how_b), (ip(3), Some(SourceCollision::Moved)));
        // The same device again (a re-homed connection overlapping its successor): its own.
        let (a2, how) = pool.lease(ids[0]).expect("lease");
        assert_eq!((a2.address, how), (ip(2), None));
        drop((a, a2));
        drop(b);
        assert_eq!(pool.in_use(), 0);
        let (b, how) = pool.lease(ids[1]).expect("lease");
        assert_eq!((b.address, how), (ip(2), None));
    }

    #[test]
    fn a_full_pool_shares_the_preferred_address() {
        let pool = Pool::new((0..2).map(ip).collect());
        let first = ids_preferring(2, 0, 3);
        let (_a, _) = pool.lease(first[0]).expect("lease");
        let (_b, how_b) = pool.lease(first[1]).expect("lease");
        assert_eq!(how_b, Some(SourceCollision::Moved));
        let (c, how_c) = pool.lease(first[2]).expect("lease");
        assert_eq!((c.address, how_c), (ip(0), Some(SourceCollision::Shared)));
        assert_eq!(pool.in_use(), 2);
        assert!(Pool::new(vec![]).lease(DeviceId([0, 0, 0, 1])).is_none());
    }
}
