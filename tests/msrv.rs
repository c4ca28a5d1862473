//! The declared `rust-version` is honoured: no package in the locked dependency graph needs a
//! newer compiler than `Cargo.toml` says this crate builds with. (Our own code is held to it by
//! clippy's `incompatible_msrv` lint, which reads the same field.)

use std::process::Command;

fn version(s: &str) -> Vec<u64> {
    let mut v: Vec<u64> = s.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    v.resize(3, 0);
    v
}

#[test]
fn no_locked_dependency_needs_a_newer_rust_than_declared() {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    let ours = env!("CARGO_PKG_RUST_VERSION");
    assert!(!ours.is_empty(), "Cargo.toml declares a rust-version");
    let packages = meta["packages"].as_array().expect("packages");
    let too_new: Vec<String> = packages
        .iter()
        .filter_map(|p| {
            let need = p["rust_version"].as_str()?;
            (version(need) > version(ours)).then(|| {
                format!(
                    "{} {} needs rust {need}",
                    p["name"].as_str().unwrap_or("?"),
                    p["version"].as_str().unwrap_or("?")
                )
            })
        })
        .collect();
    println!(
        "{} packages checked against rust-version {ours}",
        packages.len()
    );
    assert!(
        too_new.is_empty(),
        "raise rust-version in Cargo.toml or pin these older:\n{}",
        too_new.join("\n")
    );
}
