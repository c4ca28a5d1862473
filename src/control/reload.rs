//! The running configuration and its hot reload (design decision 5).
//!
//! [`Reloader`] turns the file on disk into a new configuration in force ([`Live`]). It runs
//! only in the control task, which calls it for every [`Control::Reload`], whatever its
//! origin — SIGHUP, the file poll ([`poll`]), an operator — so all of them go through exactly
//! the same path.
//!
//! Invariants:
//! - A file is validated whole with the same loader as start-up and `check-config`; if it is
//!   invalid nothing changes (the problems are logged and counted).
//! - Non-reloadable settings (listen addresses, TLS, upstreams, logging, metrics, shutdown,
//!   reload, `state_dir`, `[audit]`, the `rollback.webhook_*` keys, and the gateway-wide `reliable.dedup_capacity`, `dedup_ttl` and
//!   `retry_budget_window`) keep their running values; each one the file changes is reported as needing a
//!   restart, and `tcp_comm_config_restart_required` says so until the file matches again.
//! - The poll reloads only when the content's SHA-256 changes, read through the path on every
//!   poll, so editors writing in place, atomic renames and Kubernetes' symlink swaps are all
//!   seen, and touching the file is a no-op. Identical effective content is a no-op too.
//! - A polled change is applied only once the same content has been read twice, [`SETTLE`]
//!   apart, so a file caught half-written (which may well parse: `canary_percent = 5` is a
//!   prefix of `= 50`) is never applied. SIGHUP applies at once: the operator is done writing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::audit::Change;
use super::event::{Control, ControlTx, Origin};
use super::live::Live;
use super::router;
use crate::config::{Config, DarkMode, Problem, Rehome};
use crate::telemetry::labels::{Label, ReloadResult};
use crate::telemetry::metrics::Metrics;

/// Sets the routing gauges from the configuration in force.
pub fn publish(metrics: &Metrics, live: &Live) {
    let cfg = live.config();
    metrics.canary(
        cfg.routing.canary_percent,
        router::effective_percent(&cfg.routing, live.latched()),
    );
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
pub enum Trigger {
    #[strum(serialize = "sighup")]
    Signal,
    #[strum(serialize = "file_change")]
    Poll,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The file did not change (poll), or its effective content equals what runs.
    Unchanged,
    /// A poll saw new content; it is applied if it reads the same again after [`SETTLE`].
    Settling,
    /// The new configuration is in force; these sections changed but need a restart.
    Applied {
        restart_needed: Vec<&'static str>,
        /// The routing keys that changed, old → new (what the audit log records).
        changes: Vec<Change>,
    },
    /// Kept the running configuration.
    Rejected(Vec<Problem>),
}

/// The running values of settings that cannot change without a restart, with the new file's
/// reloadable settings; and the names of the sections whose change was not applied.
pub fn merge(running: &Config, new: Config) -> (Config, Vec<&'static str>) {
    let mut restart = Vec::new();
    let mut check = |name: &'static str, same: bool| {
        if !same {
            restart.push(name);
        }
    };
    check("listen", running.listen == new.listen);
    check("device_tls", running.device_tls == new.device_tls);
    check(
        "upstream.legacy",
        running.upstream_legacy == new.upstream_legacy,
    );
    check(
        "upstream.shadow",
        running.upstream_shadow == new.upstream_shadow,
    );
    check("upstream.new", running.upstream_new == new.upstream_new);
    check("logging", running.logging == new.logging);
    check("metrics", running.metrics == new.metrics);
    check("shutdown", running.shutdown == new.shutdown);
    check("reload", running.reload == new.reload);
    check("state_dir", running.state_dir == new.state_dir);
    check("audit", running.audit == new.audit);
    check("admin", running.admin == new.admin);
    check("mqtt", running.mqtt == new.mqtt);
    // Gateway-wide state built once at start: the shared dedup store and the retry budget's
    // ring. The rest of [reliable] reaches new connections.
    let (r, n) = (&running.reliable, &new.reliable);
    check(
        "reliable.dedup_capacity",
        r.dedup_capacity == n.dedup_capacity,
    );
    check("reliable.dedup_ttl", r.dedup_ttl == n.dedup_ttl);
    check(
        "reliable.retry_budget_window",
        r.retry_budget_window == n.retry_budget_window,
    );
    // The webhook's sender is built once, at start.
    let (w, v) = (&running.rollback, &new.rollback);
    check(
        "rollback.webhook",
        (
            &w.webhook_url,
            &w.webhook_token_file,
            w.webhook_timeout,
            w.webhook_attempts,
        ) == (
            &v.webhook_url,
            &v.webhook_token_file,
            v.webhook_timeout,
            v.webhook_attempts,
        ),
    );
    let rollback = crate::config::RollbackConfig {
        webhook_url: w.webhook_url.clone(),
        webhook_token_file: w.webhook_token_file.clone(),
        webhook_timeout: w.webhook_timeout,
        webhook_attempts: w.webhook_attempts,
        ..new.rollback.clone()
    };
    let reliable = crate::config::Reliable {
        dedup_capacity: r.dedup_capacity,
        dedup_ttl: r.dedup_ttl,
        retry_budget_window: r.retry_budget_window,
        ..new.reliable.clone()
    };
    let effective = Config {
        reliable,
        rollback,
        listen: running.listen.clone(),
        device_tls: running.device_tls.clone(),
        upstream_legacy: running.upstream_legacy.clone(),
        upstream_shadow: running.upstream_shadow.clone(),
        upstream_new: running.upstream_new.clone(),
        logging: running.logging.clone(),
        metrics: running.metrics.clone(),
        shutdown: running.shutdown.clone(),
        reload: running.reload.clone(),
        state_dir: running.state_dir.clone(),
        audit: running.audit.clone(),
        admin: running.admin.clone(),
        mqtt: running.mqtt.clone(),
        ..new
    };
    (effective, restart)
}

/// The keys whose values differ between `old` and `new`, as the audit log records them: what
/// decides where devices go — routing, dark launch — and what decides when they are sent back:
/// the rollback policy and the SLO targets (loosening either is a routing decision too). Other
/// reloadable settings are not audited.
pub fn routing_changes(old: &Config, new: &Config) -> Vec<Change> {
    let mut out = Vec::new();
    let mut diff = |key: &str, a: Value, b: Value| {
        if a != b {
            out.push(Change {
                key: key.into(),
                old: a,
                new: b,
            });
        }
    };
    let ids = |s: &std::collections::BTreeSet<crate::protocol::DeviceId>| {
        json!(s.iter().map(|d| d.to_hex()).collect::<Vec<_>>())
    };
    let dur = |d: Duration| json!(humantime::format_duration(d).to_string());
    let (a, b) = (&old.routing, &new.routing);
    diff(
        "routing.canary_percent",
        json!(a.canary_percent),
        json!(b.canary_percent),
    );
    diff("routing.force_new", ids(&a.force_new), ids(&b.force_new));
    diff(
        "routing.force_legacy",
        ids(&a.force_legacy),
        ids(&b.force_legacy),
    );
    let rehome = |r: Rehome| match r {
        Rehome::Auto => "auto",
        Rehome::Never => "never",
    };
    diff(
        "routing.rehome",
        json!(rehome(a.rehome)),
        json!(rehome(b.rehome)),
    );
    diff(
        "routing.rehome_rate",
        json!(a.rehome_rate),
        json!(b.rehome_rate),
    );
    diff(
        "routing.drain_grace",
        dur(a.drain_grace),
        dur(b.drain_grace),
    );
    let mode = |m: DarkMode| match m {
        DarkMode::Off => "off",
        DarkMode::Observe => "observe",
        DarkMode::Mirror => "mirror",
    };
    let (a, b) = (&old.dark_launch, &new.dark_launch);
    diff("dark_launch.mode", json!(mode(a.mode)), json!(mode(b.mode)));
    diff("dark_launch.percent", json!(a.percent), json!(b.percent));
    let (a, b) = (&old.rollback, &new.rollback);
    diff("rollback.enabled", json!(a.enabled), json!(b.enabled));
    diff(
        "rollback.check_interval",
        dur(a.check_interval),
        dur(b.check_interval),
    );
    diff("rollback.window", dur(a.window), dur(b.window));
    diff(
        "rollback.min_events",
        json!(a.min_events),
        json!(b.min_events),
    );
    diff(
        "rollback.max_violations",
        json!(a.max_violations),
        json!(b.max_violations),
    );
    diff(
        "rollback.success_floor",
        json!(a.success_floor),
        json!(b.success_floor),
    );
    diff(
        "rollback.latency_floor",
        json!(a.latency_floor),
        json!(b.latency_floor),
    );
    diff(
        "rollback.max_burn_rate",
        json!(a.max_burn_rate),
        json!(b.max_burn_rate),
    );
    diff(
        "rollback.compare_to_legacy",
        json!(a.compare_to_legacy),
        json!(b.compare_to_legacy),
    );
    diff(
        "rollback.confidence",
        json!(a.confidence),
        json!(b.confidence),
    );
    let (a, b) = (&old.slo, &new.slo);
    diff(
        "slo.success_target",
        json!(a.success_target),
        json!(b.success_target),
    );
    diff(
        "slo.latency_threshold",
        dur(a.latency_threshold),
        dur(b.latency_threshold),
    );
    diff(
        "slo.latency_target",
        json!(a.latency_target),
        json!(b.latency_target),
    );
    diff(
        "slo.decode_error_max",
        json!(a.decode_error_max),
        json!(b.decode_error_max),
    );
    diff(
        "slo.queue_full_max",
        json!(a.queue_full_max),
        json!(b.queue_full_max),
    );
    let (a, b) = (&old.rollout, &new.rollout);
    diff("rollout.stages", json!(a.stages), json!(b.stages));
    diff("rollout.bake_time", dur(a.bake_time), dur(b.bake_time));
    diff(
        "rollout.min_budget",
        json!(a.min_budget),
        json!(b.min_budget),
    );
    diff(
        "rollout.auto_promote",
        json!(a.auto_promote),
        json!(b.auto_promote),
    );
    out
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// How long new content must stay the same before a poll applies it.
pub const SETTLE: Duration = Duration::from_millis(100);

pub struct Reloader {
    path: PathBuf,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    /// Hash of the content last considered (applied, or rejected: a broken file is reported
    /// once, not every second). `None` until the first check.
    last: Option<[u8; 32]>,
    /// New content seen once by a poll, waiting to be seen again.
    candidate: Option<[u8; 32]>,
    /// A blocking read of the file is in progress.
    reading: Arc<AtomicBool>,
}

/// How long one read of the configuration file may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

impl Reloader {
    /// `path` is the file the running configuration came from. Its content is not trusted to
    /// be what was loaded (it may have been edited since): the first check compares what it
    /// says with the configuration in force.
    pub fn new(path: &Path, live: Arc<Live>, metrics: Arc<Metrics>) -> Reloader {
        Reloader {
            path: path.to_path_buf(),
            live,
            metrics,
            last: None,
            candidate: None,
            reading: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The configuration file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn count(&self, result: ReloadResult) {
        self.metrics.config_reload(result);
    }

    /// Reads the file off the runtime, within [`READ_TIMEOUT`]: a hung network or ConfigMap
    /// volume stalls one blocking thread, never the daemon, and while such a read is stuck no
    /// other is started.
    async fn read(&self) -> std::io::Result<Vec<u8>> {
        use std::io::{Error, ErrorKind};
        if self.reading.swap(true, Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::WouldBlock,
                "an earlier read of the file has not returned",
            ));
        }
        let (path, reading) = (self.path.clone(), self.reading.clone());
        let task = tokio::task::spawn_blocking(move || {
            let r = crate::config::read_regular(&path);
            reading.store(false, Ordering::SeqCst);
            r
        });
        match tokio::time::timeout(READ_TIMEOUT, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(Error::other(e)),
            Err(_) => Err(Error::new(
                ErrorKind::TimedOut,
                format!("reading took longer than {READ_TIMEOUT:?}"),
            )),
        }
    }

    /// Re-reads the file. A poll only acts when the content changed; a signal always re-checks.
    pub async fn check(&mut self, trigger: Trigger) -> Outcome {
        let bytes = match self.read().await {
            Ok(b) => b,
            Err(e) => {
                // Mid-rename the path can be briefly absent; a poll retries next time.
                if trigger == Trigger::Signal {
                    error!(path = %self.path.display(), error = %e, "reload: cannot read the configuration; keeping the running one");
                    self.count(ReloadResult::Error);
                }
                return Outcome::Rejected(vec![Problem {
                    key: self.path.display().to_string(),
                    message: e.to_string(),
                }]);
            }
        };
        let hash = sha(&bytes);
        let text = String::from_utf8_lossy(&bytes);
        let running = self.live.config();
        if trigger == Trigger::Poll {
            if self.last == Some(hash) {
                return Outcome::Unchanged;
            }
            if self.last.is_none() {
                // First look since start: the file as loaded is no news.
                let same = Config::parse(&text).is_ok_and(|c| merge(&running, c).0 == *running);
                if same {
                    self.last = Some(hash);
                    return Outcome::Unchanged;
                }
            }
            if self.candidate != Some(hash) {
                self.candidate = Some(hash);
                return Outcome::Settling;
            }
        }
        self.candidate = None;
        self.last = Some(hash);
        let new = match Config::parse(&text) {
            Ok(c) => c,
            Err(e) => return self.reject(trigger, e.problems()),
        };
        let (effective, restart_needed) = merge(&running, new);
        if effective.dark_launch.mode == DarkMode::Mirror && effective.upstream_shadow.is_none() {
            return self.reject(
                trigger,
                vec![Problem {
                    key: "upstream.shadow".into(),
                    message: "mirror mode needs upstream.shadow, and adding it needs a restart"
                        .into(),
                }],
            );
        }
        self.metrics.restart_required(!restart_needed.is_empty());
        if !restart_needed.is_empty() {
            warn!(
                path = %self.path.display(),
                sections = ?restart_needed,
                "reload: these sections changed but only take effect after a restart; their running values are kept"
            );
        }
        if effective == *running {
            self.count(ReloadResult::Unchanged);
            info!(trigger = trigger.label(), "reload: no effective change");
            return Outcome::Unchanged;
        }
        let (old, new) = (&running.routing, &effective.routing);
        info!(
            trigger = trigger.label(),
            canary_percent_old = old.canary_percent,
            canary_percent_new = new.canary_percent,
            force_new = new.force_new.len(),
            force_legacy = new.force_legacy.len(),
            dark_launch = ?effective.dark_launch.mode,
            "reload: configuration applied"
        );
        let changes = routing_changes(&running, &effective);
        self.live.store(effective);
        publish(&self.metrics, &self.live);
        self.count(ReloadResult::Applied);
        Outcome::Applied {
            restart_needed,
            changes,
        }
    }

    fn reject(&mut self, trigger: Trigger, problems: Vec<Problem>) -> Outcome {
        for p in &problems {
            error!(trigger = trigger.label(), key = %p.key, problem = %p.message, "reload rejected; keeping the running configuration");
        }
        self.count(ReloadResult::Error);
        Outcome::Rejected(problems)
    }
}

/// The file-poll source: every `every` (`reload.poll_interval`; zero: never) offers a
/// [`Control::Reload`] from [`Origin::FilePoll`] to the control task, which re-reads the file
/// and acts only if its content changed. Ends at shutdown, or when the control task is gone.
pub async fn poll(every: Duration, control: ControlTx, shutdown: CancellationToken) {
    if every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                // A full queue already holds work for the control task; the next tick asks
                // again, so nothing is lost by skipping this one.
                control.offer(Control::Reload { origin: Origin::FilePoll });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[upstream.legacy]\naddress = \"127.0.0.1:1\"\n";

    fn reloader(
        text: &str,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        Reloader,
        Arc<Live>,
        Arc<Metrics>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).expect("write");
        let live = Live::new(Config::parse(text).expect("valid"));
        let metrics = Arc::new(Metrics::new(false).expect("metrics"));
        let r = Reloader::new(&path, live.clone(), metrics.clone());
        (dir, path, r, live, metrics)
    }

    /// Two polls: the first sees new content, the second (same content) acts on it.
    async fn settled(r: &mut Reloader) -> Outcome {
        assert_eq!(r.check(Trigger::Poll).await, Outcome::Settling);
        r.check(Trigger::Poll).await
    }

    #[tokio::test]
    async fn poll_applies_changes_once_and_ignores_touches() {
        let (_d, path, mut r, live, m) = reloader(BASE);
        let rx = live.subscribe();
        assert_eq!(r.check(Trigger::Poll).await, Outcome::Unchanged);
        std::fs::write(&path, format!("{BASE}[routing]\ncanary_percent = 25\n")).expect("write");
        assert_eq!(
            settled(&mut r).await,
            Outcome::Applied {
                restart_needed: vec![],
                changes: vec![Change {
                    key: "routing.canary_percent".into(),
                    old: json!(0.0),
                    new: json!(25.0),
                }],
            }
        );
        assert_eq!(live.config().routing.canary_percent, 25.0);
        assert!(rx.has_changed().expect("open"));
        assert_eq!(r.check(Trigger::Poll).await, Outcome::Unchanged);
        assert_eq!(
            m.total("tcp_comm_config_reloads_total", &[("result", "applied")]),
            1.0
        );
        assert_eq!(m.total("tcp_comm_canary_percentage", &[]), 25.0);
        // A signal with nothing changed is a counted no-op.
        assert_eq!(r.check(Trigger::Signal).await, Outcome::Unchanged);
        assert_eq!(
            m.total("tcp_comm_config_reloads_total", &[("result", "unchanged")]),
            1.0
        );
    }

    #[tokio::test]
    async fn invalid_files_keep_the_running_config_and_are_counted_once() {
        let (_d, path, mut r, live, m) = reloader(BASE);
        for (bad, key) in [
            ("[routing\ncanary_percent = 5\n", "(file)"),
            ("[routing]\ncanary_pecrent = 5\n", "routing.canary_pecrent"),
            (
                "[routing]\ncanary_percent = 150\n",
                "routing.canary_percent",
            ),
        ] {
            std::fs::write(&path, format!("{BASE}{bad}")).expect("write");
            match settled(&mut r).await {
                Outcome::Rejected(p) => assert!(p.iter().any(|p| p.key == key), "{p:?}"),
                other => panic!("{bad}: {other:?}"),
            }
            assert_eq!(
                r.check(Trigger::Poll).await,
                Outcome::Unchanged,
                "reported once"
            );
        }
        assert_eq!(live.config().routing.canary_percent, 0.0);
        assert_eq!(
            m.total("tcp_comm_config_reloads_total", &[("result", "error")]),
            3.0
        );
    }

    #[tokio::test]
    async fn non_reloadable_changes_are_reported_not_applied() {
        let (_d, path, mut r, live, m) = reloader(BASE);
        std::fs::write(
            &path,
            "[listen]\ndevices = \"127.0.0.1:9\"\n[upstream.legacy]\naddress = \"127.0.0.1:2\"\n[routing]\ncanary_percent = 5\n",
        )
        .expect("write");
        assert_eq!(
            settled(&mut r).await,
            Outcome::Applied {
                restart_needed: vec!["listen", "upstream.legacy"],
                changes: vec![Change {
                    key: "routing.canary_percent".into(),
                    old: json!(0.0),
                    new: json!(5.0),
                }],
            }
        );
        let c = live.config();
        assert_eq!(c.routing.canary_percent, 5.0);
        assert_eq!(
            c.upstream_legacy.address, "127.0.0.1:1",
            "running value kept"
        );
        assert_eq!(c.listen.devices.port(), 23779);
        assert_eq!(m.total("tcp_comm_config_restart_required", &[]), 1.0);
    }

    #[tokio::test]
    async fn atomic_rename_and_symlink_swap_are_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v1 = dir.path().join("v1.toml");
        let v2 = dir.path().join("v2.toml");
        std::fs::write(&v1, BASE).expect("write");
        std::fs::write(&v2, format!("{BASE}[routing]\ncanary_percent = 50\n")).expect("write");
        let link = dir.path().join("gateway.toml");
        std::os::unix::fs::symlink(&v1, &link).expect("symlink");
        let live = Live::new(Config::parse(BASE).expect("valid"));
        let metrics = Arc::new(Metrics::new(false).expect("metrics"));
        let mut r = Reloader::new(&link, live.clone(), metrics);
        // Kubernetes-style: a new link renamed over the old one.
        let tmp = dir.path().join("tmp-link");
        std::os::unix::fs::symlink(&v2, &tmp).expect("symlink");
        std::fs::rename(&tmp, &link).expect("swap");
        assert!(matches!(settled(&mut r).await, Outcome::Applied { .. }));
        assert_eq!(live.config().routing.canary_percent, 50.0);
        // Editor-style: write a temp file, rename it over the path.
        let tmp = dir.path().join("gateway.toml.tmp");
        std::fs::write(&tmp, format!("{BASE}[routing]\ncanary_percent = 7.5\n")).expect("write");
        std::fs::rename(&tmp, &link).expect("rename");
        assert!(matches!(settled(&mut r).await, Outcome::Applied { .. }));
        assert_eq!(live.config().routing.canary_percent, 7.5);
    }

    #[tokio::test]
    async fn a_half_written_file_is_not_applied_and_a_startup_edit_is_not_lost() {
        let (_d, path, mut r, live, _m) = reloader(BASE);
        // Edited after the daemon loaded it but before the first poll: picked up.
        std::fs::write(&path, format!("{BASE}[routing]\ncanary_percent = 5")).expect("write");
        assert_eq!(r.check(Trigger::Poll).await, Outcome::Settling);
        // The writer was not done: "5" was the start of "50". The prefix is never applied.
        std::fs::write(&path, format!("{BASE}[routing]\ncanary_percent = 50\n")).expect("write");
        assert_eq!(r.check(Trigger::Poll).await, Outcome::Settling);
        assert_eq!(live.config().routing.canary_percent, 0.0);
        assert!(matches!(
            r.check(Trigger::Poll).await,
            Outcome::Applied { .. }
        ));
        assert_eq!(live.config().routing.canary_percent, 50.0);
    }

    #[tokio::test]
    async fn gateway_wide_reliable_settings_are_reported_as_needing_a_restart() {
        let (_d, path, mut r, live, m) = reloader(BASE);
        std::fs::write(
            &path,
            format!("{BASE}[reliable]\ndedup_ttl = \"1m\"\nack_timeout = \"500ms\"\n"),
        )
        .expect("write");
        assert_eq!(
            settled(&mut r).await,
            Outcome::Applied {
                restart_needed: vec!["reliable.dedup_ttl"],
                changes: vec![],
            }
        );
        let c = live.config();
        assert_eq!(
            c.reliable.ack_timeout,
            Duration::from_millis(500),
            "reloadable"
        );
        assert_eq!(
            c.reliable.dedup_ttl,
            Duration::from_secs(300),
            "running value kept"
        );
        assert_eq!(m.total("tcp_comm_config_restart_required", &[]), 1.0);
    }

    #[tokio::test]
    async fn a_path_that_turns_into_a_fifo_is_refused_at_once_and_reported() {
        let (_d, path, mut r, live, m) = reloader(BASE);
        std::fs::remove_file(&path).expect("rm");
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let t0 = tokio::time::Instant::now();
        match r.check(Trigger::Signal).await {
            Outcome::Rejected(p) => {
                assert!(p[0].message.contains("not a regular file"), "{p:?}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(live.config().routing.canary_percent, 0.0);
        assert_eq!(
            m.total("tcp_comm_config_reloads_total", &[("result", "error")]),
            1.0
        );
    }
}
