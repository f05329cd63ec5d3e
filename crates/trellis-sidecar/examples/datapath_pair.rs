//! A quick load target for the data path: a test CA, a backend app, and a sidecar pair
//! (outbound A → mTLS h2 → inbound B → backend), each sidecar on its own OS thread with a
//! single-threaded tokio runtime, so `/proc/<pid>/task/<tid>/stat` gives each one's CPU.
//!
//! ```sh
//! cargo run --release -p trellis-sidecar --example datapath_pair -- 30 &
//! wrk -t2 -c64 -d10s -H 'Host: b' http://<printed outbound address>/
//! ```
//!
//! Prints the addresses, then every 5 s the cumulative CPU milliseconds of A, B and the backend,
//! and A's request count, so CPU per request = ΔCPU / Δrequests. Runs for the given seconds.
#![allow(clippy::unwrap_used)] // example code

use std::convert::Infallible;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use trellis_identity::testca::TestCa;
use trellis_identity::tls::TlsPolicy;
use trellis_identity::{SpiffeId, TrustDomain};
use trellis_sidecar::config::{FilesFile, IdentitySource, Protocol, Upstream};
use trellis_sidecar::inbound::InboundProxy;
use trellis_sidecar::metrics::SidecarMetrics;
use trellis_sidecar::outbound::OutboundProxy;
use trellis_sidecar::{drain, SidecarSettings, SvidStore};

// The allocator the `trellis` binary is recommended to use: with glibc malloc, malloc/free and
// `malloc_consolidate` showed up at ~10% of the sidecars' CPU.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn settings(app: std::net::SocketAddr, upstreams: Vec<Upstream>) -> SidecarSettings {
    let any = "127.0.0.1:0".parse().unwrap();
    SidecarSettings {
        trust_domain: TrustDomain::parse("example.org").unwrap(),
        identity: IdentitySource::Files(FilesFile {
            cert: "-".into(),
            key: "-".into(),
            bundle: "-".into(),
        }),
        inbound_listen: any,
        app,
        inbound_tcp: vec![],
        headers_with_underscores: Default::default(),
        app_protocol: Default::default(),
        outbound_listen: any,
        upstreams,
        default_route: None,
        resolve_ttl: trellis_sidecar::config::defaults::RESOLVE_TTL,
        admin: any,
        tls_policy: TlsPolicy::Tls13,
        tls_key_exchange: Default::default(),
        drain_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(30),
        expiry_margin: Duration::from_secs(60),
        policy: None,
        access_log: false,
        limits: Default::default(),
        workload_api_socket: None,
        workers: trellis_serve::Workers::single(),
    }
}

fn thread_cpu_ms(tid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3; utime, stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() * 10 // USER_HZ = 100
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn current_tid() -> u32 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `f` on a new OS thread with a current-thread runtime; sends back the thread id.
fn spawn_runtime<F, Fut>(name: &str, f: F) -> u32
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            tx.send(current_tid()).unwrap();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f());
        })
        .unwrap();
    rx.recv().unwrap()
}

fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let ca = Arc::new(TestCa::root("example.org"));

    // Backend: HTTP/1.1 keep-alive, "ok".
    let (addr_tx, addr_rx) = mpsc::channel();
    let backend_tid = spawn_runtime("backend", move || async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addr_tx.send(listener.local_addr().unwrap()).unwrap();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"ok\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let backend = addr_rx.recv().unwrap();
    println!("rss_kb with_backend={}", rss_kb());

    let store = |path: &str| {
        let metrics = Arc::new(SidecarMetrics::new());
        let store = SvidStore::new(ca.bundle(), None, metrics.clone());
        store
            .install(ca.svid(path), ca.bundle(), SystemTime::now())
            .unwrap();
        (store, metrics)
    };
    let (b_store, b_metrics) = store("/bench/b");
    let (a_store, a_metrics) = store("/bench/a");

    let (tx, rx) = mpsc::channel();
    let b_tid = spawn_runtime("sidecar-b", move || async move {
        let inbound = InboundProxy::bind(&settings(backend, vec![]), b_store, b_metrics)
            .await
            .unwrap();
        tx.send(inbound.local_addr()).unwrap();
        let (_signal, drain) = drain::channel();
        inbound.run(drain).await;
    });
    let inbound_addr = rx.recv().unwrap();
    println!("rss_kb with_inbound={}", rss_kb());

    let (tx, rx) = mpsc::channel();
    let a_metrics_main = a_metrics.clone();
    let a_tid = spawn_runtime("sidecar-a", move || async move {
        let upstream = Upstream {
            name: "b".into(),
            listen: None,
            hosts: vec!["b".into()],
            address: inbound_addr.to_string(),
            identity: SpiffeId::parse("spiffe://example.org/bench/b").unwrap(),
            protocol: Protocol::Http,
        };
        let outbound = OutboundProxy::bind(&settings(backend, vec![upstream]), a_store, a_metrics)
            .await
            .unwrap();
        tx.send(outbound.local_addrs()).unwrap();
        let (_signal, drain) = drain::channel();
        outbound.run(drain).await;
    });
    let outbound_addrs = rx.recv().unwrap();
    println!("rss_kb with_outbound={}", rss_kb());
    println!("backend {backend}");
    println!("inbound {inbound_addr}");
    println!("outbound {}", outbound_addrs[0].1);
    let requests = || {
        let text = a_metrics_main.encode();
        text.lines()
            .filter(|l| l.starts_with("trellis_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    for _ in 0..seconds.div_ceil(5) {
        std::thread::sleep(Duration::from_secs(5));
        println!(
            "cpu_ms A={} B={} backend={} requests={}",
            thread_cpu_ms(a_tid),
            thread_cpu_ms(b_tid),
            thread_cpu_ms(backend_tid),
            requests()
        );
    }
}
