//! Editing the configuration file in place, for `cync-gateway set-canary` and staged promotion:
//! the file stays the source of truth, so a change of percentage is a change of the file.
//!
//! Invariants:
//! - Only the one value changes: comments, blank lines, key order and the formatting of
//!   everything else are kept (`toml_edit`), and so is a comment on the value's own line.
//! - The whole edited text is validated ([`Config::parse`]) before anything is written: an
//!   invalid result is never written.
//! - Atomic: the new text goes to a temporary file in the same directory, with the original's
//!   mode and owner, is fsynced, and is renamed over the original (over a symlink's target, so
//!   the link stays); then the directory is fsynced. A reader sees the old file or the new one.
//! - A file that cannot be replaced (a read-only mount, a Kubernetes ConfigMap) is an error that
//!   says what to change instead; nothing is left behind.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{Config, ConfigError};

#[derive(Debug, Error)]
pub enum EditError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML, so it cannot be edited: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("the edited file would be invalid, so nothing was written:\n{0}")]
    Invalid(ConfigError),
    #[error("{path} cannot be replaced ({source}): {hint}")]
    ReadOnly {
        path: PathBuf,
        source: std::io::Error,
        hint: String,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What [`set_canary`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Edited {
    /// The file written (a symlink's target).
    pub path: PathBuf,
    /// The percentage the file had (`None`: the key was absent, i.e. the default).
    pub old: Option<f64>,
    pub new: f64,
    /// False when the file already said `new` (nothing was written).
    pub changed: bool,
}

/// Sets `routing.canary_percent` to `percent` in the file at `path`.
pub fn set_canary(path: &Path, percent: f64) -> Result<Edited, EditError> {
    let target = std::fs::canonicalize(path).map_err(|source| EditError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = std::fs::read_to_string(&target).map_err(|source| EditError::Read {
        path: target.clone(),
        source,
    })?;
    let mut doc: toml_edit::DocumentMut =
        text.parse()
            .map_err(|e: toml_edit::TomlError| EditError::Toml {
                path: target.clone(),
                message: e.to_string(),
            })?;
    let item = &mut doc["routing"]["canary_percent"];
    let old = item
        .as_float()
        .or_else(|| item.as_integer().map(|i| i as f64));
    if old == Some(percent) {
        return Ok(Edited {
            path: target,
            old,
            new: percent,
            changed: false,
        });
    }
    let decor = item.as_value().map(|v| v.decor().clone());
    // A whole number is written as one (`25`, not `25.0`), as people write it.
    *item = if percent.fract() == 0.0 && percent.abs() <= 100.0 {
        toml_edit::value(percent as i64)
    } else {
        toml_edit::value(percent)
    };
    if let (Some(d), Some(v)) = (decor, item.as_value_mut()) {
        *v.decor_mut() = d;
    }
    let new_text = doc.to_string();
    Config::parse(&new_text).map_err(EditError::Invalid)?;
    replace(&target, path, new_text.as_bytes())?;
    Ok(Edited {
        path: target,
        old,
        new: percent,
        changed: true,
    })
}

/// What to do instead when `shown` (the path the user gave) cannot be replaced.
fn hint(shown: &Path, target: &Path) -> String {
    let configmap = target
        .components()
        .chain(shown.components())
        .any(|c| c.as_os_str().to_string_lossy().starts_with("..data"))
        || target.parent().is_some_and(|d| d.join("..data").exists());
    if configmap {
        "it is mounted from a Kubernetes ConfigMap: change routing.canary_percent in the ConfigMap (kubectl edit configmap …); every instance reloads it within seconds".into()
    } else {
        format!(
            "make {} writable by this user (the daemon's, for automatic promotion), or change routing.canary_percent where the file comes from (configuration management)",
            target.parent().unwrap_or(target).display()
        )
    }
}

/// Replaces `target` with `bytes` atomically, keeping its mode and owner.
fn replace(target: &Path, shown: &Path, bytes: &[u8]) -> Result<(), EditError> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let meta = std::fs::metadata(target).map_err(|source| EditError::Read {
        path: target.to_path_buf(),
        source,
    })?;
    let read_only = |source: std::io::Error| EditError::ReadOnly {
        path: target.to_path_buf(),
        hint: hint(shown, target),
        source,
    };
    let write = |source: std::io::Error| EditError::Write {
        path: target.to_path_buf(),
        source,
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| {
            // tempfile wraps the error with its path: the kind survives, the errno may not.
            let denied = matches!(
                e.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ) || matches!(
                e.raw_os_error(),
                Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM)
            );
            if denied {
                read_only(e)
            } else {
                write(e)
            }
        })?;
    tmp.write_all(bytes).map_err(write)?;
    tmp.as_file()
        .set_permissions(meta.permissions())
        .map_err(write)?;
    if meta.uid() != tmp.as_file().metadata().map_err(write)?.uid()
        || meta.gid() != tmp.as_file().metadata().map_err(write)?.gid()
    {
        // Only root may give a file away; anyone else would change its owner by replacing it.
        std::os::unix::fs::fchown(tmp.as_file(), Some(meta.uid()), Some(meta.gid()))
            .map_err(read_only)?;
    }
    tmp.as_file().sync_all().map_err(write)?;
    tmp.persist(target).map_err(|e| write(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# the gateway\n\n[upstream.legacy]\naddress = \"127.0.0.1:1\"  # the add-on\n\n[routing]\n# who goes where\ncanary_percent = 10   # stage 1\nrehome_rate = 2\n";

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("gateway.toml");
        std::fs::write(&p, text).expect("write");
        (dir, p)
    }

    #[test]
    fn only_the_percentage_changes_and_every_comment_stays() {
        let (_d, p) = file(FILE);
        let e = set_canary(&p, 25.0).expect("edit");
        assert_eq!((e.old, e.new, e.changed), (Some(10.0), 25.0, true));
        let after = std::fs::read_to_string(&p).expect("read");
        assert_eq!(
            after,
            FILE.replace("canary_percent = 10 ", "canary_percent = 25 ")
        );
    }

    #[test]
    fn a_fraction_is_written_as_one_and_the_mode_is_kept() {
        use std::os::unix::fs::PermissionsExt as _;
        let (_d, p) = file(FILE);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        set_canary(&p, 12.5).expect("edit");
        assert!(std::fs::read_to_string(&p)
            .expect("read")
            .contains("canary_percent = 12.5   # stage 1"));
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn an_invalid_result_is_never_written() {
        let (_d, p) = file(FILE);
        let e = set_canary(&p, 150.0).expect_err("out of range");
        assert!(matches!(e, EditError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("routing.canary_percent"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), FILE);
    }

    #[test]
    fn the_same_value_writes_nothing() {
        let (_d, p) = file(FILE);
        let before = std::fs::metadata(&p).expect("meta").ino();
        let e = set_canary(&p, 10.0).expect("edit");
        assert!(!e.changed);
        assert_eq!(std::fs::metadata(&p).expect("meta").ino(), before);
    }

    #[test]
    fn a_missing_key_is_added_to_its_table() {
        let (_d, p) = file("[upstream.legacy]\naddress = \"127.0.0.1:1\"\n");
        let e = set_canary(&p, 5.0).expect("edit");
        assert_eq!(e.old, None);
        let c = Config::load(&p).expect("valid");
        assert_eq!(c.routing.canary_percent, 5.0);
    }

    #[test]
    fn a_symlinked_file_is_replaced_behind_its_link_and_a_configmap_gets_its_hint() {
        let (d, real) = file(FILE);
        // The layout of a mounted ConfigMap: the file is a link into `..data`.
        let data = d.path().join("..data");
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::rename(&real, data.join("gateway.toml")).expect("move");
        let link = d.path().join("link.toml");
        std::os::unix::fs::symlink(data.join("gateway.toml"), &link).expect("symlink");
        set_canary(&link, 50.0).expect("edit");
        assert!(std::fs::symlink_metadata(&link)
            .expect("meta")
            .file_type()
            .is_symlink());
        assert!(std::fs::read_to_string(&link)
            .expect("read")
            .contains("canary_percent = 50"));
        assert!(hint(&link, &data.join("gateway.toml")).contains("ConfigMap"));
    }
}
