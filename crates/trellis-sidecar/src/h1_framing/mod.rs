//! HTTP/1.1 request framing guard: an I/O wrapper between an accepted connection and hyper
//! that watches, in order, every byte hyper is handed (never altering or holding one back),
//! follows the message framing, and tells the service what hyper cannot:
//!
//! - **Content-Length and Transfer-Encoding together.** RFC 9112 6.1: "A server MAY reject a
//!   request that contains both Content-Length and Transfer-Encoding or process such a request
//!   in accordance with the Transfer-Encoding alone." hyper processes it and drops
//!   Content-Length before the service sees the head; Trellis rejects it (issue #8), so the
//!   tracker records which request on the connection carried both ([`FramingReport`]) and the
//!   service answers that one `400` without forwarding it.
//! - **A malformed chunked body.** The tracker reads chunked framing with hyper's own rules,
//!   so it knows a body is the client's fault (not the upstream's) before hyper's body errors.
//! - **Slow request heads.** `limits.http.header_read_timeout` runs from the first byte of a head
//!   until the head is complete. hyper's own timer also runs while a keep-alive connection
//!   waits for its next request, which would close every idle app connection after the
//!   timeout; that wait is bounded by `limits.http.idle_timeout` instead ([`crate::http_util`]).
//!
//! Per read: a scan of the new bytes (body bytes are skipped by count, not scanned), and one
//! `httparse` parse per head, from the read buffer when the head arrived in one read, else
//! from a per-connection buffer bounded by `limits.http.max_header_bytes`. No lock, no allocation
//! per request.
//!
//! The tracker stops (and passes bytes through untouched) when it cannot follow: the HTTP/2
//! preface (h2c: the bytes are frames, not heads), a head it cannot parse or whose framing
//! hyper refuses (hyper answers `400`/`431` and closes the connection itself), a head over
//! `max_header_bytes` (hyper answers `431`), a malformed chunk (hyper fails the body and
//! closes). A `WebSocket` upgrade stops it explicitly: the service calls
//! [`FramingReport::switch_protocols`] before its `101` goes out, and the bytes after it pass
//! through untouched. Other `Upgrade`s are refused and CONNECT is answered `405`, so the
//! bytes that follow those are always HTTP/1.1 or never read.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::body::ProxyBody;
use crate::responses::text_response;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The most header fields a head may have: `limits.http.max_headers` is at most this, so a head
/// hyper accepts always fits.
const MAX_HEADERS: usize = crate::config::Limits::MAX_HEADERS_CEILING;

/// hyper's bound on the chunk extensions of one body (`CHUNKED_EXTENSIONS_LIMIT`): past it
/// hyper fails the body, so the tracker does too.
const CHUNK_EXTENSIONS_LIMIT: u64 = 16 * 1024;

/// The start of the HTTP/2 connection preface (RFC 9113 3.4), which h2c prior-knowledge
/// clients send on the outbound listener.
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0";

/// Why a chunked body is malformed: the reason in the `400` body.
const BODY_FAULTS: [&str; 5] = [
    "",
    "invalid chunk size",
    "chunk size overflows 64 bits",
    "malformed chunk delimiter or trailer",
    "chunk extensions over 16 KiB",
];

/// What the tracker found on one connection, read by the service that answers its requests.
/// Requests are numbered from 1 in arrival order; hyper hands an HTTP/1.1 connection's
/// requests to the service in that order, and only after the tracker has seen their whole
/// head.
#[derive(Debug, Default)]
pub struct FramingReport {
    /// The first request whose head has both Content-Length and Transfer-Encoding; 0: none.
    conflicting: AtomicU64,
    /// The first request whose chunked body is malformed; 0: none.
    malformed: AtomicU64,
    /// Index into [`BODY_FAULTS`] for `malformed`.
    malformed_why: AtomicU8,
    /// HTTP/1.x requests the service has received.
    received: AtomicU64,
    /// Set before a `101` goes out: the bytes that follow belong to the new protocol.
    switched: AtomicBool,
}

impl AsRef<FramingReport> for FramingReport {
    fn as_ref(&self) -> &FramingReport {
        self
    }
}

impl FramingReport {
    /// The number of the request the service is receiving now (call once per HTTP/1.x request,
    /// in order).
    pub fn next_request(&self) -> u64 {
        self.received.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Called before answering `101 Switching Protocols`: from then on the wrapper passes bytes
    /// through untouched (a WebSocket client sends its first frame only after the `101`, so
    /// no frame has been read as a head).
    pub fn switch_protocols(&self) {
        self.switched.store(true, Ordering::Release);
    }

    fn switched(&self) -> bool {
        self.switched.load(Ordering::Acquire)
    }

    /// True when request `seq` has both Content-Length and Transfer-Encoding.
    pub fn conflicting_lengths(&self, seq: u64) -> bool {
        seq != 0 && self.conflicting.load(Ordering::Acquire) == seq
    }

    /// Why request `seq`'s chunked body is malformed, if it is (so far as it has been read).
    pub fn malformed_body(&self, seq: u64) -> Option<&'static str> {
        if seq == 0 || self.malformed.load(Ordering::Acquire) != seq {
            return None;
        }
        BODY_FAULTS
            .get(usize::from(self.malformed_why.load(Ordering::Relaxed)))
            .copied()
    }

    /// The sidecar's own answer to request `seq` when its framing is refused: both lengths, or
    /// a chunked body already known to be malformed (it arrived with the head). `None`: go on.
    pub fn refusal(&self, seq: u64) -> Option<Response<ProxyBody>> {
        if self.conflicting_lengths(seq) {
            return Some(conflicting_lengths_response());
        }
        self.malformed_body(seq).map(malformed_body_response)
    }

    fn record_conflicting(&self, seq: u64) {
        // Only the first counts: hyper closes the connection after answering it.
        let _ = self
            .conflicting
            .compare_exchange(0, seq, Ordering::Release, Ordering::Relaxed);
    }

    fn record_malformed(&self, seq: u64, why: BodyFault) {
        self.malformed_why.store(why as u8, Ordering::Relaxed);
        let _ = self
            .malformed
            .compare_exchange(0, seq, Ordering::Release, Ordering::Relaxed);
    }
}

/// `400` for a request with both Content-Length and Transfer-Encoding, closing the connection.
pub fn conflicting_lengths_response() -> Response<ProxyBody> {
    close(text_response(
        StatusCode::BAD_REQUEST,
        "request has both Content-Length and Transfer-Encoding (request smuggling?); refused",
    ))
}

/// `400` for a request whose chunked body is malformed (`why`), closing the connection.
pub fn malformed_body_response(why: &str) -> Response<ProxyBody> {
    close(text_response(
        StatusCode::BAD_REQUEST,
        &format!("malformed chunked request body: {why}"),
    ))
}

fn close(mut response: Response<ProxyBody>) -> Response<ProxyBody> {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum BodyFault {
    Size = 1,
    Overflow = 2,
    Delimiter = 3,
    Extensions = 4,
}

/// Where a head's end-of-line scan is: an empty line ends the head. httparse (hence hyper)
/// accepts `\n` as well as `\r\n` as a line end, so the tracker does too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Leading empty lines, which httparse skips (RFC 9112 2.2).
    Leading,
    /// Inside a line.
    Middle,
    /// Just after a line's `\n`.
    Start,
    /// `\r` at the start of a line.
    StartCr,
}

/// hyper's chunked decoder states (hyper `proto/h1/decode.rs`), byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages: the next byte starts a head.
    Idle,
    /// Inside a head.
    Head(Line),
    /// A Content-Length body: bytes left.
    Length(u64),
    /// A chunked body.
    Chunked(Chunk),
    /// Stopped following; every byte passes through unobserved.
    Off,
}

/// Follows HTTP/1.1 request framing over a byte stream (no I/O: [`RequestFraming`] feeds it).
#[derive(Debug)]
pub struct FramingTracker {
    state: State,
    /// Heads begun so far: the number of the request being read.
    seq: u64,
    /// A head that spans reads, from its request line on.
    partial: Vec<u8>,
    max_head: usize,
    chunk_left: u64,
    extensions: u64,
}

impl FramingTracker {
    /// A tracker for one connection; heads over `max_head` bytes are left to hyper's limit.
    pub fn new(max_head: usize) -> Self {
        Self {
            state: State::Idle,
            seq: 0,
            partial: Vec::new(),
            max_head,
            chunk_left: 0,
            extensions: 0,
        }
    }

    /// True while a head has begun and is not complete.
    pub fn in_head(&self) -> bool {
        matches!(self.state, State::Head(_))
    }

    /// True once the tracker has stopped following the connection.
    pub fn is_off(&self) -> bool {
        self.state == State::Off
    }

    /// The number of the request being read (its head begun), 0 before the first.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Observes the next bytes of the connection, recording findings in `report`.
    pub fn observe(&mut self, mut data: &[u8], report: &FramingReport) {
        while !data.is_empty() {
            let used = match self.state {
                State::Off => return,
                State::Idle => {
                    self.seq += 1;
                    self.partial.clear();
                    self.state = State::Head(Line::Leading);
                    0
                }
                State::Head(line) => self.head(line, data, report),
                State::Length(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Idle
                    } else {
                        State::Length(left)
                    };
                    n
                }
                State::Chunked(Chunk::Data) => {
                    let n = usize::try_from(self.chunk_left)
                        .unwrap_or(usize::MAX)
                        .min(data.len());
                    self.chunk_left -= n as u64;
                    if self.chunk_left == 0 {
                        self.state = State::Chunked(Chunk::DataCr);
                    }
                    n
                }
                State::Chunked(chunk) => {
                    match self.chunk_byte(chunk, data[0]) {
                        Ok(next) => self.state = next,
                        Err(fault) => {
                            report.record_malformed(self.seq, fault);
                            self.state = State::Off;
                        }
                    }
                    1
                }
            };
            data = &data[used..];
        }
    }

    /// Scans head bytes; returns how many belong to the head. Parses it when it ends.
    fn head(&mut self, mut line: Line, data: &[u8], report: &FramingReport) -> usize {
        let mut start = 0;
        let mut end = None;
        for (i, &b) in data.iter().enumerate() {
            line = match (line, b) {
                (Line::Leading, b'\r' | b'\n') => {
                    start = i + 1;
                    Line::Leading
                }
                (Line::Start | Line::StartCr, b'\n') => {
                    end = Some(i + 1);
                    break;
                }
                (Line::Start, b'\r') => Line::StartCr,
                (_, b'\n') => Line::Start,
                // A `\r` not followed by `\n` at a line start is refused by httparse; until
                // then it is just another byte.
                _ => Line::Middle,
            };
        }
        let Some(end) = end else {
            let more = &data[start..];
            if self.partial.len() + more.len() > self.max_head {
                // hyper answers 431 and closes.
                self.partial = Vec::new();
                self.state = State::Off;
            } else {
                self.partial.extend_from_slice(more);
                self.state = State::Head(line);
            }
            return data.len();
        };
        self.state = if self.partial.is_empty() {
            self.parse(&data[start..end], report)
        } else {
            let fits = self.partial.len() + end - start <= self.max_head;
            let mut head = std::mem::take(&mut self.partial);
            head.extend_from_slice(&data[start..end]);
            let next = if fits {
                self.parse(&head, report)
            } else {
                State::Off
            };
            head.clear();
            // The buffer (and its capacity) is kept for the next head that spans reads.
            self.partial = head;
            next
        };
        end
    }

    /// What follows a complete head (request line on; leading empty lines skipped).
    fn parse(&mut self, head: &[u8], report: &FramingReport) -> State {
        if self.seq == 1 && head.starts_with(H2_PREFACE_LINE) {
            return State::Off;
        }
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut []);
        match request.parse_with_uninit_headers(head, &mut headers) {
            Ok(httparse::Status::Complete(_)) => {}
            // hyper refuses the head too and closes the connection.
            _ => return State::Off,
        }
        // hyper's rules (`proto/h1/role.rs`, `Server::parse`): each Transfer-Encoding field
        // decides chunked by its last coding, and the last one counts; Content-Length fields
        // after a Transfer-Encoding are ignored, before one they must parse and agree.
        let mut transfer_encoding = false;
        let mut chunked = false;
        let mut content_length = false;
        let mut length: Option<u64> = None;
        for h in request.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = true;
                chunked = last_coding_is_chunked(h.value);
            } else if h.name.eq_ignore_ascii_case("content-length") {
                content_length = true;
                if transfer_encoding {
                    continue;
                }
                match (digits(h.value), length) {
                    (Some(n), None) => length = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    _ => return State::Off,
                }
            }
        }
        if transfer_encoding {
            if request.version != Some(1) || !chunked {
                return State::Off;
            }
            if content_length {
                report.record_conflicting(self.seq);
            }
            self.chunk_left = 0;
            self.extensions = 0;
            return State::Chunked(Chunk::Start);
        }
        match length {
            Some(n) if n > 0 => State::Length(n),
            _ => State::Idle,
        }
    }

    /// One step of hyper's chunked decoder (outside chunk data).
    fn chunk_byte(&mut self, chunk: Chunk, b: u8) -> Result<State, BodyFault> {
        let next = match (chunk, b) {
            (Chunk::Start | Chunk::Size, _) if b.is_ascii_hexdigit() => {
                let digit = u64::from(match b {
                    b'0'..=b'9' => b - b'0',
                    b'a'..=b'f' => b - b'a' + 10,
                    _ => b - b'A' + 10,
                });
                self.chunk_left = self
                    .chunk_left
                    .checked_mul(16)
                    .and_then(|n| n.checked_add(digit))
                    .ok_or(BodyFault::Overflow)?;
                Chunk::Size
            }
            (Chunk::Start, _) => return Err(BodyFault::Size),
            (Chunk::Size | Chunk::SizeLws, b'\t' | b' ') => Chunk::SizeLws,
            (Chunk::Size | Chunk::SizeLws, b';') => Chunk::Extension,
            (Chunk::Size | Chunk::SizeLws, b'\r') | (Chunk::Extension, b'\r') => Chunk::SizeLf,
            (Chunk::Size | Chunk::SizeLws, _) => return Err(BodyFault::Size),
            (Chunk::Extension, b'\n') => return Err(BodyFault::Delimiter),
            (Chunk::Extension, _) => {
                self.extensions += 1;
                if self.extensions >= CHUNK_EXTENSIONS_LIMIT {
                    return Err(BodyFault::Extensions);
                }
                Chunk::Extension
            }
            (Chunk::SizeLf, b'\n') if self.chunk_left == 0 => Chunk::EndCr,
            (Chunk::SizeLf, b'\n') => Chunk::Data,
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Start,
            (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
            (Chunk::Trailer, _) => Chunk::Trailer,
            (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
            (Chunk::EndCr, b'\r') => Chunk::EndLf,
            (Chunk::EndCr, _) => Chunk::Trailer,
            (Chunk::EndLf, b'\n') => return Ok(State::Idle),
            (
                Chunk::SizeLf | Chunk::DataCr | Chunk::DataLf | Chunk::TrailerLf | Chunk::EndLf,
                _,
            ) => return Err(BodyFault::Delimiter),
            // Data is skipped by count in `observe`.
            (Chunk::Data, _) => Chunk::Data,
        };
        Ok(State::Chunked(next))
    }
}

/// hyper's `is_chunked_`: the field value as visible ASCII, its last comma-separated coding.
fn last_coding_is_chunked(value: &[u8]) -> bool {
    if !value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        return false;
    }
    let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
    last.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// hyper's Content-Length parse: decimal digits only, no sign, no list, no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// The I/O wrapper: feeds a [`FramingTracker`] every byte read, records into the connection's
/// report, and fails the read (`TimedOut`, so hyper closes the connection) when a request head
/// takes longer than `header_read_timeout`.
#[derive(Debug)]
pub struct RequestFraming<T, R> {
    inner: T,
    tracker: FramingTracker,
    report: Arc<R>,
    header_read_timeout: Duration,
    /// Made on the first head that spans reads; reset, not re-made, for later ones.
    timer: Option<Pin<Box<Sleep>>>,
    /// The request whose head the timer is running for.
    timed_seq: u64,
}

impl<T, R: AsRef<FramingReport>> RequestFraming<T, R> {
    /// Wraps `inner`; heads over `max_head` bytes are left to hyper's own limit.
    pub fn new(inner: T, report: Arc<R>, header_read_timeout: Duration, max_head: usize) -> Self {
        Self {
            inner,
            tracker: FramingTracker::new(max_head),
            report,
            header_read_timeout,
            timer: None,
            timed_seq: 0,
        }
    }

    /// Polls the head timer, starting it for a head that is under way. The timer starts when
    /// hyper first asks for more of a head, which is at once when it is waiting for one (the
    /// slowloris case), and after the current response when a pipelined head came early.
    fn head_timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.tracker.in_head() {
            return false;
        }
        let seq = self.tracker.seq();
        let timer = match &mut self.timer {
            Some(timer) if self.timed_seq == seq => timer,
            slot => {
                self.timed_seq = seq;
                let deadline = Instant::now() + self.header_read_timeout;
                match slot {
                    Some(timer) => {
                        timer.as_mut().reset(deadline);
                        timer
                    }
                    None => slot.insert(Box::pin(tokio::time::sleep_until(deadline))),
                }
            }
        };
        timer.as_mut().poll(cx).is_ready()
    }
}

impl<T: AsyncRead + Unpin, R: AsRef<FramingReport>> AsyncRead for RequestFraming<T, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if (*this.report).as_ref().switched() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.head_timed_out(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "request head not complete within {} (limits.http.header_read_timeout)",
                    humantime::format_duration(this.header_read_timeout)
                ),
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(new) = buf.filled().get(before..) {
            if !new.is_empty() {
                this.tracker.observe(new, (*this.report).as_ref());
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin, R: Unpin> AsyncWrite for RequestFraming<T, R> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
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

/// Fuzz body (cargo-fuzz target `h1_framing`, also run on stable by `tests/fuzz_bodies.rs`):
/// arbitrary bytes must never panic the tracker, and how the stream is cut into reads must
/// not change what it finds. The first byte picks the cut pattern; the rest is the stream,
/// fed once whole and once in pieces. Not API.
#[doc(hidden)]
pub fn fuzz_framing(data: &[u8]) {
    const MAX_HEAD: usize = 8 << 10;
    let Some((&pattern, stream)) = data.split_first() else {
        return;
    };
    let outcome = |t: &FramingTracker, r: &FramingReport| {
        (
            t.seq(),
            t.in_head(),
            t.is_off(),
            r.conflicting.load(Ordering::Relaxed),
            r.malformed.load(Ordering::Relaxed),
            r.malformed_why.load(Ordering::Relaxed),
        )
    };
    let (mut whole, whole_report) = (FramingTracker::new(MAX_HEAD), FramingReport::default());
    whole.observe(stream, &whole_report);
    let (mut cut, cut_report) = (FramingTracker::new(MAX_HEAD), FramingReport::default());
    // Piece sizes cycle through 1..=8 scaled by the pattern, so reads end at many offsets.
    let mut rest = stream;
    let mut i = 0usize;
    while !rest.is_empty() {
        let size = (usize::from(pattern) % 17 + 1) * (i % 8 + 1) / 4 + 1;
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        cut.observe(piece, &cut_report);
        rest = tail;
        i += 1;
    }
    assert_eq!(
        outcome(&whole, &whole_report),
        outcome(&cut, &cut_report),
        "the same stream cut into reads of other sizes was framed differently"
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
