//! Assembles a running gateway from a validated [`Config`]: binds the listeners, builds TLS and
//! the upstream dialer, and starts the device listener and the metrics server. Used by
//! `cync-gateway run`, the demo and in-process tests alike.
//!
//! Invariants:
//! - Everything that can fail for a bad environment (bind, certificate files, cipher list)
//!   fails here, before readiness is set, with an error naming what and where.
//! - [`Gateway::shutdown`] clears readiness first, then stops accepting, then drains within
//!   the deadline, then stops the metrics server: the order a load balancer needs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, Health};
use crate::config::{Config, DeviceTlsMode};
use crate::listener::{Admission, ConnContext, Listener};
use crate::logging::LogLimit;
use crate::metrics::{Metrics, MetricsError};
use crate::rehome::{self, Registry};
use crate::reliable::SessionCtx;
use crate::reload::{self, Live, Reloader};
use crate::shadow::ShadowCtx;
use crate::shutdown::{DrainOutcome, Shutdown};
use crate::tls::{self, TlsError};
use crate::upstream::Dialer;

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("device TLS: {0}")]
    DeviceTls(TlsError),
    #[error("upstream TLS: {0}")]
    UpstreamTls(TlsError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("reading a bound address: {0}")]
    LocalAddr(std::io::Error),
}

/// File descriptors a configuration may need at once: two per routed connection (device and
/// upstream), one per connection waiting for its hello, the HTTP connections, and 64 spare
/// (listeners, log files, resolver, dark-launch mirrors on a small share).
pub fn fds_needed(cfg: &Config) -> u64 {
    let l = &cfg.listen;
    2 * l.max_connections as u64 + l.max_pending as u64 + l.http_max_connections as u64 + 64
}

/// The process's soft open-file limit, if it can be read.
pub fn fd_limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

pub struct Gateway {
    pub device_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// The generated device certificate, when none was configured.
    pub generated_cert: Option<openssl::x509::X509>,
    /// The configuration in force (and the rollback latch).
    pub live: Arc<Live>,
    /// Open routed connections.
    pub registry: Arc<Registry>,
    /// The connection budgets (for tests and diagnostics).
    pub admission: Arc<Admission>,
    shutdown: Shutdown,
    http_stop: CancellationToken,
    listener_task: JoinHandle<()>,
    http_task: JoinHandle<()>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind { what, addr, source })
}

impl Gateway {
    /// Binds the configured addresses and starts.
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        let devices = bind("device listener", config.listen.devices).await?;
        let http = bind("metrics listener", config.listen.metrics).await?;
        Self::start_with(config, devices, http).await
    }

    /// Starts on listeners the caller already bound.
    pub async fn start_with(
        config: Config,
        devices: TcpListener,
        http: TcpListener,
    ) -> Result<Gateway, GatewayError> {
        let metrics = Arc::new(Metrics::with_device_limits(
            config.metrics.per_device,
            config.metrics.per_device_max,
            config.metrics.per_device_idle,
        )?);
        let (acceptor, generated_cert) = match config.device_tls.mode {
            DeviceTlsMode::Plain => (None, None),
            DeviceTlsMode::Tls => {
                let (a, cert) =
                    tls::device_acceptor(&config.device_tls).map_err(GatewayError::DeviceTls)?;
                if cert.is_some() {
                    warn!("device_tls: no certificate configured; generated a self-signed RSA certificate for this run");
                }
                (Some(Arc::new(a)), cert)
            }
        };
        let legacy = Dialer::new(&config.upstream_legacy).map_err(GatewayError::UpstreamTls)?;
        let shadow_dialer = match &config.upstream_shadow {
            Some(u) => Some(Dialer::new(u).map_err(GatewayError::UpstreamTls)?),
            None => None,
        };
        let device_addr = devices.local_addr().map_err(GatewayError::LocalAddr)?;
        let metrics_addr = http.local_addr().map_err(GatewayError::LocalAddr)?;
        let shutdown = Shutdown::new();
        let health = Arc::new(Health::default());
        let http_stop = CancellationToken::new();
        info!(
            devices = %device_addr,
            metrics = %metrics_addr,
            legacy_upstream = legacy.address(),
            device_tls = acceptor.is_some(),
            "cync-gateway listening"
        );
        let reliable = SessionCtx::new(metrics.clone(), legacy.clone(), &config);
        let registry = Arc::new(Registry::new(config.routing.rehome_rate));
        let live = Live::new(config);
        reload::publish(&metrics, &live);
        tokio::spawn(rehome::run(
            live.clone(),
            registry.clone(),
            metrics.clone(),
            shutdown.token(),
        ));
        let admission = Admission::new(&live.config().listen);
        let ctx = Arc::new(ConnContext {
            live: live.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            acceptor,
            legacy,
            reliable,
            shadow: ShadowCtx {
                dialer: shadow_dialer,
                tasks: shutdown.tasks(),
                log: Arc::new(LogLimit::default()),
            },
            shutdown: shutdown.token(),
            admission: admission.clone(),
        });
        let listener = Listener::new(devices, ctx, shutdown.tasks());
        let listener_task = tokio::spawn(listener.run());
        let limits = admin::HttpLimits {
            header_timeout: live.config().listen.http_header_timeout,
            max_connections: live.config().listen.http_max_connections,
        };
        let http_task = tokio::spawn(admin::serve_metrics(
            http,
            metrics.clone(),
            health.clone(),
            limits,
            http_stop.clone(),
        ));
        health.set_ready();
        metrics.ready.set(1);
        Ok(Gateway {
            device_addr,
            metrics_addr,
            metrics,
            health,
            generated_cert,
            live,
            registry,
            admission,
            shutdown,
            http_stop,
            listener_task,
            http_task,
        })
    }

    /// Reloads the configuration from `path` on every message from `hup` (the daemon sends one
    /// per SIGHUP) and when the file's content changes (`reload.poll_interval`).
    pub fn watch_config(
        &self,
        path: &std::path::Path,
        hup: tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let reloader = Reloader::new(path, self.live.clone(), self.metrics.clone());
        tokio::spawn(reload::run(reloader, hup, self.shutdown.token()));
    }

    /// A token that is cancelled when shutdown starts (for callers that trigger it elsewhere).
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Readiness off, stop accepting, drain within `deadline`, stop serving HTTP.
    pub async fn shutdown(self, deadline: Duration) -> DrainOutcome {
        self.health.set_draining();
        self.metrics.ready.set(0);
        self.metrics.draining.set(1);
        let outcome = self.shutdown.drain(deadline).await;
        let _ = self.listener_task.await;
        match outcome {
            DrainOutcome::Clean => info!("drain complete"),
            DrainOutcome::TimedOut { remaining } => {
                warn!(
                    remaining,
                    "drain deadline passed; closing remaining connections"
                )
            }
        }
        self.http_stop.cancel();
        let _ = self.http_task.await;
        outcome
    }
}
