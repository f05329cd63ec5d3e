//! A number that only rises, and small futures that wait for it to reach a mark.
//!
//! Not a `tokio::sync::watch`: a control plane or sidecar holds a wait on one of these for
//! every connection or stream it serves, for that connection's whole life (the drain's two per
//! connection, each SDS stream's wait for the next trust bundle), and a watch's wait future is
//! 120–190 bytes. A wait here is its waker in the watermark's slab and 40 bytes of future
//! ([`Reached`]). The slab keeps room for the most waits ever pending at once (16 bytes each).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use slab::Slab;

/// The level, and the wakers of whoever waits for it to rise.
#[derive(Debug, Default)]
pub struct Watermark {
    level: AtomicU64,
    /// The wakers of the pending [`Reached`] futures, each removed by its own future.
    waiters: Mutex<Slab<Waker>>,
}

impl Watermark {
    /// A watermark at level 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current level.
    pub fn level(&self) -> u64 {
        self.level.load(Ordering::Acquire)
    }

    /// Raises the level to `level` (nothing if it is there already) and wakes every waiter
    /// (each checks whether it reached its mark). The level is stored before the waiters are
    /// taken: a waiter that registers after the wake-ups sees it when it checks again under
    /// the lock. The wakers are woken after the lock is let go: a waker's code (an executor
    /// polling in place) may poll or drop a wait.
    pub fn raise_to(&self, level: u64) {
        if self.level.fetch_max(level, Ordering::AcqRel) >= level {
            return;
        }
        let wakers: Vec<Waker> = self.waiters().iter().map(|(_, w)| w.clone()).collect();
        for waker in wakers {
            waker.wake();
        }
    }

    /// Resolves once the level is at least `mark` (at once if it is already).
    pub fn reached(self: &Arc<Self>, mark: u64) -> Reached {
        Reached {
            watermark: Arc::clone(self),
            mark,
            waiting: None,
        }
    }

    /// How many waits are registered (for tests of their clean-up).
    pub fn waiting(&self) -> usize {
        self.waiters().len()
    }

    fn waiters(&self) -> MutexGuard<'_, Slab<Waker>> {
        // A panic while holding the lock leaves the slab consistent (each step is one slab
        // call), so a poisoned lock is still usable.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Resolves once a [`Watermark`] reaches a mark. Dropping it removes its waker.
#[derive(Debug)]
pub struct Reached {
    watermark: Arc<Watermark>,
    mark: u64,
    /// While pending: the key of the waker in `watermark.waiters`, and a copy of it to compare
    /// with the next poll's without taking the lock.
    waiting: Option<(usize, Waker)>,
}

impl Reached {
    fn stop_waiting(&mut self) {
        if let Some((key, _)) = self.waiting.take() {
            // Dropped after the lock is let go, as every waker here (see `raise_to`).
            let removed = self.watermark.waiters().try_remove(key);
            drop(removed);
        }
    }
}

impl Future for Reached {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.watermark.level() >= this.mark {
            this.stop_waiting();
            return Poll::Ready(());
        }
        // Polled again by the same task (every wake-up of a connection's task polls this in
        // its `select!`): the registered waker still holds, and this costs one atomic load.
        if let Some((_, waker)) = &this.waiting {
            if waker.will_wake(cx.waker()) {
                return Poll::Pending;
            }
        }
        let mut waiters = this.watermark.waiters();
        let replaced = match &mut this.waiting {
            Some((key, _)) => waiters
                .get_mut(*key)
                .map(|registered| std::mem::replace(registered, cx.waker().clone())),
            None => {
                let key = waiters.insert(cx.waker().clone());
                this.waiting = Some((key, cx.waker().clone()));
                None
            }
        };
        // Checked again under the lock: a `raise_to` before the registration woke nobody here.
        let reached = this.watermark.level() >= this.mark;
        drop(waiters);
        // The wakers replaced are dropped after the lock is let go (see `raise_to`).
        if let Some((_, waker)) = &mut this.waiting {
            waker.clone_from(cx.waker());
        }
        drop(replaced);
        if reached {
            this.stop_waiting();
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for Reached {
    fn drop(&mut self) {
        self.stop_waiting();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Counted(AtomicUsize);

    impl std::task::Wake for Counted {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counted() -> (Arc<Counted>, Waker) {
        let count = Arc::new(Counted::default());
        (Arc::clone(&count), Waker::from(count))
    }

    /// A wait lasts a connection's life: it must stay a fraction of a watch's, and one that is
    /// dropped or done must leave no waker behind.
    #[test]
    fn a_wait_is_small_and_leaves_nothing_behind() {
        let mark = Arc::new(Watermark::new());
        let mut one = mark.reached(1);
        let mut two = mark.reached(2);
        assert!(std::mem::size_of_val(&one) <= 40);
        let (count, waker) = counted();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut one).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut two).poll(&mut cx).is_pending());
        // Polled again by the same task: still one waker each.
        assert!(Pin::new(&mut one).poll(&mut cx).is_pending());
        assert_eq!(mark.waiting(), 2);
        mark.raise_to(1);
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "every waiter is woken");
        assert!(Pin::new(&mut one).poll(&mut cx).is_ready());
        assert!(Pin::new(&mut two).poll(&mut cx).is_pending());
        assert_eq!(mark.waiting(), 1);
        drop(two);
        assert_eq!(mark.waiting(), 0);
    }

    /// A wait polled from another task wakes that task, not the first.
    #[test]
    fn a_wait_wakes_the_task_that_polled_it_last() {
        let mark = Arc::new(Watermark::new());
        let mut reached = mark.reached(1);
        let ((first, first_waker), (second, second_waker)) = (counted(), counted());
        assert!(Pin::new(&mut reached)
            .poll(&mut Context::from_waker(&first_waker))
            .is_pending());
        assert!(Pin::new(&mut reached)
            .poll(&mut Context::from_waker(&second_waker))
            .is_pending());
        assert_eq!(mark.waiting(), 1);
        mark.raise_to(1);
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_level_never_falls_and_a_lower_mark_wakes_nobody() {
        let mark = Arc::new(Watermark::new());
        mark.raise_to(5);
        let mut six = mark.reached(6);
        let (count, waker) = counted();
        assert!(Pin::new(&mut six)
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        mark.raise_to(3);
        mark.raise_to(5);
        assert_eq!(mark.level(), 5);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        // A mark already passed resolves at once, without registering.
        let mut four = mark.reached(4);
        assert!(Pin::new(&mut four)
            .poll(&mut Context::from_waker(&waker))
            .is_ready());
        assert_eq!(mark.waiting(), 1);
    }

    #[tokio::test]
    async fn every_waiting_task_is_woken() {
        let mark = Arc::new(Watermark::new());
        let tasks: Vec<_> = (0..100).map(|_| tokio::spawn(mark.reached(1))).collect();
        tokio::task::yield_now().await;
        mark.raise_to(1);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(mark.waiting(), 0);
    }
}
