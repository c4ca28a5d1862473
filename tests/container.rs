//! The container image, built and run for real with podman: a Debian bookworm minbase made
//! here by mmdebstrap from the machine's own apt sources (no registry is reachable), the
//! Dockerfile's `runtime-prebuilt` stage packing the binary this build made, then a container
//! on the host network: `/healthz` answers, it runs as a non-root user, an edit of the mounted
//! configuration hot-reloads, and SIGTERM (`podman stop`) drains and exits 0.
//!
//! Needs podman, runc and mmdebstrap (Debian packages), which `scripts/test.sh` installs when
//! missing; without them this fails, never skips. podman runs with `--runtime runc` and raised
//! ulimits (the default runtime fails on this kernel's limits and cgroup mode).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_cync-gateway");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command, what: &str) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} cannot run ({e}): `bash scripts/test.sh` installs it"));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{what} failed:\n{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn podman(args: &[&str]) -> Command {
    let mut c = Command::new("podman");
    c.args(args);
    c
}

/// The base image tarball: made once per build directory (a fresh machine makes it, about
/// 20 s), from the machine's own apt sources, with the sources stripped from the image.
fn base_tarball() -> PathBuf {
    let dir = root().join("target/container");
    std::fs::create_dir_all(&dir).expect("target/container");
    let tar = dir.join("bookworm-minbase.tar");
    if tar.exists() {
        return tar;
    }
    let sources = [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("the machine's apt sources");
    let partial = dir.join(format!("bookworm-minbase.{}.tar", std::process::id()));
    let t0 = Instant::now();
    run(
        Command::new("mmdebstrap")
            .args([
                "--quiet",
                "--variant=minbase",
                "--include=ca-certificates,libssl3",
                "--customize-hook=rm -f \"$1\"/etc/apt/sources.list.d/* \"$1\"/etc/apt/sources.list",
                "bookworm",
            ])
            .arg(&partial)
            .arg(sources),
        "mmdebstrap",
    );
    std::fs::rename(&partial, &tar).expect("keep the base");
    println!("base made in {:?}", t0.elapsed());
    tar
}

/// Removes the container and the images when the test ends, however it ends.
struct Cleanup {
    container: String,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", &self.container]).output();
        for i in &self.images {
            let _ = podman(&["rmi", "-f", i]).output();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_builds_runs_as_non_root_answers_healthz_reloads_and_drains_on_sigterm() {
    let tag = format!("{}-{}", std::process::id(), free_port());
    let base = format!("localhost/cync-gateway-base:{tag}");
    let image = format!("localhost/cync-gateway:{tag}");
    let name = format!("cync-gateway-test-{tag}");
    let _cleanup = Cleanup {
        container: name.clone(),
        images: vec![image.clone(), base.clone()],
    };
    let tar = base_tarball();
    run(podman(&["import"]).arg(&tar).arg(&base), "podman import");
    let binary = Path::new(BIN)
        .strip_prefix(root())
        .expect("the binary is under the checkout")
        .to_string_lossy()
        .into_owned();
    let t0 = Instant::now();
    run(
        podman(&[
            "build",
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
            "--network",
            "host",
            "--target",
            "runtime-prebuilt",
            "--build-arg",
            &format!("BASE={base}"),
            "--build-arg",
            &format!("BINARY={binary}"),
            "-t",
            &image,
        ])
        .arg(root()),
        "podman build",
    );
    let size: u64 = run(
        &mut podman(&["image", "inspect", "--format", "{{.Size}}", &image]),
        "podman image inspect",
    )
    .trim()
    .parse()
    .expect("size");
    println!(
        "image built in {:?}: {:.0} MB (with this build's binary, {:.0} MB)",
        t0.elapsed(),
        size as f64 / 1e6,
        std::fs::metadata(BIN).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
    );

    // The configuration and state as volumes, the state owned by the image's user.
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, state) = (dir.path().join("config"), dir.path().join("state"));
    std::fs::create_dir_all(&cfg).expect("config dir");
    std::fs::create_dir_all(&state).expect("state dir");
    std::os::unix::fs::chown(&state, Some(10001), Some(10001)).expect("chown state");
    let up = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (devices, metrics) = (free_port(), free_port());
    let config = |percent: u32| {
        format!(
            "state_dir = \"/var/lib/cync-gateway\"\n[listen]\ndevices = \"127.0.0.1:{devices}\"\nmetrics = \"127.0.0.1:{metrics}\"\n\
             [device_tls]\nmode = \"plain\"\n[upstream.legacy]\naddress = \"{}\"\ntls = false\n\
             [routing]\ncanary_percent = {percent}\n[logging]\nformat = \"json\"\n",
            up.local_addr().expect("addr")
        )
    };
    let file = cfg.join("gateway.toml");
    std::fs::write(&file, config(10)).expect("config");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    run(
        &mut podman(&[
            "run",
            "-d",
            "--name",
            &name,
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
            "--network",
            "host",
            "-v",
            &format!("{}:/etc/cync-gateway:ro", cfg.display()),
            "-v",
            &format!("{}:/var/lib/cync-gateway", state.display()),
            &image,
        ]),
        "podman run",
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], metrics).into();
    let t0 = Instant::now();
    eventually("/healthz answers", || async {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => (http_get(addr, "/healthz").await.0 == 200).then_some(()),
            Err(_) => None,
        }
    })
    .await;
    println!("healthy {:?} after podman run", t0.elapsed());
    let uid = run(&mut podman(&["exec", &name, "id", "-u"]), "podman exec id");
    assert_eq!(uid.trim(), "10001", "runs as the image's user");
    assert_eq!(
        sample(
            &http_get(addr, "/metrics").await.1,
            "tcp_comm_canary_percentage"
        ),
        10.0
    );

    // An edit of the mounted file: applied by the daemon in the container.
    std::fs::write(&file, config(30)).expect("edit");
    wait_metric(addr, "tcp_comm_canary_percentage", 30.0).await;

    // SIGTERM: drained, exit 0.
    let t0 = Instant::now();
    run(&mut podman(&["stop", "-t", "45", &name]), "podman stop");
    let stopped = t0.elapsed();
    let code = run(
        &mut podman(&["inspect", &name, "--format", "{{.State.ExitCode}}"]),
        "podman inspect",
    );
    assert_eq!(code.trim(), "0", "exit code");
    let out = podman(&["logs", &name]).output().expect("podman logs");
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(logs.contains("drain complete"), "{logs}");
    assert!(stopped < Duration::from_secs(45), "{stopped:?}");
    println!("stopped in {stopped:?}");
}
