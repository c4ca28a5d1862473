//! The Grafana dashboard `dashboards/cync-gateway.json` (written by `scripts/gen-dashboard.py`),
//! checked statically: it provisions (fixed uid, the `datasource` and `instance` variables), its
//! panels each have a query and a place of their own on the 24-column grid, the required rows
//! are there, every query reads the datasource variable and filters every selector by
//! `$instance`, every metric, label and label value it names is documented in `docs/metrics.md`
//! (or is a recording rule of `alerts/cync-gateway.rules.yml`), and `promtool` parses every
//! query.
//!
//! No network and no gateway. Needs `promtool` (Debian package `prometheus`), which
//! `scripts/test.sh` installs when it is missing; without it the PromQL test fails, never skips.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const ROWS: [&str; 8] = [
    "Overview",
    "SLO",
    "Latency",
    "Reliability",
    "Queues",
    "Errors",
    "Dark launch",
    "Rollout",
];
const PANEL_TYPES: [&str; 5] = ["timeseries", "stat", "gauge", "heatmap", "table"];
const UNITS: [&str; 7] = [
    "percentunit",
    "percent",
    "s",
    "ops",
    "bytes",
    "Bps",
    "short",
];
const INSTANCE_FILTER: &str = "instance=~\"$instance\"";
const GRID_COLUMNS: i64 = 24;
/// Labels every scraped series may carry, whatever its family documents.
const SCRAPE_LABELS: [&str; 2] = ["instance", "job"];
/// Values of the `transport` label every traffic family has (docs/metrics.md, first paragraph).
const TRANSPORTS: [&str; 3] = ["legacy", "new", "shadow"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn dashboard() -> Value {
    let path = root().join("dashboards/cync-gateway.json");
    serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, rows included, with the panels of collapsed rows after their row.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("a top-level `panels` array") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    assert!(!out.is_empty(), "the dashboard has no panels");
    out
}

fn is_row(p: &Value) -> bool {
    p["type"] == "row"
}

fn name(p: &Value) -> String {
    format!(
        "panel {} {:?}",
        p["id"],
        p["title"].as_str().unwrap_or("<untitled>")
    )
}

/// `(where, expr)` for every query: each panel target, and each Prometheus annotation.
fn queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d).into_iter().filter(|p| !is_row(p)) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default().to_string();
            out.push((format!("{} target {}", name(p), t["refId"]), expr));
        }
    }
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = a["expr"].as_str() {
            out.push((format!("annotation {}", a["name"]), expr.to_string()));
        }
    }
    assert!(!out.is_empty(), "the dashboard has no queries");
    out
}

fn datasource() -> Value {
    serde_json::json!({"type": "prometheus", "uid": "${datasource}"})
}

#[test]
fn dashboard_is_provisionable_with_a_fixed_uid() {
    let d = dashboard();
    assert_eq!(d["uid"], "cync-gateway", "uid");
    assert_eq!(d["title"], "Cync gateway", "title");
    assert!(
        d["id"].is_null(),
        "a provisioned dashboard has no numeric id, got {}",
        d["id"]
    );
    let schema = d["schemaVersion"].as_i64().expect("schemaVersion");
    assert!(
        (38..=41).contains(&schema),
        "schemaVersion {schema}, expected about 39"
    );
    assert!(
        d.get("__inputs").is_none(),
        "`__inputs` is for the UI's import wizard; provisioning takes the datasource from the \
         `datasource` variable"
    );
}

#[test]
fn datasource_and_instance_variables_are_defined() {
    let d = dashboard();
    let vars: BTreeMap<&str, &Value> = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().expect("a variable without a name"), v))
        .collect();
    let ds = vars.get("datasource").expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource", "datasource variable type");
    assert_eq!(ds["query"], "prometheus", "datasource variable query");
    let inst = vars.get("instance").expect("an `instance` variable");
    assert_eq!(inst["type"], "query", "instance variable type");
    let query = inst["query"]
        .as_str()
        .or_else(|| inst["query"]["query"].as_str())
        .expect("instance variable query");
    assert_eq!(query, "label_values(tcp_comm_ready, instance)");
    assert_eq!(inst["multi"], true, "instance variable multi");
    assert_eq!(inst["includeAll"], true, "instance variable includeAll");
    assert_eq!(
        inst["datasource"],
        datasource(),
        "instance variable datasource"
    );
}

#[test]
fn panel_ids_are_unique() {
    let d = dashboard();
    let mut seen = BTreeSet::new();
    for p in panels(&d) {
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no numeric id", name(p)));
        assert!(seen.insert(id), "panel id {id} is used twice");
    }
}

/// `(x, y, w, h)` of a panel, checked to lie within the grid.
fn grid(p: &Value) -> (i64, i64, i64, i64) {
    let g = &p["gridPos"];
    let field = |k: &str| {
        g[k].as_i64()
            .unwrap_or_else(|| panic!("{}: gridPos.{k} missing or not an integer", name(p)))
    };
    let (x, y, w, h) = (field("x"), field("y"), field("w"), field("h"));
    assert!(x >= 0 && y >= 0, "{}: gridPos at ({x}, {y})", name(p));
    assert!(w >= 1 && h >= 1, "{}: gridPos {w}x{h}", name(p));
    assert!(
        x + w <= GRID_COLUMNS,
        "{}: x {x} + w {w} is past the {GRID_COLUMNS} columns",
        name(p)
    );
    (x, y, w, h)
}

#[test]
fn every_panel_has_a_query_and_a_place_on_the_grid() {
    let d = dashboard();
    for p in panels(&d) {
        grid(p);
        if is_row(p) {
            continue;
        }
        let n = name(p);
        let kind = p["type"].as_str().unwrap_or_default();
        assert!(PANEL_TYPES.contains(&kind), "{n}: type {kind:?}");
        assert!(
            !p["title"].as_str().unwrap_or_default().trim().is_empty(),
            "{n}: no title"
        );
        let description = p["description"].as_str().unwrap_or_default().trim();
        assert!(
            description.ends_with('.') && !description[..description.len() - 1].contains(". "),
            "{n}: the description should be one sentence for the on-call engineer, got \
             {description:?}"
        );
        let unit = p["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or_default();
        assert!(
            UNITS.contains(&unit),
            "{n}: unit {unit:?}, expected one of {UNITS:?}"
        );
        let targets = p["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("{n}: no targets"));
        let mut ref_ids = BTreeSet::new();
        for t in targets {
            let ref_id = t["refId"].as_str().unwrap_or_default();
            assert!(!ref_id.is_empty(), "{n}: a target without refId");
            assert!(ref_ids.insert(ref_id), "{n}: refId {ref_id} twice");
            assert!(
                !t["expr"].as_str().unwrap_or_default().trim().is_empty(),
                "{n} target {ref_id}: empty expr"
            );
        }
    }
}

#[test]
fn no_two_panels_overlap() {
    let d = dashboard();
    let placed: Vec<(String, (i64, i64, i64, i64))> = d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| (name(p), grid(p)))
        .collect();
    for (i, (a, (ax, ay, aw, ah))) in placed.iter().enumerate() {
        for (b, (bx, by, bw, bh)) in &placed[i + 1..] {
            let apart = ax + aw <= *bx || bx + bw <= *ax || ay + ah <= *by || by + bh <= *ay;
            assert!(
                apart,
                "{a} ({ax},{ay} {aw}x{ah}) overlaps {b} ({bx},{by} {bw}x{bh})"
            );
        }
    }
}

#[test]
fn every_required_row_is_present_expanded_and_in_order() {
    let d = dashboard();
    let mut top: Vec<&Value> = d["panels"].as_array().expect("panels").iter().collect();
    top.sort_by_key(|p| (grid(p).1, grid(p).0));
    let mut rows = Vec::new();
    let mut contents: Vec<usize> = Vec::new();
    for p in &top {
        if is_row(p) {
            assert_eq!(p["collapsed"], false, "{}: collapsed", name(p));
            rows.push(p["title"].as_str().unwrap_or_default());
            contents.push(0);
        } else if let Some(n) = contents.last_mut() {
            *n += 1;
        } else {
            panic!("{} sits above the first row", name(p));
        }
    }
    assert_eq!(rows, ROWS, "row titles, top to bottom");
    for (row, n) in rows.iter().zip(&contents) {
        assert!(*n > 0, "row {row:?} has no panels");
    }
}

#[test]
fn every_query_reads_the_datasource_variable_and_filters_by_instance() {
    let d = dashboard();
    for p in panels(&d).into_iter().filter(|p| !is_row(p)) {
        assert_eq!(p["datasource"], datasource(), "{}: datasource", name(p));
        for t in p["targets"].as_array().into_iter().flatten() {
            if !t["datasource"].is_null() {
                assert_eq!(
                    t["datasource"],
                    datasource(),
                    "{} target {}: datasource",
                    name(p),
                    t["refId"]
                );
            }
        }
    }
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if a.get("expr").is_some() {
            assert_eq!(a["datasource"], datasource(), "annotation {}", a["name"]);
        }
    }
    for (at, expr) in queries(&d) {
        assert!(expr.contains("$instance"), "{at}: no $instance in {expr}");
        for s in selectors(&lex(&expr)) {
            assert!(
                s.matchers
                    .iter()
                    .any(|(l, op, v)| l == "instance" && op == "=~" && v == "$instance"),
                "{at}: {} is not filtered by {INSTANCE_FILTER}: {expr}",
                s.metric
            );
        }
    }
}

#[test]
fn rollbacks_are_marked_as_annotations() {
    let d = dashboard();
    let marks: Vec<String> = d["annotations"]["list"]
        .as_array()
        .expect("annotations.list")
        .iter()
        .filter(|a| a["enable"] == true)
        .filter_map(|a| a["expr"].as_str())
        .filter(|e| {
            e.contains("tcp_comm_rollback_active") || e.contains("tcp_comm_rollbacks_total")
        })
        .map(str::to_string)
        .collect();
    assert!(
        !marks.is_empty(),
        "no enabled annotation marks rollbacks (tcp_comm_rollbacks_total or \
         tcp_comm_rollback_active)"
    );
}

// ---- PromQL, lexed just enough to find names, selectors and grouping labels ----

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Punct(String),
}

/// Tokens of a PromQL expression; range and subquery brackets (`[5m]`) and numbers are dropped.
fn lex(expr: &str) -> Vec<Tok> {
    let chars: Vec<char> = expr.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            let mut s = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' && i + 1 < chars.len() {
                    i += 1;
                }
                s.push(chars[i]);
                i += 1;
            }
            assert!(i < chars.len(), "unterminated string in {expr}");
            i += 1;
            toks.push(Tok::Str(s));
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            toks.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            if ["=~", "!~", "!=", "==", ">=", "<="].contains(&two.as_str()) {
                toks.push(Tok::Punct(two));
                i += 2;
            } else {
                toks.push(Tok::Punct(c.to_string()));
                i += 1;
            }
        }
    }
    toks
}

fn is_metric(name: &str) -> bool {
    name.starts_with("tcp_comm_") || name.contains(':')
}

struct Selector {
    metric: String,
    /// `(label, operator, value)`
    matchers: Vec<(String, String, String)>,
}

fn punct(t: Option<&Tok>, p: &str) -> bool {
    matches!(t, Some(Tok::Punct(q)) if q == p)
}

/// Every metric selector (`name` or `name{label op "value", ...}`) in the tokens.
fn selectors(toks: &[Tok]) -> Vec<Selector> {
    let mut out = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        let Tok::Ident(metric) = t else { continue };
        if !is_metric(metric) {
            continue;
        }
        let mut matchers = Vec::new();
        if punct(toks.get(i + 1), "{") {
            let mut j = i + 2;
            while !punct(toks.get(j), "}") {
                match (toks.get(j), toks.get(j + 1), toks.get(j + 2)) {
                    (Some(Tok::Ident(l)), Some(Tok::Punct(op)), Some(Tok::Str(v))) => {
                        matchers.push((l.clone(), op.clone(), v.clone()));
                        j += 3;
                    }
                    other => panic!("cannot read the matchers of {metric}: {other:?}"),
                }
                if punct(toks.get(j), ",") {
                    j += 1;
                }
            }
        }
        out.push(Selector {
            metric: metric.clone(),
            matchers,
        });
    }
    out
}

/// Labels named in `by (...)`, `without (...)`, `on (...)` and `ignoring (...)`.
fn grouping_labels(toks: &[Tok]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        let Tok::Ident(kw) = t else { continue };
        if !["by", "without", "on", "ignoring"].contains(&kw.as_str())
            || !punct(toks.get(i + 1), "(")
        {
            continue;
        }
        let mut j = i + 2;
        while let Some(Tok::Ident(l)) = toks.get(j) {
            out.push(l.clone());
            j += 1;
            if punct(toks.get(j), ",") {
                j += 1;
            }
        }
        assert!(
            punct(toks.get(j), ")"),
            "cannot read the labels after `{kw}`"
        );
    }
    out
}

/// A family of docs/metrics.md: its type, its label names, and every backticked word of its
/// table row (the documented label values).
struct Family {
    histogram: bool,
    labels: BTreeSet<String>,
    words: BTreeSet<String>,
}

fn families() -> BTreeMap<String, Family> {
    let mut out = BTreeMap::new();
    for line in read(&root().join("docs/metrics.md")).lines() {
        let Some(rest) = line.strip_prefix("| `tcp_comm_") else {
            continue;
        };
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = format!(
            "tcp_comm_{}",
            &rest[..rest.find('`').expect("closing backtick")]
        );
        let labels = cells
            .get(3)
            .unwrap_or_else(|| panic!("{name}: no labels column"))
            .split(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect();
        let words = line
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        let histogram = cells.get(2) == Some(&"histogram");
        out.insert(
            name,
            Family {
                histogram,
                labels,
                words,
            },
        );
    }
    assert!(
        out.len() > 20,
        "found only {} families in docs/metrics.md: has its table changed?",
        out.len()
    );
    out
}

/// The family a series name belongs to (`_bucket`, `_sum`, `_count` stripped for histograms).
fn family_of<'a>(families: &'a BTreeMap<String, Family>, name: &str) -> Option<&'a Family> {
    if let Some(f) = families.get(name) {
        return Some(f);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|s| {
        let f = families.get(name.strip_suffix(s)?)?;
        f.histogram.then_some(f)
    })
}

/// The `record:` names of alerts/cync-gateway.rules.yml.
fn recording_rules() -> BTreeSet<String> {
    let names: BTreeSet<String> = read(&root().join("alerts/cync-gateway.rules.yml"))
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("- record:")
                .or_else(|| l.strip_prefix("record:"))
        })
        .map(|n| n.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
        .collect();
    assert!(
        !names.is_empty(),
        "no `record:` in alerts/cync-gateway.rules.yml"
    );
    names
}

#[test]
fn every_metric_a_query_names_is_documented_or_recorded() {
    let d = dashboard();
    let families = families();
    let rules = recording_rules();
    let mut unknown = Vec::new();
    let mut used = 0;
    for (at, expr) in queries(&d) {
        for t in lex(&expr) {
            let Tok::Ident(n) = t else { continue };
            if !is_metric(&n) {
                continue;
            }
            used += 1;
            let known = if n.starts_with("tcp_comm_") {
                family_of(&families, &n).is_some()
            } else {
                rules.contains(&n)
            };
            if !known {
                unknown.push(format!("{at}: {n}"));
            }
        }
    }
    assert!(used > 0, "no metric name found at all: is the scan broken?");
    assert!(
        unknown.is_empty(),
        "neither a family in docs/metrics.md nor a `record:` in alerts/cync-gateway.rules.yml:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn every_label_a_query_names_is_documented_for_its_metric() {
    let d = dashboard();
    let families = families();
    let mut problems = Vec::new();
    for (at, expr) in queries(&d) {
        let toks = lex(&expr);
        let sels = selectors(&toks);
        let mut labels_here: BTreeSet<String> =
            SCRAPE_LABELS.iter().map(|l| l.to_string()).collect();
        for s in &sels {
            let Some(f) = family_of(&families, &s.metric) else {
                continue; // a recording rule (or unknown: the test above says so)
            };
            labels_here.extend(f.labels.iter().cloned());
            let bucket = s.metric.ends_with("_bucket");
            if bucket {
                labels_here.insert("le".to_string());
            }
            for (label, _, value) in &s.matchers {
                if SCRAPE_LABELS.contains(&label.as_str()) || (bucket && label == "le") {
                    continue;
                }
                if !f.labels.contains(label) {
                    problems.push(format!("{at}: {} has no label {label:?}", s.metric));
                    continue;
                }
                for v in value.split('|') {
                    // A value may be listed with another family of the same label (the `slo`
                    // and `window` values are listed once, with tcp_comm_slo_sli).
                    let documented = (label == "transport" && TRANSPORTS.contains(&v))
                        || families
                            .values()
                            .any(|g| g.labels.contains(label) && g.words.contains(v));
                    if !documented {
                        problems.push(format!(
                            "{at}: {label}={v:?} is not a documented value for {}",
                            s.metric
                        ));
                    }
                }
            }
        }
        if sels
            .iter()
            .all(|s| family_of(&families, &s.metric).is_some())
        {
            for l in grouping_labels(&toks) {
                if !labels_here.contains(&l) {
                    problems.push(format!("{at}: groups by {l:?}, which no metric here has"));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "labels not in docs/metrics.md:\n{}",
        problems.join("\n")
    );
}

/// `expr` with the Grafana variables replaced so that Prometheus can evaluate it.
fn without_grafana_variables(expr: &str) -> String {
    let mut e = expr.to_string();
    for (var, value) in [
        ("instance", ".*"),
        ("__rate_interval", "5m"),
        ("__interval_ms", "60000"),
        ("__interval", "1m"),
        ("__range_s", "3600"),
        ("__range_ms", "3600000"),
        ("__range", "1h"),
    ] {
        e = e
            .replace(&format!("${{{var}}}"), value)
            .replace(&format!("[[{var}]]"), value)
            .replace(&format!("${var}"), value);
    }
    e
}

#[test]
fn every_query_parses_as_promql() {
    let d = dashboard();
    let qs = queries(&d);
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut index = Vec::new();
    for (n, (at, expr)) in qs.iter().enumerate() {
        let e = without_grafana_variables(expr);
        assert!(
            !e.contains('$'),
            "{at}: a Grafana variable this test does not know how to replace: {expr}"
        );
        yaml.push_str(&format!(
            "      - record: dashboard:expr_{n}\n        expr: |\n"
        ));
        for line in e.lines() {
            yaml.push_str(&format!("          {line}\n"));
        }
        index.push(format!("dashboard:expr_{n} = {at}"));
    }
    let dir = tempfile::Builder::new()
        .prefix("cync-dashboard-")
        .tempdir_in(std::env::temp_dir())
        .expect("a temporary directory for the rules file");
    let file = dir.path().join("dashboard.rules.yml");
    std::fs::write(&file, &yaml).expect("write the rules file");
    let out = match Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
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
        "`promtool check rules` rejected a dashboard query ({}):\n{}\n{}\nrules:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        index.join("\n"),
        yaml
    );
}
