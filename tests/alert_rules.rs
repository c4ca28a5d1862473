//! The Prometheus rules in `alerts/`: promtool's own check and unit tests (`alerts/tests/*.yml`),
//! and what promtool cannot know: every `tcp_comm_*` name the rules, their tests and the
//! runbooks use is a registered family, every `runbook_url` is a file in this repository, and
//! every alert has a test case where it fires and one where it stays quiet (a test naming an
//! alert that does not exist would pass quietly).
//!
//! Needs `promtool` (Debian package `prometheus`), which `scripts/test.sh` installs when it is
//! missing. Without it these tests fail; they never skip.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use cync_gateway::telemetry::metrics::Metrics;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `.yml` files directly in `dir`, sorted.
fn yml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .yml files in {}", dir.display());
    files
}

fn rule_files() -> Vec<PathBuf> {
    yml_files(&root().join("alerts"))
}

fn test_files() -> Vec<PathBuf> {
    yml_files(&root().join("alerts/tests"))
}

fn alert_file() -> PathBuf {
    root().join("alerts/cync-gateway.alerts.yml")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Runs `promtool <sub> <files>` from the repository root; fails with its output unless it
/// succeeds.
fn promtool(sub: &[&str], files: &[PathBuf]) {
    let out = match Command::new("promtool")
        .args(sub)
        .args(files)
        .current_dir(root())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: run `bash scripts/test.sh` (it installs the Debian \
             package `prometheus`, which provides promtool), or \
             `apt-get install --no-install-recommends prometheus`"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    assert!(
        out.status.success(),
        "`promtool {}` failed ({}):\n{}\n{}",
        sub.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_check_rules_passes() {
    promtool(&["check", "rules"], &rule_files());
}

#[test]
fn promtool_test_rules_passes() {
    promtool(&["test", "rules"], &test_files());
}

/// Every `tcp_comm_[a-z_]+` in `text`, histogram suffixes (`_bucket`, `_count`, `_sum`) removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tcp_comm_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let name = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(name.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_metric_name_is_a_registered_family() {
    let metrics = Metrics::new(false).expect("metrics registry");
    let families: BTreeSet<&str> = metrics.family_names().iter().map(String::as_str).collect();
    let runbooks = root().join("docs/runbooks");
    let mut files = rule_files();
    files.extend(test_files());
    files.extend(
        std::fs::read_dir(&runbooks)
            .expect("docs/runbooks")
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "md")),
    );
    let mut unknown = Vec::new();
    let mut used = 0;
    for file in &files {
        for name in metric_names(&read(file)) {
            used += 1;
            if !families.contains(name.as_str()) {
                unknown.push(format!("{}: {name}", file.display()));
            }
        }
    }
    assert!(
        used > 0,
        "no tcp_comm_ name found at all: is the scan broken?"
    );
    assert!(
        unknown.is_empty(),
        "not a registered metric family (see src/telemetry/names.rs, docs/metrics.md):\n{}",
        unknown.join("\n")
    );
}

/// `(alert name, runbook_url if any)` for each `- alert:` in the alert file, in order.
fn alerts() -> Vec<(String, Option<String>)> {
    let mut alerts: Vec<(String, Option<String>)> = Vec::new();
    for line in read(&alert_file()).lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert:") {
            alerts.push((unquote(name), None));
        } else if let Some(url) = line.strip_prefix("runbook_url:") {
            let last = alerts
                .last_mut()
                .expect("a runbook_url before the first alert");
            assert!(last.1.is_none(), "{}: two runbook_url", last.0);
            last.1 = Some(unquote(url));
        }
    }
    assert!(!alerts.is_empty(), "no alert in {}", alert_file().display());
    alerts
}

fn unquote(s: &str) -> String {
    s.trim().trim_matches(|c| c == '"' || c == '\'').to_string()
}

#[test]
fn every_runbook_url_is_a_file() {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for (alert, url) in alerts() {
        if !names.insert(alert.clone()) {
            problems.push(format!("{alert}: defined twice"));
        }
        match url {
            None => problems.push(format!("{alert}: no runbook_url")),
            Some(url) if url.starts_with('/') || url.contains("://") => {
                problems.push(format!("{alert}: {url} is not a path in this repository"))
            }
            Some(url) if !root().join(&url).is_file() => {
                problems.push(format!("{alert}: {url} does not exist"))
            }
            Some(_) => {}
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Indentation of a line, in columns.
fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn significant(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

/// `(alertname, fires)` for each `alert_rule_test` case in a promtool test file: a line scan
/// (no YAML parser among the dependencies). A case is the list item holding `alertname:`; it
/// fires when its `exp_alerts` is a non-empty list, and is quiet when that is `[]` or absent.
fn alert_cases(text: &str) -> Vec<(String, bool)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut cases = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let body = line.trim_start();
        let key = body.strip_prefix("- ").unwrap_or(body);
        let Some(name) = key.strip_prefix("alertname:") else {
            continue;
        };
        // The item's dash sits two columns left of its keys.
        let item_col = (indent(line) + body.len() - key.len())
            .checked_sub(2)
            .unwrap_or_else(|| panic!("line {}: alertname outside a list item", i + 1));
        let start = (0..=i)
            .rev()
            .find(|&j| indent(lines[j]) == item_col && lines[j].trim_start().starts_with("- "))
            .unwrap_or_else(|| panic!("line {}: no list item holds this alertname", i + 1));
        let end = (i + 1..lines.len())
            .find(|&j| significant(lines[j]) && indent(lines[j]) <= item_col)
            .unwrap_or(lines.len());
        let item = &lines[start..end];
        let mut fires = false;
        for (k, l) in item.iter().enumerate() {
            let t = l.trim_start();
            let t = t.strip_prefix("- ").unwrap_or(t);
            if let Some(value) = t.strip_prefix("exp_alerts:") {
                let value = value.trim();
                fires = if value.is_empty() {
                    item[k + 1..]
                        .iter()
                        .find(|l| significant(l))
                        .is_some_and(|l| l.trim_start().starts_with("- "))
                } else {
                    value != "[]"
                };
            }
        }
        cases.push((unquote(name), fires));
    }
    cases
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_test() {
    let defined: BTreeSet<String> = alerts().into_iter().map(|(name, _)| name).collect();
    // alert -> (firing cases, quiet cases)
    let mut seen: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut problems = Vec::new();
    for file in test_files() {
        for (name, fires) in alert_cases(&read(&file)) {
            if !defined.contains(&name) {
                problems.push(format!(
                    "{}: tests {name}, which is not an alert",
                    file.display()
                ));
            }
            let e = seen.entry(name).or_default();
            if fires {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
    }
    for name in &defined {
        let (firing, quiet) = seen.get(name).copied().unwrap_or_default();
        if firing == 0 {
            problems.push(format!("{name}: no test case where it fires"));
        }
        if quiet == 0 {
            problems.push(format!("{name}: no test case where it stays quiet"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The scanners themselves, on made-up text.
#[test]
fn the_scanners_read_what_they_should() {
    assert_eq!(
        metric_names("rate(tcp_comm_packet_latency_seconds_bucket{le=\"1.5\"}[5m]) / tcp_comm_rollbacks_total"),
        ["tcp_comm_packet_latency_seconds", "tcp_comm_rollbacks_total"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    let text = "\
tests:
  - interval: 1m
    alert_rule_test:
      - eval_time: 5m
        alertname: A
        exp_alerts: []
      - eval_time: 6m
        alertname: A
        exp_alerts:
          # a comment
          - exp_labels:
              severity: page
      - alertname: B
        eval_time: 7m
      - eval_time: 8m
        exp_alerts:
          - exp_labels: {}
        alertname: \"C\"
    promql_expr_test:
      - expr: up
";
    assert_eq!(
        alert_cases(text),
        vec![
            ("A".to_string(), false),
            ("A".to_string(), true),
            ("B".to_string(), false),
            ("C".to_string(), true),
        ]
    );
}
