//! Graceful shutdown for listeners and connections.
//!
//! [`channel`] makes one [`DrainSignal`] (kept by whoever handles SIGTERM) and a [`Drain`] that
//! every listener and connection task clones and holds while it works. [`DrainSignal::drain`]
//! tells them all to wind down, then waits until every clone is dropped or the timeout passes:
//!
//! - listeners stop accepting (their socket closes, new connections are refused);
//! - HTTP connections get hyper's `graceful_shutdown()`: in-flight requests finish, then the
//!   connection closes (HTTP/2 peers get a GOAWAY);
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
    async fn dropped_signal_never_drains() {
        let (signal, drain) = channel();
        drop(signal);
        let waited = tokio::time::timeout(Duration::from_secs(3600), drain.signaled()).await;
        assert!(waited.is_err());
    }
}
