//! The files in `state_dir` that outlive a restart: the SLO state ([`SLO_FILE`]) and the
//! rollback latch ([`LATCH_FILE`]).
//!
//! Everything here is synchronous file I/O; the caller runs it on `spawn_blocking`.
//!
//! Invariants:
//! - Every write is atomic ([`write_atomic`]): a reader sees the old file or the new one, never
//!   a part of either, and once the call returns the new file survives a power cut.
//! - A corrupt file never stops the daemon: [`read_json`] moves it aside (so the evidence is
//!   kept and the next start is clean) and reports [`Loaded::Corrupt`]; the caller starts fresh.
//! - An unreadable latch means latched (fail safe): [`load_latch`] reports
//!   [`LatchLoad::Unreadable`], whose [`LatchLoad::latched`] is `true`, and leaves the file
//!   where it is for the caller to rewrite.
//! - One writer per file: temp files are named by process id, so two threads of one process
//!   must not write the same name at once (the control task is the only writer).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The file holding the SLO engine's state.
pub const SLO_FILE: &str = "slo.json";

/// The file holding the rollback latch.
pub const LATCH_FILE: &str = "latch.json";

/// The `version` of [`LatchFile`] this build writes and accepts.
pub const LATCH_VERSION: u32 = 1;

/// Files larger than this are corrupt by definition: nothing here writes anything near it, and
/// reading an unbounded file into memory could take the daemon down.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Why a write to the state directory failed.
#[derive(Error, Debug)]
pub enum StateError {
    /// A file system operation on `path` failed.
    #[error("state file {}: {source}", path.display())]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The value could not be serialised to JSON.
    #[error("serialising state: {0}")]
    Serialize(#[from] serde_json::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The prefix of every temp file [`write_atomic`] makes for `name`.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.tmp-")
}

fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    // The state says what the gateway will do next; only its own user should be able to
    // read it, let alone change it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Makes a rename or a new name in `dir` durable: without it a power cut can undo the rename
/// even though the file's data was synced.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Writes `bytes` to `dir/name` atomically and durably, creating `dir` (mode 0700) if it is
/// missing.
///
/// The bytes go to a new temp file in the same directory (`.{name}.tmp-{pid}-{random}`, made
/// exclusively, so two processes on one directory — two containers are both PID 1 — never
/// write the same one), which is synced
/// and renamed over `name`, and then the directory is synced. On any error the temp file is
/// removed and `name` is left as it was (unless only the final directory sync failed, in which
/// case the new file is in place but may not survive a power cut).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StateError> {
    create_dir(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        "{}{}-{:08x}",
        temp_prefix(name),
        std::process::id(),
        rand::random::<u32>()
    ));
    let target = dir.join(name);
    let result = write_then_rename(&tmp, &target, bytes);
    if result.is_err() {
        // Best effort: the error being returned matters more than a failure to clean up, and
        // the next read removes stale temp files anyway.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_dir(dir).map_err(io_err(dir))
}

fn write_then_rename(tmp: &Path, target: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(tmp).map_err(io_err(tmp))?;
    file.write_all(bytes).map_err(io_err(tmp))?;
    // The data must be on disk before the rename makes it visible, or a crash could leave a
    // renamed but empty file.
    file.sync_all().map_err(io_err(tmp))?;
    drop(file);
    fs::rename(tmp, target).map_err(io_err(target))
}

/// Removes temp files a process killed mid-write left behind. Any file changed in the last
/// minute is spared: it may be a write in flight, on another thread of ours or in another
/// process on the same directory. (Not by pid: in containers every gateway is PID 1.)
fn remove_stale_temps(dir: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = temp_prefix(name);
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let recent = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < std::time::Duration::from_secs(60));
        if file_name.starts_with(&prefix) && !recent {
            match fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(file = file_name, "removed a temp file left by a crash"),
                Err(error) => tracing::warn!(
                    file = file_name,
                    %error,
                    "could not remove a temp file left by a crash"
                ),
            }
        }
    }
}

/// What [`read_json`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Loaded<T> {
    /// There is no such file: a first start.
    Missing,
    /// The file parsed, at the expected version.
    Ok(T),
    /// The file exists but could not be used; the caller starts fresh.
    Corrupt {
        /// What was wrong with it.
        error: String,
        /// Where it was moved to (`{name}.corrupt-{unix_ms}`), or `None` if the move failed
        /// and it is still in place.
        moved_to: Option<PathBuf>,
    },
}

/// Reads `path` as a JSON object whose `"version"` is `version`: `Ok(None)` if it does not
/// exist, `Err` with a description of any other problem.
fn read_versioned<T: DeserializeOwned>(path: &Path, version: u32) -> Result<Option<T>, String> {
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("opening: {e}")),
    };
    let mut bytes = Vec::new();
    // One byte past the cap, so a file exactly at the cap is still accepted.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(map) = &value else {
        return Err("not a JSON object".to_string());
    };
    // Checked before deserialising into T, so a file from another version is reported as
    // such rather than as whatever field it happens to lack.
    match map.get("version") {
        None => return Err(format!("no version, expected {version}")),
        Some(found) if found.as_u64() != Some(u64::from(version)) => {
            return Err(format!("version {found}, expected {version}"));
        }
        Some(_) => {}
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| format!("version {version} but not the expected shape: {e}"))
}

/// Reads `dir/name`, a JSON object with `"version": version`.
///
/// A missing file is [`Loaded::Missing`]. Any problem (unreadable, over [`MAX_FILE_BYTES`],
/// not JSON, another version, the wrong shape) is [`Loaded::Corrupt`], and the file is renamed
/// to `{name}.corrupt-{unix_ms}` so the next start does not trip over it again. Temp files
/// left by a process killed while writing `name` are removed.
pub fn read_json<T: DeserializeOwned>(
    dir: &Path,
    name: &str,
    version: u32,
    unix_ms: u64,
) -> Loaded<T> {
    remove_stale_temps(dir, name);
    let path = dir.join(name);
    match read_versioned(&path, version) {
        Ok(None) => Loaded::Missing,
        Ok(Some(value)) => Loaded::Ok(value),
        Err(error) => {
            let aside = dir.join(format!("{name}.corrupt-{unix_ms}"));
            let moved_to = match fs::rename(&path, &aside) {
                Ok(()) => Some(aside),
                Err(rename_error) => {
                    tracing::warn!(
                        file = %path.display(),
                        error = %rename_error,
                        "could not move a corrupt state file aside"
                    );
                    None
                }
            };
            Loaded::Corrupt { error, moved_to }
        }
    }
}

/// The rollback latch as stored in [`LATCH_FILE`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LatchFile {
    /// The file format, [`LATCH_VERSION`].
    pub version: u32,
    /// Whether every device is held on the legacy path.
    pub latched: bool,
    /// Why the latch was last set or cleared.
    pub reason: String,
    /// Who set or cleared it (file, signal, controller, admin).
    pub actor: String,
    /// When, as an RFC 3339 time stamp made by the caller.
    pub at: String,
}

impl LatchFile {
    /// A latch file at the current [`LATCH_VERSION`].
    pub fn new(
        latched: bool,
        reason: impl Into<String>,
        actor: impl Into<String>,
        at: impl Into<String>,
    ) -> LatchFile {
        LatchFile {
            version: LATCH_VERSION,
            latched,
            reason: reason.into(),
            actor: actor.into(),
            at: at.into(),
        }
    }
}

/// Writes the latch to `dir/`[`LATCH_FILE`] atomically, as pretty JSON (an operator may read
/// it by hand) ending in a newline.
pub fn save_latch(dir: &Path, latch: &LatchFile) -> Result<(), StateError> {
    let mut bytes = serde_json::to_vec_pretty(latch)?;
    bytes.push(b'\n');
    write_atomic(dir, LATCH_FILE, &bytes)
}

/// What [`load_latch`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum LatchLoad {
    /// No latch file: the latch has never been set here.
    Absent,
    /// The latch file says clear.
    Clear(LatchFile),
    /// The latch file says set.
    Set(LatchFile),
    /// A latch file exists but cannot be read (permissions, not JSON, another version, a
    /// directory in its place). Treat it as set: a rollback must not be undone by a
    /// damaged file.
    Unreadable {
        /// What was wrong with it.
        error: String,
    },
}

impl LatchLoad {
    /// Whether routing must hold every device on legacy: set or unreadable.
    pub fn latched(&self) -> bool {
        match self {
            LatchLoad::Absent | LatchLoad::Clear(_) => false,
            LatchLoad::Set(_) | LatchLoad::Unreadable { .. } => true,
        }
    }
}

/// Reads `dir/`[`LATCH_FILE`]. An unreadable file is left where it is (unlike
/// [`read_json`]): the caller treats it as set and rewrites it, and moving it aside first
/// would make a second crash before that rewrite forget the latch.
pub fn load_latch(dir: &Path) -> LatchLoad {
    remove_stale_temps(dir, LATCH_FILE);
    match read_versioned::<LatchFile>(&dir.join(LATCH_FILE), LATCH_VERSION) {
        Ok(None) => LatchLoad::Absent,
        Ok(Some(latch)) if latch.latched => LatchLoad::Set(latch),
        Ok(Some(latch)) => LatchLoad::Clear(latch),
        Err(error) => LatchLoad::Unreadable { error },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Doc {
        version: u32,
        budget: f64,
        note: String,
    }

    fn doc(note: &str) -> Doc {
        Doc {
            version: 1,
            budget: 0.25,
            note: note.to_string(),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = serde_json::to_vec(&doc("hello")).unwrap();
        write_atomic(dir.path(), SLO_FILE, &bytes).unwrap();
        let loaded: Loaded<Doc> = read_json(dir.path(), SLO_FILE, 1, 7);
        assert_eq!(loaded, Loaded::Ok(doc("hello")));
    }

    #[test]
    fn a_missing_file_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let loaded: Loaded<Doc> = read_json(dir.path(), SLO_FILE, 1, 7);
        assert_eq!(loaded, Loaded::Missing);
    }

    #[test]
    fn an_existing_file_is_replaced_and_no_temp_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), SLO_FILE, b"old contents, longer than the new").unwrap();
        write_atomic(dir.path(), SLO_FILE, b"new").unwrap();
        assert_eq!(fs::read(dir.path().join(SLO_FILE)).unwrap(), b"new");
        assert_eq!(names(dir.path()), vec![SLO_FILE.to_string()]);
    }

    #[test]
    fn a_write_into_a_missing_dir_creates_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a").join("state");
        write_atomic(&dir, LATCH_FILE, b"{}").unwrap();
        assert_eq!(fs::read(dir.join(LATCH_FILE)).unwrap(), b"{}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }

    #[test]
    fn corrupt_json_is_moved_aside_to_the_exact_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(SLO_FILE), b"{ not json").unwrap();
        let loaded: Loaded<Doc> = read_json(dir.path(), SLO_FILE, 1, 1_700_000_000_123);
        let aside = dir.path().join("slo.json.corrupt-1700000000123");
        match loaded {
            Loaded::Corrupt { error, moved_to } => {
                assert!(error.contains("not valid JSON"), "{error}");
                assert_eq!(moved_to, Some(aside.clone()));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert_eq!(fs::read(&aside).unwrap(), b"{ not json");
        assert!(!dir.path().join(SLO_FILE).exists());
        // The next start finds a clean slate.
        let again: Loaded<Doc> = read_json(dir.path(), SLO_FILE, 1, 1_700_000_000_124);
        assert_eq!(again, Loaded::Missing);
    }

    #[test]
    fn a_wrong_version_is_corrupt_naming_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = serde_json::to_vec(&json!({"version": 2, "other": "shape"})).unwrap();
        write_atomic(dir.path(), SLO_FILE, &bytes).unwrap();
        let loaded: Loaded<Doc> = read_json(dir.path(), SLO_FILE, 1, 5);
        match loaded {
            Loaded::Corrupt { error, moved_to } => {
                assert!(error.contains("version 2, expected 1"), "{error}");
                assert_eq!(moved_to, Some(dir.path().join("slo.json.corrupt-5")));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn a_right_version_of_the_wrong_shape_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(SLO_FILE), br#"{"version": 1}"#).unwrap();
        let loaded: Loaded<Doc> = read_json(dir.path(), SLO_FILE, 1, 5);
        assert!(matches!(loaded, Loaded::Corrupt { .. }), "{loaded:?}");
    }

    #[test]
    fn a_stale_temp_file_from_a_crash_is_removed_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = serde_json::to_vec(&doc("real")).unwrap();
        write_atomic(dir.path(), SLO_FILE, &bytes).unwrap();
        // A process with another pid, killed halfway through its write, long ago (2023).
        let stale = dir.path().join(".slo.json.tmp-999999999-0000abcd");
        fs::write(&stale, &bytes[..bytes.len() / 2]).unwrap();
        let long_ago = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        // Another one, just written: maybe a write in flight in another process; spared.
        let fresh = dir.path().join(".slo.json.tmp-999999998-0000abcd");
        fs::write(&fresh, b"{").unwrap();
        let loaded: Loaded<Doc> = read_json(dir.path(), SLO_FILE, 1, 5);
        assert_eq!(loaded, Loaded::Ok(doc("real")));
        assert!(!stale.exists());
        assert!(fresh.exists());
        fs::remove_file(&fresh).unwrap();
        assert_eq!(names(dir.path()), vec![SLO_FILE.to_string()]);
    }

    #[test]
    fn a_truncated_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = serde_json::to_vec(&doc("truncated")).unwrap();
        fs::write(dir.path().join(SLO_FILE), &bytes[..bytes.len() / 2]).unwrap();
        let loaded: Loaded<Doc> = read_json(dir.path(), SLO_FILE, 1, 9);
        match loaded {
            Loaded::Corrupt { moved_to, .. } => {
                assert_eq!(moved_to, Some(dir.path().join("slo.json.corrupt-9")));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn a_file_over_the_cap_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b' '; MAX_FILE_BYTES as usize + 1];
        fs::write(dir.path().join(SLO_FILE), &big).unwrap();
        let loaded: Loaded<Doc> = read_json(dir.path(), SLO_FILE, 1, 9);
        match loaded {
            Loaded::Corrupt { error, .. } => assert!(error.contains("larger"), "{error}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_latch_is_absent_and_not_latched() {
        let dir = tempfile::tempdir().unwrap();
        let load = load_latch(dir.path());
        assert_eq!(load, LatchLoad::Absent);
        assert!(!load.latched());
    }

    #[test]
    fn a_set_latch_loads_as_set() {
        let dir = tempfile::tempdir().unwrap();
        let latch = LatchFile::new(
            true,
            "error budget burnt",
            "controller",
            "2024-05-01T12:00:00Z",
        );
        save_latch(dir.path(), &latch).unwrap();
        let load = load_latch(dir.path());
        assert_eq!(load, LatchLoad::Set(latch));
        assert!(load.latched());
        let text = fs::read_to_string(dir.path().join(LATCH_FILE)).unwrap();
        assert!(text.ends_with("}\n"), "{text:?}");
        assert!(text.contains("\n  \"latched\": true"), "{text:?}");
    }

    #[test]
    fn a_cleared_latch_loads_as_clear() {
        let dir = tempfile::tempdir().unwrap();
        let latch = LatchFile::new(false, "resumed", "admin", "2024-05-01T13:00:00Z");
        save_latch(dir.path(), &latch).unwrap();
        let load = load_latch(dir.path());
        assert_eq!(load, LatchLoad::Clear(latch));
        assert!(!load.latched());
    }

    #[test]
    fn a_garbage_latch_is_unreadable_latched_and_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LATCH_FILE), b"\x00\x01garbage").unwrap();
        let load = load_latch(dir.path());
        assert!(matches!(load, LatchLoad::Unreadable { .. }), "{load:?}");
        assert!(load.latched());
        assert_eq!(names(dir.path()), vec![LATCH_FILE.to_string()]);
    }

    #[test]
    fn a_latch_of_another_version_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let mut latch = LatchFile::new(false, "r", "admin", "2024-05-01T13:00:00Z");
        latch.version = 2;
        save_latch(dir.path(), &latch).unwrap();
        let load = load_latch(dir.path());
        match &load {
            LatchLoad::Unreadable { error } => {
                assert!(error.contains("version 2, expected 1"), "{error}")
            }
            other => panic!("expected Unreadable, got {other:?}"),
        }
        assert!(load.latched());
    }

    #[test]
    fn a_directory_in_place_of_the_latch_is_unreadable_and_latched() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(LATCH_FILE)).unwrap();
        let load = load_latch(dir.path());
        assert!(matches!(load, LatchLoad::Unreadable { .. }), "{load:?}");
        assert!(load.latched());
        assert!(dir.path().join(LATCH_FILE).is_dir());
    }

    #[test]
    fn a_reader_never_sees_a_partial_write() {
        let dir = tempfile::tempdir().unwrap();
        let big = |fill: char| {
            let mut bytes = serde_json::to_vec(&Doc {
                version: 1,
                budget: 1.0,
                note: std::iter::repeat_n(fill, 256 * 1024).collect(),
            })
            .unwrap();
            bytes.push(b'\n');
            bytes
        };
        let contents = Arc::new([big('a'), big('b')]);
        write_atomic(dir.path(), SLO_FILE, &contents[0]).unwrap();

        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let path = dir.path().join(SLO_FILE);
            let contents = Arc::clone(&contents);
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut reads = 0usize;
                loop {
                    let finished = done.load(Ordering::SeqCst);
                    let seen = fs::read(&path).unwrap();
                    assert!(
                        seen == contents[0] || seen == contents[1],
                        "read {} bytes that are neither version",
                        seen.len()
                    );
                    let _: Doc = serde_json::from_slice(&seen).unwrap();
                    reads += 1;
                    if finished {
                        return reads;
                    }
                }
            })
        };
        for i in 0..200 {
            write_atomic(dir.path(), SLO_FILE, &contents[i % 2]).unwrap();
        }
        done.store(true, Ordering::SeqCst);
        let reads = reader.join().unwrap();
        assert!(reads > 0);
        assert_eq!(names(dir.path()), vec![SLO_FILE.to_string()]);
    }
}
