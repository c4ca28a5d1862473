//! The wake-ups between the parts of one session: "something was queued for the upstream",
//! "... for the device", "the device queue has room", "a timer was added".
//!
//! Each is a flag in one byte and all share one registered waker, because every part that
//! waits on one (the device writer, the upstream reader and writer, the session loop) is a
//! future polled inside the session's own task: `tokio::sync::Notify` would give each its own
//! waiter list, and each waiting future a 64-byte `Notified` for as long as it waits — which,
//! for an idle device, is the connection's whole life.
//!
//! Invariants:
//! - A raise is never lost: a waiter registers the waker before it reads its flag, and a raise
//!   sets the flag before it wakes.
//! - Raises do not accumulate: like `Notify::notify_one` without a waiter, any number of raises
//!   before a wait leave one wake-up, taken by that wait.
//! - Only futures of one task wait on a `Signals` (the waker slot holds one task's waker).

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Poll;

use futures_util::task::AtomicWaker;

/// One of a session's wake-ups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Signal {
    /// Something was queued for the upstream (or the upstream's FIN is due).
    ToUpstream = 1,
    /// Something was queued for the device (or the device's FIN is due).
    ToDevice = 2,
    /// The device queue has room again.
    Room = 4,
    /// A timer was added (a command to retry): the session loop recomputes its wake-up.
    Rearm = 8,
}

/// A session's four wake-ups ([`Signal`]).
#[derive(Debug, Default)]
pub struct Signals {
    raised: AtomicU8,
    waker: AtomicWaker,
}

impl Signals {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes the wait for `s`, now or, if none is waiting, the next one.
    pub fn raise(&self, s: Signal) {
        self.raised.fetch_or(s as u8, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Completes once `s` has been raised since the last wait for it completed. Cancel-safe:
    /// the raise is taken only by the poll that returns ready.
    pub fn wait(&self, s: Signal) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            self.waker.register(cx.waker());
            let bit = s as u8;
            if self.raised.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::Arc;
    use std::task::{Context, Wake, Waker};

    use super::*;

    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count::default());
        (c.clone(), Waker::from(c))
    }

    fn wakes(c: &Count) -> usize {
        c.0.load(Ordering::SeqCst)
    }

    #[test]
    fn a_raise_before_the_wait_is_kept_for_it_and_taken_once() {
        let s = Signals::new();
        let (_, w) = counting();
        let mut cx = Context::from_waker(&w);
        s.raise(Signal::ToDevice);
        s.raise(Signal::ToDevice);
        assert!(pin!(s.wait(Signal::ToDevice)).poll(&mut cx).is_ready());
        assert!(pin!(s.wait(Signal::ToDevice)).poll(&mut cx).is_pending());
    }

    #[test]
    fn a_raise_while_waiting_wakes_the_task_and_completes_only_its_own_wait() {
        let s = Signals::new();
        let (count, w) = counting();
        let mut cx = Context::from_waker(&w);
        let mut up = pin!(s.wait(Signal::ToUpstream));
        let mut room = pin!(s.wait(Signal::Room));
        assert!(up.as_mut().poll(&mut cx).is_pending());
        assert!(room.as_mut().poll(&mut cx).is_pending());
        s.raise(Signal::Room);
        assert_eq!(wakes(&count), 1);
        assert!(up.as_mut().poll(&mut cx).is_pending());
        assert!(room.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn a_wait_dropped_before_it_saw_the_raise_leaves_it_for_the_next() {
        let s = Signals::new();
        let (_, w) = counting();
        let mut cx = Context::from_waker(&w);
        {
            let mut first = pin!(s.wait(Signal::Rearm));
            assert!(first.as_mut().poll(&mut cx).is_pending());
            s.raise(Signal::Rearm);
        }
        assert!(pin!(s.wait(Signal::Rearm)).poll(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_raise_from_another_thread_wakes_a_waiting_task() {
        let s = Arc::new(Signals::new());
        let raiser = s.clone();
        let t = std::thread::spawn(move || raiser.raise(Signal::ToUpstream));
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            s.wait(Signal::ToUpstream),
        )
        .await
        .expect("the raise woke the wait");
        t.join().expect("raiser thread");
    }
}
