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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, DeviceTlsMode, SourceAddress};
use crate::conn::admission::Admission;
use crate::conn::handler::ConnContext;
use crate::conn::legacy::Legacy;
use crate::conn::listener::Listener;
use crate::conn::registry::Registry;
use crate::conn::reliable::SessionCtx;
use crate::conn::shadow::ShadowCtx;
use crate::conn::tls::{self, TlsError};
use crate::conn::upstream::Dialer;
use crate::control::admin::{self, Admin, AdminError};
use crate::control::apply::{ControlTask, Effects};
use crate::control::audit::AuditLog;
use crate::control::latch;
use crate::control::reload::{self, Reloader};
use crate::control::rollback::{Controller, LastCheckCell};
use crate::control::rollout::{self, Rollouts};
use crate::control::slo_task::SloService;
use crate::control::webhook::{Notifier, Webhook};
use crate::control::{event, rehome, ControlPlane, ControlTx, Live};
use crate::shutdown::{DrainOutcome, Shutdown};
use crate::telemetry::http::{self, Health};
use crate::telemetry::logging::LogLimit;
use crate::telemetry::metrics::{Metrics, MetricsError};
use crate::telemetry::tasks::Tasks;
use crate::telemetry::wallclock::WallClock;

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
    #[error("state_dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("rollback.webhook_url: {0}")]
    Webhook(String),
    #[error("rollback.webhook_token_file {path}: {source}")]
    WebhookToken {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin.token_file {path}: {why}")]
    AdminToken { path: PathBuf, why: String },
    #[error("mqtt.password_file {path}: {why}")]
    MqttPassword { path: PathBuf, why: String },
    #[error("{upstream}.source_address = \"transparent\" needs CAP_NET_ADMIN or CAP_NET_RAW (as root, or AmbientCapabilities=CAP_NET_RAW in the systemd unit; see docs/operations.md, \"Transparent source addresses\"): {source}")]
    Transparent {
        upstream: &'static str,
        source: std::io::Error,
    },
}

/// The secret in `path`: its first line, trimmed; an empty one is refused.
async fn read_secret(path: &Path) -> Result<String, String> {
    let p = path.to_path_buf();
    let text = tokio::task::spawn_blocking(move || std::fs::read_to_string(p))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
        .map_err(|e| e.to_string())?;
    let secret = text.lines().next().unwrap_or("").trim().to_string();
    if secret.is_empty() {
        return Err("the file is empty: put the secret on its first line".into());
    }
    Ok(secret)
}

/// The bearer token in `path`: its first line, trimmed; an empty one is refused (anyone could
/// send it).
async fn read_admin_token(path: &Path) -> Result<String, GatewayError> {
    read_secret(path)
        .await
        .map_err(|why| GatewayError::AdminToken {
            path: path.to_path_buf(),
            why,
        })
}

/// File descriptors a configuration may need at once: two per routed connection (device and
/// upstream), one per connection waiting for its hello, the HTTP connections, and 64 spare
/// (listeners, log files, resolver, dark-launch mirrors on a small share).
pub fn fds_needed(cfg: &Config) -> u64 {
    let l = &cfg.listen;
    2 * l.max_connections as u64 + l.max_pending as u64 + l.http_max_connections as u64 + 64
}

/// The kernel's cap on any listener's accept queue (`net.core.somaxconn`), if it can be read.
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The process's soft open-file limit, if it can be read.
pub fn fd_limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Creates `state_dir` (mode 0700) if it is missing: the latch must be writable before the
/// gateway routes anything to the new path.
async fn ensure_state_dir(dir: &Path) -> Result<(), GatewayError> {
    let d = dir.to_path_buf();
    let res = tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    res.map_err(|source| GatewayError::StateDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// The webhook's sender task, when one is configured (its token read once, here).
/// It runs on the HTTP tracker and stops with it: a dead webhook retrying never holds up the
/// drain, and what is still queued at the very end is logged as abandoned.
async fn webhook_notifier(
    cfg: &Config,
    metrics: &Arc<Metrics>,
    tasks: &Tasks,
    stop: &CancellationToken,
) -> Result<Option<Notifier>, GatewayError> {
    let r = &cfg.rollback;
    let Some(url) = &r.webhook_url else {
        return Ok(None);
    };
    let token = match &r.webhook_token_file {
        None => None,
        Some(path) => {
            let p = path.clone();
            let text = tokio::task::spawn_blocking(move || std::fs::read_to_string(p))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
                .map_err(|source| GatewayError::WebhookToken {
                    path: path.clone(),
                    source,
                })?;
            Some(text.trim().to_string())
        }
    };
    let hook = Webhook::new(url, token).map_err(|e| GatewayError::Webhook(e.to_string()))?;
    let m = metrics.clone();
    let (notifier, worker) = Notifier::new(
        hook,
        16,
        r.webhook_attempts,
        r.webhook_timeout,
        Duration::from_secs(1),
        move |d| m.webhook_delivery(<&'static str>::from(d)),
    );
    let stop = stop.clone();
    tasks.spawn("webhook", async move {
        tokio::select! {
            _ = worker => {}
            _ = stop.cancelled() => info!("webhook sender stopped (deliveries still pending, if any, are abandoned)"),
        }
    });
    Ok(Some(notifier))
}

/// This host's name, for webhook bodies.
async fn instance_name() -> String {
    tokio::fs::read_to_string("/proc/sys/kernel/hostname")
        .await
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cync-gateway".into())
}

pub struct Gateway {
    pub device_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// The generated device certificate, when none was configured.
    pub generated_cert: Option<openssl::x509::X509>,
    /// The configuration in force (and the rollback latch); read-only outside the control
    /// task: changes go through [`Gateway::control`].
    pub live: Arc<Live>,
    /// Open routed connections.
    pub registry: Arc<Registry>,
    /// The connection budgets (for tests and diagnostics).
    pub admission: Arc<Admission>,
    /// The SLO engine and its state.
    pub slo: Arc<SloService>,
    /// The rollback controller's last check.
    pub last_check: LastCheckCell,
    /// Where the admin API listens (removed at shutdown).
    pub admin_socket: PathBuf,
    /// The admin API's TCP address, with `admin.listen`.
    pub admin_addr: Option<SocketAddr>,
    control: ControlTx,
    shutdown: Shutdown,
    /// The HTTP server's tasks: they outlive the drain, so /metrics answers until the end.
    http_tasks: Tasks,
    http_stop: CancellationToken,
}

/// How to start a gateway: the configuration, and optionally listeners already bound and the
/// file the configuration came from.
pub struct GatewayBuilder {
    config: Config,
    listeners: Option<(TcpListener, TcpListener)>,
    config_file: Option<PathBuf>,
}

fn bind(what: &'static str, addr: SocketAddr, backlog: u32) -> Result<TcpListener, GatewayError> {
    crate::conn::listener::bind(addr, backlog).map_err(|source| GatewayError::Bind {
        what,
        addr,
        source,
    })
}

/// The HTTP listener's accept queue: scrapers and probes, a handful at a time.
const HTTP_BACKLOG: u32 = 128;

impl GatewayBuilder {
    /// Serves on listeners the caller already bound (devices, HTTP) instead of binding the
    /// configured addresses.
    pub fn listeners(mut self, devices: TcpListener, http: TcpListener) -> Self {
        self.listeners = Some((devices, http));
        self
    }

    /// Reloads from `path`: on every [`crate::control::Control::Reload`] (the daemon sends
    /// one per SIGHUP), and when its content changes (`reload.poll_interval`).
    pub fn config_file(mut self, path: &Path) -> Self {
        self.config_file = Some(path.to_path_buf());
        self
    }

    pub async fn start(self) -> Result<Gateway, GatewayError> {
        let GatewayBuilder {
            config,
            listeners,
            config_file,
        } = self;
        let (devices, http) = match listeners {
            Some(l) => l,
            None => (
                bind(
                    "device listener",
                    config.listen.devices,
                    config.listen.backlog,
                )?,
                bind("metrics listener", config.listen.metrics, HTTP_BACKLOG)?,
            ),
        };
        Gateway::start_inner(config, devices, http, config_file).await
    }
}

impl Gateway {
    /// Binds the configured addresses and starts, without a configuration file to reload.
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        Self::builder(config).start().await
    }

    pub fn builder(config: Config) -> GatewayBuilder {
        GatewayBuilder {
            config,
            listeners: None,
            config_file: None,
        }
    }

    async fn start_inner(
        config: Config,
        devices: TcpListener,
        http: TcpListener,
        config_file: Option<PathBuf>,
    ) -> Result<Gateway, GatewayError> {
        let metrics = Arc::new(Metrics::with_device_limits(
            config.metrics.per_device,
            config.metrics.per_device_max,
            config.metrics.per_device_idle,
        )?);
        crate::control::series::zero(&metrics);
        metrics.tracer().set_log_all(config.logging.commands);
        let device_tls = config.device_tls.mode == DeviceTlsMode::Tls;
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
        for (upstream, u) in [
            ("upstream.legacy", Some(&config.upstream_legacy)),
            ("upstream.new", config.upstream_new.as_ref()),
        ] {
            if u.is_some_and(|u| u.source == SourceAddress::Transparent) {
                crate::conn::source::transparent_available()
                    .map_err(|source| GatewayError::Transparent { upstream, source })?;
            }
        }
        let dialer = Dialer::new(&config.upstream_legacy).map_err(GatewayError::UpstreamTls)?;
        let shadow_dialer = match &config.upstream_shadow {
            Some(u) => Some(Dialer::new(u).map_err(GatewayError::UpstreamTls)?),
            None => None,
        };
        let device_addr = devices.local_addr().map_err(GatewayError::LocalAddr)?;
        let metrics_addr = http.local_addr().map_err(GatewayError::LocalAddr)?;
        let shutdown = Shutdown::new();
        let tasks = shutdown.tasks();
        let health = Arc::new(Health::default());
        let http_stop = CancellationToken::new();
        let http_tasks = Tasks::default();

        let new_dialer = match &config.upstream_new {
            Some(u) => Dialer::new(u).map_err(GatewayError::UpstreamTls)?,
            None => dialer.clone(),
        };
        let reliable = SessionCtx::new(metrics.clone(), new_dialer, &config);
        let registry = Arc::new(Registry::new(config.routing.rehome_rate));
        let poll_every = config.reload.poll_interval;
        let clock = WallClock::start();
        let state_dir = config.state_dir.clone();
        ensure_state_dir(&state_dir).await?;
        let latched = latch::load(&state_dir, &metrics, clock.rfc3339(Instant::now())).await;
        let notifier = webhook_notifier(&config, &metrics, &http_tasks, &http_stop).await?;
        let admin_socket = config.admin.socket.clone();
        let admin_listener = admin::bind(&admin_socket).await?;
        let admin_tcp = match (config.admin.listen, &config.admin.token_file) {
            (Some(addr), Some(token_file)) => {
                let token = read_admin_token(token_file).await?;
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| GatewayError::Bind {
                        what: "admin.listen",
                        addr,
                        source,
                    })?;
                Some((l, token))
            }
            _ => None,
        };
        let audit = AuditLog::new(&state_dir, config.audit.max_bytes, config.audit.keep);
        let live = Live::starting(config, latched);
        metrics.set_rollback_active(latched);
        reload::publish(&metrics, &live);
        let slo = SloService::start(live.clone(), metrics.clone(), clock).await;
        let rollout_cell = rollout::start(&live, &slo).await;

        // The control plane: one channel, one task that applies what arrives on it.
        let (control, control_rx) = event::channel();
        let reloader = config_file
            .as_deref()
            .map(|p| Reloader::new(p, live.clone(), metrics.clone()));
        if reloader.is_some() {
            tasks.spawn(
                "config-poll",
                reload::poll(poll_every, control.clone(), shutdown.token()),
            );
        }
        tasks.spawn(
            "control",
            ControlTask::new(live.clone(), metrics.clone(), reloader)
                .with_rollout(rollout_cell.clone())
                .with_effects(Effects {
                    slo: slo.clone(),
                    audit,
                    notifier,
                    instance: instance_name().await,
                })
                .run(control_rx, shutdown.token()),
        );
        let controller =
            Controller::new(slo.clone(), live.clone(), metrics.clone(), control.clone());
        let last_check = controller.last_check();
        tasks.spawn("rollback-controller", controller.run(shutdown.token()));
        let rollouts = Arc::new(Rollouts {
            live: live.clone(),
            slo: slo.clone(),
            last_check: last_check.clone(),
            cell: rollout_cell.clone(),
            metrics: metrics.clone(),
        });
        tasks.spawn(
            "promoter",
            rollout::run(rollouts.clone(), control.clone(), shutdown.token()),
        );
        tasks.spawn(
            "rehome",
            rehome::run(
                live.clone(),
                registry.clone(),
                metrics.clone(),
                shutdown.token(),
            ),
        );

        let admission = Admission::new(&live.config().listen);
        let routes = ControlPlane::new(live.clone());
        let ctx = Arc::new(ConnContext {
            routes: routes.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            acceptor,
            dialer,
            legacy: Legacy {
                metrics: metrics.clone(),
                reliable: reliable.clone(),
                shadow: ShadowCtx {
                    dialer: shadow_dialer,
                    tasks: tasks.clone(),
                    log: Arc::new(LogLimit::default()),
                },
                routes,
            },
            reliable,
            shutdown: shutdown.token(),
            admission: admission.clone(),
        });
        tasks.spawn(
            "device-listener",
            Listener::new(devices, ctx, tasks.clone()).run(),
        );
        let limits = http::HttpLimits {
            header_timeout: live.config().listen.http_header_timeout,
            max_connections: live.config().listen.http_max_connections,
        };
        // The admin API answers through the drain too (status while draining); the status
        // page on the metrics address shows what its `status` does.
        let admin = Arc::new(Admin {
            live: live.clone(),
            metrics: metrics.clone(),
            slo: slo.clone(),
            last_check: last_check.clone(),
            control: control.clone(),
            rollouts,
        });
        let page: Arc<dyn http::StatusPage> = admin.clone();
        http_tasks.spawn(
            "http",
            http::serve_metrics(
                http,
                metrics.clone(),
                health.clone(),
                Some(page),
                limits,
                http_tasks.clone(),
                http_stop.clone(),
            ),
        );
        // The SLO task outlives the drain (on the HTTP tracker), so its last write holds the
        // drained connections' commands.
        http_tasks.spawn("slo", slo.clone().run(http_stop.clone()));
        let mut admin_addr = None;
        if let Some((l, token)) = admin_tcp {
            admin_addr = l.local_addr().ok();
            http_tasks.spawn(
                "admin-tcp",
                admin::serve_tcp(
                    l,
                    admin.clone(),
                    token,
                    http_tasks.clone(),
                    http_stop.clone(),
                ),
            );
        }
        if live.config().mqtt.enabled {
            let cfg = live.config().mqtt.clone();
            let password = match &cfg.password_file {
                Some(p) => {
                    Some(
                        read_secret(p)
                            .await
                            .map_err(|why| GatewayError::MqttPassword {
                                path: p.clone(),
                                why,
                            })?,
                    )
                }
                None => None,
            };
            let bridge = crate::control::mqtt::Bridge {
                topics: crate::control::mqtt::topics(&cfg, &instance_name().await),
                cfg,
                password,
                admin: admin.clone(),
                metrics: metrics.clone(),
            };
            // On the HTTP tracker: Home Assistant keeps seeing the gateway through the drain,
            // and `offline` is published as the very last thing.
            http_tasks.spawn("mqtt", bridge.run(http_stop.clone()));
        }
        http_tasks.spawn(
            "admin",
            admin::serve(admin_listener, admin, http_tasks.clone(), http_stop.clone()),
        );
        info!(socket = %admin_socket.display(), tcp = ?admin_addr, "admin API listening");
        // Logged once everything answers (the device listener, /metrics, the admin socket):
        // scripts and tests take the addresses from this line.
        info!(
            devices = %device_addr,
            metrics = %metrics_addr,
            admin = admin_addr.map(|a| a.to_string()).unwrap_or_default(),
            legacy_upstream = live.config().upstream_legacy.address.as_str(),
            new_upstream = live
                .config()
                .upstream_new
                .as_ref()
                .unwrap_or(&live.config().upstream_legacy)
                .address
                .as_str(),
            device_tls,
            "cync-gateway listening"
        );
        health.set_ready();
        metrics.set_ready(true);
        Ok(Gateway {
            device_addr,
            metrics_addr,
            metrics,
            health,
            generated_cert,
            live,
            registry,
            admission,
            slo,
            last_check,
            admin_socket,
            admin_addr,
            control,
            shutdown,
            http_tasks,
            http_stop,
        })
    }

    /// Where every change to what runs is sent: reloads, the rollback latch.
    pub fn control(&self) -> ControlTx {
        self.control.clone()
    }

    /// A token that is cancelled when shutdown starts (for callers that trigger it elsewhere).
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Readiness off, stop accepting, drain within `deadline`, stop serving HTTP.
    pub async fn shutdown(self, deadline: Duration) -> DrainOutcome {
        self.health.set_draining();
        self.metrics.set_ready(false);
        self.metrics.set_draining(true);
        let outcome = self.shutdown.drain(deadline).await;
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
        self.http_tasks.close();
        self.http_tasks.wait().await;
        if let Err(e) = tokio::fs::remove_file(&self.admin_socket).await {
            warn!(socket = %self.admin_socket.display(), error = %e, "could not remove the admin socket");
        }
        outcome
    }
}
