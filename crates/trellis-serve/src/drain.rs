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
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::watermark::Watermark;

/// Holders are asked to wind down (the level before is 0: nothing asked them to stop).
const DRAINING: u64 = 1;
/// The drain timeout passed: holders must stop now.
const FORCED: u64 = 2;

/// Starts a drain. Held by the process's shutdown handler.
#[derive(Debug)]
pub struct DrainSignal {
    /// The drain's state ([`DRAINING`], then perhaps [`FORCED`]), and whoever waits for it.
    /// Not a `tokio::sync::watch`: every connection waits on its drain for its whole life
    /// (twice: for the drain and for the force), and a watch's wait is ~190 bytes where a
    /// [`Watermark`]'s is 40.
    shared: Arc<Watermark>,
    /// Closes (returns `None`) once every [`Drain`] clone is gone: nothing is ever sent on it.
    released: mpsc::Receiver<Infallible>,
}

/// Held by every listener and connection until it is done. Cloning is cheap (two reference
/// counts).
#[derive(Debug, Clone)]
pub struct Drain {
    shared: Arc<Watermark>,
    _hold: mpsc::Sender<Infallible>,
}

/// A connected pair: the signal and the first [`Drain`] to clone from.
pub fn channel() -> (DrainSignal, Drain) {
    let shared = Arc::new(Watermark::new());
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
        self.shared.reached(DRAINING)
    }

    /// Resolves once the drain timeout has passed with holders left: they must stop now. Never
    /// resolves for a drain that finished in time or that was never started.
    pub fn forced(&self) -> impl Future<Output = ()> + Send + Unpin + 'static {
        self.shared.reached(FORCED)
    }

    /// True once draining has started.
    pub fn is_draining(&self) -> bool {
        self.shared.level() >= DRAINING
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
        shared.raise_to(DRAINING);
        async move {
            let finished = tokio::time::timeout(timeout, released.recv()).await.is_ok();
            if !finished {
                shared.raise_to(FORCED);
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
        shared.raise_to(DRAINING);
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

    /// Every connection holds two waits for its whole life; one that is done or dropped
    /// leaves no waker behind (the waits themselves are tested in `watermark`).
    #[tokio::test(start_paused = true)]
    async fn waits_leave_nothing_behind() {
        let (signal, drain) = channel();
        let forced = drain.forced();
        let signaled = tokio::spawn(drain.signaled());
        tokio::task::yield_now().await;
        assert_eq!(drain.shared.waiting(), 1);
        drop(forced);
        let _drained = signal.drain(Duration::from_secs(1));
        signaled.await.unwrap();
        assert_eq!(drain.shared.waiting(), 0);
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
