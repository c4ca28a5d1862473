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
use crate::tls::{self, Stream, TlsError};

#[derive(Debug, Error)]
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
    #[error("TLS to {addr}: {source}")]
    Tls { addr: String, source: TlsError },
}

impl DialError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Resolve { .. } => "resolve",
            Self::Connect { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::Tls { .. } => "tls",
        }
    }
}

/// Knows how to reach one upstream.
#[derive(Clone)]
pub struct Dialer {
    address: String,
    connector: Option<Arc<SslConnector>>,
    connect_timeout: Duration,
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
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub async fn dial(&self) -> Result<Stream, DialError> {
        let addr = self.address.clone();
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
            Err(_) => Err(DialError::Timeout {
                addr: self.address.clone(),
                after: self.connect_timeout,
            }),
        }
    }
}
