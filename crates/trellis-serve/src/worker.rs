//! Thread-per-core serving (Envoy's worker model): N single-threaded runtimes, one per OS
//! thread, each serving whole connections, so a request and everything it wakes (its
//! connection task, the pooled connection it is sent on) stay on one thread.
//!
//! Worker 0 is the caller's own runtime: the accept loops, admin and background tasks run
//! there. [`Workers::start`] adds threads 1..N, each driving its own current-thread runtime.
//! A [`crate::Listener`] given the [`Workers`] hands each accepted connection to the worker
//! with the fewest open connections (ties go round-robin); the socket moves to that worker's
//! reactor before its handshake, so its readiness events wake that thread only.
//!
//! State a request changes (pooled connections to peers and to the app) is kept per worker
//! with [`PerWorker`], indexed by [`current`]; read-mostly state stays shared.
//!
//! With one worker nothing here spawns a thread or moves a socket: the listener spawns on the
//! caller's runtime exactly as without [`Workers`].

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// This thread's worker index; 0 on every thread that is not one of [`Workers::start`]'s.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The worker this code runs on: 0 on the caller's runtime (and on any thread that is not a
/// worker), 1..N on the threads [`Workers::start`] made.
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// The serving runtimes. Cloning is a reference count; the default is one worker (the
/// caller's runtime, no extra thread).
#[derive(Clone, Default)]
pub struct Workers(Option<Arc<Remote>>);

/// Workers 1..N and the open connections of every worker.
struct Remote {
    /// Worker `i`'s runtime (worker 0: the caller's).
    handles: Box<[Handle]>,
    /// Open connections handed to each worker, by any listener.
    open: Box<[AtomicUsize]>,
    /// Where the next tie-break starts.
    next: AtomicUsize,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("count", &self.count())
            .finish()
    }
}

/// The threads of workers 1..N; [`WorkerThreads::stop`] (or dropping it) ends their runtimes,
/// dropping any task still on them, and joins the threads.
#[derive(Debug, Default)]
pub struct WorkerThreads {
    threads: Vec<(Option<oneshot::Sender<()>>, JoinHandle<()>)>,
}

impl WorkerThreads {
    /// Stops every worker thread and waits for it to end.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for (stop, _) in &mut self.threads {
            // A worker whose runtime already ended has dropped its receiver: nothing to stop.
            if let Some(stop) = stop.take() {
                let _ = stop.send(());
            }
        }
        for (_, thread) in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::warn!("a worker thread panicked");
            }
        }
    }
}

impl Drop for WorkerThreads {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl Workers {
    /// One worker: the caller's runtime.
    pub fn single() -> Self {
        Self(None)
    }

    /// `count` workers: the caller's runtime `here` (worker 0, where the accept loops run) and
    /// `count - 1` new threads, named `trellis-worker-I`, each with its own current-thread
    /// runtime (I/O and timers enabled). With `count <= 1`, no thread. Keep the returned
    /// [`WorkerThreads`] until every accept loop using these workers has ended: a connection
    /// handed to a stopped worker is dropped unserved, and that worker, now counting no open
    /// connections, would be picked for every one after it.
    pub fn start(count: usize, here: Handle) -> io::Result<(Self, WorkerThreads)> {
        if count <= 1 {
            return Ok((Self::single(), WorkerThreads::default()));
        }
        let mut handles = Vec::with_capacity(count);
        handles.push(here);
        let mut threads = WorkerThreads::default();
        for index in 1..count {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("trellis-worker-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(runtime.handle().clone()));
                    // Drives every task handed to this worker until told to stop.
                    let _ = runtime.block_on(stop_rx);
                })?;
            let handle = ready_rx
                .recv()
                .map_err(|_| io::Error::other(format!("worker thread {index} ended at start")))
                .and_then(|r| r);
            threads.threads.push((Some(stop_tx), thread));
            handles.push(handle?);
        }
        Ok((
            Self(Some(Arc::new(Remote {
                handles: handles.into(),
                open: (0..count).map(|_| AtomicUsize::new(0)).collect(),
                next: AtomicUsize::new(0),
            }))),
            threads,
        ))
    }

    /// How many workers serve connections (1 without extra threads).
    pub fn count(&self) -> usize {
        self.0.as_ref().map_or(1, |r| r.open.len())
    }

    /// The worker the next connection goes to: fewest open connections, ties round-robin.
    /// `None` with one worker.
    pub(crate) fn pick(&self) -> Option<Assigned> {
        let remote = self.0.as_ref()?;
        let count = remote.open.len();
        let start = remote.next.fetch_add(1, Ordering::Relaxed) % count;
        let chosen = (0..count)
            .map(|k| (start + k) % count)
            .min_by_key(|&i| remote.open[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        remote.open[chosen].fetch_add(1, Ordering::Relaxed);
        Some(Assigned {
            remote: Arc::clone(remote),
            index: chosen,
        })
    }
}

/// A connection's place on one worker; counted open until dropped.
pub(crate) struct Assigned {
    remote: Arc<Remote>,
    index: usize,
}

impl Assigned {
    /// The worker's index.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// Whether the worker is the one this code runs on (no move needed).
    pub(crate) fn is_here(&self) -> bool {
        self.index == current()
    }

    /// Spawns `task` on the worker's runtime (on this one when [`Self::is_here`]); the
    /// connection counts as open on that worker until `task` ends or is dropped.
    pub(crate) fn spawn<F>(self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let elsewhere = (!self.is_here()).then(|| self.remote.handles[self.index].clone());
        let task = async move {
            let _open = self;
            task.await;
        };
        match elsewhere {
            Some(handle) => drop(handle.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }
}

impl Drop for Assigned {
    fn drop(&mut self) {
        self.remote.open[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// One `T` per worker, each used only by its own worker's tasks: pooled connections, whose
/// driving task runs on the worker that opened them, so a request never wakes another thread.
#[derive(Debug)]
pub struct PerWorker<T>(Box<[T]>);

impl<T> PerWorker<T> {
    /// `make(i)` for each of `workers` workers (at least one).
    pub fn new(workers: usize, make: impl FnMut(usize) -> T) -> Self {
        Self((0..workers.max(1)).map(make).collect())
    }

    /// The current worker's `T` (worker 0's on a thread that is not a worker, and for an index
    /// past the end: a pool made for fewer workers still works).
    pub fn get(&self) -> &T {
        // One worker (the default): no thread-local read on the request path.
        if let [only] = &*self.0 {
            return only;
        }
        let i = current();
        debug_assert!(
            i < self.0.len(),
            "worker {i} of a PerWorker made for {}",
            self.0.len()
        );
        self.0.get(i).unwrap_or(&self.0[0])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_starts_no_thread_and_picks_nothing() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (workers, threads) = Workers::start(1, runtime.handle().clone()).unwrap();
        assert_eq!(workers.count(), 1);
        assert!(workers.pick().is_none());
        assert!(threads.threads.is_empty());
        assert_eq!(current(), 0);
    }

    #[test]
    fn picks_the_least_loaded_worker_and_counts_it_open_until_dropped() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (workers, threads) = Workers::start(3, runtime.handle().clone()).unwrap();
        let a = workers.pick().unwrap();
        let b = workers.pick().unwrap();
        let c = workers.pick().unwrap();
        let mut seen = [a.index(), b.index(), c.index()];
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2], "one each before any worker gets a second");
        let freed = b.index();
        drop(b);
        assert_eq!(workers.pick().unwrap().index(), freed, "the emptied worker");
        threads.stop();
    }

    #[test]
    fn tasks_run_on_their_worker_and_per_worker_state_follows_them() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (workers, threads) = Workers::start(2, runtime.handle().clone()).unwrap();
        let slots = Arc::new(PerWorker::new(2, |i| i * 10));
        let ran = runtime.block_on(async {
            let mut ran = Vec::new();
            for _ in 0..4 {
                let assigned = workers.pick().unwrap();
                let (tx, rx) = oneshot::channel();
                let slots = Arc::clone(&slots);
                let expected = assigned.index();
                assigned.spawn(async move {
                    // A timer works on every worker (each runtime has its own driver).
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    let _ = tx.send((current(), *slots.get(), expected));
                });
                ran.push(rx.await.unwrap());
            }
            ran
        });
        for (on, slot, expected) in &ran {
            assert_eq!(on, expected);
            assert_eq!(*slot, on * 10);
        }
        assert!(ran.iter().any(|r| r.0 == 1), "{ran:?}");
        threads.stop();
    }
}
