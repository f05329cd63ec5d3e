//! The connection cap every listener has, and how a listener tells its owner about the
//! connections it turns away.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What a listener reports about connections it turns away, to whoever counts them (each
/// binary implements it over its own metrics; this crate knows no metrics library).
pub trait ListenerEvents: Send + Sync + 'static {
    /// A connection was accepted and closed at once: the listener was at its cap.
    fn refused(&self);
    /// A connection's handshake did not finish within the listener's handshake timeout.
    fn handshake_timed_out(&self) {}
    /// A connection was handed to worker thread `worker` (only with more than one worker, see
    /// [`crate::worker`]).
    fn handed_to_worker(&self, _worker: usize) {}
}

/// Reports nothing: for listeners nobody counts (tests, examples).
#[derive(Debug, Clone, Copy, Default)]
pub struct Uncounted;

impl ListenerEvents for Uncounted {
    fn refused(&self) {}
}

/// A cap on one listener's open connections. Past it a connection is accepted and closed at
/// once (cheaper and clearer for the peer than leaving it in the kernel backlog, and the
/// connections already open keep being served). One atomic add per accept; no lock.
#[derive(Debug)]
pub struct ConnLimit {
    open: AtomicUsize,
    max: usize,
}

impl ConnLimit {
    /// At most `max` open connections.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// A permit for one more connection, or `None` when the listener is full.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnPermit> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnPermit(Arc::clone(self)))
    }

    /// Connections holding a permit now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// One open connection of a [`ConnLimit`]; released on drop.
#[derive(Debug)]
pub struct ConnPermit(Arc<ConnLimit>);

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_up_to_the_cap_then_none_until_one_is_released() {
        let limit = ConnLimit::new(2);
        let a = limit.try_acquire();
        let b = limit.try_acquire();
        assert!(a.is_some() && b.is_some());
        assert!(limit.try_acquire().is_none());
        assert_eq!(limit.open(), 2, "a refusal does not leak a slot");
        drop(a);
        assert_eq!(limit.open(), 1);
        assert!(limit.try_acquire().is_some());
    }
}
