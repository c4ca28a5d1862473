//! Log output: `tracing` to stderr as JSON lines (plain text when stderr is a terminal, or as
//! configured), and optionally to a rolling file through `tracing-appender`.
//!
//! Invariants:
//! - `RUST_LOG`, when set, overrides `logging.level`, so an operator can raise verbosity
//!   without editing the file.
//! - Nothing here formats packet bytes: 0x23 auth codes can never reach a log by this route
//!   (packets print their type and length only).

use std::io::IsTerminal;

use thiserror::Error;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::{RollingFileAppender, Rotation as AppenderRotation};
use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, Logging, Rotation};

#[derive(Debug, Error)]
pub enum LogError {
    #[error("invalid log filter {0:?}")]
    Filter(String),
    #[error("log file in {dir}: {source}")]
    File {
        dir: String,
        source: tracing_appender::rolling::InitError,
    },
    #[error("a global logger is already installed")]
    AlreadySet,
}

/// Installs the global subscriber. Keep the returned guard alive: it flushes the file writer.
pub fn init(cfg: &Logging) -> Result<Option<WorkerGuard>, LogError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v).map_err(|_| LogError::Filter(v))?,
        _ => EnvFilter::try_new(&cfg.level).map_err(|_| LogError::Filter(cfg.level.clone()))?,
    };
    let json = match cfg.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let (file, guard) = match &cfg.file_dir {
        None => (None, None),
        Some(dir) => {
            let rotation = match cfg.file_rotation {
                Rotation::Hourly => AppenderRotation::HOURLY,
                Rotation::Daily => AppenderRotation::DAILY,
                Rotation::Never => AppenderRotation::NEVER,
            };
            let appender = RollingFileAppender::builder()
                .rotation(rotation)
                .filename_prefix(&cfg.file_prefix)
                .build(dir)
                .map_err(|source| LogError::File {
                    dir: dir.display().to_string(),
                    source,
                })?;
            let (w, g) = tracing_appender::non_blocking(appender);
            (Some(w), Some(g))
        }
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match (json, file) {
        (true, Some(f)) => builder
            .json()
            .with_writer(std::io::stderr.and(f))
            .try_init(),
        (true, None) => builder.json().with_writer(std::io::stderr).try_init(),
        (false, Some(f)) => builder.with_writer(std::io::stderr.and(f)).try_init(),
        (false, None) => builder.with_writer(std::io::stderr).try_init(),
    };
    result.map_err(|_| LogError::AlreadySet)?;
    Ok(guard)
}

/// Spaces log lines that many connections could write at once (a shared upstream dying), so
/// one event is one line, not thousands.
#[derive(Debug, Default)]
pub struct LogLimit {
    last: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl LogLimit {
    /// True when a line may be logged now (none in the last `every`).
    pub fn allow(&self, now: tokio::time::Instant, every: std::time::Duration) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| now.saturating_duration_since(t) < every) {
            return false;
        }
        *last = Some(now);
        true
    }
}
