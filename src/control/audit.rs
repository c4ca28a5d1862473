//! The audit log: append-only JSON lines in `state_dir/`[`AUDIT_FILE`], one [`Entry`] per
//! routing change (a reload, a rollback, a resume, ...), rotated by size.
//!
//! Everything here is synchronous file I/O; the caller runs it on `spawn_blocking`.
//!
//! Invariants:
//! - An entry is on disk (fsynced) before [`AuditLog::append`] returns.
//! - Rotation happens before writing, never after, so the newest entry is always in the
//!   current file and is never rotated away or lost.
//! - Size is bounded: the current file and the `keep` rotated ones (`audit.jsonl.1` newest to
//!   `audit.jsonl.{keep}` oldest) hold at most `(keep + 1) × max_bytes` plus one entry (a file
//!   exceeds `max_bytes` only when a single entry does).
//! - A torn line (a crash mid-write) costs only that line: [`read`] skips and counts it, and
//!   the next append starts on a fresh line so it does not glue itself to the torn one.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The current audit file in the state directory; rotated files add `.1`, `.2`, ...
pub const AUDIT_FILE: &str = "audit.jsonl";

/// Why an audit operation failed.
#[derive(Error, Debug)]
pub enum AuditError {
    /// A file system operation on `path` failed.
    #[error("audit log {}: {source}", path.display())]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The entry could not be serialised to JSON.
    #[error("serialising an audit entry: {0}")]
    Serialize(#[from] serde_json::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One setting that changed, with its value before and after.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Change {
    /// Which setting, e.g. `routing.percent`.
    pub key: String,
    /// Its value before the change.
    pub old: serde_json::Value,
    /// Its value after the change.
    pub new: serde_json::Value,
}

/// One routing change, as one line of the audit log.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Entry {
    /// When, as an RFC 3339 time stamp made by the caller.
    pub time: String,
    /// Who made the change: `file`, `signal`, `controller` or `admin`.
    pub actor: String,
    /// What was done: `reload`, `rollback`, `resume`, ...
    pub action: String,
    /// The settings that changed.
    pub changes: Vec<Change>,
    /// Why, in words.
    pub reason: String,
    /// The SLO figures behind the decision, if any (`null` otherwise).
    #[serde(default)]
    pub slo: serde_json::Value,
}

/// The audit log in one directory, appended to by the control task.
#[derive(Debug, Clone)]
pub struct AuditLog {
    dir: PathBuf,
    max_bytes: u64,
    keep: usize,
}

fn rotated_name(n: usize) -> String {
    format!("{AUDIT_FILE}.{n}")
}

/// The index `n` of a rotated file `audit.jsonl.{n}`, if `name` is one.
fn rotated_index(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(AUDIT_FILE)?.strip_prefix('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&n| n > 0)
}

/// The rotated files in `dir`, oldest (highest index) first; an absent directory has none.
fn rotated_files(dir: &Path) -> Result<Vec<(usize, PathBuf)>, AuditError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(n) = entry.file_name().to_str().and_then(rotated_index) {
            files.push((n, entry.path()));
        }
    }
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    Ok(files)
}

fn remove_if_present(path: &Path) -> Result<(), AuditError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

fn rename_if_present(from: &Path, to: &Path) -> Result<(), AuditError> {
    match fs::rename(from, to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(from)(e)),
        _ => Ok(()),
    }
}

/// Makes renames and new names in `dir` durable: a synced file whose directory entry is not
/// synced can still vanish in a power cut.
fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    #[cfg(unix)]
    {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

fn create_dir(dir: &Path) -> Result<(), AuditError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    // Same directory as the state files: only the gateway's own user should see inside.
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err(dir))
}

impl AuditLog {
    /// An audit log in `dir` whose current file is rotated before it would grow past
    /// `max_bytes`, keeping `keep` rotated files (`0`: the current file is simply replaced).
    /// Nothing is touched until the first [`AuditLog::append`].
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64, keep: usize) -> AuditLog {
        AuditLog {
            dir: dir.into(),
            max_bytes,
            keep,
        }
    }

    /// The directory the log lives in (what [`read`] takes).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `e` as one line and syncs it to disk before returning, rotating first if the
    /// line would take a non-empty current file past `max_bytes`. Creates the directory if it
    /// is missing.
    pub fn append(&self, e: &Entry) -> Result<(), AuditError> {
        // Compact serde_json escapes every newline inside strings, so the entry is one line.
        let mut line = serde_json::to_vec(e)?;
        line.push(b'\n');
        create_dir(&self.dir)?;
        let path = self.dir.join(AUDIT_FILE);
        let len = match fs::metadata(&path) {
            Ok(meta) => Some(meta.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut exists = len.is_some();
        if let Some(len) = len {
            if len > 0 && len.saturating_add(line.len() as u64) > self.max_bytes {
                self.rotate(&path)?;
                exists = false;
            }
        }

        let mut file = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if exists && !ends_in_newline(&mut file).map_err(io_err(&path))? {
            // The last write was torn by a crash: end that line here, or this entry would be
            // glued onto it and be unreadable too.
            line.insert(0, b'\n');
        }
        // One buffer, one write: O_APPEND puts it at the end as a whole, so the line and its
        // newline cannot be split by anything else writing to the file.
        file.write_all(&line).map_err(io_err(&path))?;
        file.sync_data().map_err(io_err(&path))?;
        if !exists {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Shifts `audit.jsonl.{i}` to `.{i+1}` and the current file to `.1`, dropping what would
    /// go past `keep` (and any file beyond it, left by a run with a larger `keep`).
    fn rotate(&self, current: &Path) -> Result<(), AuditError> {
        for (n, path) in rotated_files(&self.dir)? {
            if n >= self.keep {
                remove_if_present(&path)?;
            }
        }
        if self.keep == 0 {
            remove_if_present(current)?;
        } else {
            for i in (1..self.keep).rev() {
                rename_if_present(
                    &self.dir.join(rotated_name(i)),
                    &self.dir.join(rotated_name(i + 1)),
                )?;
            }
            rename_if_present(current, &self.dir.join(rotated_name(1)))?;
        }
        sync_dir(&self.dir)
    }
}

/// Whether the file's last byte is a newline (true for an empty file).
fn ends_in_newline(file: &mut fs::File) -> io::Result<bool> {
    if file.metadata()?.len() == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// What [`read`] found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct History {
    /// The entries, oldest first.
    pub entries: Vec<Entry>,
    /// Lines that did not parse as an entry (a torn last line after a crash, say).
    pub skipped: usize,
}

/// Reads the audit log in `dir`, oldest entry first, across the rotated files and the current
/// one; with `limit`, only the newest `limit` entries. Lines that do not parse are skipped and
/// counted. A missing directory or file is an empty history.
pub fn read(dir: &Path, limit: Option<usize>) -> Result<History, AuditError> {
    let mut paths: Vec<PathBuf> = rotated_files(dir)?.into_iter().map(|(_, p)| p).collect();
    paths.push(dir.join(AUDIT_FILE));
    let mut history = History::default();
    for path in paths {
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            // Rotation may have moved it since the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&path)(e)),
        };
        for line in bytes.split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Entry>(line) {
                Ok(entry) => history.entries.push(entry),
                Err(_) => history.skipped += 1,
            }
        }
    }
    if let Some(limit) = limit {
        let excess = history.entries.len().saturating_sub(limit);
        history.entries.drain(..excess);
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn entry(i: usize) -> Entry {
        Entry {
            time: format!("2024-05-01T12:00:{:02}Z", i % 60),
            actor: "controller".to_string(),
            action: "rollback".to_string(),
            changes: vec![Change {
                key: "routing.percent".to_string(),
                old: json!(format!("{i:03}")),
                new: json!(0),
            }],
            reason: format!("entry {i:03}"),
            slo: json!({"burn_rate": 14.4}),
        }
    }

    fn line_len(e: &Entry) -> u64 {
        serde_json::to_vec(e).unwrap().len() as u64 + 1
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
    fn three_entries_read_back_in_order_with_fields_intact() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path(), 1 << 20, 3);
        let mut third = entry(3);
        third.reason = "multi\nline \"reason\"".to_string();
        third.slo = serde_json::Value::Null;
        let written = vec![entry(1), entry(2), third];
        for e in &written {
            log.append(e).unwrap();
        }
        let history = read(dir.path(), None).unwrap();
        assert_eq!(history.entries, written);
        assert_eq!(history.skipped, 0);
    }

    #[test]
    fn a_missing_slo_field_reads_as_null() {
        let dir = tempfile::tempdir().unwrap();
        let line = r#"{"time":"t","actor":"file","action":"reload","changes":[],"reason":"r"}"#;
        fs::write(dir.path().join(AUDIT_FILE), format!("{line}\n")).unwrap();
        let history = read(dir.path(), None).unwrap();
        assert_eq!(history.entries.len(), 1);
        assert_eq!(history.entries[0].slo, serde_json::Value::Null);
    }

    #[test]
    fn rotation_keeps_the_newest_entry_current_and_at_most_keep_files() {
        let dir = tempfile::tempdir().unwrap();
        let len = line_len(&entry(0));
        // Three lines per file: a fourth would pass max_bytes.
        let max_bytes = 3 * len;
        let keep = 2;
        let log = AuditLog::new(dir.path(), max_bytes, keep);
        for i in 1..=20 {
            log.append(&entry(i)).unwrap();
            let current = read_current(dir.path());
            assert_eq!(current.last(), Some(&entry(i)), "newest entry is current");
        }
        assert_eq!(
            names(dir.path()),
            vec!["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
        );
        let mut total = 0;
        for name in names(dir.path()) {
            let size = fs::metadata(dir.path().join(name)).unwrap().len();
            assert!(size <= max_bytes, "{size} > {max_bytes}");
            total += size;
        }
        assert!(total <= (keep as u64 + 1) * max_bytes + len);
        // Files of 3, 3 and then 2 (entries 19 and 20) in the current one.
        let history = read(dir.path(), None).unwrap();
        let expected: Vec<Entry> = (13..=20).map(entry).collect();
        assert_eq!(history.entries, expected);
        assert_eq!(history.skipped, 0);
        assert_eq!(read_current(dir.path()), vec![entry(19), entry(20)]);
    }

    fn read_current(dir: &Path) -> Vec<Entry> {
        fs::read_to_string(dir.join(AUDIT_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn keep_zero_replaces_the_current_file() {
        let dir = tempfile::tempdir().unwrap();
        let max_bytes = 2 * line_len(&entry(0));
        let log = AuditLog::new(dir.path(), max_bytes, 0);
        for i in 1..=5 {
            log.append(&entry(i)).unwrap();
        }
        assert_eq!(names(dir.path()), vec!["audit.jsonl"]);
        assert_eq!(read(dir.path(), None).unwrap().entries, vec![entry(5)]);
    }

    #[test]
    fn an_entry_larger_than_max_bytes_is_still_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path(), 10, 1);
        log.append(&entry(1)).unwrap();
        log.append(&entry(2)).unwrap();
        assert_eq!(read_current(dir.path()), vec![entry(2)]);
        assert_eq!(
            read(dir.path(), None).unwrap().entries,
            vec![entry(1), entry(2)]
        );
    }

    #[test]
    fn rotation_drops_files_beyond_keep_left_by_an_earlier_run() {
        let dir = tempfile::tempdir().unwrap();
        let max_bytes = line_len(&entry(0));
        let wide = AuditLog::new(dir.path(), max_bytes, 4);
        for i in 1..=5 {
            wide.append(&entry(i)).unwrap();
        }
        assert_eq!(names(dir.path()).len(), 5);
        let narrow = AuditLog::new(dir.path(), max_bytes, 1);
        narrow.append(&entry(6)).unwrap();
        assert_eq!(names(dir.path()), vec!["audit.jsonl", "audit.jsonl.1"]);
        assert_eq!(
            read(dir.path(), None).unwrap().entries,
            vec![entry(5), entry(6)]
        );
    }

    #[test]
    fn a_torn_trailing_line_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path(), 1 << 20, 3);
        log.append(&entry(1)).unwrap();
        log.append(&entry(2)).unwrap();
        let whole = serde_json::to_string(&entry(3)).unwrap();
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(AUDIT_FILE))
            .unwrap();
        file.write_all(&whole.as_bytes()[..whole.len() / 2])
            .unwrap();
        drop(file);

        let history = read(dir.path(), None).unwrap();
        assert_eq!(history.entries, vec![entry(1), entry(2)]);
        assert_eq!(history.skipped, 1);

        // The next entry after the crash is not lost to the torn line.
        log.append(&entry(4)).unwrap();
        let history = read(dir.path(), None).unwrap();
        assert_eq!(history.entries, vec![entry(1), entry(2), entry(4)]);
        assert_eq!(history.skipped, 1);
    }

    #[test]
    fn entries_survive_a_new_instance() {
        let dir = tempfile::tempdir().unwrap();
        let max_bytes = 2 * line_len(&entry(0));
        AuditLog::new(dir.path(), max_bytes, 2)
            .append(&entry(1))
            .unwrap();
        let reopened = AuditLog::new(dir.path(), max_bytes, 2);
        reopened.append(&entry(2)).unwrap();
        reopened.append(&entry(3)).unwrap();
        let history = read(dir.path(), None).unwrap();
        assert_eq!(history.entries, vec![entry(1), entry(2), entry(3)]);
        assert_eq!(names(dir.path()), vec!["audit.jsonl", "audit.jsonl.1"]);
    }

    #[test]
    fn every_line_is_json_ending_in_a_newline() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("missing").join("state"), 1 << 20, 1);
        for i in 1..=5 {
            let mut e = entry(i);
            e.reason = format!("line one\nline two\r\n{i}");
            log.append(&e).unwrap();
        }
        let bytes = fs::read(log.dir().join(AUDIT_FILE)).unwrap();
        assert_eq!(bytes.last(), Some(&b'\n'));
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        assert_eq!(lines.len(), 5);
        for line in lines {
            assert!(line.ends_with('\n'));
            let _: Entry = serde_json::from_str(line.trim_end_matches('\n')).unwrap();
        }
    }

    #[test]
    fn a_limit_returns_the_newest_entries() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path(), 2 * line_len(&entry(0)), 5);
        for i in 1..=7 {
            log.append(&entry(i)).unwrap();
        }
        let history = read(dir.path(), Some(3)).unwrap();
        assert_eq!(history.entries, vec![entry(5), entry(6), entry(7)]);
        assert_eq!(read(dir.path(), Some(100)).unwrap().entries.len(), 7);
        assert!(read(dir.path(), Some(0)).unwrap().entries.is_empty());
    }

    #[test]
    fn a_missing_dir_is_an_empty_history() {
        let dir = tempfile::tempdir().unwrap();
        let history = read(&dir.path().join("nope"), None).unwrap();
        assert_eq!(history, History::default());
    }
}
