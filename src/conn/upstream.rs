//! Dialing an upstream (the add-on): resolve `host:port`, connect within a timeout, then TLS
//! (without SNI or host-name checks) or plaintext, as configured.
//!
//! Invariants:
//! - One call, one new connection: connections are never pooled or shared, because the add-on
//!   keys all of its state on the connection (protocol doc §14.3).
//! - The name is resolved at each dial, so an add-on that moves is followed without a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openssl::ssl::SslConnector;
use thiserror::Error;
use tokio::net::TcpStream;

use crate::config::{ProxyProtocol, SourceAddress, Upstream};
use crate::conn::tls::{self, Stream, TlsError};
use crate::protocol::DeviceId;

/// Why a dial failed; its derived label is the `reason` of `tcp_comm_upstream_connect_errors_total`.
#[derive(Debug, Error, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum DialError {
    #[error("resolving {addr}: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
    /// The TCP connection was accepted but the TLS handshake did not finish in time: most
    /// often a server that does not speak TLS (`tls = true` toward a plain one).
    #[error("TLS handshake with {addr}: no answer within {after:?} of connecting (the TCP connection was accepted; does the server speak TLS? see `tls` of this upstream)")]
    TlsTimeout { addr: String, after: Duration },
    #[error("TLS to {addr}: {source}")]
    Tls { addr: String, source: TlsError },
}

/// Turns on TCP keepalive with `idle` before the first probe (then probes every quarter of it,
/// at least a second apart, four times): a peer that vanished without a FIN (Wi-Fi gone, a
/// host powered off) is noticed even on a connection nothing is written to. Zero leaves it off.
pub fn set_keepalive(tcp: &TcpStream, idle: Duration) -> std::io::Result<()> {
    if idle.is_zero() {
        return Ok(());
    }
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / 4).max(Duration::from_secs(1)))
        .with_retries(4);
    socket2::SockRef::from(tcp).set_tcp_keepalive(&ka)
}

/// Knows how to reach one upstream.
#[derive(Clone)]
pub struct Dialer {
    address: String,
    connector: Option<Arc<SslConnector>>,
    connect_timeout: Duration,
    keepalive: Duration,
    proxy: ProxyProtocol,
    /// The device connection this dialer serves: (the device's address, the address it
    /// connected to), for the PROXY header. `None`: a header that says "unknown".
    origin: Option<(SocketAddr, SocketAddr)>,
    source: Arc<SourceAddress>,
    /// The device, for a pool address chosen from its id.
    device: Option<DeviceId>,
}

/// The pool address of `device`: `u64_be(SHA-256("cync-gateway/v1/source:" + hex(id))[0..8])
/// % len`, so a device keeps its address across reconnects, restarts and instances.
pub fn pool_address(pool: &[std::net::IpAddr], device: DeviceId) -> Option<std::net::IpAddr> {
    use sha2::{Digest, Sha256};
    if pool.is_empty() {
        return None;
    }
    let d = Sha256::digest(format!("cync-gateway/v1/source:{}", device.to_hex()).as_bytes());
    let n = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    pool.get((n % pool.len() as u64) as usize).copied()
}

/// The PROXY protocol header for a connection from `origin` (client, then the address it
/// connected to); `None` when `proxy` is off. Built by the `ppp` crate: v1 `PROXY TCP4|TCP6
/// … \r\n` (`UNKNOWN` without an origin or with mixed families), v2 a PROXY command over
/// TCP (a LOCAL command without an origin).
pub fn proxy_header(
    proxy: ProxyProtocol,
    origin: Option<(SocketAddr, SocketAddr)>,
) -> Option<Vec<u8>> {
    use ppp::{v1, v2};
    let pair = |o: Option<(SocketAddr, SocketAddr)>| match o {
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => Some((
            v1::Addresses::new_tcp4(*s.ip(), *d.ip(), s.port(), d.port()),
            v2::Addresses::IPv4(v2::IPv4::new(*s.ip(), *d.ip(), s.port(), d.port())),
        )),
        Some((SocketAddr::V6(s), SocketAddr::V6(d))) => Some((
            v1::Addresses::new_tcp6(*s.ip(), *d.ip(), s.port(), d.port()),
            v2::Addresses::IPv6(v2::IPv6::new(*s.ip(), *d.ip(), s.port(), d.port())),
        )),
        _ => None,
    };
    match proxy {
        ProxyProtocol::Off => None,
        ProxyProtocol::V1 => Some(match pair(origin) {
            Some((a, _)) => a.to_string().into_bytes(),
            None => v1::Addresses::Unknown.to_string().into_bytes(),
        }),
        ProxyProtocol::V2 => {
            let built = match pair(origin) {
                Some((_, a)) => v2::Builder::with_addresses(
                    v2::Version::Two | v2::Command::Proxy,
                    v2::Protocol::Stream,
                    a,
                )
                .build(),
                None => v2::Builder::new(
                    v2::Version::Two | v2::Command::Local,
                    v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
                )
                .build(),
            };
            built.ok()
        }
    }
}

impl Dialer {
    pub fn new(cfg: &Upstream) -> Result<Dialer, TlsError> {
        let connector = if cfg.tls {
            Some(Arc::new(tls::upstream_connector(&cfg.verify)?))
        } else {
            None
        };
        Ok(Dialer {
            address: cfg.address.clone(),
            connector,
            connect_timeout: cfg.connect_timeout,
            keepalive: cfg.tcp_keepalive,
            proxy: cfg.proxy_protocol,
            origin: None,
            source: Arc::new(cfg.source.clone()),
            device: None,
        })
    }

    /// This dialer for `device`: with `source_address = "pool"`, its connections come from its
    /// own address of the pool.
    pub fn for_device_id(&self, device: DeviceId) -> Dialer {
        Dialer {
            device: Some(device),
            ..self.clone()
        }
    }

    /// Connects from the pool address of this dialer's device, or as the host chooses.
    async fn connect(&self, addr: &str) -> std::io::Result<TcpStream> {
        let from = match (&*self.source, self.device) {
            (SourceAddress::Pool(pool), Some(d)) => pool_address(pool, d),
            _ => None,
        };
        let Some(ip) = from else {
            return TcpStream::connect(addr).await;
        };
        let target = tokio::net::lookup_host(addr)
            .await?
            .find(|a| a.is_ipv4() == ip.is_ipv4())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{addr} has no address of the pool address {ip}'s family (lookup)"),
                )
            })?;
        let socket = if ip.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(ip, 0))?;
        socket.connect(target).await
    }

    /// This dialer for the connection of a device at `peer` that connected to `local`: with
    /// `proxy_protocol`, every connection it makes (the first one and every redial) starts
    /// with a header naming them.
    pub fn for_device(&self, peer: SocketAddr, local: SocketAddr) -> Dialer {
        Dialer {
            origin: Some((peer, local)),
            ..self.clone()
        }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub async fn dial(&self) -> Result<Stream, DialError> {
        let addr = self.address.clone();
        // Whether the timeout struck in the TLS handshake, for an error that says so.
        let connected = std::sync::atomic::AtomicBool::new(false);
        let work = async {
            let tcp = self.connect(&addr).await.map_err(|source| {
                if source.kind() == std::io::ErrorKind::InvalidInput
                    || source.to_string().contains("lookup")
                {
                    DialError::Resolve {
                        addr: addr.clone(),
                        source,
                    }
                } else {
                    DialError::Connect {
                        addr: addr.clone(),
                        source,
                    }
                }
            })?;
            // Frames are small and latency-sensitive; Nagle would hold replies back.
            let _ = tcp.set_nodelay(true);
            let _ = set_keepalive(&tcp, self.keepalive);
            // The PROXY header goes first, under TLS if any, as the specification says.
            let mut tcp = tcp;
            if let Some(h) = proxy_header(self.proxy, self.origin) {
                use tokio::io::AsyncWriteExt as _;
                tcp.write_all(&h)
                    .await
                    .map_err(|source| DialError::Connect {
                        addr: addr.clone(),
                        source,
                    })?;
            }
            connected.store(true, std::sync::atomic::Ordering::Relaxed);
            match &self.connector {
                None => Ok(Stream::Plain(tcp)),
                Some(c) => tls::connect(c, tcp).await.map_err(|source| DialError::Tls {
                    addr: addr.clone(),
                    source,
                }),
            }
        };
        match tokio::time::timeout(self.connect_timeout, work).await {
            Ok(r) => r,
            Err(_) if connected.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(DialError::TlsTimeout {
                    addr: self.address.clone(),
                    after: self.connect_timeout,
                })
            }
            Err(_) => Err(DialError::Timeout {
                addr: self.address.clone(),
                after: self.connect_timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[tokio::test]
    async fn upstream_connections_have_keepalive_as_configured() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        for (ka, on) in [("\"45s\"", true), ("0", false)] {
            let text = format!(
                "[upstream.legacy]\naddress = \"{addr}\"\ntls = false\ntcp_keepalive = {ka}\n"
            );
            let cfg = Config::parse(&text).expect("config");
            let d = Dialer::new(&cfg.upstream_legacy).expect("dialer");
            let (s, accepted) = tokio::join!(d.dial(), l.accept());
            let Stream::Plain(tcp) = s.expect("dial") else {
                panic!("plain expected");
            };
            drop(accepted);
            let sock = socket2::SockRef::from(&tcp);
            assert_eq!(sock.keepalive().expect("getsockopt"), on);
            if on {
                assert_eq!(
                    sock.keepalive_time().expect("time"),
                    Duration::from_secs(45)
                );
            }
        }
    }

    /// The specification's (haproxy's proxy-protocol.txt) v1 example, and the same addresses
    /// in v2 laid out by hand from its section 2.2: the 12-byte signature, 0x21 (version 2,
    /// PROXY), 0x11 (TCP over IPv4), the 12-byte length, then source, destination and ports.
    #[test]
    fn proxy_headers_are_the_specifications_bytes() {
        let origin: Option<(SocketAddr, SocketAddr)> = Some((
            "192.168.0.1:56324".parse().expect("addr"),
            "192.168.0.11:443".parse().expect("addr"),
        ));
        assert_eq!(
            proxy_header(ProxyProtocol::V1, origin),
            Some(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec())
        );
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        v2.extend_from_slice(&[192, 168, 0, 1, 192, 168, 0, 11]);
        v2.extend_from_slice(&56324u16.to_be_bytes());
        v2.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(proxy_header(ProxyProtocol::V2, origin), Some(v2));
        let six: Option<(SocketAddr, SocketAddr)> = Some((
            "[::1]:1000".parse().expect("addr"),
            "[::1]:23779".parse().expect("addr"),
        ));
        assert_eq!(
            proxy_header(ProxyProtocol::V1, six),
            Some(b"PROXY TCP6 ::1 ::1 1000 23779\r\n".to_vec())
        );
        // No origin: v1 says UNKNOWN, v2 is a LOCAL command with no addresses.
        assert_eq!(
            proxy_header(ProxyProtocol::V1, None),
            Some(b"PROXY UNKNOWN\r\n".to_vec())
        );
        let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(proxy_header(ProxyProtocol::V2, None), Some(local));
        assert_eq!(proxy_header(ProxyProtocol::Off, origin), None);
    }
}
