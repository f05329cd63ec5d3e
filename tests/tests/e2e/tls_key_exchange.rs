//! Post-quantum key exchange (`tls_key_exchange`): two Trellis sidecars negotiate the hybrid
//! X25519MLKEM768, and `trellis inspect`, `trellis status` and the handshake metric say so;
//! the system's `openssl s_client` (OpenSSL 3.0, no ML-KEM) falls back to X25519 against the
//! default `pq-preferred`, and a `pq-only` sidecar refuses it with a counted reason.
//! Stock Envoy is covered in `sidecar_envoy` (`envoy_key_exchange_*`).

use std::process::{Command, Output};

use anyhow::{ensure, Context as _};
use serde_json::Value;
use trellis_tests::mesh::{legit, Mesh, MeshOpts, B_ID};
use trellis_tests::metrics::Metrics;
use trellis_tests::openssl::{http_get_request, s_client_async, write_svid_pem, SClientRun};
use trellis_tests::{
    e2e, fetch_svid, run_with_timeout, tool_or_skip, trellis_bin, COMMAND_TIMEOUT,
};

const CLIENT_ID: &str = "spiffe://example.org/ops/openssl";

/// Runs `trellis <args…>` on a blocking thread (the processes under test keep running).
async fn trellis(args: Vec<String>) -> anyhow::Result<(Output, String)> {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(trellis_bin());
        cmd.args(&args);
        let output = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        Ok((output, stdout))
    })
    .await?
}

/// `trellis_tls_handshakes_total{direction,result="ok",group}`.
fn ok_by_group(m: &Metrics, direction: &str, group: &str) -> f64 {
    m.sum_or_zero(
        "trellis_tls_handshakes_total",
        &[("direction", direction), ("result", "ok"), ("group", group)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trellis_sidecars_negotiate_x25519mlkem768_and_say_so() -> anyhow::Result<()> {
    e2e(async {
        let mesh = Mesh::start(MeshOpts::default()).await?;
        legit(&mesh, "/pq").await?;

        // The handshake metric, by group, on both ends of the hop.
        let a = mesh.a.metrics().await?;
        let b = mesh.b.metrics().await?;
        let a_pq = ok_by_group(&a, "outbound", "X25519MLKEM768");
        let b_pq = ok_by_group(&b, "inbound", "X25519MLKEM768");
        ensure!(
            a_pq >= 1.0 && b_pq >= 1.0,
            "want X25519MLKEM768 on A outbound and B inbound:\nA: {}\nB: {}",
            a.lines_of("trellis_tls_handshakes_total"),
            b.lines_of("trellis_tls_handshakes_total")
        );
        for group in ["X25519", "P-256", "other"] {
            ensure!(
                ok_by_group(&b, "inbound", group) == 0.0,
                "B counted a {group} handshake:\n{}",
                b.lines_of("trellis_tls_handshakes_total")
            );
        }

        // `trellis inspect`, with sidecar A's identity, against sidecar B.
        let admin_a = mesh.a.addrs.admin.to_string();
        let target = mesh.b.addrs.inbound.to_string();
        let (out, text) = trellis(vec![
            "inspect".into(),
            target.clone(),
            "--admin".into(),
            admin_a.clone(),
            "--spiffe-id".into(),
            B_ID.into(),
        ])
        .await?;
        ensure!(out.status.success(), "trellis inspect failed:\n{text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("key exchange"))
            .with_context(|| format!("no `key exchange` line in:\n{text}"))?;
        ensure!(
            line.split_whitespace().collect::<Vec<_>>() == ["key", "exchange", "X25519MLKEM768"],
            "{line:?}"
        );
        let (out, json) = trellis(vec![
            "inspect".into(),
            target,
            "--admin".into(),
            admin_a,
            "--json".into(),
        ])
        .await?;
        ensure!(
            out.status.success(),
            "trellis inspect --json failed:\n{json}"
        );
        let report: Value = serde_json::from_str(&json)?;
        ensure!(
            report["key_exchange"] == "X25519MLKEM768",
            "inspect --json: {report}"
        );

        // `trellis status` shows the share of post-quantum handshakes.
        let (out, status) = trellis(vec![
            "status".into(),
            "--admin".into(),
            mesh.b.addrs.admin.to_string(),
        ])
        .await?;
        ensure!(out.status.success(), "trellis status failed:\n{status}");
        ensure!(
            status.lines().any(|l| l.starts_with("key exchange")
                && l.contains("X25519MLKEM768=")
                && l.contains("(100% post-quantum)")),
            "trellis status:\n{status}"
        );
        let (_, json) = trellis(vec![
            "status".into(),
            "--admin".into(),
            mesh.b.addrs.admin.to_string(),
            "--json".into(),
        ])
        .await?;
        let status: Value = serde_json::from_str(&json)?;
        ensure!(
            status["key_exchange"]["X25519MLKEM768"].as_u64() >= Some(1),
            "status --json: {status}"
        );
        Ok(())
    })
    .await
}

/// `openssl s_client` with a client SVID of the mesh's control plane to `mesh`'s sidecar B,
/// one GET.
async fn s_client(mesh: &Mesh, dir: &std::path::Path) -> anyhow::Result<Option<SClientRun>> {
    let Some(openssl) = tool_or_skip("openssl_s_client_key_exchange", "openssl") else {
        return Ok(None);
    };
    let token = mesh.cp.create_token(CLIENT_ID, "1h")?;
    let (svid, _) = fetch_svid(&mesh.cp, &token).await?;
    let files = write_svid_pem(&svid, dir, "client")?;
    let mut args = vec![
        "-CAfile".to_string(),
        mesh.cp.bundle_pem_path.to_string_lossy().into_owned(),
        "-verify_return_error".to_string(),
    ];
    args.extend(files.s_client_args());
    Ok(Some(
        s_client_async(
            &openssl,
            mesh.b.addrs.inbound,
            args,
            &http_get_request("b", "/from-openssl", &[]),
        )
        .await?,
    ))
}

/// The system OpenSSL's version line, for the messages (the test expects 3.x without ML-KEM;
/// OpenSSL 3.5 offers X25519MLKEM768 and would negotiate it).
fn openssl_version() -> String {
    Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openssl_s_client_falls_back_to_x25519_and_pq_only_refuses_it() -> anyhow::Result<()> {
    e2e(async {
        let version = openssl_version();
        // Default (pq-preferred): OpenSSL 3.0 offers X25519 first; the sidecar takes it.
        let dir = tempfile::tempdir()?;
        let mesh = Mesh::start(MeshOpts::default()).await?;
        let Some(run) = s_client(&mesh, dir.path()).await? else {
            return Ok(());
        };
        let pq_capable = run.stdout.contains("X25519MLKEM768");
        ensure!(
            run.http_status() == Some(200),
            "{version}: pq-preferred sidecar refused s_client:\n{}",
            run.describe()
        );
        let temp_key = run
            .stdout
            .lines()
            .chain(run.stderr.lines())
            .find(|l| l.contains("Temp Key") || l.contains("Negotiated TLS1.3 group"))
            .unwrap_or_default()
            .to_owned();
        eprintln!("{version} against pq-preferred: {temp_key}");
        let b = mesh.b.metrics().await?;
        if pq_capable {
            // OpenSSL 3.5+: it has the hybrid too; the fallback is not exercised.
            ensure!(ok_by_group(&b, "inbound", "X25519MLKEM768") >= 1.0);
            return Ok(());
        }
        ensure!(
            temp_key.contains("X25519"),
            "{version}: want X25519, got {temp_key:?}\n{}",
            run.describe()
        );
        ensure!(
            ok_by_group(&b, "inbound", "X25519") >= 1.0,
            "B did not count an X25519 handshake:\n{}",
            b.lines_of("trellis_tls_handshakes_total")
        );
        drop(mesh);

        // pq-only: the same client is refused in the handshake, and the reason is counted.
        let mesh = Mesh::start(MeshOpts {
            b_args: vec!["--tls-key-exchange".into(), "pq-only".into()],
            ..MeshOpts::default()
        })
        .await?;
        // Trellis to a pq-only Trellis still works (both have the hybrid).
        legit(&mesh, "/pq-only").await?;
        let Some(run) = s_client(&mesh, dir.path()).await? else {
            return Ok(());
        };
        ensure!(
            run.http_status().is_none() && run.stderr.contains("handshake failure"),
            "{version}: a pq-only sidecar answered a classical client:\n{}",
            run.describe()
        );
        let b = mesh.b.metrics().await?;
        let refused = b.sum_or_zero(
            "trellis_tls_handshakes_total",
            &[
                ("direction", "inbound"),
                ("result", "error"),
                ("reason", "no_shared_group"),
            ],
        );
        ensure!(
            refused >= 1.0,
            "B did not count no_shared_group:\n{}",
            b.lines_of("trellis_tls_handshakes_total")
        );
        ensure!(ok_by_group(&b, "inbound", "X25519MLKEM768") >= 1.0);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_key_exchange_is_refused_naming_the_allowed_values() -> anyhow::Result<()> {
    e2e(async {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("control.yaml");
        std::fs::write(&config, "trust_domain: example.org\ntls_key_exchange: pq\n")?;
        let runs: [(&str, Vec<String>, Option<&str>); 3] = [
            (
                "flag",
                vec!["sidecar".into(), "--tls-key-exchange".into(), "pq".into()],
                None,
            ),
            ("env", vec!["control".into()], Some("quantum")),
            (
                "file",
                vec![
                    "control".into(),
                    "--config".into(),
                    config.display().to_string(),
                ],
                None,
            ),
        ];
        for (how, args, env) in runs {
            let output = tokio::task::spawn_blocking(move || {
                let mut cmd = Command::new(trellis_bin());
                cmd.args(&args);
                if let Some(v) = env {
                    cmd.env("TRELLIS_TLS_KEY_EXCHANGE", v)
                        .env("TRELLIS_TRUST_DOMAIN", "example.org");
                }
                run_with_timeout(cmd, COMMAND_TIMEOUT)
            })
            .await??;
            let stderr = String::from_utf8_lossy(&output.stderr);
            ensure!(!output.status.success(), "{how}: a bad value was accepted");
            for needle in ["pq-preferred", "pq-only", "classical"] {
                ensure!(stderr.contains(needle), "{how}: {needle} not in:\n{stderr}");
            }
            if how == "file" {
                ensure!(
                    stderr.contains("control.yaml") && stderr.contains("line 2"),
                    "{how}: no file and line in:\n{stderr}"
                );
            }
        }
        Ok(())
    })
    .await
}
