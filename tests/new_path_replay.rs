//! The new path over the whole real capture, side by side with what the legacy suite checks
//! (`tests/legacy_passthrough.rs`): byte for byte both ways, counted frame by frame, plain and
//! with TLS on both legs.

mod common;

use common::replay::replay_capture;

/// The new path forwards the same capture byte for byte when nothing is duplicated or lost,
/// and measures it the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_new_path_is_byte_exact_and_measured() {
    replay_capture(false, false, "new", |c| c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replay_new_path_tls_both_legs() {
    replay_capture(true, true, "new", |c| c).await;
}
