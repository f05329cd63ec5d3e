//! Graceful shutdown for listeners and connections.
//!
//! [`channel`] makes one [`DrainSignal`] (kept by whoever handles SIGTERM) and a [`Drain`] that
//! every listener and connection task clones and holds while it works. [`DrainSignal::drain`]
//! tells them all to wind down, then waits until every clone is dropped or the timeout passes:
//!
//! - listeners stop accepting (their socket closes, new connections are refused);
//! - then, and only then, HTTP connections wind down: HTTP/2 peers get a GOAWAY, HTTP/1.1
//!   clients `Connection: close` on their next response (an idle one is closed after a short
//!   grace, see `http_util::HTTP1_DRAIN_GRACE`); in-flight requests finish. The proxies hold
//!   their connections on a nested channel that they drain ([`DrainSignal::drain_all`]) once
//!   their listeners are closed, so a client told to go away that reconnects at once is
//!   refused rather than accepted into the backlog of a listener about to close (and reset);
//! - raw TCP forwards keep copying until they end on their own or the timeout passes.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Starts a drain. Held by the process's shutdown handler.
#[derive(Debug)]
pub struct DrainSignal {
    signal: watch::Sender<bool>,
    /// Closes (returns `None`) once every [`Drain`] clone is gone: nothing is ever sent on it.
    released: mpsc::Receiver<Infallible>,
}

/// Held by every listener and connection until it is done. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Drain {
    signal: watch::Receiver<bool>,
    _hold: mpsc::Sender<Infallible>,
}

/// A connected pair: the signal and the first [`Drain`] to clone from.
pub fn channel() -> (DrainSignal, Drain) {
    let (signal, signal_rx) = watch::channel(false);
    let (hold, released) = mpsc::channel(1);
    (
        DrainSignal { signal, released },
        Drain {
            signal: signal_rx,
            _hold: hold,
        },
    )
}

impl Drain {
    /// Resolves once draining has started (at once if it already has). If the [`DrainSignal`] is
    /// dropped without draining, this never resolves: nothing asked the holder to stop.
    pub fn signaled(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut signal = self.signal.clone();
        async move {
            // `wait_for` looks at the current value first, so a drain that started (and a signal
            // dropped after it) still resolves.
            if signal.wait_for(|draining| *draining).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// True once draining has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

impl DrainSignal {
    /// Starts draining and resolves when every [`Drain`] clone has been dropped (`true`) or
    /// `timeout` has passed (`false`, some work was cut short).
    pub fn drain(self, timeout: Duration) -> impl Future<Output = bool> {
        let DrainSignal {
            signal,
            mut released,
        } = self;
        signal.send_replace(true);
        async move {
            // Keep the sender alive while waiting so late `signaled()` calls still see the drain.
            let _signal = signal;
            tokio::time::timeout(timeout, released.recv()).await.is_ok()
        }
    }

    /// Starts draining and resolves once every [`Drain`] clone has been dropped, however long
    /// that takes: for a drain nested inside another, whose own timeout bounds the wait.
    pub async fn drain_all(self) {
        let DrainSignal {
            signal,
            mut released,
        } = self;
        signal.send_replace(true);
        // The sender stays alive while waiting, as in `drain`.
        let _signal = signal;
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
    async fn drain_times_out_when_a_holder_lingers() {
        let (signal, drain) = channel();
        let lingering = drain.clone();
        drop(drain);
        assert!(!signal.drain(Duration::from_secs(15)).await);
        assert!(lingering.is_draining());
        // A late look still sees the drain even though the signal is gone.
        lingering.signaled().await;
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
        signal.drain_all().await;
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_signal_never_drains() {
        let (signal, drain) = channel();
        drop(signal);
        let waited = tokio::time::timeout(Duration::from_secs(3600), drain.signaled()).await;
        assert!(waited.is_err());
    }
}
