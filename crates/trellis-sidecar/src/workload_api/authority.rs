//! Lets gRPC clients built on grpc-core (Python, C++, Ruby, PHP: py-spiffe among them) and
//! grpc-java call the Workload API over its Unix socket.
//!
//! Since grpc-core 1.57 (grpc/grpc#33571) a channel to `unix:/run/spiffe/workload.sock` sends
//! the percent-encoded path as `:authority` (`%2Frun%2Fspiffe%2Fworkload.sock`), and grpc-java
//! sends the raw path. Neither is an authority (RFC 3986 §3.2 allows `%` only in userinfo),
//! and the `h2` crate under tonic refuses such a request with `RST_STREAM(PROTOCOL_ERROR)`
//! before tonic sees it (hyperium/h2#487, open). grpc-go and the Rust `spiffe` crate send
//! `localhost`.
//!
//! So every connection goes through [`relay`]: server-to-client bytes are copied as they are;
//! client-to-server bytes are parsed as HTTP/2 frames, each header block (HEADERS plus
//! CONTINUATION) is HPACK-decoded with the client's dynamic table, an `:authority` that does
//! not parse as one is replaced with `localhost` (on a Unix socket the authority names
//! nothing), and the block is re-encoded with literals that never touch the server's dynamic
//! table, so the two tables cannot drift apart. Every other frame passes unchanged.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may announce (RFC 9113 §6.5.2), so re-encoded
/// blocks are split at it whatever the server announced.
const MAX_FRAME: usize = 16_384;
/// A frame or header block larger than this ends the connection (the server's own limits are
/// far below: requests here are empty messages and a few headers).
const MAX_BLOCK: usize = 256 * 1024;
/// The replacement authority.
const LOCALHOST: &[u8] = b"localhost";

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Copies `client` ⇄ `server` until either side closes, fixing `:authority` on the way in.
pub async fn relay<C, S>(client: C, server: S) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let inbound = async {
        let result = rewrite(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
        result
    };
    let outbound = async {
        let result = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        result.map(|_| ())
    };
    // Either direction ending ends the connection (the other half is dropped with it).
    tokio::select! {
        r = inbound => r,
        r = outbound => r,
    }
}

/// The client-to-server direction: preface, then frame by frame.
async fn rewrite<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        // Not HTTP/2 with prior knowledge: let the server answer it as it would.
        to.write_all(&preface).await?;
        tokio::io::copy(from, to).await?;
        return Ok(());
    }
    to.write_all(PREFACE).await?;
    let mut decoder = loona_hpack::Decoder::new();
    // The client's encoder may use at most the server's SETTINGS_HEADER_TABLE_SIZE, which
    // tonic leaves at the protocol's default.
    decoder.set_max_allowed_table_size(4096);
    // A header block in progress: (stream, END_STREAM flag, fragments so far).
    let mut pending: Option<(u32, u8, Vec<u8>)> = None;
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > MAX_BLOCK {
            return Err(bad(format!("frame of {len} bytes")));
        }
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        match kind {
            HEADERS => {
                if pending.is_some() {
                    return Err(bad("HEADERS while a header block is open"));
                }
                let fragment = headers_fragment(flags, &payload)?;
                pending = Some((stream, flags & END_STREAM, fragment.to_vec()));
            }
            CONTINUATION => match pending.as_mut() {
                Some((s, _, block)) if *s == stream => {
                    block.extend_from_slice(&payload);
                    if block.len() > MAX_BLOCK {
                        return Err(bad("header block too large"));
                    }
                }
                _ => return Err(bad("CONTINUATION without HEADERS")),
            },
            _ => {
                if pending.is_some() {
                    // RFC 9113 §6.10: nothing may come between HEADERS and its CONTINUATIONs.
                    return Err(bad("a frame inside a header block"));
                }
                to.write_all(&head).await?;
                to.write_all(&payload).await?;
                continue;
            }
        }
        if flags & END_HEADERS != 0 {
            if let Some((stream, end_stream, block)) = pending.take() {
                let block = reencode(&mut decoder, &block)?;
                write_block(to, stream, end_stream, &block).await?;
            }
        }
    }
}

/// The header block fragment of a HEADERS payload: padding and priority removed.
fn headers_fragment(flags: u8, payload: &[u8]) -> io::Result<&[u8]> {
    let mut body = payload;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        let (&p, rest) = body
            .split_first()
            .ok_or_else(|| bad("PADDED without length"))?;
        pad = usize::from(p);
        body = rest;
    }
    if flags & PRIORITY != 0 {
        body = body.get(5..).ok_or_else(|| bad("PRIORITY too short"))?;
    }
    body.get(..body.len().saturating_sub(pad))
        .filter(|_| pad <= body.len())
        .ok_or_else(|| bad("padding longer than the frame"))
}

/// Decodes `block` with the client's table, fixes `:authority`, and encodes every field as a
/// literal without indexing (RFC 7541 §6.2.2), so the server's table stays empty.
fn reencode(decoder: &mut loona_hpack::Decoder<'_>, block: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len() + 16);
    decoder
        .decode_with_cb(block, |name, value| {
            let value: &[u8] =
                if &*name == b":authority" && http::uri::Authority::try_from(&*value).is_err() {
                    LOCALHOST
                } else {
                    &value
                };
            out.push(0x00);
            string(&mut out, &name);
            string(&mut out, value);
        })
        .map_err(|e| bad(format!("HPACK: {e}")))?;
    Ok(out)
}

/// An HPACK string literal, not Huffman-coded (RFC 7541 §5.2).
fn string(out: &mut Vec<u8>, s: &[u8]) {
    integer(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// An HPACK integer with an `n`-bit prefix after `first`'s high bits (RFC 7541 §5.1).
fn integer(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        // `value < max <= 127`, so the cast cannot truncate.
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// Writes `block` as one HEADERS frame and as many CONTINUATION frames as it needs.
async fn write_block<W: AsyncWrite + Unpin>(
    to: &mut W,
    stream: u32,
    end_stream: u8,
    block: &[u8],
) -> io::Result<()> {
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut kind = HEADERS;
    let mut flags = end_stream;
    if chunks.peek().is_none() {
        return frame(to, HEADERS, flags | END_HEADERS, stream, &[]).await;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        frame(
            to,
            kind,
            flags | if last { END_HEADERS } else { 0 },
            stream,
            chunk,
        )
        .await?;
        kind = CONTINUATION;
        flags = 0;
    }
    Ok(())
}

async fn frame<W: AsyncWrite + Unpin>(
    to: &mut W,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> io::Result<()> {
    let len = payload.len();
    let mut head = [0u8; 9];
    head[0] = (len >> 16) as u8;
    head[1] = (len >> 8) as u8;
    head[2] = len as u8;
    head[3] = kind;
    head[4] = flags;
    head[5..].copy_from_slice(&stream.to_be_bytes());
    to.write_all(&head).await?;
    to.write_all(payload).await
}

/// Fuzzing entry point (`fuzz/fuzz_targets/workload_api_relay.rs`, run on stable by
/// `tests/it/fuzz_bodies.rs`): a client's bytes → the client-to-server rewrite must not panic,
/// and every header block it writes decodes, with no `:authority` that fails to parse. Not API.
#[doc(hidden)]
pub fn fuzz_rewrite(data: &[u8]) {
    let mut out = Vec::new();
    let _ = futures::executor::block_on(rewrite(&mut &data[..], &mut out));
    if !out.starts_with(PREFACE) {
        return;
    }
    // Walk the frames written; decode every header block with the server's view (a fresh
    // decoder: the rewrite never adds to the server's table).
    let mut decoder = loona_hpack::Decoder::new();
    let mut rest = &out[PREFACE.len()..];
    let mut block = Vec::new();
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let Some(payload) = rest.get(9..9 + len) else {
            return;
        };
        if kind == HEADERS || kind == CONTINUATION {
            block.extend_from_slice(payload);
            if flags & END_HEADERS != 0 {
                let headers = decoder
                    .decode(&block)
                    .unwrap_or_else(|e| panic!("a rewritten block does not decode: {e}"));
                for (name, value) in headers {
                    if name == b":authority" {
                        assert!(http::uri::Authority::try_from(&value[..]).is_ok());
                    }
                }
                block.clear();
            }
        }
        rest = &rest[9 + len..];
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn decode(block: &[u8]) -> Vec<(String, String)> {
        loona_hpack::Decoder::new()
            .decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn a_path_authority_becomes_localhost_and_others_stay() {
        let mut client = loona_hpack::Encoder::new();
        let mut decoder = loona_hpack::Decoder::new();
        let grpc_core: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":authority", b"%2Frun%2Fspiffe%2Fworkload.sock"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b"workload.spiffe.io", b"true"),
        ];
        // Twice: the second block refers to the client's dynamic table.
        for _ in 0..2 {
            let block = client.encode(grpc_core.iter().copied());
            let out = decode(&reencode(&mut decoder, &block).unwrap());
            assert_eq!(out[1], (":authority".into(), "localhost".into()));
            assert_eq!(out[3], ("workload.spiffe.io".into(), "true".into()));
        }
        let block = client.encode([(&b":authority"[..], &b"localhost:8080"[..])]);
        let out = decode(&reencode(&mut decoder, &block).unwrap());
        assert_eq!(out[0].1, "localhost:8080");
    }

    #[test]
    fn integers_follow_rfc_7541_examples() {
        // RFC 7541 C.1.1-C.1.3.
        let mut out = Vec::new();
        integer(&mut out, 0, 5, 10);
        assert_eq!(out, [0x0a]);
        out.clear();
        integer(&mut out, 0, 5, 1337);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        out.clear();
        integer(&mut out, 0, 8, 42);
        assert_eq!(out, [0x2a]);
    }

    #[tokio::test]
    async fn frames_are_relayed_with_the_block_rewritten() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode([(&b":authority"[..], &b"%2Fx.sock"[..])]);
        let mut input = PREFACE.to_vec();
        // SETTINGS (empty), then HEADERS split into HEADERS + CONTINUATION, padded.
        input.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let (a, b) = block.split_at(3);
        let mut headers = vec![2u8];
        headers.extend_from_slice(a);
        headers.extend_from_slice(&[0, 0]);
        let len = headers.len() as u8;
        input.extend_from_slice(&[0, 0, len, HEADERS, PADDED | END_STREAM, 0, 0, 0, 1]);
        input.extend_from_slice(&headers);
        input.extend_from_slice(&[0, 0, b.len() as u8, CONTINUATION, END_HEADERS, 0, 0, 0, 1]);
        input.extend_from_slice(b);
        let mut out = Vec::new();
        rewrite(&mut &input[..], &mut out).await.unwrap();
        assert_eq!(&out[..24], PREFACE);
        assert_eq!(&out[24..33], &[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let head = &out[33..42];
        assert_eq!(head[3], HEADERS);
        assert_eq!(head[4], END_STREAM | END_HEADERS);
        assert_eq!(
            decode(&out[42..]),
            [(":authority".to_owned(), "localhost".to_owned())]
        );
    }
}
