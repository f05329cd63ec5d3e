//! HTTP/2 written and read by hand (RFC 9113 framing, HPACK static-table requests), for tests
//! that must send what no well-behaved client would: streams reset at once, endless
//! CONTINUATION, more streams than allowed.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame type HEADERS.
pub const HEADERS: u8 = 0x1;
/// Frame type RST_STREAM.
pub const RST_STREAM: u8 = 0x3;
/// Frame type SETTINGS.
pub const SETTINGS: u8 = 0x4;
/// Frame type GOAWAY.
pub const GOAWAY: u8 = 0x7;
/// Frame type CONTINUATION.
pub const CONTINUATION: u8 = 0x9;
/// Flag END_STREAM.
pub const END_STREAM: u8 = 0x1;
/// Flag END_HEADERS.
pub const END_HEADERS: u8 = 0x4;
/// Error code ENHANCE_YOUR_CALM.
pub const ENHANCE_YOUR_CALM: u32 = 0xb;
/// Error code REFUSED_STREAM.
pub const REFUSED_STREAM: u32 = 0x7;
/// Error code CANCEL.
pub const CANCEL: u32 = 0x8;

/// Appends one frame to `out`.
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// HPACK for `GET https://b<path>`: static-table indexes and literals without indexing.
pub fn get_block(path: &str) -> Vec<u8> {
    assert!(path.len() < 127);
    let mut b = vec![0x82, 0x87, 0x04, path.len() as u8];
    b.extend_from_slice(path.as_bytes());
    b.extend_from_slice(&[0x01, 0x01, b'b']);
    b
}

/// The client preface, an empty SETTINGS and an ACK of the server's.
pub fn h2_start() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    frame(&mut out, SETTINGS, 0x1, 0, &[]);
    out
}

/// What the server sent back on a raw HTTP/2 connection.
#[derive(Debug, Default)]
pub struct H2Seen {
    /// The last GOAWAY's error code.
    pub goaway: Option<u32>,
    /// RST_STREAM error codes, in order.
    pub rst: Vec<u32>,
    /// Streams a response HEADERS frame came on.
    pub headers: Vec<u32>,
    /// The server closed the connection (EOF or error).
    pub closed: bool,
}

/// Reads frames until EOF/error, `wait`, or `stop` says enough.
pub async fn read_frames<S: AsyncRead + Unpin>(
    io: &mut S,
    wait: Duration,
    stop: impl Fn(&H2Seen) -> bool,
) -> H2Seen {
    let mut seen = H2Seen::default();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if stop(&seen) {
            return seen;
        }
        let mut head = [0u8; 9];
        match tokio::time::timeout_at(deadline, io.read_exact(&mut head)).await {
            Err(_) => return seen,
            Ok(Err(_)) => {
                seen.closed = true;
                return seen;
            }
            Ok(Ok(_)) => {}
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if tokio::time::timeout_at(deadline, io.read_exact(&mut payload))
            .await
            .map_or(true, |r| r.is_err())
        {
            seen.closed = true;
            return seen;
        }
        match head[3] {
            GOAWAY if len >= 8 => {
                seen.goaway = Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]))
            }
            RST_STREAM if len == 4 => seen.rst.push(u32::from_be_bytes([
                payload[0], payload[1], payload[2], payload[3],
            ])),
            HEADERS => seen.headers.push(stream),
            _ => {}
        }
    }
}
