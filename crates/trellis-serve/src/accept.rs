//! Bind, and the one accept loop every listener of both binaries runs ([`Listener::serve`]):
//!
//! - **connection cap**: past [`ConnLimit`]'s max a connection is accepted and closed at once,
//!   and reported ([`ListenerEvents::refused`]);
//! - **handshake timeout**: a listener with a [`Handshake`] (TLS) runs it in the connection's
//!   own task, bounded by the listener's timeout, so a slow client never stalls the loop; a
//!   handshake that runs out of time is reported ([`ListenerEvents::handshake_timed_out`]);
//! - **accept errors** (out of file descriptors, …) are logged and retried after a short pause
//!   instead of spinning;
//! - **drain**: the loop stops accepting once its [`Drain`] signals (the socket closes with the
//!   [`Listener`]); each connection task holds a clone of that drain, so the drain waits for
//!   them, and is dropped (its socket closed) when the drain is forced.
//!
//! What happens to a connection is the caller's: the loop hands each one, as an [`Accepted`],
//! to a closure whose future it spawns, holding the connection's permit until that future
//! ends. [`Accepted::handshake`] is the only way to the stream, so no listener serves a
//! connection whose handshake it skipped or left unbounded.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};

use crate::drain::Drain;
use crate::limit::{ConnLimit, ConnPermit, ListenerEvents};
use crate::net::DeadPeer;
use crate::worker::Workers;

/// After a failed `accept` (EMFILE and friends), how long the loop waits before the next.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// A listener could not be bound.
#[derive(Debug, Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// The OS error.
    pub source: io::Error,
}

/// Binds `addr` (port 0: any free port; read it back with [`TcpListener::local_addr`]).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// What a listener does to an accepted connection before serving it: a TLS handshake, or
/// nothing ([`Plain`]). Runs in the connection's own task, bounded by the listener's handshake
/// timeout. Cloned once per connection (a TLS acceptor is a reference count).
pub trait Handshake: Clone + Send + Sync + 'static {
    /// The connection once the handshake is done (a TLS stream, and what it tells about the
    /// peer).
    type Io: Send + 'static;

    /// Runs the handshake; `None` refuses the connection (the implementation has logged and
    /// counted why: only it knows the reason).
    fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = Option<Self::Io>> + Send;
}

/// No handshake: the TCP stream is served as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;

    fn handshake(
        &self,
        tcp: TcpStream,
        _peer: SocketAddr,
    ) -> impl Future<Output = Option<TcpStream>> + Send {
        std::future::ready(Some(tcp))
    }
}

/// One bound listener: its socket, its cap, whom it reports to, and its handshake.
pub struct Listener<H = Plain> {
    tcp: TcpListener,
    name: &'static str,
    limit: Arc<ConnLimit>,
    events: Arc<dyn ListenerEvents>,
    handshake: H,
    /// `None`: no handshake to bound ([`Plain`]).
    handshake_timeout: Option<Duration>,
    /// Where accepted connections are served (default: this runtime).
    workers: Workers,
    /// Socket options each accepted connection needs set on its own, because the listening
    /// socket could not pass them on (see [`PerConnection`]).
    per_connection: PerConnection,
}

/// The TCP options a listener still sets on each accepted socket. TCP_NODELAY and
/// [`DeadPeer`]'s options are set once on the listening socket instead: Linux gives them
/// to every socket it accepts (the accepted socket starts as a copy of the listener's state),
/// which saves the six `setsockopt` calls per connection that setting them on each would cost
/// (a third of a full handshake's system calls, for nothing). Elsewhere, or if the listening
/// socket refuses one, they are set on each accepted socket as before.
#[derive(Debug, Clone, Copy)]
struct PerConnection {
    /// Set TCP_NODELAY on each accepted socket.
    nodelay: bool,
    /// Set these on each accepted socket.
    dead_peer: Option<DeadPeer>,
}

/// Whether accepted sockets start with the listening socket's TCP options.
const ACCEPTED_SOCKETS_INHERIT: bool = cfg!(target_os = "linux");

impl<H> std::fmt::Debug for Listener<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("addr", &self.tcp.local_addr().ok())
            .field("max_connections", &self.limit.max())
            .finish_non_exhaustive()
    }
}

impl Listener<Plain> {
    /// Serves plain TCP on `tcp`, at most `max_connections` at once; `name` is the listener in
    /// logs; refusals go to `events`.
    pub fn new(
        tcp: TcpListener,
        name: &'static str,
        max_connections: usize,
        events: Arc<dyn ListenerEvents>,
    ) -> Self {
        // Requests are small and latency-bound.
        let nodelay =
            !(ACCEPTED_SOCKETS_INHERIT && SockRef::from(&tcp).set_tcp_nodelay(true).is_ok());
        Self {
            tcp,
            name,
            limit: ConnLimit::new(max_connections),
            events,
            handshake: Plain,
            handshake_timeout: None,
            workers: Workers::single(),
            per_connection: PerConnection {
                nodelay,
                dead_peer: None,
            },
        }
    }

    /// Runs `handshake` on every connection first, each bounded by `timeout`.
    pub fn with_handshake<H: Handshake>(self, handshake: H, timeout: Duration) -> Listener<H> {
        Listener {
            tcp: self.tcp,
            name: self.name,
            limit: self.limit,
            events: self.events,
            handshake,
            handshake_timeout: Some(timeout),
            workers: self.workers,
            per_connection: self.per_connection,
        }
    }
}

impl<H: Handshake> Listener<H> {
    /// Serves each accepted connection on one of `workers` (the least loaded) instead of this
    /// runtime; the loop itself, the cap and the drain stay here.
    pub fn with_workers(mut self, workers: Workers) -> Self {
        self.workers = workers;
        self
    }

    /// Every accepted connection gets `dead_peer`'s keepalive and TCP_USER_TIMEOUT, before
    /// its handshake.
    pub fn with_dead_peer(mut self, dead_peer: DeadPeer) -> Self {
        let inherited = ACCEPTED_SOCKETS_INHERIT && dead_peer.set(SockRef::from(&self.tcp)).is_ok();
        self.per_connection.dead_peer = (!inherited).then_some(dead_peer);
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The listener's name in logs.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The connection cap (connections open now, and the max).
    pub fn limit(&self) -> &Arc<ConnLimit> {
        &self.limit
    }

    /// Accepts until `drain` signals. Each connection that fits under the cap gets its own
    /// task running the future `serve` makes of it. The task holds the connection's permit and
    /// a clone of `drain` until that future ends, and is dropped (closing the connection) when
    /// the drain is forced.
    pub async fn serve<F, Fut>(&self, drain: &Drain, mut serve: F)
    where
        F: FnMut(Accepted<H>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let draining = drain.signaled();
        let mut draining = std::pin::pin!(draining);
        loop {
            let (tcp, peer) = tokio::select! {
                biased;
                () = &mut draining => return,
                accepted = self.tcp.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(listener = self.name, error = %e, "accept failed");
                        tokio::select! {
                            () = &mut draining => return,
                            () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                        }
                    }
                },
            };
            let Some(permit) = self.limit.try_acquire() else {
                self.events.refused();
                tracing::debug!(listener = self.name, %peer, "listener full; connection closed");
                drop(tcp);
                continue;
            };
            if self.per_connection.nodelay {
                let _ = tcp.set_nodelay(true);
            }
            if let Some(dead_peer) = &self.per_connection.dead_peer {
                dead_peer.apply(&tcp);
            }
            let worker = self.workers.pick();
            let tcp = match &worker {
                // Off this runtime's reactor, so its readiness wakes the worker's thread only;
                // it joins that worker's reactor in the worker's own task.
                Some(w) if !w.is_here() => match tcp.into_std() {
                    Ok(tcp) => Socket::Moving(tcp),
                    Err(e) => {
                        tracing::warn!(listener = self.name, %peer, error = %e, "cannot hand the connection to a worker");
                        continue;
                    }
                },
                _ => Socket::Here(tcp),
            };
            if let Some(w) = &worker {
                self.events.handed_to_worker(w.index());
                tracing::debug!(listener = self.name, %peer, worker = w.index(), "connection handed to a worker");
            }
            let task = serve(Accepted {
                tcp,
                peer,
                handshake: self.handshake.clone(),
                bound: self
                    .handshake_timeout
                    .map(|timeout| (timeout, Arc::clone(&self.events), self.name)),
            });
            let task = connection_task(task, permit, drain);
            match worker {
                Some(worker) => worker.spawn(task),
                None => drop(tokio::spawn(task)),
            }
        }
    }
}

/// A connection's task: `serve`, holding the connection's permit and a clone of `drain` until
/// it ends, and dropped when the drain is forced.
fn connection_task<Fut>(
    serve: Fut,
    permit: ConnPermit,
    drain: &Drain,
) -> impl Future<Output = ()> + Send + 'static
where
    Fut: Future<Output = ()> + Send + 'static,
{
    ConnectionTask {
        // Boxed: the task then holds a pointer, not whatever serves the connection.
        serve: Box::pin(serve),
        forced: drain.forced(),
        _permit: permit,
        _hold: drain.clone(),
    }
}

/// What [`connection_task`] returns. A struct, not an `async` block: the block kept each thing
/// it captured twice (as captured and as moved into its locals and `select!`, rust-lang/rust#62958),
/// 168 bytes where these are 72, and tokio lays a task out in 128-byte steps (its cache-line
/// alignment): 168 made every connection's task 384 bytes, this makes it 256.
struct ConnectionTask<F, R> {
    serve: Pin<Box<F>>,
    forced: R,
    _permit: ConnPermit,
    _hold: Drain,
}

impl<F, R> Future for ConnectionTask<F, R>
where
    F: Future<Output = ()>,
    R: Future<Output = ()> + Unpin,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.serve.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // Forced: what serves the connection is dropped with the task.
        Pin::new(&mut this.forced).poll(cx)
    }
}

/// An accepted socket: on this runtime's reactor, or on its way to a worker's (registered
/// there by the first call in the connection's task).
enum Socket {
    Here(TcpStream),
    Moving(std::net::TcpStream),
}

impl Socket {
    /// The stream, on the reactor of the runtime this runs on.
    fn register(self) -> io::Result<TcpStream> {
        match self {
            Socket::Here(tcp) => Ok(tcp),
            Socket::Moving(tcp) => TcpStream::from_std(tcp),
        }
    }
}

/// An accepted connection, before its handshake.
pub struct Accepted<H> {
    tcp: Socket,
    peer: SocketAddr,
    handshake: H,
    /// The handshake's timeout, whom to tell when it runs out, and the listener's name.
    bound: Option<(Duration, Arc<dyn ListenerEvents>, &'static str)>,
}

impl<H: Handshake> Accepted<H> {
    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The listener's handshake, bounded by its timeout. `None`: refused or timed out (logged
    /// and reported); the connection is closed.
    pub async fn handshake(self) -> Option<H::Io> {
        let Accepted {
            tcp,
            peer,
            handshake,
            bound,
        } = self;
        let tcp = match tcp.register() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot register the connection on its worker");
                return None;
            }
        };
        let Some((timeout, events, name)) = bound else {
            return handshake.handshake(tcp, peer).await;
        };
        match tokio::time::timeout(timeout, handshake.handshake(tcp, peer)).await {
            Ok(io) => io,
            Err(_) => {
                events.handshake_timed_out();
                tracing::debug!(listener = name, %peer, "handshake timed out");
                None
            }
        }
    }
}

impl Accepted<Plain> {
    /// The TCP stream (a plain listener has no handshake). Call it in the connection's task:
    /// a connection handed to a worker joins that worker's reactor here, which can fail (the
    /// kernel refusing the registration); the caller drops the connection then.
    pub fn into_tcp(self) -> io::Result<TcpStream> {
        self.tcp.register()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    /// A connection's task lives as long as the connection: it must not hold what serves the
    /// connection twice over.
    #[test]
    fn a_connection_task_holds_its_future_once() {
        let serve = async {
            let state = [1u8; 4096];
            tokio::task::yield_now().await;
            std::hint::black_box(state);
        };
        let limit = ConnLimit::new(1);
        let permit = limit.try_acquire().unwrap();
        let (_signal, drain) = crate::drain::channel();
        let task = connection_task(serve, permit, &drain);
        let size = std::mem::size_of_val(&task);
        assert!(
            size < 1024,
            "a connection task is {size} bytes for a 4 KiB future"
        );
    }

    /// Every open connection has one of these tasks. tokio lays a task out in 128-byte steps
    /// on x86_64 (cache-line alignment) around ~104 bytes of its own, so a connection's task of
    /// at most 152 bytes takes 256 (an `async` block's 168 took 384).
    #[test]
    fn a_connection_task_fits_in_a_256_byte_task() {
        let limit = ConnLimit::new(1);
        let permit = limit.try_acquire().unwrap();
        let (_signal, drain) = crate::drain::channel();
        let task = connection_task(std::future::pending::<()>(), permit, &drain);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 152, "a connection task is {size} bytes");
    }

    #[derive(Default)]
    struct Counted {
        refused: AtomicUsize,
        timed_out: AtomicUsize,
    }

    impl ListenerEvents for Counted {
        fn refused(&self) {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        fn handshake_timed_out(&self) {
            self.timed_out.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn listener(max: usize) -> (Listener, Arc<Counted>, SocketAddr) {
        let tcp = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let events = Arc::new(Counted::default());
        let listener = Listener::new(tcp, "test", max, events.clone());
        let addr = listener.local_addr().unwrap();
        (listener, events, addr)
    }

    /// Reads until the server closes the connection (EOF or reset); false if it stays open
    /// for 60 s (longer than any timeout under test, which paused time reaches first).
    async fn closed_by_server(client: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_secs(60), client.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    const DEAD_PEER: DeadPeer = DeadPeer {
        interval: Duration::from_secs(30),
        timeout: Duration::from_secs(10),
    };
    /// What [`accepted_options`] reads from a connection that got TCP_NODELAY and
    /// [`DEAD_PEER`]'s options: keepalive after 30 s, TCP_USER_TIMEOUT 30 + 10 s.
    const WATCHED: (bool, bool, Duration, Option<Duration>) = (
        true,
        true,
        Duration::from_secs(30),
        Some(Duration::from_secs(40)),
    );

    /// What one connection accepted by `listener` has set: TCP_NODELAY, SO_KEEPALIVE,
    /// TCP_KEEPIDLE and TCP_USER_TIMEOUT, read before its handshake (the handshake sees the
    /// socket as the accept loop leaves it).
    async fn accepted_options(listener: Listener) -> (bool, bool, Duration, Option<Duration>) {
        let addr = listener.local_addr().unwrap();
        let (_signal, drain) = crate::drain::channel();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            listener
                .serve(&drain, |conn| {
                    let tx = tx.clone();
                    async move {
                        let tcp = conn.handshake().await.unwrap();
                        let sock = SockRef::from(&tcp);
                        let _ = tx
                            .send((
                                sock.tcp_nodelay().unwrap(),
                                sock.keepalive().unwrap(),
                                sock.tcp_keepalive_time().unwrap(),
                                sock.tcp_user_timeout().unwrap(),
                            ))
                            .await;
                    }
                })
                .await;
        });
        let _client = TcpStream::connect(addr).await.unwrap();
        rx.recv().await.unwrap()
    }

    #[tokio::test]
    async fn accepted_connections_get_nodelay_and_the_dead_peer_options() {
        let (plain, _, _) = listener(4).await;
        let (nodelay, keepalive, _, user_timeout) = accepted_options(plain).await;
        assert!(nodelay);
        assert!(
            !keepalive && user_timeout.is_none(),
            "no dead-peer options asked for"
        );
        let (watched, _, _) = listener(4).await;
        let watched = watched.with_dead_peer(DEAD_PEER);
        if ACCEPTED_SOCKETS_INHERIT {
            // Set once, on the listening socket: nothing left to set per connection.
            assert!(!watched.per_connection.nodelay);
            assert!(watched.per_connection.dead_peer.is_none());
        }
        assert_eq!(accepted_options(watched).await, WATCHED);
    }

    /// Where the listening socket cannot pass the options on, each accepted socket gets them.
    #[tokio::test]
    async fn options_the_listener_cannot_pass_on_are_set_per_connection() {
        let (mut listener, _, _) = listener(4).await;
        SockRef::from(&listener.tcp).set_tcp_nodelay(false).unwrap();
        listener.per_connection = PerConnection {
            nodelay: true,
            dead_peer: Some(DEAD_PEER),
        };
        assert_eq!(accepted_options(listener).await, WATCHED);
    }

    #[tokio::test]
    async fn cap_refuses_and_counts_then_serves_again_when_a_slot_frees() {
        let (listener, events, addr) = listener(2).await;
        let (_signal, drain) = crate::drain::channel();
        let served = Arc::new(AtomicUsize::new(0));
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let loop_served = Arc::clone(&served);
        tokio::spawn(async move {
            listener
                .serve(&drain, |conn| {
                    let served = Arc::clone(&loop_served);
                    let mut release = release_rx.clone();
                    async move {
                        let _tcp = conn.handshake().await;
                        served.fetch_add(1, Ordering::Relaxed);
                        // Held open until the test releases it.
                        let _ = release.wait_for(|r| *r).await;
                    }
                })
                .await;
        });
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while served.load(Ordering::Relaxed) < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "two connections not served"
            );
            tokio::task::yield_now().await;
        }
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_by_server(&mut third).await,
            "over the cap but left open"
        );
        assert_eq!(events.refused.load(Ordering::Relaxed), 1);
        assert_eq!(served.load(Ordering::Relaxed), 2);
        // Free the slots: the next connection is served.
        release_tx.send_replace(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let _c = TcpStream::connect(addr).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            if served.load(Ordering::Relaxed) >= 3 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never served again");
        }
    }

    #[test]
    fn with_workers_connections_run_on_both_workers_under_one_cap() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (workers, threads) = crate::Workers::start(2, runtime.handle().clone()).unwrap();
        runtime.block_on(async {
            let (listener, events, addr) = listener(2).await;
            let listener = listener.with_workers(workers);
            let (_signal, drain) = crate::drain::channel();
            let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                listener
                    .serve(&drain, |conn| {
                        let seen_tx = seen_tx.clone();
                        async move {
                            // The stream works on the worker it was handed to (its reactor).
                            let mut tcp = conn.into_tcp().unwrap();
                            let _ = seen_tx.send(crate::worker::current());
                            let mut buf = [0u8; 1];
                            let _ = tcp.read(&mut buf).await;
                        }
                    })
                    .await;
            });
            let _a = TcpStream::connect(addr).await.unwrap();
            let _b = TcpStream::connect(addr).await.unwrap();
            let mut on = [seen.recv().await.unwrap(), seen.recv().await.unwrap()];
            on.sort_unstable();
            assert_eq!(on, [0, 1], "one connection on each worker");
            // The cap counts both workers' connections: a third is refused.
            let mut third = TcpStream::connect(addr).await.unwrap();
            assert!(closed_by_server(&mut third).await);
            assert_eq!(events.refused.load(Ordering::Relaxed), 1);
        });
        threads.stop();
    }

    /// A handshake that never finishes.
    #[derive(Clone)]
    struct Stall;

    impl Handshake for Stall {
        type Io = TcpStream;
        async fn handshake(&self, tcp: TcpStream, _peer: SocketAddr) -> Option<TcpStream> {
            let _held = tcp;
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_handshake_is_cut_at_the_timeout_and_reported() {
        let (listener, events, addr) = listener(8).await;
        let listener = listener.with_handshake(Stall, Duration::from_secs(10));
        let (_signal, drain) = crate::drain::channel();
        let reached = Arc::new(AtomicUsize::new(0));
        let loop_reached = Arc::clone(&reached);
        tokio::spawn(async move {
            listener
                .serve(&drain, |conn| {
                    let reached = Arc::clone(&loop_reached);
                    async move {
                        if conn.handshake().await.is_some() {
                            reached.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
                .await;
        });
        let started = tokio::time::Instant::now();
        let mut client = TcpStream::connect(addr).await.unwrap();
        assert!(closed_by_server(&mut client).await);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(10), "{waited:?}");
        assert_eq!(events.timed_out.load(Ordering::Relaxed), 1);
        assert_eq!(
            reached.load(Ordering::Relaxed),
            0,
            "served without a handshake"
        );
    }

    #[tokio::test]
    async fn drain_closes_the_socket_and_a_forced_drain_drops_connections() {
        let (listener, _events, addr) = listener(8).await;
        let (signal, drain) = crate::drain::channel();
        let loop_drain = drain.clone();
        let accepting = tokio::spawn(async move {
            listener
                .serve(&loop_drain, |conn| async move {
                    // Ignores the drain: only a forced drain ends it.
                    let _tcp = conn.into_tcp().unwrap();
                    std::future::pending::<()>().await;
                })
                .await;
        });
        drop(drain);
        let mut client = TcpStream::connect(addr).await.unwrap();
        // Give the loop time to accept it (the write lands either way).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let drained = signal.drain(Duration::from_millis(200)).await;
        assert!(!drained, "a connection that ignores the drain finished it");
        accepting.await.unwrap();
        assert!(
            closed_by_server(&mut client).await,
            "forced drain left it open"
        );
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after the drain"
        );
    }
}
