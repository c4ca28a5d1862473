//! The layer rule, checked on every source file: imports go down only, and no two source files
//! import each other, directly or round a loop.
//!
//! Layers, bottom to top (`CONTRIBUTING.md`): `protocol` → `config` → `telemetry` → `conn` →
//! `control` → top (`shutdown` → `gateway` → `demo`). `sim` imports only `protocol` and
//! `conn::tls`, and only the top imports `sim`. Binaries (`main.rs`, `bin/`) are above
//! everything and are not checked.
//!
//! Every `use` and every path that starts with `crate::`, `super::`, `self::` or a child
//! module is resolved to the file that defines it (comments and string literals are skipped;
//! inline `mod` blocks such as `mod tests` are followed, so a test's `use super::*` is its own
//! file). The checker is also run on small made-up trees below, so a rule it stopped enforcing
//! would fail here too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path: `["conn", "reliable", "core"]`.
type Module = Vec<String>;

fn layer(top: &str) -> Option<u8> {
    Some(match top {
        "protocol" => 0,
        "config" => 1,
        "telemetry" => 2,
        "conn" => 3,
        "control" => 4,
        // The top: signals and drain, the wiring that uses them, the demo that runs it.
        "shutdown" => 5,
        "gateway" => 6,
        "demo" => 7,
        // The runbook commands: clients of the admin API the control plane serves.
        "runbook" => 5,
        _ => return None,
    })
}

/// Why `from` may not import `to`, if it may not.
fn violation(from: &Module, to: &Module) -> Option<String> {
    let (Some(f), Some(t)) = (from.first(), to.first()) else {
        return None; // the crate root only declares modules
    };
    if f == t {
        return None;
    }
    if f == "sim" {
        let tls = to.len() >= 2 && to[0] == "conn" && to[1] == "tls";
        return (t != "protocol" && !tls)
            .then(|| "sim may import only protocol and conn::tls".to_string());
    }
    if t == "sim" {
        return (layer(f) < Some(5)).then(|| "only the top layer may import sim".to_string());
    }
    match (layer(f), layer(t)) {
        (Some(a), Some(b)) if b < a => None,
        (Some(_), Some(_)) => Some(format!("`{f}` is not above `{t}`")),
        _ => Some(format!(
            "unknown layer for `{f}` or `{t}`: add it to layer()"
        )),
    }
}

/// The code of a file without comments, string literals and char literals (each replaced by a
/// space, so positions of tokens around them do not merge).
fn strip(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && (!ident_char(prev(&b, i))
                || (prev(&b, i) == 'b' && !ident_char(prev(&b, i.saturating_sub(1)))))
        {
            // Raw string: r"…", r#"…"#, …
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            'raw: while j < b.len() {
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break 'raw;
                }
                j += 1;
            }
            i = j;
            out.push(' ');
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push(' ');
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') {
                i += 2;
                while i < b.len() && b[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push(' ');
            } else if b.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push(' ');
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev(b: &[char], i: usize) -> char {
    if i == 0 {
        ' '
    } else {
        b[i - 1]
    }
}

fn ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Splits a use tree (`a::{b::C, d::{self, E}}`) into its paths.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = Vec::new();
    expand_into(&tree, &mut Vec::new(), &mut out);
    out
}

fn expand_into(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let Some(open) = tree.find('{') else {
        let mut p = prefix.clone();
        for seg in tree.split("::") {
            let seg = seg.split(" as ").next().unwrap_or(seg);
            if !seg.is_empty() && seg != "self" && seg != "*" {
                p.push(seg.to_string());
            }
        }
        out.push(p);
        return;
    };
    let head = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let base = prefix.len();
    prefix.extend(
        head.split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_string),
    );
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand_into(&inner[start..i], prefix, out);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < inner.len() {
        expand_into(&inner[start..], prefix, out);
    }
    prefix.truncate(base);
}

/// Every path a file's code names, each with the module it is named from (inline `mod`
/// blocks included).
fn named_paths(code: &str, file_module: &Module) -> Vec<(Module, Vec<String>)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    // (inline module, brace depth its body opened at)
    let mut stack: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let here = |stack: &[(String, usize)]| {
        let mut m = file_module.clone();
        m.extend(stack.iter().map(|(n, _)| n.clone()));
        m
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            depth += 1;
            i += 1;
            continue;
        }
        if c == '}' {
            depth = depth.saturating_sub(1);
            while stack.last().is_some_and(|(_, d)| *d > depth) {
                stack.pop();
            }
            i += 1;
            continue;
        }
        if !ident_char(c) || ident_char(prev(&chars, i)) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (ident_char(chars[i]) || chars[i] == ':') {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        if word == "mod" {
            // `mod name {` opens an inline module; `mod name;` declares a file.
            let rest: String = chars[i..].iter().take(200).collect();
            let rest = rest.trim_start();
            let name: String = rest.chars().take_while(|c| ident_char(*c)).collect();
            if rest[name.len()..].trim_start().starts_with('{') {
                stack.push((name, depth + 1));
            }
        } else if word == "use" {
            let end = chars[i..]
                .iter()
                .position(|c| *c == ';')
                .map_or(chars.len(), |p| i + p);
            let tree: String = chars[i..end].iter().collect();
            for p in expand(&tree) {
                out.push((here(&stack), p));
            }
            i = end;
        } else if word.contains("::") {
            let segs: Vec<String> = word
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            out.push((here(&stack), segs));
        }
    }
    out
}

/// The source files and their modules.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read src") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "bin") {
                    stack.push(p);
                }
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).expect("under src");
            let mut m: Module = rel
                .with_extension("")
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            if m == ["main"] {
                continue;
            }
            if m.last().is_some_and(|l| l == "mod" || l == "lib") {
                m.pop();
            }
            out.insert(m, p);
        }
    }
    out
}

/// The module a path named from `at` refers to, if it is one of ours.
fn resolve(at: &Module, path: &[String], known: &BTreeMap<Module, PathBuf>) -> Option<Module> {
    let (mut abs, rest): (Module, &[String]) = match path.first().map(String::as_str) {
        Some("crate") => (Vec::new(), &path[1..]),
        Some("super") => {
            let mut m = at.clone();
            let mut rest = path;
            while rest.first().is_some_and(|s| s == "super") {
                m.pop();
                rest = &rest[1..];
            }
            (m, rest)
        }
        Some("self") => (at.clone(), &path[1..]),
        Some(first) => {
            let mut child = at.clone();
            child.push(first.to_string());
            if !known.contains_key(&child) {
                return None; // another crate, or a local item
            }
            (at.clone(), path)
        }
        None => return None,
    };
    // The longest prefix that is a module of ours; an inline module is its file.
    let mut best = None;
    for seg in rest {
        abs.push(seg.clone());
        if known.contains_key(&abs) {
            best = Some(abs.clone());
        }
    }
    best.or_else(|| {
        let mut m = abs;
        while !m.is_empty() && !known.contains_key(&m) {
            m.pop();
        }
        Some(m)
    })
}

struct Report {
    violations: Vec<String>,
    cycles: Vec<String>,
    edges: usize,
}

fn check(src: &Path) -> Report {
    let known = modules(src);
    let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    let mut violations = Vec::new();
    for (m, file) in &known {
        let code = strip(&std::fs::read_to_string(file).expect("read"));
        for (at, path) in named_paths(&code, m) {
            let Some(target) = resolve(&at, &path, &known) else {
                continue;
            };
            if &target == m {
                continue;
            }
            if let Some(why) = violation(m, &target) {
                violations.push(format!(
                    "{}: `{}` imports `{}`: {why}",
                    file.display(),
                    m.join("::"),
                    path.join("::")
                ));
            }
            graph.entry(m.clone()).or_default().insert(target);
        }
    }
    let edges = graph.values().map(BTreeSet::len).sum();
    Report {
        violations,
        cycles: cycles(&graph),
        edges,
    }
}

/// One loop per strongly connected group of files (Tarjan), each as `a -> b -> a`.
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<String> {
    fn visit(
        v: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        path: &mut Vec<Module>,
        state: &mut BTreeMap<Module, u8>,
        out: &mut Vec<String>,
    ) {
        state.insert(v.clone(), 1);
        path.push(v.clone());
        for w in graph.get(v).into_iter().flatten() {
            match state.get(w).copied().unwrap_or(0) {
                0 => visit(w, graph, path, state, out),
                1 => {
                    let from = path.iter().position(|p| p == w).unwrap_or(0);
                    let mut names: Vec<String> =
                        path[from..].iter().map(|m| m.join("::")).collect();
                    names.push(w.join("::"));
                    out.push(names.join(" -> "));
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(v.clone(), 2);
    }
    let mut state = BTreeMap::new();
    let mut out = Vec::new();
    for v in graph.keys() {
        if state.get(v).copied().unwrap_or(0) == 0 {
            visit(v, graph, &mut Vec::new(), &mut state, &mut out);
        }
    }
    out
}

#[test]
fn imports_go_down_the_layers_and_no_files_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let r = check(&src);
    println!("{} import edges between source files checked", r.edges);
    assert!(
        r.edges > 100,
        "the checker saw too few imports: {}",
        r.edges
    );
    assert!(
        r.violations.is_empty(),
        "imports that break the layer rule (see CONTRIBUTING.md):\n{}",
        r.violations.join("\n")
    );
    assert!(
        r.cycles.is_empty(),
        "source files that import each other:\n{}",
        r.cycles.join("\n")
    );
}

/// Writes a made-up tree and checks it.
fn check_tree(files: &[(&str, &str)]) -> Report {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
    }
    check(dir.path())
}

#[test]
fn an_upward_import_is_caught_in_any_of_its_spellings() {
    for import in [
        "use crate::control::router;",
        "use crate::{protocol::X, control::Y};",
        "fn f() { crate::control::router::route(); }",
        "use super::super::control::Z;",
    ] {
        let r = check_tree(&[
            ("lib.rs", "pub mod conn; pub mod control; pub mod protocol;"),
            ("conn/mod.rs", "pub mod handler;"),
            ("conn/handler.rs", import),
            ("control/mod.rs", "pub mod router;"),
            ("control/router.rs", "use crate::conn::handler;"),
            ("protocol.rs", ""),
        ]);
        assert_eq!(r.violations.len(), 1, "{import}: {:?}", r.violations);
        assert!(r.violations[0].contains("`conn` is not above `control`"));
    }
}

#[test]
fn comments_strings_and_a_tests_module_do_not_count_but_test_imports_do() {
    let r = check_tree(&[
        ("lib.rs", "pub mod conn; pub mod control;"),
        ("conn/mod.rs", "pub mod a;"),
        (
            "conn/a.rs",
            "// use crate::control::x;\n/// [`crate::control`]\nconst S: &str = \"crate::control::x\";\n\
             fn f<'a>(c: char) -> bool { c == '\"' }\n\
             #[cfg(test)]\nmod tests { use super::*; }",
        ),
        ("control/mod.rs", ""),
    ]);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert!(
        r.cycles.is_empty(),
        "a test's `use super::*` is its own file"
    );
    let r = check_tree(&[
        ("lib.rs", "pub mod conn; pub mod control;"),
        ("conn/mod.rs", "pub mod a;"),
        (
            "conn/a.rs",
            "#[cfg(test)]\nmod tests { use crate::control::X; }",
        ),
        ("control/mod.rs", ""),
    ]);
    assert_eq!(r.violations.len(), 1, "tests follow the rule too");
}

#[test]
fn files_that_import_each_other_are_a_cycle_even_within_a_layer() {
    let r = check_tree(&[
        ("lib.rs", "pub mod conn;"),
        ("conn/mod.rs", "pub mod a; pub mod b; pub use a::X;"),
        ("conn/a.rs", "use super::b::Y;"),
        ("conn/b.rs", "use super::X;"),
    ]);
    assert!(r.violations.is_empty());
    assert_eq!(r.cycles.len(), 1, "{:?}", r.cycles);
    assert!(
        r.cycles[0].contains("conn::a -> conn::b -> conn"),
        "{:?}",
        r.cycles
    );
}

#[test]
fn the_simulator_may_use_only_the_protocol_and_tls_helpers() {
    let files = |import: &'static str| {
        check_tree(&[
            ("lib.rs", "pub mod conn; pub mod protocol; pub mod sim;"),
            ("conn/mod.rs", "pub mod tls; pub mod legacy;"),
            ("conn/tls.rs", ""),
            ("conn/legacy.rs", ""),
            ("protocol.rs", ""),
            ("sim/mod.rs", import),
        ])
    };
    assert!(
        files("use crate::conn::tls::Stream; use crate::protocol::X;")
            .violations
            .is_empty()
    );
    assert_eq!(files("use crate::conn::legacy::X;").violations.len(), 1);
}
