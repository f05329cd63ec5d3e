//! Plain TCP mode, for protocols that are not HTTP: the copy both forwards share. Identity
//! checks still apply: see [`crate::inbound::tcp`] (peer → mTLS → policy → app) and
//! [`crate::outbound::tcp`] (app → mTLS with the upstream's `identity` → peer).
//!
//! Bytes are copied both ways with [`tokio::io::copy_bidirectional_with_sizes`]; an EOF on one
//! side is passed on as a half-close (TLS `close_notify` + TCP FIN) so request/response
//! protocols that shut down their write side still work. On drain, forwards keep copying until
//! they end on their own or the drain timeout passes.

use tokio::io::{AsyncRead, AsyncWrite};

/// Copy buffer per direction: one TLS record's worth of plaintext.
pub const COPY_BUFFER: usize = 16 * 1024;

/// Copies until both directions have ended; returns (a→b, b→a) bytes.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await
}
