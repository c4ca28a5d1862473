//! The deployment files, checked by the tools that consume them where one runs here:
//! Kubernetes manifests by `kubernetes-validate --strict` (no warning allowed), the
//! PrometheusRule against `alerts/` (regenerated, then its rules through `promtool`), the
//! Home Assistant add-on's options through its own run script into a configuration the
//! gateway accepts, the compose stack's mounts, and the Dockerfile's runtime contract.
//!
//! Needs `kubernetes-validate` (PyPI), `promtool` and `python3`, which `scripts/test.sh`
//! installs when missing; without them these tests fail, never skip.

use std::path::PathBuf;
use std::process::Command;

use cync_gateway::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_cync-gateway");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn run(cmd: &mut Command, what: &str) -> String {
    let o = cmd
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{what} cannot run ({e}): `bash scripts/test.sh` installs it"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{what} failed:\n{text}");
    text
}

/// The drain timeout of the reference configuration.
fn drain_s() -> u64 {
    Config::load(&root().join("config/gateway.toml"))
        .expect("reference")
        .shutdown
        .drain_timeout
        .as_secs()
}

#[test]
fn kubernetes_validate_strict_passes_on_every_core_manifest_without_a_warning() {
    let files: Vec<PathBuf> = ["configmap", "deployment", "service", "pdb"]
        .iter()
        .map(|f| root().join(format!("deploy/kubernetes/{f}.yaml")))
        .collect();
    let out = run(
        Command::new("kubernetes-validate")
            .arg("--strict")
            .args(&files),
        "kubernetes-validate",
    );
    println!("{out}");
    assert!(!out.contains("WARN") && !out.contains("ERROR"), "{out}");
    assert_eq!(out.matches(" passed for resource ").count(), 5, "{out}");
}

#[test]
fn the_prometheusrule_is_generated_from_alerts_and_its_rules_pass_promtool() {
    run(
        Command::new("python3").args(["scripts/gen-prometheusrule.py", "--check"]),
        "gen-prometheusrule --check",
    );
    // The groups as a plain rules file: what the operator hands to Prometheus.
    let text = read("deploy/kubernetes/monitoring/prometheusrule.yaml");
    assert!(
        text.contains("kind: PrometheusRule\n")
            && text.contains("apiVersion: monitoring.coreos.com/v1\n")
    );
    let groups: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "  groups:")
        .skip(1)
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.yml");
    std::fs::write(&rules, format!("groups:\n{}\n", groups.join("\n"))).expect("rules");
    let out = run(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules),
        "promtool",
    );
    // As many rules as alerts/ has.
    let count =
        |t: &str| t.matches("\n      - record:").count() + t.matches("\n      - alert:").count();
    let source = read("alerts/cync-gateway.rules.yml") + &read("alerts/cync-gateway.alerts.yml");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", count(&source))),
        "{out}"
    );
    let sm = read("deploy/kubernetes/monitoring/servicemonitor.yaml");
    assert!(sm.contains("app.kubernetes.io/component: metrics") && sm.contains("port: metrics"));
    let svc = read("deploy/kubernetes/service.yaml");
    assert!(svc.contains("app.kubernetes.io/component: metrics") && svc.contains("name: metrics"));
}

#[test]
fn the_dashboard_is_what_its_generator_writes() {
    run(
        Command::new("python3").args(["scripts/gen-dashboard.py", "--check"]),
        "gen-dashboard --check",
    );
}

#[test]
fn the_deployment_drains_before_it_is_killed_runs_non_root_read_only_and_probes_the_gateway() {
    let d = read("deploy/kubernetes/deployment.yaml");
    let grace: u64 = d
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .and_then(|v| v.parse().ok())
        .expect("terminationGracePeriodSeconds");
    assert!(grace > drain_s(), "{grace} s");
    for want in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "path: /readyz",
        "path: /healthz",
        "mountPath: /etc/cync-gateway",
        "mountPath: /var/lib/cync-gateway",
    ] {
        assert!(d.contains(want), "no {want:?} in the Deployment");
    }
    // Mounted as a directory: a subPath mount would never see a ConfigMap edit.
    assert!(!d.contains("subPath"));
    // The ConfigMap's gateway.toml is a configuration the gateway accepts.
    let cm = read("deploy/kubernetes/configmap.yaml");
    let toml: Vec<&str> = cm
        .lines()
        .skip_while(|l| !l.starts_with("  gateway.toml: |"))
        .skip(1)
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect();
    let c = Config::parse(&toml.join("\n")).unwrap_or_else(|e| panic!("ConfigMap: {e}"));
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/cync-gateway"));
}

/// `key: value` lines of a top-level YAML block (`name:` followed by indented lines).
fn block<'a>(yaml: &'a str, name: &str) -> Vec<(&'a str, &'a str)> {
    yaml.lines()
        .skip_while(|l| *l != format!("{name}:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.trim().split_once(": "))
        .collect()
}

#[test]
fn every_home_assistant_option_maps_to_a_real_key_through_the_run_script() {
    let manifest = read("deploy/home-assistant/config.yaml");
    let options = block(&manifest, "options");
    let schema = block(&manifest, "schema");
    assert!(!options.is_empty());
    assert_eq!(
        options.iter().map(|o| o.0).collect::<Vec<_>>(),
        schema.iter().map(|o| o.0).collect::<Vec<_>>(),
        "every option has a schema"
    );
    for port in ["23779/tcp: 23779", "9400/tcp: 9400"] {
        assert!(manifest.contains(port), "{port}");
    }
    assert!(
        manifest.contains("arch:\n  - amd64\n  - aarch64"),
        "arch list"
    );
    // The run script's mapping: one `option KEY OPTION` line per option.
    let script = read("deploy/home-assistant/run.sh");
    let mapping: Vec<(&str, &str)> = script
        .lines()
        .filter_map(|l| l.strip_prefix("option "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let mut mapped: Vec<&str> = mapping.iter().map(|m| m.1).collect();
    mapped.sort_unstable();
    let mut declared: Vec<&str> = options.iter().map(|o| o.0).collect();
    declared.sort_unstable();
    assert_eq!(mapped, declared, "every option mapped once, nothing else");
    // Options with values other than the defaults, through the real script, into a file the
    // gateway accepts and that says what the options said.
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = dir.path().join("options.json");
    std::fs::write(
        &opts,
        serde_json::json!({
            "addon_address": "local-cync-lan:23780",
            "addon_tls": false,
            "canary_percent": 12.5,
            "dark_launch": "observe",
            "auto_promote": true,
            "log_level": "debug"
        })
        .to_string(),
    )
    .expect("options");
    let config = dir.path().join("gateway.toml");
    run(
        Command::new("bash")
            .arg(root().join("deploy/home-assistant/run.sh"))
            .env("OPTIONS", &opts)
            .env("CONFIG", &config)
            .env("GATEWAY", BIN)
            .env("STATE_DIR", dir.path().join("state"))
            .env("DRY_RUN", "1"),
        "run.sh",
    );
    let c = Config::load(&config).expect("the add-on's configuration");
    assert_eq!(c.upstream_legacy.address, "local-cync-lan:23780");
    assert!(!c.upstream_legacy.tls);
    assert_eq!(c.routing.canary_percent, 12.5);
    assert_eq!(c.dark_launch.mode, cync_gateway::config::DarkMode::Observe);
    assert!(c.rollout.auto_promote);
    assert_eq!(c.logging.level, "debug");
    let keys: Vec<&str> = mapping.iter().map(|m| m.0).collect();
    assert_eq!(
        keys,
        [
            "upstream.legacy.address",
            "upstream.legacy.tls",
            "routing.canary_percent",
            "dark_launch.mode",
            "rollout.auto_promote",
            "logging.level"
        ]
    );
}

#[test]
fn every_file_the_compose_stack_mounts_exists_and_its_gateway_config_is_valid() {
    let compose = read("deploy/docker-compose.yml");
    let mut mounts = 0;
    for l in compose.lines() {
        let Some(v) = l.trim().strip_prefix("- ") else {
            continue;
        };
        let v = v.trim_matches('"');
        if !(v.starts_with("./") || v.starts_with("../")) {
            continue;
        }
        let host = v.split(':').next().expect("host path");
        let p = root().join("deploy").join(host);
        assert!(
            p.exists(),
            "{host} (mounted in docker-compose.yml) does not exist"
        );
        mounts += 1;
    }
    assert!(mounts >= 7, "{mounts} mounts");
    for service in ["cync-gateway:", "prometheus:", "alertmanager:", "grafana:"] {
        assert!(compose.contains(&format!("\n  {service}\n")), "{service}");
    }
    Config::load(&root().join("deploy/compose/gateway.toml")).expect("compose gateway.toml");
    let prom = read("deploy/prometheus/prometheus.yml");
    assert!(prom.contains("cync-gateway:9400") && prom.contains("alertmanager:9093"));
}

#[test]
fn the_image_runs_as_a_user_stops_on_sigterm_and_checks_healthz() {
    let d = read("Dockerfile");
    let line = |prefix: &str| {
        d.lines()
            .rfind(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in the Dockerfile"))
            .to_string()
    };
    assert_eq!(line("USER "), "USER 10001:10001");
    assert_eq!(line("STOPSIGNAL "), "STOPSIGNAL SIGTERM");
    assert!(d.contains("/healthz"), "HEALTHCHECK on /healthz");
    assert!(line("VOLUME ").contains("/var/lib/cync-gateway"));
    assert!(d.contains("AS runtime-prebuilt") && d.contains("cargo build --locked --release"));
    assert!(d.contains("org.opencontainers.image.title"));
}
