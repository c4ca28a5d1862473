//! The rollback latch's life on disk: read once at start, written by the control task on
//! every change.
//!
//! Invariants:
//! - Fail safe: a latch file that exists but cannot be read sets the latch (logged, counted,
//!   and rewritten as set so the next start agrees). Only an absent file or one that says
//!   "clear" starts unlatched.
//! - The file is written atomically ([`super::state::write_atomic`]) before the change is
//!   reported done, so a crash right after a rollback still starts latched.
//! - Only an operator clears it ([`super::Control::Resume`]).

use std::path::Path;

use tracing::{error, warn};

use super::event::RollbackCause;
use super::slo_task::{StateFile, StateProblem};
use super::state::{self, LatchFile, LatchLoad, StateError, LATCH_VERSION};
use crate::telemetry::metrics::Metrics;

/// Reads the latch at start: whether the gateway starts latched.
pub async fn load(dir: &Path, metrics: &Metrics, at: String) -> bool {
    let d = dir.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || state::load_latch(&d))
        .await
        .unwrap_or_else(|e| LatchLoad::Unreadable {
            error: format!("reading task failed: {e}"),
        });
    match loaded {
        LatchLoad::Absent | LatchLoad::Clear(_) => false,
        LatchLoad::Set(f) => {
            warn!(
                reason = f.reason,
                actor = f.actor,
                since = f.at,
                "starting with the rollback latch set: every device routes to legacy until an operator resumes"
            );
            true
        }
        LatchLoad::Unreadable { error } => {
            error!(
                dir = %dir.display(),
                error,
                "the rollback latch file exists but cannot be read; treating it as set (fail safe)"
            );
            metrics.state_error(StateFile::Latch, StateProblem::Unreadable);
            metrics.rollback(RollbackCause::LatchUnreadable);
            let file = LatchFile {
                version: LATCH_VERSION,
                latched: true,
                reason: format!("latch file unreadable at start: {error}"),
                actor: "gateway".into(),
                at,
            };
            if let Err(e) = save(dir, file).await {
                error!(error = %e, "cannot rewrite the latch file; it stays set in memory");
                metrics.state_error(StateFile::Latch, StateProblem::Write);
            }
            true
        }
    }
}

/// Writes the latch file (atomically, on the blocking pool).
pub async fn save(dir: &Path, file: LatchFile) -> Result<(), StateError> {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || state::save_latch(&d, &file))
        .await
        .unwrap_or_else(|e| {
            Err(StateError::Io {
                path: dir.join(state::LATCH_FILE),
                source: std::io::Error::other(e.to_string()),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreadable_latch_file_sets_the_latch_and_is_rewritten_as_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(state::LATCH_FILE), b"\x00garbage").expect("write");
        let m = Metrics::new(false).expect("metrics");
        assert!(load(dir.path(), &m, "2026-12-01T00:00:00.000Z".into()).await);
        assert_eq!(
            m.total(
                "tcp_comm_state_errors_total",
                &[("file", "latch"), ("error", "unreadable")]
            ),
            1.0
        );
        assert_eq!(
            m.total(
                "tcp_comm_rollbacks_total",
                &[("reason", "latch_unreadable")]
            ),
            1.0
        );
        // The next start reads a proper, set latch.
        let again = Metrics::new(false).expect("metrics");
        assert!(load(dir.path(), &again, "later".into()).await);
        assert_eq!(again.total("tcp_comm_state_errors_total", &[]), 0.0);
    }

    #[tokio::test]
    async fn no_latch_file_starts_clear_and_a_saved_one_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Metrics::new(false).expect("metrics");
        assert!(!load(dir.path(), &m, "t".into()).await);
        let set = |on: bool| LatchFile {
            version: LATCH_VERSION,
            latched: on,
            reason: "r".into(),
            actor: "controller".into(),
            at: "t".into(),
        };
        save(dir.path(), set(true)).await.expect("save");
        assert!(load(dir.path(), &m, "t".into()).await);
        save(dir.path(), set(false)).await.expect("save");
        assert!(!load(dir.path(), &m, "t".into()).await);
        assert_eq!(m.total("tcp_comm_state_errors_total", &[]), 0.0);
    }
}
