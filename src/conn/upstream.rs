//! Dialing an upstream (the add-on): resolve `host:port`, connect within a timeout, then TLS
//! (without SNI or host-name checks) or plaintext, as configured.
//!
//! Invariants:
//! - One call, one new connection: connections are never pooled or shared, because the add-on
//!   keys all of its state on the connection (protocol doc §14.3).
//! - The name is resolved at each dial, so an add-on that moves is followed without a restart.

use std::sync::Arc;
use std::time::Duration;

use openssl::ssl::SslConnector;
use thiserror::Error;
use tokio::net::TcpStream;

use crate::config::Upstream;
use crate::conn::tls::{self, Stream, TlsError};

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
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub async fn dial(&self) -> Result<Stream, DialError> {
        let addr = self.address.clone();
        // Whether the timeout struck in the TLS handshake, for an error that says so.
        let connected = std::sync::atomic::AtomicBool::new(false);
        let work = async {
            let tcp = TcpStream::connect(&addr).await.map_err(|source| {
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
}
