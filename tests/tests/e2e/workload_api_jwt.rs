//! JWT-SVIDs through the Workload API (issue #20, JWT half), with clients nobody here wrote:
//! the Rust `spiffe` crate (`WorkloadApiClient`, `JwtSource`, local `JwtSvid` validation) and
//! py-spiffe, plus raw gRPC calls and `trellis jwt inspect` for the refusals.
//!
//! ```text
//!  trellis control ─SDS + JwtSvidService (mTLS)─▶ sidecar ◀─unix─ spiffe crate / py-spiffe
//! ```

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use spiffe::{JwtSource, JwtSvid, SpiffeId, TrustDomain, WorkloadApiClient};
use trellis_identity::jwt::{JwtBundle, JwtKey};
use trellis_proto::workload::{JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest};
use trellis_tests::{e2e, run_with_timeout, ControlPlane, ControlPlaneOpts, COMMAND_TIMEOUT};

use crate::protocols::venv_python_with;
use crate::workload_api::{raw_client, sidecar_with_socket, with_header, ID};

/// The `kid` header of `token` (not verified).
fn kid_of(token: &str) -> anyhow::Result<String> {
    Ok(JwtSvid::parse_insecure(token)?.key_id().to_owned())
}

/// A JWT-SVID for `sub` signed by a key the control plane never had, and a JWKS with that key.
fn foreign_token(sub: &str, aud: &str, iat: u64, exp: u64) -> anyhow::Result<(String, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let point = key.public_key_raw();
    let kid = JwtKey::thumbprint(point)?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.clone());
    header.typ = Some("JWT".into());
    let claims = serde_json::json!({ "sub": sub, "aud": [aud], "iat": iat, "exp": exp });
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()),
    )?;
    let jwks = JwtBundle::new(
        trellis_identity::TrustDomain::parse("example.org")?,
        vec![JwtKey::from_point(kid, point)?],
    )
    .to_jwks();
    Ok((token, jwks))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The status of a refused call (`None` if it succeeded).
fn code<T>(r: Result<T, tonic::Status>) -> Option<(tonic::Code, String)> {
    r.err().map(|s| (s.code(), s.message().to_owned()))
}

type Raw = trellis_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
    tonic::transport::Channel,
>;

/// `ValidateJWTSVID` with the security header.
async fn validate(
    raw: &Raw,
    audience: &str,
    svid: &str,
) -> Result<tonic::Response<trellis_proto::workload::ValidateJwtsvidResponse>, tonic::Status> {
    raw.clone()
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: audience.into(),
            svid: svid.into(),
        }))
        .await
}

/// `trellis jwt inspect TOKEN --bundle PATH [extra]`: (exit code, stdout, stderr).
fn jwt_inspect(
    token: &str,
    bundle: &Path,
    extra: &[&str],
) -> anyhow::Result<(i32, String, String)> {
    let mut cmd = Command::new(trellis_tests::trellis_bin());
    cmd.args(["jwt", "inspect", token, "--bundle"])
        .arg(bundle)
        .args(extra);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_crate_fetches_and_validates_jwt_svids() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let (_sidecar, socket) = sidecar_with_socket(&cp, &[]).await?;
        let endpoint = format!("unix://{}", socket.display());
        let client = WorkloadApiClient::connect_to(&endpoint).await?;

        let started = Instant::now();
        let svid = client.fetch_jwt_svid(["db", "cache"], None).await?;
        println!("fetch_jwt_svid (first, minted): {:?}", started.elapsed());
        ensure!(
            svid.spiffe_id().to_string() == ID,
            "sub {}",
            svid.spiffe_id()
        );
        let aud: BTreeSet<&str> = svid.audience().iter().map(String::as_str).collect();
        ensure!(aud == BTreeSet::from(["cache", "db"]), "aud {aud:?}");

        // Cached per audience set until half its lifetime: the same token again, in any order.
        let started = Instant::now();
        let again = client.fetch_jwt_svid(["cache", "db"], None).await?;
        println!("fetch_jwt_svid (cached): {:?}", started.elapsed());
        ensure!(
            again.token() == svid.token(),
            "a second fetch minted a new token"
        );

        // The bundle has the key that signed it, and the crate verifies the token with it.
        let bundles = client.fetch_jwt_bundles().await?;
        let td = TrustDomain::new("example.org")?;
        let bundle = bundles.get(&td).context("no JWT bundle for example.org")?;
        ensure!(
            bundle.find_jwt_authority(svid.key_id()).is_some(),
            "kid {} not in the bundle",
            svid.key_id()
        );
        let local = JwtSvid::parse_and_validate(svid.token(), &bundles, &["db"])?;
        ensure!(local.spiffe_id().to_string() == ID);
        ensure!(
            JwtSvid::parse_and_validate(svid.token(), &bundles, &["web"]).is_err(),
            "the crate accepted an audience the token does not carry"
        );

        // And the sidecar's ValidateJWTSVID agrees.
        let validated = client.validate_jwt_token("db", svid.token()).await?;
        ensure!(validated.spiffe_id().to_string() == ID);
        let refused = client.validate_jwt_token("web", svid.token()).await;
        ensure!(refused.is_err(), "ValidateJWTSVID accepted audience `web`");

        // Asking for another identity than ours: PermissionDenied.
        let other = SpiffeId::new("spiffe://example.org/ns/demo/sa/other")?;
        let err = client
            .fetch_jwt_svid(["db"], Some(&other))
            .await
            .err()
            .context("a JWT-SVID for another SPIFFE ID")?;
        ensure!(
            format!("{err:?}").contains("PermissionDenied"),
            "other spiffe_id: {err:?}"
        );

        // JwtSource: the crate's watcher over FetchJWTBundles plus fetches.
        let source = JwtSource::builder().endpoint(&endpoint).build().await?;
        let from_source = source.fetch_jwt_svid(["db"]).await?;
        ensure!(from_source.spiffe_id().to_string() == ID);
        let set = source.bundle_set()?;
        JwtSvid::parse_and_validate(from_source.token(), set.as_ref(), &["db"])?;
        source.shutdown().await;

        // Counted and audited on the control plane, without the token.
        let metrics = cp.metrics().await?;
        let issued = metrics.sum("trellis_jwt_svids_issued_total", &[]);
        ensure!(issued >= 2.0, "trellis_jwt_svids_issued_total {issued}");
        let audit = std::fs::read_to_string(cp.state_dir.join("audit.log"))?;
        ensure!(
            audit.contains("\"event\":\"jwt_issued\""),
            "no jwt_issued line"
        );
        ensure!(!audit.contains(svid.token()), "the audit log holds a token");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_fetches_validates_and_reads_jwt_bundles() -> anyhow::Result<()> {
    e2e(async {
        let test = "py_spiffe_fetches_validates_and_reads_jwt_bundles";
        let Some(python) = venv_python_with(test, "spiffe") else {
            return Ok(());
        };
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let (_sidecar, socket) = sidecar_with_socket(&cp, &[]).await?;
        let mut cmd = Command::new(&python);
        cmd.arg(trellis_tests::workspace_root().join("tests/fixtures/spiffe_client.py"))
            .arg("jwt")
            .arg(&socket);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "spiffe_client.py jwt: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let got: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ensure!(got["spiffe_id"] == ID, "py-spiffe: {got}");
        ensure!(
            got["audience"] == serde_json::json!(["db"]),
            "py-spiffe: {got}"
        );
        ensure!(got["validate_db"] == ID, "validate `db`: {got}");
        let web = got["validate_web"].as_str().unwrap_or_default();
        ensure!(web.starts_with("refused"), "validate `web`: {web}");
        let token = got["token"].as_str().context("no token")?;
        let kid = kid_of(token)?;
        let kids = &got["bundles"]["example.org"];
        ensure!(
            kids.as_array()
                .is_some_and(|k| k.iter().any(|k| k == kid.as_str())),
            "py-spiffe bundles {kids} lack the token's kid {kid}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bad_input_is_refused_with_a_reason() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let (_sidecar, socket) = sidecar_with_socket(&cp, &[]).await?;
        let mut raw = raw_client(&socket).await?;

        // No security header: InvalidArgument, for all three methods.
        let (c, _) = code(
            raw.fetch_jwtsvid(JwtsvidRequest {
                audience: vec!["db".into()],
                spiffe_id: String::new(),
            })
            .await,
        )
        .context("FetchJWTSVID without header answered")?;
        ensure!(c == tonic::Code::InvalidArgument, "no header: {c:?}");
        let (c, _) = code(
            raw.fetch_jwt_bundles(JwtBundlesRequest {})
                .await
                .map(|_| ()),
        )
        .context("FetchJWTBundles without header answered")?;
        ensure!(c == tonic::Code::InvalidArgument, "no header: {c:?}");
        let (c, _) = code(
            raw.validate_jwtsvid(ValidateJwtsvidRequest {
                audience: "db".into(),
                svid: "x".into(),
            })
            .await,
        )
        .context("ValidateJWTSVID without header answered")?;
        ensure!(c == tonic::Code::InvalidArgument, "no header: {c:?}");

        // Bad audiences: none, empty, with whitespace.
        for (aud, want) in [
            (vec![], "no audience"),
            (vec![String::new()], "empty"),
            (vec!["a b".to_owned()], "whitespace"),
        ] {
            let (c, msg) = code(
                raw.fetch_jwtsvid(with_header(JwtsvidRequest {
                    audience: aud.clone(),
                    spiffe_id: String::new(),
                }))
                .await,
            )
            .with_context(|| format!("audience {aud:?} answered"))?;
            ensure!(
                c == tonic::Code::InvalidArgument && msg.contains(want),
                "audience {aud:?}: {c:?} {msg}"
            );
        }
        // A malformed spiffe_id.
        let (c, _) = code(
            raw.fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["db".into()],
                spiffe_id: "not-a-spiffe-id".into(),
            }))
            .await,
        )
        .context("bad spiffe_id answered")?;
        ensure!(c == tonic::Code::InvalidArgument, "bad spiffe_id: {c:?}");

        // A real token, and the JWT bundle as a file for `trellis jwt inspect`.
        let token = raw
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["db".into()],
                spiffe_id: String::new(),
            }))
            .await?
            .into_inner()
            .svids
            .remove(0)
            .svid;
        let bundles = raw
            .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
            .await?
            .into_inner()
            .message()
            .await?
            .context("no JWT bundle message")?;
        let jwks = bundles
            .bundles
            .get("spiffe://example.org")
            .context("no bundle for spiffe://example.org")?;
        let bundle_path = cp.dir.path().join("jwt-bundle.json");
        std::fs::write(&bundle_path, jwks)?;

        // The right audience: its SPIFFE ID and claims.
        let ok = validate(&raw, "db", &token).await?.into_inner();
        ensure!(ok.spiffe_id == ID, "validated as {}", ok.spiffe_id);
        let claims = ok.claims.context("no claims")?;
        ensure!(
            claims.fields.contains_key("exp") && claims.fields.contains_key("aud"),
            "claims {:?}",
            claims.fields.keys()
        );
        // Another audience.
        let (c, msg) = code(validate(&raw, "web", &token).await).context("web accepted")?;
        ensure!(
            c == tonic::Code::InvalidArgument && msg.contains("audience"),
            "wrong audience: {c:?} {msg}"
        );
        // Signed by a key the control plane never had.
        let now = unix_now();
        let (forged, foreign_jwks) = foreign_token(ID, "db", now, now + 300)?;
        let (c, msg) = code(validate(&raw, "db", &forged).await).context("forged accepted")?;
        ensure!(
            c == tonic::Code::InvalidArgument && msg.contains("unknown_key"),
            "foreign key: {c:?} {msg}"
        );
        // Garbage.
        let (c, msg) = code(validate(&raw, "db", "not.a.jwt").await).context("garbage accepted")?;
        ensure!(
            c == tonic::Code::InvalidArgument && msg.contains("malformed"),
            "{msg}"
        );

        // `trellis jwt inspect`: the real token against the real bundle.
        let (exit, out, err) = jwt_inspect(&token, &bundle_path, &["--audience", "db"])?;
        ensure!(exit == 0, "inspect valid token: exit {exit}\n{out}\n{err}");
        ensure!(
            out.contains(&format!("subject: {ID}")) && out.contains("valid:"),
            "{out}"
        );
        ensure!(out.contains("\"typ\":\"JWT\""), "header printed: {out}");
        let (exit, _, err) = jwt_inspect(&token, &bundle_path, &["--audience", "web"])?;
        ensure!(
            exit == 1 && err.contains("(audience)"),
            "wrong audience: {exit} {err}"
        );
        let (exit, _, err) = jwt_inspect(&forged, &bundle_path, &[])?;
        ensure!(
            exit == 1 && err.contains("(unknown_key)"),
            "foreign key: {exit} {err}"
        );
        // An expired token, with the bundle of the key that signed it.
        let (expired, expired_jwks) = foreign_token(ID, "db", now - 600, now - 300)?;
        let foreign_path = cp.dir.path().join("foreign.json");
        std::fs::write(&foreign_path, &expired_jwks)?;
        let (exit, _, err) = jwt_inspect(&expired, &foreign_path, &[])?;
        ensure!(
            exit == 1 && err.contains("(expired)"),
            "expired: {exit} {err}"
        );
        // The forged token is valid against its own key's bundle: the refusal above was the key.
        std::fs::write(&foreign_path, &foreign_jwks)?;
        let (exit, out, err) = jwt_inspect(&forged, &foreign_path, &[])?;
        ensure!(
            exit == 0,
            "forged token vs its own key: {exit}\n{out}\n{err}"
        );
        // Usage errors: exit 2.
        let (exit, _, err) = jwt_inspect(&token, &cp.dir.path().join("missing.json"), &[])?;
        ensure!(
            exit == 2 && err.contains("missing.json"),
            "missing bundle: {exit} {err}"
        );
        Ok(())
    })
    .await
}

/// Key rotation with overlap: with 4 s signing windows, each next key reaches an open
/// `FetchJWTBundles` stream (half a window) before any token names it, and the previous key
/// stays in the bundle after it stopped signing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_key_rotation_publishes_the_next_key_before_it_signs() -> anyhow::Result<()> {
    use tokio_stream::StreamExt as _;
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts {
            extra_args: vec![
                "--jwt-key-rotate-every".into(),
                "4s".into(),
                "--jwt-svid-ttl".into(),
                "10s".into(),
            ],
            ..Default::default()
        })?;
        let (_sidecar, socket) = sidecar_with_socket(&cp, &[]).await?;
        let mut raw = raw_client(&socket).await?;
        let mut stream = raw
            .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
            .await?
            .into_inner();
        // Bundle messages, with when they arrived.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Some(jwks) = msg.bundles.get("spiffe://example.org") else {
                    continue;
                };
                let Ok(b) = JwtBundle::parse(
                    trellis_identity::TrustDomain::parse("example.org").unwrap(),
                    jwks,
                ) else {
                    continue;
                };
                let kids: BTreeSet<String> = b.keys().iter().map(|k| k.kid().to_owned()).collect();
                if tx.send((Instant::now(), kids)).is_err() {
                    return;
                }
            }
        });
        let mut published: Vec<(Instant, BTreeSet<String>)> = Vec::new();
        let mut signed: Vec<(Instant, String)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut n = 0;
        // Until three different keys have signed (two rotations).
        while signed.iter().map(|(_, k)| k).collect::<BTreeSet<_>>().len() < 3 {
            ensure!(
                Instant::now() < deadline,
                "fewer than two rotations in 30 s: {signed:?}"
            );
            n += 1;
            // A new audience each time: never the cached token.
            let token = raw
                .fetch_jwtsvid(with_header(JwtsvidRequest {
                    audience: vec![format!("aud-{n}")],
                    spiffe_id: String::new(),
                }))
                .await?
                .into_inner()
                .svids
                .remove(0)
                .svid;
            let at = Instant::now();
            while let Ok(m) = rx.try_recv() {
                published.push(m);
            }
            signed.push((at, kid_of(&token)?));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Every token's key was in a bundle the open stream had delivered before it was minted
        // (first-start key aside: it signs from the first instant, with the first bundle).
        let first_kid = &signed[0].1;
        let mut lead = Vec::new();
        for (at, kid) in signed.iter().filter(|(_, k)| k != first_kid) {
            let first_seen = published
                .iter()
                .find(|(_, kids)| kids.contains(kid))
                .map(|(t, _)| *t)
                .with_context(|| format!("kid {kid} signed but was never in a bundle"))?;
            ensure!(
                first_seen <= *at,
                "kid {kid} signed before the stream published it"
            );
            lead.push(at.saturating_duration_since(first_seen));
        }
        let first_use: Vec<_> = {
            let mut seen = BTreeSet::new();
            signed
                .iter()
                .filter(|(_, k)| k != first_kid && seen.insert(k.clone()))
                .map(|(at, k)| {
                    let pub_at = published
                        .iter()
                        .find(|(_, ks)| ks.contains(k))
                        .map(|(t, _)| *t);
                    pub_at.map(|p| at.saturating_duration_since(p))
                })
                .collect()
        };
        println!("published-before-first-use leads: {first_use:?}");
        ensure!(
            first_use
                .iter()
                .all(|d| d.is_some_and(|d| d >= Duration::from_millis(1000))),
            "a next key was published less than 1 s before it signed: {first_use:?}"
        );
        // Overlap after: a message holds the first key and its successor at once.
        ensure!(
            published
                .iter()
                .any(|(_, ks)| ks.contains(first_kid) && ks.len() >= 2),
            "the first key never shared a bundle with its successor: {published:?}"
        );
        let metrics = cp.metrics().await?;
        let keys = metrics.sum("trellis_jwt_keys", &[]);
        ensure!((1.0..=3.0).contains(&keys), "trellis_jwt_keys {keys}");
        Ok(())
    })
    .await
}
