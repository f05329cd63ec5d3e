//! SVID rotation under load (issue #5, scenario 1), with real processes: the control plane
//! rotates every SVID about once a second (10 s lifetime) for 30 s while four app connections
//! send requests through app A → sidecar A → sidecar B → app B.
//!
//! ```text
//!  load (4 × app A) ──http/1.1──▶ sidecar A ══ one pooled mTLS h2 connection ══▶ sidecar B ──▶ app B
//!  held: one h2-over-mTLS connection to B's inbound, opened before the first rotation
//!  probes: a fresh mTLS handshake with B's inbound every 250 ms (which serial does B present?)
//! ```
//!
//! Asserts: no request fails; fresh handshakes see many different serials (and never an
//! expired certificate); the connection opened before the rotations still carries a request
//! at the end; sidecar A opened no new upstream connection while B's certificate changed
//! under it. Prints sent/failed/p99 and the rotations counted. Run with `--nocapture`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, ensure, Context as _};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use trellis_identity::tls::PeerMatch;
use trellis_identity::{SpiffeId, Svid, TrustBundle};
use trellis_tests::app_client::{echo_json, get_once, Proto};
use trellis_tests::load::{Load, LoadOpts};
use trellis_tests::mesh::{Mesh, MeshOpts, B_ID};
use trellis_tests::{
    e2e, eventually, fetch_svid, peer_leaf, serial_of, tls_client_config, tls_connect,
    ControlPlane, ControlPlaneOpts,
};

/// How long SVIDs keep rotating under load.
const ROTATING_FOR: Duration = Duration::from_secs(30);
/// Time between two probe handshakes.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Fewer distinct serials than this in 30 s of 1 s rotations means rotation did not reach
/// new handshakes (a loaded machine still manages many more).
const MIN_SERIALS: usize = 5;
const ROTATIONS: &str = "trellis_svid_rotations_total";
const UPSTREAM_CONNECTIONS: &str = "trellis_upstream_connections_total";

/// A client SVID for the test's own mTLS connections to B, renewed (with a fresh join token)
/// when it has less than 3 s left: SVIDs live 10 s here.
struct ClientIdentity {
    id: String,
    svid: Svid,
    bundle: TrustBundle,
}

impl ClientIdentity {
    async fn fetch(cp: &ControlPlane, id: &str) -> anyhow::Result<Self> {
        let token = cp.create_token(id, "1h")?;
        let (svid, bundle) = fetch_svid(cp, &token).await?;
        Ok(ClientIdentity {
            id: id.to_string(),
            svid,
            bundle,
        })
    }

    async fn fresh(&mut self, cp: &ControlPlane) -> anyhow::Result<()> {
        let left = self
            .svid
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if left < Duration::from_secs(3) {
            *self = Self::fetch(cp, &self.id).await?;
        }
        Ok(())
    }

    fn config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        tls_client_config(
            self.bundle.clone(),
            PeerMatch::Exact(SpiffeId::parse(B_ID).map_err(|e| anyhow!("{e}"))?),
            Some(&self.svid),
            &[b"h2"],
        )
    }
}

/// An h2 connection straight to B's inbound over mTLS, kept open across the rotations.
struct HeldConn {
    sender: http2::SendRequest<Empty<bytes::Bytes>>,
    /// The serial B presented when it was opened.
    serial: String,
}

impl HeldConn {
    async fn open(addr: SocketAddr, client: &ClientIdentity) -> anyhow::Result<Self> {
        let tls = tls_connect(addr, client.config()?).await?;
        let serial = serial_of(&peer_leaf(&tls)?)?;
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(HeldConn { sender, serial })
    }

    /// `GET path` on the held connection; must be app B's echo.
    async fn get(&mut self, path: &str) -> anyhow::Result<()> {
        let req = http::Request::get(format!("http://b{path}")).body(Empty::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req))
            .await
            .context("held connection: no answer within 10s")??;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        ensure!(
            status == http::StatusCode::OK,
            "held connection: {status} {}",
            String::from_utf8_lossy(&body)
        );
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        ensure!(
            v["app"] == "app-b",
            "held connection: not app B's echo: {v}"
        );
        Ok(())
    }
}

/// One fresh handshake with B's inbound: the serial B presented. Its certificate must be
/// B's (the verifier checks the SPIFFE ID) and unexpired.
async fn probe(addr: SocketAddr, client: &ClientIdentity) -> anyhow::Result<String> {
    let tls = tls_connect(addr, client.config()?).await?;
    let leaf = peer_leaf(&tls)?;
    let facts = trellis_identity::cert_facts(&leaf).map_err(|e| anyhow!("{e}"))?;
    ensure!(
        facts.not_after > SystemTime::now(),
        "B presented an expired certificate (serial {})",
        facts.serial_hex
    );
    Ok(facts.serial_hex)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_rotation_every_second_under_load_drops_nothing() -> anyhow::Result<()> {
    e2e(async {
        // 10 s is the shortest SVID lifetime `trellis control` accepts; the sidecars' expiry
        // margin must be shorter than that or /ready never says ready.
        let margin = vec!["--expiry-margin".to_string(), "2s".to_string()];
        let mesh = Mesh::start(MeshOpts {
            control: ControlPlaneOpts {
                svid_ttl: Some("10s".into()),
                rotate_every: Some("1s".into()),
                ..Default::default()
            },
            a_args: margin.clone(),
            b_args: margin,
            ..Default::default()
        })
        .await?;
        let outbound = mesh.a.outbound();
        eventually(Duration::from_secs(30), "a first request A → B", || async {
            echo_json(&get_once(outbound, Proto::H1, "b", "/warmup", &[]).await?).map(|_| ())
        })
        .await?;

        let mut client = ClientIdentity::fetch(&mesh.cp, "spiffe://example.org/ns/demo/sa/probe").await?;
        let mut held = HeldConn::open(mesh.b.addrs.inbound, &client).await?;
        held.get("/held/before").await?;
        let upstream_before = mesh.a.metrics().await?.sum(UPSTREAM_CONNECTIONS, &[]);
        let rotations_before = mesh.b.metrics().await?.sum(ROTATIONS, &[]);

        let load = Load::start(LoadOpts::new(outbound, "b", "app-b"));
        let event = load.mark("rotating");
        let started = Instant::now();
        let mut serials = BTreeSet::new();
        let mut probes = 0usize;
        let mut probe_errors = Vec::new();
        while started.elapsed() < ROTATING_FOR {
            client.fresh(&mesh.cp).await?;
            probes += 1;
            match probe(mesh.b.addrs.inbound, &client).await {
                Ok(serial) => {
                    serials.insert(serial);
                }
                Err(e) => probe_errors.push(format!(
                    "+{:.1}s: {e:#}",
                    started.elapsed().as_secs_f64()
                )),
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        load.end(event);
        let held_result = held.get("/held/after").await;
        let report = load.stop().await;

        let (ma, mb) = (mesh.a.metrics().await?, mesh.b.metrics().await?);
        let upstream_after = ma.sum(UPSTREAM_CONNECTIONS, &[]);
        let certs = mesh.b.admin_get("/certs").await?;
        let b_serial_now = serde_json::from_slice::<serde_json::Value>(&certs.body)?["svid"]
            ["serial"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let rotations_b = mb.sum(ROTATIONS, &[]) - rotations_before;
        report.print("svid rotation (1s, 30s)");
        println!(
            "[rotation] sidecar B rotations during the run: {rotations_b}; sidecar A rotations in total: {}; \
             fresh handshakes with B: {probes}, distinct serials seen: {}; \
             sidecar A upstream connections: {upstream_before} before, {upstream_after} after; \
             held connection (opened on serial {}…) still answers: {}",
            ma.sum(ROTATIONS, &[]),
            serials.len(),
            &held.serial[..8.min(held.serial.len())],
            held_result.is_ok(),
        );

        report.assert_no_failures()?;
        ensure!(
            probe_errors.is_empty(),
            "{} of {probes} fresh handshakes with B failed:\n{}",
            probe_errors.len(),
            probe_errors.join("\n")
        );
        held_result.context("the connection opened before the rotations")?;
        ensure!(
            serials.len() >= MIN_SERIALS,
            "fresh handshakes saw only {} serial(s) in {ROTATING_FOR:?} of 1s rotations: {serials:?}",
            serials.len()
        );
        ensure!(
            b_serial_now != held.serial,
            "B still presents serial {b_serial_now}, the one the held connection was opened on"
        );
        ensure!(
            rotations_b >= MIN_SERIALS as f64,
            "sidecar B counted only {rotations_b} rotations"
        );
        ensure!(
            upstream_after == upstream_before,
            "sidecar A opened {} new upstream connection(s) while B rotated (rotation must not \
             drop pooled connections)",
            upstream_after - upstream_before
        );
        Ok(())
    })
    .await
}
