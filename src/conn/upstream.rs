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

use thiserror::Error;
use tokio::net::TcpStream;

use crate::config::{ProxyProtocol, SourceAddress, Upstream};
use crate::conn::proxy_protocol::proxy_header;
use crate::conn::source::{self, Lease, Pool};
use crate::conn::tls::{Stream, TlsError, UpstreamTls};
use crate::protocol::DeviceId;
use crate::telemetry::labels::{SourceCollision, TlsHandshake, Transport};
use crate::telemetry::metrics::Metrics;

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

/// Counts a dialled connection's TLS handshake, full or resumed, on `t`'s path.
pub fn count_handshake(metrics: &Metrics, t: Transport, s: &Stream) {
    if s.is_tls() {
        let how = if s.session_reused() {
            TlsHandshake::Resumed
        } else {
            TlsHandshake::Full
        };
        metrics.upstream_tls_handshake(t, how);
    }
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

/// Knows how to reach one upstream; [`Dialer::for_connection`] makes the one a device
/// connection uses for its whole life (its first dial and the new path's redials).
#[derive(Clone)]
pub struct Dialer {
    /// Where and how, the same for every connection to this upstream: shared, not copied
    /// into each (0.1 KiB of every connection).
    target: Arc<Target>,
    /// The device connection this dialer serves: (the device's address, the address it
    /// connected to), for the PROXY header and a transparent source. `None`: a header that
    /// says "unknown", and the host's choice of source.
    origin: Option<(SocketAddr, SocketAddr)>,
    source: Source,
}

/// The upstream every connection of one [`Dialer`] and its clones goes to.
struct Target {
    address: String,
    /// Shared by every clone, so all of one upstream's connections offer the newest session.
    connector: Option<UpstreamTls>,
    connect_timeout: Duration,
    keepalive: Duration,
    proxy: ProxyProtocol,
}

/// Where this dialer's connections come from.
#[derive(Clone)]
enum Source {
    Host,
    /// The pool, and (for a device connection) the address it holds.
    Pool(Arc<Pool>, Option<Arc<Lease>>),
    Transparent,
}

impl Dialer {
    pub fn new(cfg: &Upstream) -> Result<Dialer, TlsError> {
        let connector = if cfg.tls {
            Some(UpstreamTls::new(&cfg.verify, cfg.tls_session_reuse)?)
        } else {
            None
        };
        let source = match &cfg.source {
            SourceAddress::Gateway => Source::Host,
            SourceAddress::Pool(list) => Source::Pool(Pool::new(list.clone()), None),
            SourceAddress::Transparent => Source::Transparent,
        };
        Ok(Dialer {
            target: Arc::new(Target {
                address: cfg.address.clone(),
                connector,
                connect_timeout: cfg.connect_timeout,
                keepalive: cfg.tcp_keepalive,
                proxy: cfg.proxy_protocol,
            }),
            origin: None,
            source,
        })
    }

    /// The dialer of one device connection: from `peer` (the device, or the address its
    /// balancer's PROXY header named) to `local`, for `device` when its hello named one.
    /// With `proxy_protocol` every connection it makes starts with a header naming them; with
    /// a pool it holds the device's address (and says how it got it, for
    /// `tcp_comm_source_pool_collisions_total`) until its last clone is dropped.
    pub fn for_connection(
        &self,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        device: Option<DeviceId>,
    ) -> (Dialer, Option<SourceCollision>) {
        let mut how = None;
        let source = match (&self.source, device) {
            (Source::Pool(pool, _), Some(d)) => match pool.lease(d) {
                Some((lease, collision)) => {
                    how = collision;
                    Source::Pool(pool.clone(), Some(Arc::new(lease)))
                }
                None => self.source.clone(),
            },
            _ => self.source.clone(),
        };
        let dialer = Dialer {
            origin: local.map(|l| (peer, l)),
            source,
            ..self.clone()
        };
        (dialer, how)
    }

    /// Whether its connections' source depends on the device's id (a pool), so it cannot dial
    /// before the hello.
    pub fn needs_device(&self) -> bool {
        matches!(self.source, Source::Pool(_, None))
    }

    /// The pool address this dialer's connections come from, if it holds one.
    pub fn source_address(&self) -> Option<std::net::IpAddr> {
        match &self.source {
            Source::Pool(_, Some(lease)) => Some(lease.address),
            _ => None,
        }
    }

    /// Connects from the pool address this dialer holds, from the device's own address
    /// (transparent, IPv4: Cync devices have no IPv6), or as the host chooses.
    async fn connect(&self, addr: &str) -> std::io::Result<TcpStream> {
        let (from, transparent) = match (&self.source, self.origin) {
            (Source::Pool(_, Some(lease)), _) => (lease.address, false),
            (Source::Transparent, Some((SocketAddr::V4(device), _))) => {
                (std::net::IpAddr::V4(*device.ip()), true)
            }
            _ => return TcpStream::connect(addr).await,
        };
        let target = tokio::net::lookup_host(addr)
            .await?
            .find(|a| a.is_ipv4() == from.is_ipv4())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{addr} has no address of the source address {from}'s family (lookup)"),
                )
            })?;
        source::connect_from(from, target, transparent).await
    }

    pub fn address(&self) -> &str {
        &self.target.address
    }

    pub async fn dial(&self) -> Result<Stream, DialError> {
        let addr = self.target.address.clone();
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
            let _ = set_keepalive(&tcp, self.target.keepalive);
            // The PROXY header goes first, under TLS if any, as the specification says.
            let mut tcp = tcp;
            if let Some(h) = proxy_header(self.target.proxy, self.origin) {
                use tokio::io::AsyncWriteExt as _;
                tcp.write_all(&h)
                    .await
                    .map_err(|source| DialError::Connect {
                        addr: addr.clone(),
                        source,
                    })?;
            }
            connected.store(true, std::sync::atomic::Ordering::Relaxed);
            match &self.target.connector {
                None => Ok(Stream::Plain(tcp)),
                Some(c) => c.connect(tcp).await.map_err(|source| DialError::Tls {
                    addr: addr.clone(),
                    source,
                }),
            }
        };
        match tokio::time::timeout(self.target.connect_timeout, work).await {
            Ok(r) => r,
            Err(_) if connected.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(DialError::TlsTimeout {
                    addr: self.target.address.clone(),
                    after: self.target.connect_timeout,
                })
            }
            Err(_) => Err(DialError::Timeout {
                addr: self.target.address.clone(),
                after: self.target.connect_timeout,
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
}
