//! Hostile and foreign peers against a sidecar's inbound mTLS listener, one test per input.
//!
//! The peer is mostly `openssl s_client` (a TLS stack that is not rustls), sometimes a
//! tokio-rustls client. The control plane signs with a CA made by `trellis ca init`, so the
//! test holds the intermediate's key and can mint leaves that chain to the real bundle but
//! break exactly one SVID rule.
//!
//! Every refusal is checked three ways: no HTTP response came back, sidecar B counted the
//! handshake failure under the expected `reason`, and app B never saw a request.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use http::{Request, StatusCode, Version};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;
use trellis_identity::tls::PeerMatch;
use trellis_identity::SpiffeId;
use trellis_tests::app_client::{echo_json, get_once, Proto};
use trellis_tests::mesh::{Mesh, MeshOpts, A_ID, B_ID};
use trellis_tests::openssl::{
    http_get_request, s_client_async, write_svid_pem, InitCa, LeafOpts, PemFiles, SClientRun,
};
use trellis_tests::{
    e2e, eventually, fetch_svid, tls_client_config, tls_connect, tool_or_skip, ControlPlaneOpts,
};

const CLIENT_ID: &str = "spiffe://example.org/test/client";
const WRONG_ID: &str = "spiffe://example.org/wrong";
const XFCC: &str = "x-forwarded-client-cert";

struct Fixture {
    mesh: Mesh,
    openssl: PathBuf,
    /// The CA the control plane signs with (`trellis ca init`).
    ca: InitCa,
    /// PEM files the test writes.
    pki: TempDir,
}

/// A mesh whose control plane signs with a `trellis ca init` CA; sidecar A also has upstream
/// `b-wrong` pointing at sidecar B but expecting [`WRONG_ID`]. `None` if openssl is missing
/// (outside CI only).
async fn fixture(test: &str) -> anyhow::Result<Option<Fixture>> {
    fixture_with(test, &[]).await
}

/// [`fixture`] with more arguments for sidecar B.
async fn fixture_with(test: &str, b_args: &[&str]) -> anyhow::Result<Option<Fixture>> {
    let Some(openssl) = tool_or_skip(test, "openssl") else {
        return Ok(None);
    };
    let pki = tempfile::tempdir()?;
    let ca = InitCa::create("example.org", &pki.path().join("ca"))?;
    let control = ControlPlaneOpts {
        extra_args: vec![
            "--ca-cert".into(),
            ca.intermediate().to_string_lossy().into_owned(),
            "--ca-key".into(),
            ca.intermediate_key().to_string_lossy().into_owned(),
            "--ca-bundle".into(),
            ca.bundle().to_string_lossy().into_owned(),
        ],
        ..Default::default()
    };
    let mesh = Mesh::start(MeshOpts {
        control,
        a_upstreams_to_b: vec![("b-wrong".into(), WRONG_ID.into())],
        b_args: b_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await?;
    Ok(Some(Fixture {
        mesh,
        openssl,
        ca,
        pki,
    }))
}

impl Fixture {
    /// `openssl s_client` to sidecar B's inbound listener with `args`, sending a GET for
    /// `path` (plus `headers`), verifying B's certificate against the control plane's bundle.
    async fn s_client(
        &self,
        args: &[String],
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<SClientRun> {
        let mut all = vec![
            "-CAfile".to_string(),
            self.mesh.cp.bundle_pem_path.to_string_lossy().into_owned(),
            "-verify_return_error".to_string(),
        ];
        all.extend_from_slice(args);
        s_client_async(
            &self.openssl,
            self.mesh.b.addrs.inbound,
            all,
            &http_get_request("b", path, headers),
        )
        .await
    }

    /// Sidecar B's `trellis_tls_handshakes_total{direction="inbound",result="error",reason}`.
    async fn inbound_errors(&self, reason: &str) -> anyhow::Result<f64> {
        Ok(self.mesh.b.metrics().await?.sum_or_zero(
            "trellis_tls_handshakes_total",
            &[
                ("direction", "inbound"),
                ("result", "error"),
                ("reason", reason),
            ],
        ))
    }

    /// A client SVID for [`CLIENT_ID`] from the control plane (key made by the control plane,
    /// as for a stock Envoy), written as PEM files.
    async fn client_svid_files(&self) -> anyhow::Result<(PemFiles, trellis_identity::Svid)> {
        let token = self.mesh.cp.create_token(CLIENT_ID, "1h")?;
        let (svid, _bundle) = fetch_svid(&self.mesh.cp, &token).await?;
        Ok((write_svid_pem(&svid, self.pki.path(), "client")?, svid))
    }

    /// Checks that `run` got no HTTP response, that B counted one more inbound handshake
    /// error under `reason` than `before` (any reason if `reason` is empty), and that app B
    /// saw nothing.
    async fn assert_refused(
        &self,
        what: &str,
        run: &SClientRun,
        reason: &str,
        before: f64,
    ) -> anyhow::Result<()> {
        ensure!(
            run.http_status().is_none(),
            "{what}: the request was answered:\n{}",
            run.describe()
        );
        eventually(
            Duration::from_secs(5),
            &format!("sidecar B to count the refusal under reason=\"{reason}\""),
            || async {
                let after = if reason.is_empty() {
                    self.mesh.b.metrics().await?.sum_or_zero(
                        "trellis_tls_handshakes_total",
                        &[("direction", "inbound"), ("result", "error")],
                    )
                } else {
                    self.inbound_errors(reason).await?
                };
                ensure!(
                    after > before,
                    "{what}: reason=\"{reason}\" stayed at {after}; handshake metrics:\n{}\n{}",
                    self.mesh
                        .b
                        .metrics()
                        .await?
                        .lines_of("trellis_tls_handshakes_total"),
                    run.describe()
                );
                Ok(())
            },
        )
        .await?;
        let seen = self.mesh.app_b.seen();
        ensure!(
            seen.is_empty(),
            "{what}: app B received {} request(s): {:?}",
            seen.len(),
            seen.first()
        );
        eprintln!(
            "{what}: refused; openssl said: {}",
            run.stderr
                .lines()
                .find(|l| l.contains("alert") || l.contains("error"))
                .unwrap_or("(no error line)")
        );
        Ok(())
    }

    /// Mints a leaf with `opts` under the control plane's own intermediate and checks that B
    /// refuses it with `reason`.
    async fn refuses_minted_leaf(
        &self,
        what: &str,
        opts: LeafOpts,
        reason: &str,
    ) -> anyhow::Result<()> {
        let files = self
            .ca
            .sign_leaf_with_rcgen(&opts, self.pki.path(), "minted")?;
        let before = self.inbound_errors(reason).await?;
        let run = self
            .s_client(
                &[&["-tls1_3".to_string()][..], &files.s_client_args()].concat(),
                "/minted",
                &[],
            )
            .await?;
        self.assert_refused(what, &run, reason, before).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejects_client_without_certificate() -> anyhow::Result<()> {
    e2e(async {
        let Some(f) = fixture("rejects_client_without_certificate").await? else {
            return Ok(());
        };
        let before = f.inbound_errors("no_cert").await?;
        let run = f.s_client(&["-tls1_3".into()], "/", &[]).await?;
        f.assert_refused("no client certificate", &run, "no_cert", before)
            .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejects_certificate_from_another_ca() -> anyhow::Result<()> {
    e2e(async {
        let Some(f) = fixture("rejects_certificate_from_another_ca").await? else {
            return Ok(());
        };
        // Same trust domain, same shape, but a CA the mesh has never trusted.
        let other = InitCa::create("example.org", &f.pki.path().join("other-ca"))?;
        let files = other.sign_leaf_with_openssl(
            &f.openssl,
            "spiffe://example.org/ns/demo/sa/a",
            f.pki.path(),
            "intruder",
        )?;
        let before = f.inbound_errors("unknown_ca").await?;
        let run = f
            .s_client(
                &[&["-tls1_3".to_string()][..], &files.s_client_args()].concat(),
                "/",
                &[],
            )
            .await?;
        f.assert_refused("certificate from another CA", &run, "unknown_ca", before)
            .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejects_tls12_under_tls13_policy() -> anyhow::Result<()> {
    e2e(async {
        let Some(f) = fixture("rejects_tls12_under_tls13_policy").await? else {
            return Ok(());
        };
        // A perfectly valid SVID: only the protocol version is wrong.
        let (files, _) = f.client_svid_files().await?;
        let before = f.inbound_errors("protocol_version").await?;
        let run = f
            .s_client(
                &[&["-tls1_2".to_string()][..], &files.s_client_args()].concat(),
                "/",
                &[],
            )
            .await?;
        f.assert_refused("TLS 1.2 client", &run, "protocol_version", before)
            .await?;
        ensure!(
            run.stderr.contains("protocol version"),
            "want a protocol_version alert:\n{}",
            run.describe()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accepts_valid_client_svid_over_tls13_and_replaces_its_xfcc() -> anyhow::Result<()> {
    e2e(async {
        let Some(f) = fixture("accepts_valid_client_svid_over_tls13_and_replaces_its_xfcc").await?
        else {
            return Ok(());
        };
        let (files, svid) = f.client_svid_files().await?;
        let leaf_hash = hex::encode(Sha256::digest(svid.chain()[0].as_ref()));
        let run = f
            .s_client(
                &[&["-tls1_3".to_string()][..], &files.s_client_args()].concat(),
                "/from-openssl",
                &[
                    (
                        XFCC,
                        "By=spiffe://example.org/x;URI=spiffe://example.org/admin",
                    ),
                    ("X-Forwarded-Client-Cert", "URI=spiffe://example.org/root"),
                ],
            )
            .await?;
        ensure!(
            run.http_status() == Some(200),
            "valid SVID over TLS 1.3 through openssl: want HTTP 200:\n{}",
            run.describe()
        );
        ensure!(
            run.stdout.contains("\"app\":\"app-b\""),
            "answer did not come from app B:\n{}",
            run.describe()
        );
        let seen = f
            .mesh
            .app_b
            .last_seen("/from-openssl")
            .context("app B never saw the request")?;
        let want = format!("By={B_ID};Hash={leaf_hash};URI={CLIENT_ID}");
        ensure!(
            seen.header_all(XFCC) == [want.as_str()],
            "app B saw XFCC {:?}, want [{want:?}]",
            seen.header_all(XFCC)
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejects_expired_certificate() -> anyhow::Result<()> {
    e2e(async {
        let Some(f) = fixture("rejects_expired_certificate").await? else {
            return Ok(());
        };
        let opts = LeafOpts {
            expired: true,
            ..LeafOpts::new(CLIENT_ID)
        };
        f.refuses_minted_leaf("expired SVID from the mesh's own CA", opts, "expired")
            .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejects_certificate_with_two_uri_sans() -> anyhow::Result<()> {
    e2e(async {
        let Some(f) = fixture("rejects_certificate_with_two_uri_sans").await? else {
            return Ok(());
        };
        let opts = LeafOpts {
            uris: vec![CLIENT_ID.into(), A_ID.into()],
            ..LeafOpts::new(CLIENT_ID)
        };
        f.refuses_minted_leaf("leaf with two URI SANs", opts, "not_svid")
            .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejects_certificate_from_another_trust_domain() -> anyhow::Result<()> {
    e2e(async {
        let Some(f) = fixture("rejects_certificate_from_another_trust_domain").await? else {
            return Ok(());
        };
        // Signed by the mesh's own intermediate, but the ID is in evil.org.
        f.refuses_minted_leaf(
            "leaf in trust domain evil.org",
            LeafOpts::new("spiffe://evil.org/ns/demo/sa/a"),
            "not_svid",
        )
        .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejects_ca_certificate_as_client() -> anyhow::Result<()> {
    e2e(async {
        let Some(f) = fixture("rejects_ca_certificate_as_client").await? else {
            return Ok(());
        };
        let opts = LeafOpts {
            is_ca: true,
            ..LeafOpts::new(CLIENT_ID)
        };
        f.refuses_minted_leaf("client certificate with cA=true", opts, "not_svid")
            .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_with_wrong_spiffe_id_gets_502_naming_both() -> anyhow::Result<()> {
    e2e(async {
        let Some(f) = fixture("peer_with_wrong_spiffe_id_gets_502_naming_both").await? else {
            return Ok(());
        };
        for proto in [Proto::H1, Proto::H2c] {
            let reply = get_once(f.mesh.a.outbound(), proto, "b-wrong", "/wrong", &[]).await?;
            let body = reply.text();
            ensure!(
                reply.status == StatusCode::BAD_GATEWAY && body.contains(WRONG_ID) && body.contains(B_ID),
                "{proto:?}: sidecar B presents {B_ID}, sidecar A expects {WRONG_ID}: want 502 naming both, got {}",
                reply.summary()
            );
            eprintln!("{proto:?}: 502 body: {}", body.trim());
        }
        ensure!(
            f.mesh.app_b.last_seen("/wrong").is_none(),
            "app B received a request over a connection whose identity check failed"
        );
        let a_metrics = f.mesh.a.metrics().await?;
        let wrong = a_metrics.sum(
            "trellis_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "error"), ("reason", "wrong_identity")],
        );
        ensure!(
            wrong >= 1.0,
            "sidecar A did not count an outbound wrong_identity failure:\n{}",
            a_metrics.lines_of("trellis_tls_handshakes_total")
        );
        // The right identity on the same address still works.
        let ok = get_once(f.mesh.a.outbound(), Proto::H1, "b", "/right", &[]).await?;
        echo_json(&ok)?;
        Ok(())
    })
    .await
}

/// A raw rustls peer (valid client SVID) speaking HTTP/1.1 and HTTP/2 straight to sidecar
/// B's inbound listener, forging XFCC: app B sees only the header sidecar B wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_mtls_peer_cannot_forge_xfcc() -> anyhow::Result<()> {
    e2e(async {
        let Some(f) = fixture("raw_mtls_peer_cannot_forge_xfcc").await? else {
            return Ok(());
        };
        let (_, svid) = f.client_svid_files().await?;
        let leaf_hash = hex::encode(Sha256::digest(svid.chain()[0].as_ref()));
        let want = format!("By={B_ID};Hash={leaf_hash};URI={CLIENT_ID}");
        let bundle = f.mesh.cp.bundle()?;
        for (alpn, path) in [(&b"http/1.1"[..], "/raw/h1"), (&b"h2"[..], "/raw/h2")] {
            let config = tls_client_config(
                bundle.clone(),
                PeerMatch::Exact(SpiffeId::parse(B_ID)?),
                Some(&svid),
                &[alpn],
            )?;
            let tls = tls_connect(f.mesh.b.addrs.inbound, config).await?;
            let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            ensure!(
                negotiated.as_deref() == Some(alpn),
                "offered ALPN {:?} only, sidecar B chose {:?}",
                String::from_utf8_lossy(alpn),
                negotiated.map(|a| String::from_utf8_lossy(&a).into_owned())
            );
            let io = TokioIo::new(tls);
            let req = |version: Version, uri: String| {
                Request::builder()
                    .uri(uri)
                    .version(version)
                    .header("host", "b")
                    .header(
                        XFCC,
                        "By=spiffe://example.org/x;URI=spiffe://example.org/admin",
                    )
                    .header(XFCC, "URI=spiffe://example.org/root")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
            };
            let resp = if alpn == b"h2" {
                let (mut tx, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                tx.send_request(req(Version::HTTP_2, format!("https://b{path}"))?)
                    .await?
            } else {
                let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(conn);
                tx.send_request(req(Version::HTTP_11, path.to_string())?)
                    .await?
            };
            let status = resp.status();
            let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
                .await
                .context("response body")??
                .to_bytes();
            ensure!(
                status == StatusCode::OK,
                "{path}: {status} {:?}",
                String::from_utf8_lossy(&body)
            );
            let seen = f
                .mesh
                .app_b
                .last_seen(path)
                .with_context(|| format!("app B never saw {path}"))?;
            ensure!(
                seen.header_all(XFCC) == [want.as_str()],
                "{path}: app B saw XFCC {:?}, want [{want:?}]",
                seen.header_all(XFCC)
            );
        }
        Ok(())
    })
    .await
}

/// `--tls-policy tls12+` adds TLS 1.2, but only with ECDHE-ECDSA AEAD suites: a TLS 1.2 client
/// offering only a CBC suite is refused, one offering AES-GCM gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls12_plus_policy_accepts_tls12_with_aead_suites_only() -> anyhow::Result<()> {
    e2e(async {
        let Some(f) = fixture_with(
            "tls12_plus_policy_accepts_tls12_with_aead_suites_only",
            &["--tls-policy", "tls12+"],
        )
        .await?
        else {
            return Ok(());
        };
        let (files, _) = f.client_svid_files().await?;
        let tls12 = |cipher: &str| {
            [
                &[
                    "-tls1_2".to_string(),
                    "-cipher".to_string(),
                    cipher.to_string(),
                ][..],
                &files.s_client_args(),
            ]
            .concat()
        };
        let before = f.mesh.b.metrics().await?.sum_or_zero(
            "trellis_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "error")],
        );
        let run = f
            .s_client(&tls12("ECDHE-ECDSA-AES128-SHA"), "/cbc", &[])
            .await?;
        f.assert_refused("TLS 1.2 with only a CBC suite", &run, "", before)
            .await?;

        let run = f
            .s_client(&tls12("ECDHE-ECDSA-AES128-GCM-SHA256"), "/gcm", &[])
            .await?;
        ensure!(
            run.http_status() == Some(200) && run.stdout.contains("TLSv1.2"),
            "TLS 1.2 + ECDHE-ECDSA-AES128-GCM-SHA256 under tls12+: want HTTP 200 over TLSv1.2:\n{}",
            run.describe()
        );
        ensure!(
            f.mesh.app_b.last_seen("/gcm").is_some(),
            "app B never saw the TLS 1.2 request"
        );
        Ok(())
    })
    .await
}

/// TLS 1.3 resumption with a foreign client: the second connection resumes the first one's
/// session (no certificate exchanged), and sidecar B still tells the app the same caller
/// identity and certificate hash as after the full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resumed_session_keeps_the_callers_identity() -> anyhow::Result<()> {
    e2e(async {
        let Some(f) = fixture("resumed_session_keeps_the_callers_identity").await? else {
            return Ok(());
        };
        let (files, svid) = f.client_svid_files().await?;
        let leaf_hash = hex::encode(Sha256::digest(svid.chain()[0].as_ref()));
        let want = format!("By={B_ID};Hash={leaf_hash};URI={CLIENT_ID}");
        let sess = f.pki.path().join("session.pem");
        let sess = sess.to_string_lossy().into_owned();
        let base = [&["-tls1_3".to_string()][..], &files.s_client_args()].concat();

        let full = f
            .s_client(
                &[&base[..], &["-sess_out".into(), sess.clone()]].concat(),
                "/full",
                &[],
            )
            .await?;
        ensure!(
            full.http_status() == Some(200) && full.stdout.contains("New, TLSv1.3"),
            "first connection: want a full TLS 1.3 handshake and HTTP 200:\n{}",
            full.describe()
        );
        let resumed = f
            .s_client(
                &[&base[..], &["-sess_in".into(), sess]].concat(),
                "/resumed",
                &[],
            )
            .await?;
        ensure!(
            resumed.http_status() == Some(200),
            "resumed connection: want HTTP 200:\n{}",
            resumed.describe()
        );
        ensure!(
            resumed.stdout.contains("Reused, TLSv1.3"),
            "sidecar B did not resume the TLS 1.3 session it issued a ticket for:\n{}",
            resumed.describe()
        );
        for path in ["/full", "/resumed"] {
            let seen = f
                .mesh
                .app_b
                .last_seen(path)
                .with_context(|| format!("app B never saw {path}"))?;
            ensure!(
                seen.header_all(XFCC) == [want.as_str()],
                "{path}: app B saw XFCC {:?}, want [{want:?}]",
                seen.header_all(XFCC)
            );
        }
        Ok(())
    })
    .await
}
