//! Graceful shutdown for listeners and connections.
//!
//! [`channel`] makes one [`DrainSignal`] (kept by whoever handles SIGTERM) and a [`Drain`] that
//! every listener and connection task clones and holds while it works. [`DrainSignal::drain`]
//! tells them all to wind down, then waits until every clone is dropped or the timeout passes;
//! when it passes, the drain turns *forced* and whatever still runs is cut off:
//!
//! - listeners stop accepting (their socket closes, new connections are refused);
//! - then, and only then, HTTP connections wind down: HTTP/2 peers get a GOAWAY, HTTP/1.1
//!   clients `Connection: close` on their next response (an idle one is closed after a short
//!   grace, see [`crate::graceful::HTTP1_DRAIN_GRACE`]); in-flight requests finish. The
//!   sidecar's proxies hold their connections on a nested channel that they drain
//!   ([`DrainSignal::drain_all`]) once their listeners are closed, so a client told to go away
//!   that reconnects at once is refused rather than accepted into the backlog of a listener
//!   about to close (and reset);
//! - raw TCP forwards keep copying until they end on their own or the drain is forced;
//! - once forced ([`Drain::forced`]), connection tasks started by [`crate::Listener`] are
//!   dropped, which closes their sockets.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use slab::Slab;
use tokio::sync::mpsc;

/// Nothing asked the holders to stop.
const RUNNING: u8 = 0;
/// Holders are asked to wind down.
const DRAINING: u8 = 1;
/// The drain timeout passed: holders must stop now.
const FORCED: u8 = 2;

/// Starts a drain. Held by the process's shutdown handler.
#[derive(Debug)]
pub struct DrainSignal {
    shared: Arc<Shared>,
    /// Closes (returns `None`) once every [`Drain`] clone is gone: nothing is ever sent on it.
    released: mpsc::Receiver<Infallible>,
}

/// Held by every listener and connection until it is done. Cloning is cheap (two reference
/// counts).
#[derive(Debug, Clone)]
pub struct Drain {
    shared: Arc<Shared>,
    _hold: mpsc::Sender<Infallible>,
}

/// The drain's state and whoever waits for it to change.
///
/// Not a `tokio::sync::watch`: every connection waits on its drain for its whole life (twice:
/// for the drain and for the force), and a watch's wait future is ~190 bytes, multiplied by
/// every connection a control plane or sidecar holds. A wait here is its waker in `waiters`
/// and ~40 bytes of future ([`Reached`]). The slab keeps room for the most waits ever pending
/// at once (16 bytes each), for the drain's life.
#[derive(Debug)]
struct Shared {
    state: AtomicU8,
    /// The wakers of the pending [`Reached`] futures, each removed by its own future.
    waiters: Mutex<Slab<Waker>>,
}

impl Shared {
    fn waiters(&self) -> MutexGuard<'_, Slab<Waker>> {
        // A panic while holding the lock leaves the slab consistent (each step is one slab
        // call), so a poisoned lock is still usable.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves to `state` and wakes every waiter (each checks whether it is the state it waits
    /// for). The state is stored before the waiters are taken: a waiter that registers after
    /// the wake-ups sees it when it checks again under the lock. The wakers are woken after the
    /// lock is let go: a waker's code (an executor polling in place) may poll or drop a wait.
    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        let wakers: Vec<Waker> = self.waiters().iter().map(|(_, w)| w.clone()).collect();
        for waker in wakers {
            waker.wake();
        }
    }

    fn reached(&self, state: u8) -> bool {
        self.state.load(Ordering::Acquire) >= state
    }
}

/// A connected pair: the signal and the first [`Drain`] to clone from.
pub fn channel() -> (DrainSignal, Drain) {
    let shared = Arc::new(Shared {
        state: AtomicU8::new(RUNNING),
        waiters: Mutex::new(Slab::new()),
    });
    let (hold, released) = mpsc::channel(1);
    (
        DrainSignal {
            shared: Arc::clone(&shared),
            released,
        },
        Drain {
            shared,
            _hold: hold,
        },
    )
}

impl Drain {
    /// Resolves once draining has started (at once if it already has). If the [`DrainSignal`] is
    /// dropped without draining, this never resolves: nothing asked the holder to stop.
    pub fn signaled(&self) -> impl Future<Output = ()> + Send + Unpin + 'static {
        Reached::new(&self.shared, DRAINING)
    }

    /// Resolves once the drain timeout has passed with holders left: they must stop now. Never
    /// resolves for a drain that finished in time or that was never started.
    pub fn forced(&self) -> impl Future<Output = ()> + Send + Unpin + 'static {
        Reached::new(&self.shared, FORCED)
    }

    /// True once draining has started.
    pub fn is_draining(&self) -> bool {
        self.shared.reached(DRAINING)
    }
}

/// Resolves once the drain reaches a state (at once if it already has). Holds no [`Drain`]:
/// waiting for the drain does not delay it.
struct Reached {
    shared: Arc<Shared>,
    state: u8,
    /// While pending: the key of the waker in `shared.waiters`, and a copy of it to compare
    /// with the next poll's without taking the lock.
    waiting: Option<(usize, Waker)>,
}

impl Reached {
    fn new(shared: &Arc<Shared>, state: u8) -> Self {
        Self {
            shared: Arc::clone(shared),
            state,
            waiting: None,
        }
    }

    fn stop_waiting(&mut self) {
        if let Some((key, _)) = self.waiting.take() {
            // Dropped after the lock is let go, as every waker here (see `Shared::set`).
            let removed = self.shared.waiters().try_remove(key);
            drop(removed);
        }
    }
}

impl Future for Reached {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.shared.reached(this.state) {
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
        let mut waiters = this.shared.waiters();
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
        // Checked again under the lock: a `set` before the registration woke nobody here.
        let reached = this.shared.reached(this.state);
        drop(waiters);
        // The wakers replaced are dropped after the lock is let go (see `Shared::set`).
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

impl DrainSignal {
    /// Starts draining and resolves when every [`Drain`] clone has been dropped (`true`) or
    /// `timeout` has passed (`false`: the drain turns forced and what is left is cut short).
    /// The signal is sent when this is called, before the returned future is first polled.
    pub fn drain(self, timeout: Duration) -> impl Future<Output = bool> {
        let DrainSignal {
            shared,
            mut released,
        } = self;
        shared.set(DRAINING);
        async move {
            let finished = tokio::time::timeout(timeout, released.recv()).await.is_ok();
            if !finished {
                shared.set(FORCED);
            }
            finished
        }
    }

    /// Starts draining and resolves once every [`Drain`] clone has been dropped, however long
    /// that takes: for a drain nested inside another, whose own timeout bounds the wait.
    pub async fn drain_all(self) {
        let DrainSignal {
            shared,
            mut released,
        } = self;
        shared.set(DRAINING);
        let _ = released.recv().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_every_holder() {
        let (signal, drain) = channel();
        let holder = drain.clone();
        let task = tokio::spawn(async move {
            holder.signaled().await;
            drop(holder);
        });
        assert!(!drain.is_draining());
        drop(drain);
        assert!(signal.drain(Duration::from_secs(10)).await);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn drain_times_out_and_forces_when_a_holder_lingers() {
        let (signal, drain) = channel();
        let lingering = drain.clone();
        drop(drain);
        let forced = tokio::spawn({
            let lingering = lingering.clone();
            async move { lingering.forced().await }
        });
        assert!(!signal.drain(Duration::from_secs(15)).await);
        assert!(lingering.is_draining());
        // Late looks still see the drain and the force even though the signal is gone.
        lingering.signaled().await;
        lingering.forced().await;
        forced.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_that_finishes_in_time_is_never_forced() {
        let (signal, drain) = channel();
        let watcher = drain.clone();
        let holder = drain.clone();
        drop(drain);
        let task = tokio::spawn(async move {
            holder.signaled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(holder);
        });
        // The watcher only looks; it holds its clone, so drop it before draining.
        let forced = watcher.forced();
        drop(watcher);
        let started = tokio::time::Instant::now();
        assert!(signal.drain(Duration::from_secs(15)).await);
        // It waited for the holder (1 s), not for the timeout.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_secs(15),
            "{waited:?}"
        );
        task.await.unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(3600), forced).await;
        assert!(waited.is_err(), "forced after a drain that finished");
    }

    #[tokio::test(start_paused = true)]
    async fn drain_all_waits_for_the_last_holder_however_long() {
        let (signal, drain) = channel();
        let holder = drain.clone();
        drop(drain);
        let task = tokio::spawn(async move {
            holder.signaled().await;
            // Longer than any drain timeout: `drain_all` has none of its own.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(holder);
        });
        let started = tokio::time::Instant::now();
        signal.drain_all().await;
        // (Paused time: exact.) Returning any earlier would leave the holder running.
        assert!(started.elapsed() >= Duration::from_secs(3600));
        task.await.unwrap();
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Counted(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counted {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counted() -> (Arc<Counted>, Waker) {
        let count = Arc::new(Counted::default());
        (Arc::clone(&count), Waker::from(count))
    }

    fn waiters(drain: &Drain) -> usize {
        drain.shared.waiters().len()
    }

    /// Every connection holds two waits for its whole life: each must stay a fraction of a
    /// watch's (~190 bytes), and one that is dropped or done must leave no waker behind.
    #[test]
    fn a_wait_is_small_and_leaves_nothing_behind() {
        let (signal, drain) = channel();
        let mut signaled = drain.signaled();
        let mut forced = drain.forced();
        assert!(std::mem::size_of_val(&signaled) <= 48);
        let (_, waker) = counted();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut signaled).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut forced).poll(&mut cx).is_pending());
        // Polled again by the same task: still one waker each.
        assert!(Pin::new(&mut signaled).poll(&mut cx).is_pending());
        assert_eq!(waiters(&drain), 2);
        drop(forced);
        assert_eq!(waiters(&drain), 1);
        let drained = signal.drain(Duration::from_secs(1));
        assert!(Pin::new(&mut signaled).poll(&mut cx).is_ready());
        assert_eq!(waiters(&drain), 0);
        drop((drained, signaled));
    }

    /// A wait polled from another task wakes that task, not the first.
    #[test]
    fn a_wait_wakes_the_task_that_polled_it_last() {
        let (signal, drain) = channel();
        let mut signaled = drain.signaled();
        let ((first, first_waker), (second, second_waker)) = (counted(), counted());
        assert!(Pin::new(&mut signaled)
            .poll(&mut Context::from_waker(&first_waker))
            .is_pending());
        assert!(Pin::new(&mut signaled)
            .poll(&mut Context::from_waker(&second_waker))
            .is_pending());
        assert_eq!(waiters(&drain), 1);
        let _drained = signal.drain(Duration::from_secs(1));
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn every_waiting_holder_is_woken() {
        let (signal, drain) = channel();
        let holders: Vec<_> = (0..100)
            .map(|_| {
                let holder = drain.clone();
                tokio::spawn(async move {
                    holder.signaled().await;
                    drop(holder);
                })
            })
            .collect();
        tokio::task::yield_now().await;
        drop(drain);
        assert!(signal.drain(Duration::from_secs(10)).await);
        for holder in holders {
            holder.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_signal_never_drains() {
        let (signal, drain) = channel();
        drop(signal);
        let waited = tokio::time::timeout(Duration::from_secs(3600), drain.signaled()).await;
        assert!(waited.is_err());
    }
}
