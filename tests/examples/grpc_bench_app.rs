//! The gRPC app behind the benchmark's gRPC unary point (`tests/bench/run.sh`): a tonic
//! server on one current-thread runtime (like the HTTP backend, one nginx worker), so the
//! proxies, not the app, are what the point compares. A Python `grpcio` server answered
//! ~700 calls/s on the shared 2-core machine: every path would have measured the app.
//!
//! ```sh
//! cargo build --release -p trellis-tests --example grpc_bench_app
//! target/release/examples/grpc_bench_app    # prints "listening 127.0.0.1:PORT"
//! ```
//!
//! `bench.Echo/Unary` answers its request bytes unchanged; `bench.Echo/Served` answers the
//! number of `Unary` calls answered so far (decimal text), so the harness can check that the
//! calls h2load counted reached the app: h2load judges a call by its HTTP status, and a gRPC
//! error is an HTTP 200 too.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tower::service_fn;
use trellis_tests::grpc::RawCodec;

/// Service `bench.Echo`; `served` counts answered `Unary` calls.
#[derive(Clone, Default)]
struct Echo {
    served: Arc<AtomicU64>,
}

impl NamedService for Echo {
    const NAME: &'static str = "bench.Echo";
}

impl tower::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let served = self.served.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(match req.uri().path() {
                "/bench.Echo/Unary" => {
                    let echo = service_fn(move |r: Request<Bytes>| {
                        served.fetch_add(1, Ordering::Relaxed);
                        async move { Ok::<_, Status>(Response::new(r.into_inner())) }
                    });
                    grpc.unary(echo, req).await
                }
                "/bench.Echo/Served" => {
                    let n = served.load(Ordering::Relaxed).to_string();
                    let count = service_fn(move |_: Request<Bytes>| {
                        let n = Bytes::from(n.clone());
                        async move { Ok::<_, Status>(Response::new(n)) }
                    });
                    grpc.unary(count, req).await
                }
                other => Status::unimplemented(other.to_owned()).into_http(),
            })
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(Echo::default())
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
