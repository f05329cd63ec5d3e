//! Fresh-handshake probes: a new mTLS connection to a sidecar's inbound for every probe, then
//! one HTTP/2 request on it. Requests over a pooled connection opened before an event (a CA
//! rotation, a control-plane outage) prove nothing about certificates: nothing re-checks
//! them on a connection that is already up. A fresh handshake verifies the certificate the
//! sidecar presents *now* against the bundle in force *now*, and makes the sidecar verify a
//! freshly issued client SVID.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, ensure, Context as _};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use trellis_identity::tls::PeerMatch;
use trellis_identity::{SpiffeId, Svid, TrustBundle};

use crate::{fetch_svid, peer_leaf, tls_client_config, tls_connect, ControlPlane};

/// A client SVID for the probes, renewed with a fresh join token when it has less than
/// `renew_below` left.
pub struct ProbeClient {
    id: String,
    svid: Svid,
    renew_below: Duration,
}

/// What one successful probe saw.
#[derive(Debug, Clone)]
pub struct ProbeSeen {
    /// When the probe started.
    pub at: Instant,
    /// Issuer subject of the certificate the sidecar presented.
    pub issuer: String,
    /// Its serial, lowercase hex.
    pub serial: String,
}

/// Every probe of a run.
#[derive(Debug, Default)]
pub struct ProbeRun {
    /// Successful probes.
    pub ok: Vec<ProbeSeen>,
    /// Failed probes: seconds since the run started and why.
    pub failed: Vec<String>,
}

impl ProbeRun {
    /// Probes attempted.
    pub fn attempted(&self) -> usize {
        self.ok.len() + self.failed.len()
    }

    /// Errors unless at least `min` probes ran and none failed.
    pub fn assert_all_ok(&self, min: usize) -> anyhow::Result<()> {
        ensure!(
            self.failed.is_empty(),
            "{} of {} fresh handshakes failed:\n{}",
            self.failed.len(),
            self.attempted(),
            self.failed.join("\n")
        );
        ensure!(
            self.attempted() >= min,
            "only {} fresh handshakes ran, want at least {min}",
            self.attempted()
        );
        Ok(())
    }
}

impl ProbeClient {
    /// Fetches a first SVID for `id` from `cp` (join token attestation).
    pub async fn fetch(cp: &ControlPlane, id: &str, renew_below: Duration) -> anyhow::Result<Self> {
        let token = cp.create_token(id, "1h")?;
        let (svid, _) = fetch_svid(cp, &token).await?;
        Ok(ProbeClient {
            id: id.to_owned(),
            svid,
            renew_below,
        })
    }

    /// Renews the SVID if it is about to expire.
    pub async fn fresh(&mut self, cp: &ControlPlane) -> anyhow::Result<()> {
        let left = self
            .svid
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if left < self.renew_below {
            *self = Self::fetch(cp, &self.id, self.renew_below).await?;
        }
        Ok(())
    }

    /// One fresh mTLS handshake with `addr`, which must present `expect_id` verified by
    /// `bundle`, then `GET /probe` on it, which must be answered by `expect_app`'s echo.
    pub async fn probe(
        &self,
        bundle: TrustBundle,
        addr: SocketAddr,
        expect_id: &str,
        expect_app: &str,
    ) -> anyhow::Result<ProbeSeen> {
        let at = Instant::now();
        let expected = SpiffeId::parse(expect_id).map_err(|e| anyhow!("{e}"))?;
        let config = tls_client_config(
            bundle,
            PeerMatch::Exact(expected),
            Some(&self.svid),
            &[b"h2"],
        )?;
        let tls = tls_connect(addr, config).await?;
        let facts = trellis_identity::cert_facts(&peer_leaf(&tls)?).map_err(|e| anyhow!("{e}"))?;
        ensure!(
            facts.not_after > SystemTime::now(),
            "{addr} presented an expired certificate (serial {})",
            facts.serial_hex
        );
        let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = http::Request::get("http://probe/probe").body(Empty::<bytes::Bytes>::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .context("no answer within 10s")??;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        ensure!(
            status == http::StatusCode::OK,
            "{status} {}",
            String::from_utf8_lossy(&body)
        );
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        ensure!(v["app"] == expect_app, "not {expect_app}'s echo: {v}");
        Ok(ProbeSeen {
            at,
            issuer: facts.issuer,
            serial: facts.serial_hex,
        })
    }

    /// Probes `addr` every `every` for `how_long`, verifying with `bundle`, without renewing
    /// the client SVID (for when the control plane is away); adds the outcomes to `run`.
    #[allow(clippy::too_many_arguments)]
    pub async fn probe_for(
        &self,
        bundle: &TrustBundle,
        addr: SocketAddr,
        expect_id: &str,
        expect_app: &str,
        every: Duration,
        how_long: Duration,
        run: &mut ProbeRun,
    ) {
        let started = Instant::now();
        while started.elapsed() < how_long {
            match self
                .probe(bundle.clone(), addr, expect_id, expect_app)
                .await
            {
                Ok(seen) => run.ok.push(seen),
                Err(e) => run
                    .failed
                    .push(format!("+{:.1}s: {e:#}", started.elapsed().as_secs_f64())),
            }
            tokio::time::sleep(every.min(how_long.saturating_sub(started.elapsed()))).await;
        }
    }

    /// Probes `addr` every `every` until `stop` resolves, verifying with the control plane's
    /// `bundle.pem` of the moment; renews the client SVID as needed (a renewal failure counts
    /// as a failed probe).
    pub async fn run_until(
        &mut self,
        cp: &ControlPlane,
        addr: SocketAddr,
        expect_id: &str,
        expect_app: &str,
        every: Duration,
        stop: &tokio::sync::Notify,
    ) -> ProbeRun {
        let started = Instant::now();
        let mut run = ProbeRun::default();
        loop {
            let result = match self.fresh(cp).await {
                Ok(()) => match cp.bundle() {
                    Ok(bundle) => self.probe(bundle, addr, expect_id, expect_app).await,
                    Err(e) => Err(e.context("reading the control plane's bundle.pem")),
                },
                Err(e) => Err(e.context("renewing the probe's client SVID")),
            };
            match result {
                Ok(seen) => run.ok.push(seen),
                Err(e) => run
                    .failed
                    .push(format!("+{:.1}s: {e:#}", started.elapsed().as_secs_f64())),
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.notified() => return run,
            }
        }
    }
}
