//! The real `cync-gateway` binary run as a daemon: started on a configuration file, its
//! ephemeral ports learnt from its JSON start-up log line, its stderr kept for asserts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::DEADLINE;

pub const BIN: &str = env!("CARGO_BIN_EXE_cync-gateway");

pub struct Daemon {
    pub child: Child,
    pub devices: SocketAddr,
    pub metrics: SocketAddr,
    /// The admin API's TCP address, with `admin.listen`.
    pub admin: Option<SocketAddr>,
    /// The configuration file it runs on.
    pub path: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
    _dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Runs the binary on `path` (whose `[logging] format` must be `"json"`), keeping `dir`
    /// alive as long as the daemon.
    pub async fn start(path: PathBuf, dir: Option<tempfile::TempDir>) -> Daemon {
        Self::start_with_env(path, dir, &[]).await
    }

    /// As [`Daemon::start`], with `env` added to the daemon's environment.
    pub async fn start_with_env(
        path: PathBuf,
        dir: Option<tempfile::TempDir>,
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn daemon");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let mut early: Vec<String> = Vec::new();
        let (devices, metrics, admin) = tokio::time::timeout(DEADLINE, async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .expect("read log")
                    .unwrap_or_else(|| panic!("daemon exited before listening: {early:#?}"));
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    early.push(line);
                    continue;
                };
                let f = &v["fields"];
                if f["message"] == "cync-gateway listening" {
                    let d = f["devices"]
                        .as_str()
                        .expect("devices")
                        .parse()
                        .expect("addr");
                    let m = f["metrics"]
                        .as_str()
                        .expect("metrics")
                        .parse()
                        .expect("addr");
                    let a = f["admin"].as_str().and_then(|a| a.parse().ok());
                    early.push(line);
                    return (d, m, a);
                }
                early.push(line);
            }
        })
        .await
        .expect("daemon logs its addresses");
        // Keep draining stderr so the daemon never blocks on a full pipe; keep it all (the
        // start-up lines included) for asserts.
        let log = Arc::new(Mutex::new(early));
        let l = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                l.lock().expect("log").push(line);
            }
        });
        Daemon {
            child,
            devices,
            metrics,
            admin,
            path,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id().expect("pid")).expect("pid fits"))
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal");
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains(needle))
    }
}

/// Runs the binary's command line `args` (a runbook command, say) and waits for it.
pub async fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .output()
        .await
        .expect("run the CLI")
}
