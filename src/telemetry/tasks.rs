//! Named background tasks: every long-lived task the gateway starts runs on a
//! [`TaskTracker`] (so whoever owns the tracker can wait for it) inside a span named after it
//! (so its log lines say which task wrote them), and its end is logged.
//!
//! Invariants:
//! - No bare `tokio::spawn` for gateway work: [`Tasks::spawn`] is the one way to start one, and
//!   shutdown waits for every task on the tracker (the drain deadline bounds the wait).
//! - Cloning shares the tracker; [`Tasks::tracker`] hands it to code that waits or closes.

use std::future::Future;

use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument};

/// A task tracker whose tasks have names.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
}

impl Tasks {
    pub fn new(tracker: TaskTracker) -> Tasks {
        Tasks { tracker }
    }

    /// Runs `fut` on the tracker as the task `name`.
    pub fn spawn<F>(&self, name: &'static str, fut: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let span = tracing::info_span!("task", name);
        self.tracker.spawn(
            async move {
                fut.await;
                debug!("task ended");
            }
            .instrument(span),
        )
    }

    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// No task may be added from now on; [`Tasks::wait`] can then finish.
    pub fn close(&self) {
        self.tracker.close();
    }

    /// Resolves once the tracker is closed and every task on it has ended.
    pub async fn wait(&self) {
        self.tracker.wait().await
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}
