//! `trellis control` as a process, driven by a tonic SDS client over TLS 1.3: join-token
//! redemption, the secrets it serves, rotation pushes, the errors a bad caller gets, the admin
//! endpoints, and the messages a bad start prints.

use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context as _};
use tonic::Code;
use trellis_identity::{verify_svid_chain, SpiffeId, Usage};
use trellis_proto::{DiscoveryRequest, SECRET_TYPE_URL};
use trellis_tests::control_must_fail_to_start as start_must_fail;
use trellis_tests::{
    bundle_from_secret, decode_secrets, e2e, fetch_svid, grpc_code, run_with_timeout,
    svid_from_secret, test_node, tool_or_skip, ControlPlane, ControlPlaneOpts, SdsStream,
};

const RECV: Duration = Duration::from_secs(10);

fn fast_rotation() -> ControlPlaneOpts {
    ControlPlaneOpts {
        svid_ttl: Some("1h".into()),
        rotate_every: Some("2s".into()),
        ..Default::default()
    }
}

/// Asserts that opening a stream with `credential` for `names` fails with `want` within 5 s.
async fn expect_stream_error(
    cp: &ControlPlane,
    credential: Option<&str>,
    names: &[&str],
    want: Code,
) -> anyhow::Result<()> {
    let mut client = cp.sds_client().await?;
    let result = async {
        let mut stream = SdsStream::open(&mut client, credential, names).await?;
        stream.recv(Duration::from_secs(5)).await
    }
    .await;
    match result {
        Ok(resp) => anyhow::bail!(
            "names {names:?}: want gRPC {want:?}, got a response with {} resources",
            resp.resources.len()
        ),
        Err(e) => {
            ensure!(
                grpc_code(&e) == Some(want),
                "names {names:?}: want gRPC {want:?}, got: {e:#}"
            );
            eprintln!("names {names:?}: got, as expected: {e:#}");
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_token_stream_gets_svid_bundle_then_rotation() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(fast_rotation())?;
        let want_id = SpiffeId::parse("spiffe://example.org/app/web")?;
        let token = cp.create_token(want_id.as_str(), "1h")?;
        ensure!(
            token.starts_with("trellis-join."),
            "token format: {token:?}"
        );

        let bundle_file = cp.bundle()?;
        let mut client = cp.sds_client().await?;
        let mut stream = SdsStream::open(&mut client, Some(&token), &["default", "ROOTCA"]).await?;

        // Both secrets, in one response or several; ACK each response.
        let mut svid = None;
        let mut rootca = None;
        let mut last_version = String::new();
        while svid.is_none() || rootca.is_none() {
            let resp = stream.recv(RECV).await?;
            ensure!(!resp.nonce.is_empty(), "response without a nonce");
            ensure!(
                !resp.version_info.is_empty(),
                "response without version_info"
            );
            let secrets = decode_secrets(&resp)?;
            for name in secrets.keys() {
                ensure!(
                    name == "default" || name == "ROOTCA",
                    "unasked-for secret {name:?}"
                );
            }
            if let Some(s) = secrets.get("default") {
                svid = Some(svid_from_secret(s)?);
            }
            if let Some(s) = secrets.get("ROOTCA") {
                rootca = Some(bundle_from_secret(s, &cp.trust_domain)?);
            }
            last_version = resp.version_info.clone();
            stream.ack(&resp).await?;
        }
        let (svid, rootca) = (svid.context("default")?, rootca.context("ROOTCA")?);

        // ROOTCA is the bundle the control plane wrote to disk.
        ensure!(
            rootca.roots() == bundle_file.roots(),
            "ROOTCA secret differs from bundle.pem"
        );
        // The SVID chains to ROOTCA and names the token's SPIFFE ID.
        ensure!(
            svid.spiffe_id() == &want_id,
            "SVID is for {}",
            svid.spiffe_id()
        );
        let verified =
            verify_svid_chain(svid.chain(), &rootca, SystemTime::now(), Usage::Either)
                .map_err(|e| anyhow::anyhow!("SVID chain does not verify against ROOTCA: {e}"))?;
        ensure!(verified == want_id, "verified ID {verified}");
        // --svid-ttl 1h.
        let left = svid
            .not_after()
            .duration_since(SystemTime::now())
            .context("SVID already expired")?;
        ensure!(
            left > Duration::from_secs(50 * 60) && left <= Duration::from_secs(61 * 60),
            "SVID lifetime left {left:?}, want about 1h (--svid-ttl 1h)"
        );

        // --rotate-every 2s: a new SVID (new serial) is pushed on the open stream.
        let first_serial = svid.serial_hex().to_string();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let rotated = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            ensure!(
                !left.is_zero(),
                "no rotated SVID within 10s (--rotate-every 2s)"
            );
            let resp = stream
                .recv(left)
                .await
                .context("waiting for a rotation push")?;
            let secrets = decode_secrets(&resp)?;
            stream.ack(&resp).await?;
            if let Some(s) = secrets.get("default") {
                let new = svid_from_secret(s)?;
                if new.serial_hex() != first_serial {
                    ensure!(
                        resp.version_info != last_version,
                        "rotation push reused version_info {last_version:?}"
                    );
                    break new;
                }
            }
        };
        ensure!(
            rotated.spiffe_id() == &want_id,
            "rotated SVID is for {}",
            rotated.spiffe_id()
        );
        rotated
            .verify(&rootca, SystemTime::now())
            .map_err(|e| anyhow::anyhow!("rotated SVID does not verify: {e}"))?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_stream_with_same_join_token_shares_redemption() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let id = "spiffe://example.org/app/shared";
        let token = cp.create_token(id, "1h")?;
        let mut client = cp.sds_client().await?;

        // Envoy opens one stream per secret name, on one connection, within a few seconds.
        let mut first = SdsStream::open(&mut client, Some(&token), &["default"]).await?;
        let resp = first.recv(RECV).await?;
        let svid = svid_from_secret(decode_secrets(&resp)?.get("default").context("default")?)?;
        ensure!(
            svid.spiffe_id().as_str() == id,
            "first stream: {}",
            svid.spiffe_id()
        );
        first.ack(&resp).await?;

        let mut second = SdsStream::open(&mut client, Some(&token), &["ROOTCA"]).await?;
        let resp = second
            .recv(RECV)
            .await
            .context("second stream with the same join token, right after the first")?;
        let secrets = decode_secrets(&resp)?;
        bundle_from_secret(secrets.get("ROOTCA").context("ROOTCA")?, &cp.trust_domain)?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_join_token_is_unauthenticated() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        expect_stream_error(
            &cp,
            Some("trellis-join.notarealtoken"),
            &["default"],
            Code::Unauthenticated,
        )
        .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credential_is_unauthenticated() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        expect_stream_error(&cp, None, &["default"], Code::Unauthenticated).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_without_k8s_configured_is_unauthenticated() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        // A syntactically valid (unsigned) JWT; the control plane has no --k8s-jwks.
        let jwt = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDp3ZWIifQ.";
        expect_stream_error(&cp, Some(jwt), &["default"], Code::Unauthenticated).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_workloads_spiffe_id_is_permission_denied() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let token = cp.create_token("spiffe://example.org/app/web", "1h")?;
        expect_stream_error(
            &cp,
            Some(&token),
            &["spiffe://example.org/app/db"],
            Code::PermissionDenied,
        )
        .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_resource_name_gets_an_error_not_silence() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let token = cp.create_token("spiffe://example.org/app/web", "1h")?;
        let mut client = cp.sds_client().await?;
        let result = async {
            let mut stream =
                SdsStream::open(&mut client, Some(&token), &["no-such-secret"]).await?;
            stream.recv(Duration::from_secs(5)).await
        }
        .await;
        let err = match result {
            Ok(resp) => anyhow::bail!("want a gRPC error, got {} resources", resp.resources.len()),
            Err(e) => e,
        };
        let code = grpc_code(&err).with_context(|| format!("want a gRPC error, got: {err:#}"))?;
        ensure!(
            matches!(
                code,
                Code::NotFound | Code::InvalidArgument | Code::PermissionDenied
            ),
            "unknown resource name: got {code:?}: {err:#}"
        );
        eprintln!("unknown resource name: got, as expected: {err:#}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_spiffe_id_and_trust_domain_id_are_aliases() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let id = "spiffe://example.org/app/alias";
        let token = cp.create_token(id, "1h")?;
        let mut client = cp.sds_client().await?;
        let names = [id, "spiffe://example.org"];
        let mut stream = SdsStream::open(&mut client, Some(&token), &names).await?;
        let mut seen = std::collections::BTreeMap::new();
        while seen.len() < 2 {
            let resp = stream.recv(RECV).await?;
            seen.extend(decode_secrets(&resp)?);
            stream.ack(&resp).await?;
        }
        let svid = svid_from_secret(seen.get(id).context("secret named by own SPIFFE ID")?)?;
        ensure!(svid.spiffe_id().as_str() == id);
        bundle_from_secret(
            seen.get("spiffe://example.org")
                .context("secret named by trust-domain ID")?,
            &cp.trust_domain,
        )?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_metrics_pass_promtool() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        // One issuance and one failure, so labelled series exist.
        let token = cp.create_token("spiffe://example.org/app/metrics", "1h")?;
        fetch_svid(&cp, &token).await?;
        expect_stream_error(
            &cp,
            Some("trellis-join.bogus"),
            &["default"],
            Code::Unauthenticated,
        )
        .await?;

        for path in ["/healthz", "/ready"] {
            let r = cp.admin_get(path).await?;
            ensure!(r.status == 200, "GET {path}: {} {}", r.status, r.text());
        }
        let metrics = cp.admin_get("/metrics").await?;
        ensure!(metrics.status == 200, "GET /metrics: {}", metrics.status);
        let body = metrics.text();
        for series in [
            "trellis_svids_issued_total{attestor=\"join_token\"} 1",
            "trellis_attestation_failures_total{reason=\"join_token_unknown\"} 1",
            "trellis_sds_streams ",
            "trellis_ca_expiry_timestamp_seconds ",
        ] {
            ensure!(body.contains(series), "/metrics lacks `{series}`:\n{body}");
        }
        ensure!(
            body.contains("# TYPE"),
            "no metric families in /metrics:\n{body}"
        );

        let Some(promtool) = tool_or_skip("admin_endpoints_and_metrics_pass_promtool", "promtool")
        else {
            return Ok(());
        };
        let path = cp.dir.path().join("metrics.txt");
        std::fs::write(&path, &metrics.body)?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#""$0" check metrics < "$1""#)
            .arg(promtool)
            .arg(&path);
        let out = run_with_timeout(cmd, Duration::from_secs(30))?;
        ensure!(
            out.status.success(),
            "promtool check metrics failed ({}):\n{}{}\n--- metrics ---\n{body}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_secrets_returns_svid_and_bundle() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let id = "spiffe://example.org/app/fetch";
        let token = cp.create_token(id, "1h")?;
        let mut client = cp.sds_client().await?;
        let mut req = tonic::Request::new(DiscoveryRequest {
            node: Some(test_node()),
            resource_names: vec!["default".into(), "ROOTCA".into()],
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let resp = tokio::time::timeout(RECV, client.fetch_secrets(req))
            .await
            .context("FetchSecrets: no answer")??
            .into_inner();
        let secrets = decode_secrets(&resp)?;
        let svid = svid_from_secret(secrets.get("default").context("default")?)?;
        let rootca =
            bundle_from_secret(secrets.get("ROOTCA").context("ROOTCA")?, &cp.trust_domain)?;
        ensure!(
            svid.spiffe_id().as_str() == id,
            "FetchSecrets SVID is for {}",
            svid.spiffe_id()
        );
        svid.verify(&rootca, SystemTime::now())
            .map_err(|e| anyhow::anyhow!("FetchSecrets SVID does not verify: {e}"))?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_gets_error_and_others_are_still_served() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let token = cp.create_token("spiffe://example.org/app/bad", "1h")?;
        let mut client = cp.sds_client().await?;
        let wrong_type = DiscoveryRequest {
            node: Some(test_node()),
            resource_names: vec!["default".into()],
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            ..Default::default()
        };
        let result = async {
            let mut stream = SdsStream::open_with(&mut client, Some(&token), wrong_type).await?;
            stream.recv(Duration::from_secs(5)).await
        }
        .await;
        match result {
            Ok(resp) => anyhow::bail!(
                "wrong type_url: want a gRPC error, got {} resources",
                resp.resources.len()
            ),
            Err(e) => {
                ensure!(
                    grpc_code(&e).is_some_and(|c| c != Code::Ok),
                    "wrong type_url: want a gRPC error, got: {e:#}"
                );
                eprintln!("wrong type_url: got, as expected: {e:#}");
            }
        }
        // Everyone else is still served.
        let other = cp.create_token("spiffe://example.org/app/good", "1h")?;
        let (svid, _) = fetch_svid(&cp, &other).await?;
        ensure!(svid.spiffe_id().as_str() == "spiffe://example.org/app/good");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_ca_and_serves_under_the_same_bundle() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let before = std::fs::read(&cp.bundle_pem_path)?;
        let cp = cp.restart()?;
        let after = std::fs::read(&cp.bundle_pem_path)?;
        ensure!(before == after, "bundle.pem changed across a restart");
        // The restarted control plane still proves its identity under the old bundle and
        // issues SVIDs that chain to it.
        let token = cp.create_token("spiffe://example.org/app/restarted", "1h")?;
        let (svid, rootca) = fetch_svid(&cp, &token).await?;
        ensure!(
            rootca.roots() == cp.bundle()?.roots(),
            "ROOTCA after restart differs from bundle.pem"
        );
        svid.verify(&cp.bundle()?, SystemTime::now())
            .map_err(|e| anyhow::anyhow!("SVID after restart does not verify: {e}"))?;
        Ok(())
    })
    .await
}

#[test]
fn config_with_unknown_field_stops_start_naming_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bad-config.yaml");
    std::fs::write(&config, "no_such_setting: true\n")?;
    let stderr = start_must_fail(dir.path(), &["--config".as_ref(), config.as_os_str()])?;
    ensure!(
        stderr.contains("bad-config.yaml"),
        "stderr does not name the file: {stderr}"
    );
    ensure!(
        stderr.contains("no_such_setting"),
        "stderr does not name the unknown field: {stderr}"
    );
    Ok(())
}

#[test]
fn jwks_that_is_not_json_stops_start_naming_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let jwks = dir.path().join("notjson.txt");
    std::fs::write(&jwks, "this is not JSON\n")?;
    let stderr = start_must_fail(
        dir.path(),
        &[
            "--k8s-jwks".as_ref(),
            jwks.as_os_str(),
            "--k8s-issuer".as_ref(),
            "https://kubernetes.default.svc".as_ref(),
        ],
    )?;
    ensure!(
        stderr.contains("notjson.txt"),
        "stderr does not name the file: {stderr}"
    );
    Ok(())
}
