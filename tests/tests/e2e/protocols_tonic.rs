//! gRPC between two tonic peers across the mesh (issue #15): a tonic server (the app, behind
//! sidecar B with `--app-protocol h2c` and a per-method policy) and a tonic client calling it
//! through sidecar A. The same cases as the grpcio test in `protocols`: unary, the three
//! streaming kinds, 3 MB each way, a per-method deny and a deadline, with the exact codes and
//! bytes asserted, and the app's own view (calls per method, cancellations) checked in-process.
//!
//! ```text
//!  tonic client ──h2c──▶ sidecar A ══ mTLS, HTTP/2 ══▶ sidecar B (--app-protocol h2c, policy) ──h2c──▶ tonic server
//! ```
//!
//! No generated code: messages are raw bytes ([`RawCodec`]), the server is a
//! hand-written `NamedService` dispatching on the path to `tonic::server::Grpc`, and the client
//! is `tonic::client::Grpc`, as generated code would use them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use http::uri::PathAndQuery;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};
use tower::service_fn;
use trellis_tests::echo::EchoApp;
use trellis_tests::grpc::RawCodec;
use trellis_tests::mesh::{A_ID, B_ID};
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{e2e, ControlPlane, ControlPlaneOpts};

/// Above tonic's 4 MiB default, so the 3 MB message plus the reply's suffix always fits.
const MAX_MESSAGE: usize = 16 << 20;

/// What the app saw: calls per method (counted before the handler runs) and `Slow` calls that
/// were dropped before they finished (the stream was reset or the deadline passed).
#[derive(Default)]
struct Seen {
    calls: Mutex<HashMap<String, u32>>,
    slow_cancelled: AtomicU32,
}

impl Seen {
    fn calls(&self, method: &str) -> u32 {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.get(method).copied().unwrap_or(0)
    }

    fn cancelled(&self) -> u32 {
        self.slow_cancelled.load(Ordering::SeqCst)
    }
}

/// Service `test.Echo`, as in `tests/fixtures/grpc_peer.py`:
/// `Unary` echoes the request plus `|xfcc=` and the `x-forwarded-client-cert` the app got;
/// `ServerStream` answers `0:req`, `1:req`, `2:req`; `ClientStream` answers
/// `count=N;bytes=M`; `Bidi` echoes each message as it arrives; `Admin` must never run (the
/// policy denies it); `Slow` sleeps 5 s unless cancelled.
#[derive(Clone, Default)]
struct EchoService {
    seen: Arc<Seen>,
}

impl NamedService for EchoService {
    const NAME: &'static str = "test.Echo";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for EchoService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let seen = self.seen.clone();
        Box::pin(async move {
            let method = req
                .uri()
                .path()
                .strip_prefix("/test.Echo/")
                .unwrap_or_default()
                .to_owned();
            *seen
                .calls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(method.clone())
                .or_default() += 1;
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            Ok(match method.as_str() {
                "Unary" => grpc.unary(service_fn(unary), req).await,
                "ServerStream" => grpc.server_streaming(service_fn(server_stream), req).await,
                "ClientStream" => grpc.client_streaming(service_fn(client_stream), req).await,
                "Bidi" => grpc.streaming(service_fn(bidi), req).await,
                "Admin" => grpc.unary(service_fn(admin), req).await,
                "Slow" => {
                    let slow = service_fn(move |_: Request<Bytes>| slow(seen.clone()));
                    grpc.unary(slow, req).await
                }
                _ => Status::unimplemented(method).into_http(),
            })
        })
    }
}

async fn unary(req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
    let xfcc = req
        .metadata()
        .get("x-forwarded-client-cert")
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    let mut reply = req.into_inner().to_vec();
    reply.extend_from_slice(b"|xfcc=");
    reply.extend_from_slice(&xfcc);
    Ok(Response::new(reply.into()))
}

type ReplyStream = tokio_stream::Iter<std::vec::IntoIter<Result<Bytes, Status>>>;

async fn server_stream(req: Request<Bytes>) -> Result<Response<ReplyStream>, Status> {
    let req = req.into_inner();
    let replies = (0..3)
        .map(|i| Ok([format!("{i}:").as_bytes(), &req[..]].concat().into()))
        .collect::<Vec<_>>();
    Ok(Response::new(tokio_stream::iter(replies)))
}

async fn client_stream(req: Request<Streaming<Bytes>>) -> Result<Response<Bytes>, Status> {
    let mut messages = req.into_inner();
    let (mut count, mut bytes) = (0, 0);
    while let Some(m) = messages.message().await? {
        count += 1;
        bytes += m.len();
    }
    Ok(Response::new(format!("count={count};bytes={bytes}").into()))
}

/// The request stream is the response stream: each message goes back as soon as it arrives.
async fn bidi(req: Request<Streaming<Bytes>>) -> Result<Response<Streaming<Bytes>>, Status> {
    Ok(Response::new(req.into_inner()))
}

async fn admin(_: Request<Bytes>) -> Result<Response<Bytes>, Status> {
    Ok(Response::new(Bytes::from_static(b"admin")))
}

/// Sleeps 5 s; if the call's future is dropped first (hyper drops it when the stream is reset,
/// tonic when the forwarded `grpc-timeout` passes), counts a cancellation.
async fn slow(seen: Arc<Seen>) -> Result<Response<Bytes>, Status> {
    struct Watch(Arc<Seen>, bool);
    impl Drop for Watch {
        fn drop(&mut self) {
            if !self.1 {
                self.0.slow_cancelled.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let mut watch = Watch(seen, false);
    tokio::time::sleep(Duration::from_secs(5)).await;
    watch.1 = true;
    Ok(Response::new(Bytes::from_static(b"late")))
}

fn method(name: &str) -> anyhow::Result<PathAndQuery> {
    Ok(format!("/test.Echo/{name}").parse()?)
}

/// A unary call with tonic's client; the status on failure.
async fn call(
    client: &mut tonic::client::Grpc<Channel>,
    name: &str,
    message: Bytes,
) -> anyhow::Result<Result<Bytes, Status>> {
    client.ready().await.context("channel not ready")?;
    let reply = client
        .unary(Request::new(message), method(name)?, RawCodec)
        .await;
    Ok(reply.map(Response::into_inner))
}

/// Waits up to 3 s for the app to have seen at least `want` cancelled `Slow` calls.
async fn wait_cancelled(seen: &Seen, want: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while seen.cancelled() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen.cancelled() >= want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tonic_calls_cross_the_mesh_with_grpc_errors() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let seen = Arc::new(Seen::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let app_addr: SocketAddr = listener.local_addr()?;
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(EchoService { seen: seen.clone() })
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let policy = cp.dir.path().join("policy-b.yaml");
        std::fs::write(&policy, super::protocols::GRPC_POLICY)?;
        let policy = policy.to_string_lossy().into_owned();
        let b = Sidecar::start(
            &cp,
            SidecarOpts::new("sidecar-b", B_ID, app_addr).args(&[
                "--policy",
                &policy,
                "--app-protocol",
                "h2c",
            ]),
        )
        .await?;
        let app_a = EchoApp::start("app-a").await?;
        let a = Sidecar::start(
            &cp,
            SidecarOpts::new("sidecar-a", A_ID, app_a.addr).upstream("b", b.addrs.inbound, B_ID),
        )
        .await?;

        // tonic's own transport to sidecar A's outbound port, `:authority: b` picking the upstream.
        let channel = Endpoint::from_shared(format!("http://{}", a.outbound()))?
            .origin("http://b".parse()?)
            .connect()
            .await?;
        let mut client = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);

        // Unary, and sidecar B's XFCC as the app received it.
        let reply = call(&mut client, "Unary", Bytes::from_static(b"hello")).await??;
        let reply = String::from_utf8_lossy(&reply);
        ensure!(
            reply.starts_with(&format!("hello|xfcc=By={B_ID};Hash="))
                && reply.ends_with(&format!(";URI={A_ID}")),
            "unary: {reply}"
        );

        // Server streaming.
        client.ready().await?;
        let mut replies = client
            .server_streaming(Request::new(Bytes::from_static(b"x")), method("ServerStream")?, RawCodec)
            .await?
            .into_inner();
        let mut got = Vec::new();
        while let Some(m) = replies.message().await? {
            got.push(m);
        }
        let want: [&[u8]; 3] = [b"0:x", b"1:x", b"2:x"];
        ensure!(got == want, "server streaming: {got:?}");

        // Client streaming.
        client.ready().await?;
        let reply = client
            .client_streaming(
                Request::new(tokio_stream::iter(vec![Bytes::from_static(b"abc"); 5])),
                method("ClientStream")?,
                RawCodec,
            )
            .await?
            .into_inner();
        ensure!(reply == "count=5;bytes=15", "client streaming: {reply:?}");

        // Bidirectional, in lock step: each message is sent only after the previous one came
        // back, so a sidecar that waited for the whole request stream would hang here.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        tx.send(Bytes::from_static(b"m0")).await?;
        client.ready().await?;
        let mut echoes = client
            .streaming(
                Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
                method("Bidi")?,
                RawCodec,
            )
            .await?
            .into_inner();
        for i in 0..4 {
            if i > 0 {
                tx.send(format!("m{i}").into()).await?;
            }
            let echo = tokio::time::timeout(Duration::from_secs(10), echoes.message())
                .await
                .with_context(|| format!("bidi: no echo of m{i} within 10 s"))??;
            ensure!(
                echo.as_deref() == Some(format!("m{i}").as_bytes()),
                "bidi: m{i} came back as {echo:?}"
            );
        }
        drop(tx);
        ensure!(
            echoes.message().await?.is_none(),
            "bidi: more messages after the client closed"
        );

        // 3 MB each way, byte for byte (a pattern, so a dropped or reordered chunk shows).
        let big: Bytes = (0..3_000_000u32)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect::<Vec<u8>>()
            .into();
        let reply = call(&mut client, "Unary", big.clone()).await??;
        ensure!(
            reply.len() > big.len() && reply[..big.len()] == big[..],
            "3 MB: {} bytes came back, not the 3,000,000 sent plus the XFCC suffix (or changed)",
            reply.len()
        );

        // A per-method deny: PERMISSION_DENIED naming the rule, and the app never runs it.
        let denied = call(&mut client, "Admin", Bytes::from_static(b"x")).await?;
        ensure!(
            matches!(&denied, Err(s) if s.code() == Code::PermissionDenied && s.message().contains("no-grpc-admin")),
            "denied: want PERMISSION_DENIED naming no-grpc-admin, got {denied:?}"
        );
        ensure!(seen.calls("Admin") == 0, "a denied call reached the app");

        // A deadline shorter than the handler: DEADLINE_EXCEEDED, and the app's call is
        // cancelled. tonic's `Channel` runs its own timer on `grpc-timeout` and reports its own
        // expiry as CANCELLED ("Timeout expired"), so this call goes through a bare hyper
        // HTTP/2 connection (as tonic's h2c example does): the code it gets is the sidecars'.
        let tcp = tokio::net::TcpStream::connect(a.outbound()).await?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await?;
        tokio::spawn(conn);
        let bare = service_fn(move |req: http::Request<tonic::body::Body>| {
            let mut sender = sender.clone();
            async move { sender.send_request(req).await }
        });
        let mut bare = tonic::client::Grpc::with_origin(bare, "http://b".parse()?);
        let mut request = Request::new(Bytes::from_static(b"x"));
        request.set_timeout(Duration::from_millis(400));
        let started = Instant::now();
        bare.ready().await?;
        let expired = tokio::time::timeout(
            Duration::from_secs(4),
            bare.unary(request, method("Slow")?, RawCodec),
        )
        .await
        .context("a call with a 400 ms deadline was still running after 4 s")?;
        let took = started.elapsed();
        ensure!(
            matches!(&expired, Err(s) if s.code() == Code::DeadlineExceeded),
            "deadline: want DEADLINE_EXCEEDED, got {expired:?}"
        );
        ensure!(took < Duration::from_secs(3), "deadline: answered after {took:?}");
        ensure!(
            wait_cancelled(&seen, 1).await,
            "the app never saw the expired call cancelled"
        );

        // A caller that gives up (no deadline; tonic drops the call, resetting the stream):
        // the reset crosses both sidecars and the app's handler is dropped, well before 5 s.
        let before = seen.cancelled();
        let calls = seen.calls("Slow");
        let gave_up = tokio::time::timeout(
            Duration::from_millis(500),
            call(&mut client, "Slow", Bytes::from_static(b"x")),
        )
        .await;
        ensure!(gave_up.is_err(), "Slow answered within 500 ms: {gave_up:?}");
        ensure!(seen.calls("Slow") == calls + 1, "the Slow call never reached the app");
        ensure!(
            wait_cancelled(&seen, before + 1).await,
            "the app's handler kept running after the caller reset the stream"
        );

        // The channel still works after the resets.
        let reply = call(&mut client, "Unary", Bytes::from_static(b"again")).await??;
        ensure!(reply.starts_with(b"again|xfcc="), "after the resets: {reply:?}");
        server.abort();
        Ok(())
    })
    .await
}
