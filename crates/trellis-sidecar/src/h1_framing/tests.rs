//! Unit tests of the parent module.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX: usize = 8 << 10;

/// Feeds `stream` in pieces cut at `cuts`; returns the tracker and its report.
fn feed(stream: &[u8], cuts: &[usize]) -> (FramingTracker, FramingReport) {
    let mut t = FramingTracker::new(MAX);
    let report = FramingReport::default();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
        t.observe(&stream[from..cut], &report);
        from = cut;
    }
    (t, report)
}

/// Every way of cutting `stream` in two, and byte by byte: the same outcome as in one read.
fn every_split(stream: &[u8], check: impl Fn(&FramingTracker, &FramingReport, &str)) {
    let (t, r) = feed(stream, &[]);
    check(&t, &r, "whole");
    for cut in 1..stream.len() {
        let (t, r) = feed(stream, &[cut]);
        check(&t, &r, &format!("cut at {cut}"));
    }
    let cuts: Vec<usize> = (1..stream.len()).collect();
    let (t, r) = feed(stream, &cuts);
    check(&t, &r, "byte by byte");
}

fn pipelined() -> Vec<u8> {
    [
        &b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"5;name=\"v\"\r\nhello\r\nA \t;x;y=z\r\n0123456789\r\n0\r\nX-Trailer: t\r\nX-Two: 2\r\n\r\n",
        // Leading empty lines are skipped (RFC 9112 2.2), bare LF line ends accepted.
        b"\r\n\nGET /d HTTP/1.1\nHost: x\n\n",
        b"POST /e HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
        b"GET /f HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"POST /g HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]
    .concat()
}

#[test]
fn content_length_body_is_skipped() {
    every_split(
        b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nGET /GET /b HTTP/1.1\r\n\r\n",
        |t, r, how| {
            assert_eq!(t.seq(), 2, "{how}");
            assert_eq!(t.state, State::Idle, "{how}");
            assert!(
                !r.conflicting_lengths(1) && !r.conflicting_lengths(2),
                "{how}"
            );
        },
    );
}

#[test]
fn chunked_with_extensions_and_trailers() {
    every_split(
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
          3;ext=1\r\nGET\r\n5 ;a;b=\"c\"\r\n\r\n\r\n\r\r\n0;last\r\nTrailer: GET / HTTP/1.1\r\n\r\n\
          GET /next HTTP/1.1\r\n\r\n",
        |t, r, how| {
            assert_eq!(t.seq(), 2, "{how}");
            assert_eq!(t.state, State::Idle, "{how}");
            assert_eq!(r.malformed_body(1), None, "{how}");
        },
    );
}

#[test]
fn pipelined_requests_split_anywhere() {
    every_split(&pipelined(), |t, r, how| {
        assert_eq!(t.seq(), 7, "{how}");
        assert_eq!(t.state, State::Idle, "{how}");
        assert_eq!(r.conflicting.load(Ordering::Relaxed), 0, "{how}");
        assert_eq!(r.malformed.load(Ordering::Relaxed), 0, "{how}");
    });
}

#[test]
fn both_lengths_in_the_first_request() {
    for head in [
        "POST / HTTP/1.1\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\ntransfer-ENCODING: chunked\r\ncontent-length: 3\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\nContent-Length: 9\r\n\r\n",
    ] {
        let stream = [head.as_bytes(), b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"].concat();
        every_split(&stream, |t, r, how| {
            assert!(r.conflicting_lengths(1), "{head:?} {how}");
            assert!(!r.conflicting_lengths(2), "{head:?} {how}");
            assert!(r.refusal(1).is_some(), "{head:?} {how}");
            // Framed by Transfer-Encoding, as hyper does.
            assert_eq!(t.seq(), 2, "{head:?} {how}");
            assert_eq!(t.state, State::Idle, "{head:?} {how}");
        });
    }
}

#[test]
fn both_lengths_in_a_later_pipelined_request() {
    let stream = [
        &pipelined()[..],
        b"POST /h HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /i HTTP/1.1\r\n\r\n",
    ]
    .concat();
    every_split(&stream, |t, r, how| {
        assert!(r.conflicting_lengths(8), "{how}");
        assert!((1..=7).all(|n| !r.conflicting_lengths(n)), "{how}");
        assert!(r.refusal(7).is_none() && r.refusal(9).is_none(), "{how}");
        assert_eq!(t.seq(), 9, "{how}");
    });
    // Requests that are not HTTP/1.x are numbered 0 and never match.
    assert!(!FramingReport::default().conflicting_lengths(0));
}

#[test]
fn h2_preface_passes_through() {
    let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // A SETTINGS frame, then bytes that would look like a head with both lengths.
    stream.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    stream.extend_from_slice(
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    every_split(&stream, |t, r, how| {
        assert!(t.is_off(), "{how}");
        assert!(!t.in_head(), "{how}");
        assert_eq!(r.conflicting.load(Ordering::Relaxed), 0, "{how}");
    });
}

#[test]
fn head_split_across_reads_is_buffered_once() {
    let head = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Long: ".to_vec();
    let (mut t, r) = feed(&head, &[5, 20]);
    assert!(t.in_head());
    assert_eq!(t.partial, head, "the head so far, from its request line");
    t.observe(b"v\r\nContent-Length: 2\r\n", &r);
    assert!(t.in_head());
    t.observe(b"\r\nokGET /b HTTP/1.1\r\n", &r);
    assert!(t.in_head(), "the second head has begun");
    assert_eq!(t.seq(), 2);
    assert_eq!(t.partial, b"GET /b HTTP/1.1\r\n");
    t.observe(b"\r\n", &r);
    assert_eq!(t.state, State::Idle);
    assert!(
        t.partial.capacity() > 0,
        "the buffer is kept for the next head"
    );
}

#[test]
fn head_over_the_limit_is_left_to_hyper() {
    let mut t = FramingTracker::new(64);
    let r = FramingReport::default();
    t.observe(b"GET / HTTP/1.1\r\n", &r);
    t.observe(&[b'a'; 64], &r);
    assert!(t.is_off());
    assert!(t.partial.capacity() == 0);
}

#[test]
fn malformed_chunks_are_the_clients_fault() {
    let cases: [(&[u8], &str); 6] = [
        (b"zz\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
        (b"5 5\r\nhello\r\n", "invalid chunk size"),
        (
            b"5\r\nhelloXX0\r\n\r\n",
            "malformed chunk delimiter or trailer",
        ),
        (b"5;a\nb\r\n", "malformed chunk delimiter or trailer"),
        (b"10000000000000000\r\n", "chunk size overflows 64 bits"),
        (b"0\r\n\rX", "malformed chunk delimiter or trailer"),
    ];
    for (body, why) in cases {
        let stream = [
            &b"GET /ok HTTP/1.1\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            body,
        ]
        .concat();
        every_split(&stream, |t, r, how| {
            assert_eq!(r.malformed_body(2), Some(why), "{body:?} {how}");
            assert_eq!(r.malformed_body(1), None, "{body:?} {how}");
            assert!(r.refusal(2).is_some());
            assert!(t.is_off(), "{body:?} {how}");
        });
    }
    let mut ext = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
    ext.resize(ext.len() + CHUNK_EXTENSIONS_LIMIT as usize, b'x');
    let (_, r) = feed(&ext, &[]);
    assert_eq!(r.malformed_body(1), Some("chunk extensions over 16 KiB"));
}

#[test]
fn framing_hyper_refuses_stops_tracking() {
    for head in [
        "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET / HTTP/1.1\r\nx-folded: a\r\n b\r\n\r\n",
        "GET / HTTP/1.1\r\nContent-Length : 0\r\n\r\n",
    ] {
        let (t, r) = feed(head.as_bytes(), &[]);
        assert!(t.is_off(), "{head:?}");
        assert!(!r.conflicting_lengths(1), "{head:?}");
    }
    // Same lengths twice is fine (hyper agrees).
    let (t, _) = feed(
        b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        &[],
    );
    assert_eq!(t.state, State::Idle);
}

#[test]
fn responses_say_why_and_close() {
    let r = conflicting_lengths_response();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.headers()["connection"], "close");
    let ProxyBody::Text(Some(b)) = r.body() else {
        panic!()
    };
    assert!(std::str::from_utf8(b)
        .unwrap()
        .starts_with("request has both Content-Length and Transfer-Encoding"));
    let r = malformed_body_response("invalid chunk size");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.headers()["connection"], "close");
}

fn wrapped(
    timeout: Duration,
) -> (
    RequestFraming<tokio::io::DuplexStream, FramingReport>,
    tokio::io::DuplexStream,
) {
    let (server, client) = tokio::io::duplex(1 << 16);
    let io = RequestFraming::new(server, Arc::new(FramingReport::default()), timeout, MAX);
    (io, client)
}

#[tokio::test(start_paused = true)]
async fn slow_head_times_out() {
    let (mut io, mut client) = wrapped(Duration::from_secs(1));
    let mut buf = [0u8; 256];
    client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    let n = io.read(&mut buf).await.unwrap();
    assert_eq!(n, 18);
    let started = Instant::now();
    // Bytes keep coming, but the head does not end.
    client.write_all(b"s").await.unwrap();
    assert_eq!(io.read(&mut buf).await.unwrap(), 1);
    let e = tokio::time::timeout(Duration::from_secs(30), io.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(
        e.to_string().contains("limits.http.header_read_timeout"),
        "{e}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn idle_keep_alive_is_not_timed() {
    let (mut io, mut client) = wrapped(Duration::from_secs(1));
    let mut buf = [0u8; 256];
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(io.read(&mut buf).await.unwrap(), 18);
    // Waiting for the next request: no timer, however long.
    assert!(
        tokio::time::timeout(Duration::from_secs(60), io.read(&mut buf))
            .await
            .is_err()
    );
    // A head that arrives whole is not timed either; the next slow one is, from its start.
    client.write_all(b"GET /2 HTTP/1.1\r\n\r\nG").await.unwrap();
    assert_eq!(io.read(&mut buf).await.unwrap(), 20);
    let started = Instant::now();
    let e = io.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
}

/// The tracker numbers requests exactly as hyper delivers them: the pipelined stream
/// through a real hyper server, each request checked against the report when it arrives.
#[tokio::test]
async fn hyper_sees_the_same_requests() {
    use http_body_util::BodyExt as _;
    let (server, mut client) = tokio::io::duplex(1 << 16);
    let report = Arc::new(FramingReport::default());
    let io = RequestFraming::new(server, Arc::clone(&report), Duration::from_secs(5), MAX);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let service = {
        let (report, seen) = (Arc::clone(&report), Arc::clone(&seen));
        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let seq = report.next_request();
            let conflicting = report.conflicting_lengths(seq);
            let seen = Arc::clone(&seen);
            async move {
                let path = req.uri().path().to_owned();
                let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
                seen.lock()
                    .unwrap()
                    .push((seq, path, conflicting, body.ok()));
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                    bytes::Bytes,
                >::new()))
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let stream = [
        &pipelined()[..],
        b"POST /h HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"3\r\nabc\r\n0\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
    ]
    .concat();
    let client = async move {
        client.write_all(&stream).await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
    };
    let (served, ()) = tokio::join!(conn, client);
    served.unwrap();
    let seen = seen.lock().unwrap().clone();
    let paths: Vec<&str> = seen.iter().map(|(_, p, _, _)| p.as_str()).collect();
    assert_eq!(paths, ["/a", "/b", "/c", "/d", "/e", "/f", "/g", "/h"]);
    let flagged: Vec<u64> = seen.iter().filter(|s| s.2).map(|s| s.0).collect();
    assert_eq!(flagged, [8]);
    let bodies: Vec<Option<usize>> = seen.iter().map(|s| s.3).collect();
    assert_eq!(
        bodies,
        [0, 5, 15, 0, 0, 0, 0, 3].map(Some),
        "hyper framed the bodies as the tracker did"
    );
}
