//! Idle tracking as an I/O wrapper: [`Tracked`] records in an [`IdleClock`] when a byte last
//! moved either way, and [`IdleClock::expired`] resolves once none has for a while. Neither
//! hyper's HTTP/1.1 nor its HTTP/2 server closes a connection that simply stays quiet; this
//! does, for both, at the cost of one relaxed store per read or write (no timer reset per I/O,
//! no reference count touched per I/O).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When a connection last moved a byte.
#[derive(Debug)]
pub struct IdleClock {
    base: Instant,
    /// Milliseconds since `base`.
    last: AtomicU64,
}

impl IdleClock {
    /// A clock that reads "just now".
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    /// Records activity now.
    pub fn touch(&self) {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// How long since a byte last moved.
    pub fn idle_for(&self) -> Duration {
        let last = self.base + Duration::from_millis(self.last.load(Ordering::Relaxed));
        Instant::now().saturating_duration_since(last)
    }

    /// Completes once no byte has moved for `timeout` (checked when the last deadline passes,
    /// so a busy connection costs one timer per `timeout`).
    pub async fn expired(self: Arc<Self>, timeout: Duration) {
        loop {
            let last = self.base + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// An I/O stream that records its activity in an [`IdleClock`].
#[derive(Debug)]
pub struct Tracked<T> {
    inner: T,
    clock: Arc<IdleClock>,
}

impl<T> Tracked<T> {
    /// Wraps `inner`; every read or write that moves a byte touches `clock`.
    pub fn new(inner: T, clock: Arc<IdleClock>) -> Self {
        Self { inner, clock }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn expires_only_after_a_quiet_timeout() {
        let clock = IdleClock::new();
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = Tracked::new(near, Arc::clone(&clock));
        let expired = tokio::spawn(Arc::clone(&clock).expired(Duration::from_secs(10)));
        // Traffic every 6 s keeps it alive well past one timeout.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            far.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            io.read_exact(&mut b).await.unwrap();
            assert!(!expired.is_finished(), "expired while bytes moved");
        }
        let quiet = Instant::now();
        expired.await.unwrap();
        let waited = quiet.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn writes_count_as_activity() {
        let clock = IdleClock::new();
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = Tracked::new(near, Arc::clone(&clock));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(clock.idle_for() >= Duration::from_secs(5));
        io.write_all(b"hello").await.unwrap();
        assert_eq!(clock.idle_for(), Duration::ZERO);
        let mut b = [0u8; 5];
        far.read_exact(&mut b).await.unwrap();
    }
}
