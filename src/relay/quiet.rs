//! The waits a relay seldom wakes for (the drain, a revocation, a policy change), polled
//! only once one of them has woken.
//!
//! A tokio `Notified` that is still waiting locks its notifier's list of waiters each
//! time it is polled, and the drain's token and the policy's channel are shared by every
//! connection of the gate. The relay's task wakes for every message, so polling those
//! waits on every wake-up would take a lock shared by all connections once per message.
//! Here they are polled with a waker of their own, which notes that they woke before it
//! wakes the task: until it has, a poll costs two atomic operations.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Waits polled only after one of them woke (see the module's notes).
pub(super) struct Quiet {
    flag: Arc<Flag>,
    /// `flag` as a waker, made once.
    waker: Waker,
}

struct Flag {
    /// One of the waits woke (or has never been polled, or just finished and was
    /// replaced): poll them.
    woken: AtomicBool,
    /// The relay's task.
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Quiet {
    pub(super) fn new() -> Quiet {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(flag.clone());
        Quiet { flag, waker }
    }

    /// Poll `waits` with the quiet waker if one of them woke since the last poll (or on the
    /// first); otherwise only keep the task's waker for when one does.
    pub(super) fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        waits: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let polled = waits(&mut Context::from_waker(&self.waker));
        if polled.is_ready() {
            // The caller replaces the wait that finished: the new one must be polled.
            self.flag.woken.store(true, Ordering::Release);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;

    #[tokio::test]
    async fn a_wait_is_polled_once_and_again_only_after_it_woke() {
        let notify = Arc::new(tokio::sync::Notify::new());
        let mut notified = pin!(notify.notified());
        let quiet = Quiet::new();
        let mut polls = 0;
        let mut results = Vec::new();
        for round in 0..4 {
            if round == 3 {
                notify.notify_waiters();
            }
            let polled = std::future::poll_fn(|cx| {
                Poll::Ready(quiet.poll(cx, |cx| {
                    polls += 1;
                    notified.as_mut().poll(cx)
                }))
            })
            .await;
            results.push(polled.is_ready());
        }
        assert_eq!(results, [false, false, false, true]);
        assert_eq!(polls, 2, "polled only first and after it woke");
    }
}
