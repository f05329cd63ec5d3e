//! The operator's view of running processes (issue #6): admin `POST /shutdown` on both
//! binaries, `trellis status --admin`, `trellis inspect --admin` (a sidecar lends its identity
//! for one handshake), and `/certs` never showing a key.
//!
//! ```text
//!  test ──admin──▶ sidecar A ══ mTLS ══▶ sidecar B (--policy) ──▶ app B
//!       ──admin──▶ trellis control
//! ```
//!
//! Run with `--nocapture` to see the `trellis status` screens and the drain figures.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use http::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use trellis_identity::{certs_to_pem, key_to_pem};
use trellis_tests::app_client::{get_once, Proto};
use trellis_tests::echo::EchoApp;
use trellis_tests::mesh::{Mesh, MeshOpts, A_ID, B_ID};
use trellis_tests::sds_server::TestCa;
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{
    e2e, eventually, free_port, http_get, run_with_timeout, trellis_bin, Child, ControlPlane,
    ControlPlaneOpts, HttpResponse, COMMAND_TIMEOUT,
};

/// Generous bound for a drain and exit (the sidecar's own bound is its 15 s drain timeout).
const EXIT_WITHIN: Duration = Duration::from_secs(30);
/// How long the request in flight at `/shutdown` takes in the app.
const SLOW_MS: u64 = 2000;
/// Sidecar B's policy: A may call `/api/**`; nobody may call `/admin/**`.
const POLICY: &str = "\
apiVersion: trellis.io/v1
kind: Policy
defaultAction: deny
rules:
  - name: a-api
    action: allow
    from: [spiffe://example.org/ns/demo/sa/a]
    to:
      - paths: [/api/**, /slow/**]
  - name: no-admin
    action: deny
    from: [\"*\"]
    to:
      - paths: [/admin/**]
";

// ---------------------------------------------------------------------------------------------
// Local helpers: the harness has GET only (tests/src/http.rs), so POST is a few lines here.

/// `METHOD path` with `Connection: close` to `addr`, read to EOF (10 s at most).
async fn admin_request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<HttpResponse> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .with_context(|| format!("{method} {path}: no complete response within 10s"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{method} {path}: no header end in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path}: bad status line in {head:?}"))?;
    Ok(HttpResponse {
        status,
        headers: lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect(),
        body: body.as_bytes().to_vec(),
    })
}

/// `GET path` on an admin port.
async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    http_get(TcpStream::connect(addr).await?, &addr.to_string(), path).await
}

/// Waits without blocking the runtime for `child` to exit.
async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_exit() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One run of the `trellis` CLI.
struct Run {
    output: Output,
    stdout: String,
    stderr: String,
}

impl Run {
    fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not JSON:\n{}", self.describe()))
    }

    fn describe(&self) -> String {
        format!(
            "exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.output.status, self.stdout, self.stderr
        )
    }
}

/// Runs `trellis <args…>` on a blocking thread (the processes under test keep running).
async fn trellis(args: &[&str]) -> anyhow::Result<Run> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(trellis_bin());
        cmd.args(&args);
        let output = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        Ok(Run {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            output,
        })
    })
    .await?
}

/// A mesh whose sidecar B enforces [`POLICY`]; the policy file lives in the returned dir.
async fn policy_mesh() -> anyhow::Result<(Mesh, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("service-b.yaml");
    std::fs::write(&policy, POLICY)?;
    let mesh = Mesh::start(MeshOpts {
        b_args: vec!["--policy".into(), policy.display().to_string()],
        ..MeshOpts::default()
    })
    .await?;
    Ok((mesh, dir))
}

/// This machine's address on its default route, if it has one that is not loopback: a
/// connection to it from here comes from a non-loopback peer address. No packet is sent
/// (a UDP `connect` only picks the route).
fn non_loopback_ip() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_shutdown_drains_a_sidecar_and_stops_the_control_plane() -> anyhow::Result<()> {
    e2e(async {
        let (mut mesh, _policy_dir) = policy_mesh().await?;
        let (b_admin, cp_admin) = (mesh.b.addrs.admin, mesh.cp.admin_addr);

        // Only POST stops anything; a GET is told which method to use, and nothing happens.
        for addr in [b_admin, cp_admin] {
            let r = admin_get(addr, "/shutdown").await?;
            ensure!(
                r.status == 405 && r.header("allow") == Some("POST"),
                "GET /shutdown on {addr}: {} {:?} {}",
                r.status,
                r.header("allow"),
                r.text()
            );
        }
        ensure!(
            mesh.b.child.try_exit().is_none() && mesh.cp.child.try_exit().is_none(),
            "a GET /shutdown stopped a process"
        );

        // A slow request in flight through A → B when B is asked to stop.
        let a_out = mesh.a.outbound();
        let slow_before = mesh.app_b.slow_started();
        let path = format!("/slow/{SLOW_MS}");
        let slow = tokio::spawn(async move { get_once(a_out, Proto::H1, "b", &path, &[]).await });
        eventually(Duration::from_secs(20), "the slow request to reach app B", || async {
            ensure!(mesh.app_b.slow_started() > slow_before, "not yet");
            Ok(())
        })
        .await?;

        let asked = Instant::now();
        let r = admin_request(b_admin, "POST", "/shutdown").await?;
        ensure!(r.status == 202, "POST /shutdown on B: {} {}", r.status, r.text());
        let answered = asked.elapsed();
        let reply = slow.await??;
        ensure!(
            reply.status == StatusCode::OK && reply.text() == "slow done\n",
            "the request in flight at /shutdown: {}",
            reply.summary()
        );
        let status = wait_exit(&mut mesh.b.child, EXIT_WITHIN)
            .await
            .context("sidecar B did not exit after POST /shutdown")?;
        let exited = asked.elapsed();
        ensure!(status.success(), "sidecar B exited {status}, want 0");
        let log = mesh.b.child.stderr();
        ensure!(
            log.contains("shutdown requested on the admin endpoint"),
            "sidecar B's log does not say why it stopped:\n{}",
            mesh.b.child.stderr_tail(20)
        );

        let asked = Instant::now();
        let r = admin_request(cp_admin, "POST", "/shutdown").await?;
        ensure!(r.status == 202, "POST /shutdown on the control plane: {} {}", r.status, r.text());
        let status = wait_exit(&mut mesh.cp.child, EXIT_WITHIN)
            .await
            .context("the control plane did not exit after POST /shutdown")?;
        ensure!(status.success(), "the control plane exited {status}, want 0");
        println!(
            "[admin shutdown] sidecar B: 202 in {:.1} ms, the in-flight {SLOW_MS} ms request completed 200, \
             exit 0 {:.2} s after the request; control plane: exit 0 {:.2} s after the request",
            answered.as_secs_f64() * 1e3,
            exited.as_secs_f64(),
            asked.elapsed().as_secs_f64()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_shutdown_is_refused_to_a_non_loopback_peer() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let app = EchoApp::start("app").await?;
        // A sidecar whose admin listener is bound to every address, as a config may do.
        let mut cmd = Command::new(trellis_bin());
        cmd.arg("sidecar")
            .args(["--trust-domain", cp.trust_domain.as_str()])
            .args(["--control-plane", &cp.sds_addr.to_string()])
            .arg("--control-bundle")
            .arg(&cp.bundle_pem_path)
            .args(["--spiffe-id", A_ID])
            .args(["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
            .args(["--admin", "0.0.0.0:0", "--app", &app.addr.to_string()])
            .env("TRELLIS_JOIN_TOKEN", cp.create_token(A_ID, "1h")?);
        let mut sidecar = Sidecar::spawn("sidecar-any", A_ID, cmd, cp.dir.path()).await?;
        let port = sidecar.addrs.admin.port();
        match non_loopback_ip() {
            Some(ip) => {
                let from_outside = SocketAddr::new(ip, port);
                let r = admin_request(from_outside, "POST", "/shutdown").await?;
                ensure!(
                    r.status == 403 && r.text().contains("loopback"),
                    "POST /shutdown from {ip}: {} {}",
                    r.status,
                    r.text()
                );
                let r = admin_request(from_outside, "POST", "/inspect?target=127.0.0.1:1").await?;
                ensure!(r.status == 403, "POST /inspect from {ip}: {} {}", r.status, r.text());
                // Read-only endpoints stay available; the sidecar is still up.
                ensure!(admin_get(from_outside, "/ready").await?.status == 200, "/ready from {ip}");
                println!("[admin shutdown] POST /shutdown and /inspect from {ip}: 403; sidecar still ready");
            }
            None => println!(
                "[admin shutdown] this machine has no non-loopback address: only the loopback side is checked"
            ),
        }
        ensure!(sidecar.child.try_exit().is_none(), "the sidecar stopped");
        let loopback = SocketAddr::from(([127, 0, 0, 1], port));
        let r = admin_request(loopback, "POST", "/shutdown").await?;
        ensure!(r.status == 202, "POST /shutdown from loopback: {} {}", r.status, r.text());
        let status = sidecar
            .wait_exit(EXIT_WITHIN)
            .await
            .context("no exit after POST /shutdown")?;
        ensure!(status.success(), "exited {status}, want 0");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_summarizes_a_sidecar_and_a_control_plane() -> anyhow::Result<()> {
    e2e(async {
        let (mesh, _policy_dir) = policy_mesh().await?;
        let a_out = mesh.a.outbound();
        // Traffic for the counters: 3 allowed, 2 denied by `no-admin`, 1 by the default.
        for path in ["/api/1", "/api/2", "/api/3"] {
            let r = get_once(a_out, Proto::H1, "b", path, &[]).await?;
            ensure!(r.status == StatusCode::OK, "{path}: {}", r.summary());
        }
        for path in ["/admin/users", "/admin/export", "/elsewhere"] {
            let r = get_once(a_out, Proto::H1, "b", path, &[]).await?;
            ensure!(r.status == StatusCode::FORBIDDEN, "{path}: {}", r.summary());
        }
        let b_admin = mesh.b.addrs.admin.to_string();
        let cp_admin = format!("http://{}", mesh.cp.admin_addr);

        // Sidecar B, for a person.
        let run = trellis(&["status", "--admin", &b_admin]).await?;
        println!("$ trellis status --admin {b_admin}\n{}", run.stdout);
        ensure!(
            run.code() == Some(0),
            "status of sidecar B:\n{}",
            run.describe()
        );
        for needle in [
            "sidecar ",
            "status          READY",
            &format!("identity        {B_ID}"),
            "  expires ",
            "bundle          ",
            "sds             connected;",
            "policy          sha256 ",
            "2 rules",
            "  last error    none",
            "requests        inbound 200=3 403=3",
            "denies          default=1 no-admin=2",
        ] {
            ensure!(
                run.stdout.contains(needle),
                "missing {needle:?} in:\n{}",
                run.describe()
            );
        }

        // Sidecar B, for a script.
        let run = trellis(&["status", "--admin", &b_admin, "--json"]).await?;
        ensure!(run.code() == Some(0), "{}", run.describe());
        let s = run.json()?;
        let policy = serde_json::from_slice::<Value>(&mesh.b.admin_get("/policy").await?.body)?;
        ensure!(
            s["kind"] == "sidecar"
                && s["ready"] == true
                && s["identity"]["spiffe_id"] == B_ID
                && s["identity"]["expires_in_seconds"]
                    .as_i64()
                    .is_some_and(|t| t > 0)
                && s["sds"]["connected"] == true
                && s["policy"]["hash"] == policy["hash"]
                && s["policy"]["last_error"].is_null()
                && s["requests"]["inbound"]["403"] == 3
                && s["denies"]["no-admin"] == 2
                && s["bundle"].as_array().is_some_and(|b| b.len() == 1),
            "status --json of sidecar B:\n{s:#}"
        );

        // The control plane, both ways.
        let run = trellis(&["status", "--admin", &cp_admin]).await?;
        println!("$ trellis status --admin {cp_admin}\n{}", run.stdout);
        ensure!(
            run.code() == Some(0),
            "status of the control plane:\n{}",
            run.describe()
        );
        for needle in [
            "control plane ",
            "status          READY",
            "identity        spiffe://example.org/trellis/control",
            "cas             active ",
            "svids issued    join_token=",
        ] {
            ensure!(
                run.stdout.contains(needle),
                "missing {needle:?} in:\n{}",
                run.describe()
            );
        }
        let run = trellis(&["status", "--admin", &cp_admin, "--json"]).await?;
        let s = run.json()?;
        ensure!(
            s["kind"] == "control"
                && s["ready"] == true
                && s["identity"]["spiffe_id"] == "spiffe://example.org/trellis/control"
                && s["cas"][0]["phase"] == "active"
                && s["sds_streams"].as_u64().is_some_and(|n| n >= 2)
                && s["svids_issued"]["join_token"]
                    .as_u64()
                    .is_some_and(|n| n >= 2),
            "status --json of the control plane:\n{s:#}"
        );

        // Nobody there: exit 2 and a message that says so.
        let nobody = format!("127.0.0.1:{}", free_port());
        let run = trellis(&["status", "--admin", &nobody]).await?;
        ensure!(
            run.code() == Some(2) && run.stderr.contains("unreachable"),
            "status of nothing:\n{}",
            run.describe()
        );
        let run = trellis(&["status", "--admin", "not-an-address"]).await?;
        ensure!(run.code() == Some(2), "bad --admin:\n{}", run.describe());

        // Reachable but not ready: a sidecar that refuses the SVID it is offered (issued for
        // another ID than its --spiffe-id) never gets one: exit 1 and why.
        let mut opts = SidecarOpts::new(
            "sidecar-unready",
            "spiffe://example.org/ns/demo/sa/c",
            mesh.app_b.addr,
        );
        opts.join_token = Some(
            mesh.cp
                .create_token("spiffe://example.org/ns/demo/sa/other", "1h")?,
        );
        let unready = Sidecar::start_unready(&mesh.cp, opts)?;
        let run = trellis(&["status", "--admin", &unready.addrs.admin.to_string()]).await?;
        println!(
            "$ trellis status --admin {}  # no SVID\n{}",
            unready.addrs.admin, run.stdout
        );
        ensure!(
            run.code() == Some(1) && run.stdout.contains("NOT READY: no SVID yet"),
            "status of a sidecar without an SVID:\n{}",
            run.describe()
        );

        // /certs on both binaries: facts, never a key.
        for (who, addr) in [
            ("sidecar", mesh.b.addrs.admin),
            ("control plane", mesh.cp.admin_addr),
        ] {
            let r = admin_get(addr, "/certs").await?;
            let text = r.text();
            ensure!(
                r.status == 200 && !text.contains("PRIVATE KEY"),
                "{who} /certs: {text}"
            );
            let v: Value = serde_json::from_str(&text)?;
            ensure!(
                v["svid"]["serial"].is_string()
                    && v["svid"]["not_after"].is_u64()
                    && v["svid"]["not_after_rfc3339"].is_string()
                    && v["bundle"][0]["not_after_rfc3339"].is_string(),
                "{who} /certs: {v:#}"
            );
            println!(
                "$ curl {addr}/certs  # {who}\n{}",
                serde_json::to_string_pretty(&v)?
            );
        }

        // The control plane's own serving SVID: its expiry gauge is the notAfter /certs shows.
        let certs: Value = serde_json::from_slice(&mesh.cp.admin_get("/certs").await?.body)?;
        let metrics = mesh.cp.admin_get("/metrics").await?.text();
        let series = format!(
            "trellis_svid_expiry_timestamp_seconds{{spiffe_id=\"spiffe://example.org/trellis/control\"}} {}",
            certs["svid"]["not_after"]
        );
        ensure!(
            metrics.contains(&series),
            "control plane /metrics lacks `{series}`:\n{metrics}"
        );
        Ok(())
    })
    .await
}

/// A sidecar whose identity comes from PEM files has no SDS stream at all: `trellis status`
/// must show the files it reads, not an SDS line saying "NOT connected" (which reads as a
/// fault). `/certs` reports `source` (`sds` or `files`), which `cmd_status.rs` reads.
/// endpoint does, this fails on the `source` line, showing the SDS line it replaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_file_identity_sidecar_shows_its_files() -> anyhow::Result<()> {
    e2e(async {
        let ca = TestCa::root("example.org");
        let svid = ca.svid(A_ID.strip_prefix("spiffe://example.org").context("A_ID")?);
        let dir = tempfile::tempdir()?;
        let (cert, key, bundle) = (
            dir.path().join("svid.pem"),
            dir.path().join("svid-key.pem"),
            dir.path().join("bundle.pem"),
        );
        std::fs::write(&cert, certs_to_pem(svid.chain()))?;
        std::fs::write(&key, key_to_pem(svid.key()).as_bytes())?;
        std::fs::write(&bundle, ca.bundle_pem())?;
        let app = EchoApp::start("app").await?;
        let mut cmd = Command::new(trellis_bin());
        cmd.arg("sidecar")
            .args(["--trust-domain", "example.org"])
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--bundle")
            .arg(&bundle)
            .args(["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
            .args(["--admin", "127.0.0.1:0", "--app", &app.addr.to_string()]);
        let sidecar = Sidecar::spawn("sidecar-files", A_ID, cmd, dir.path()).await?;
        let admin = sidecar.addrs.admin.to_string();

        let run = trellis(&["status", "--admin", &admin]).await?;
        println!(
            "$ trellis status --admin {admin}  # identity from files\n{}",
            run.stdout
        );
        ensure!(run.code() == Some(0), "{}", run.describe());
        for needle in [
            "status          READY",
            &format!("identity        {A_ID}"),
            "source          identity files (no control plane); 0 reloads",
            &format!("  cert          {}", cert.display()),
            &format!("  key           {}", key.display()),
            &format!("  bundle        {}", bundle.display()),
        ] {
            ensure!(
                run.stdout.contains(needle),
                "missing {needle:?} in:\n{}",
                run.describe()
            );
        }
        ensure!(
            !run.stdout.contains("sds ") && !run.stdout.contains("NOT connected"),
            "an SDS line for a sidecar without SDS:\n{}",
            run.describe()
        );

        let run = trellis(&["status", "--admin", &admin, "--json"]).await?;
        let s = run.json()?;
        ensure!(
            run.code() == Some(0)
                && s["identity_source"] == "files"
                && s["sds"].is_null()
                && s["files"]["cert"] == cert.display().to_string()
                && s["files"]["bundle"] == bundle.display().to_string()
                && s["identity"]["spiffe_id"] == A_ID,
            "status --json of a files sidecar:\n{s:#}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_borrows_a_running_sidecars_identity() -> anyhow::Result<()> {
    e2e(async {
        let mesh = Mesh::start(MeshOpts::default()).await?;
        let a_admin = mesh.a.addrs.admin.to_string();
        let b_inbound = mesh.b.addrs.inbound.to_string();

        // Sidecar B verified as its identity, with A's SVID presented and accepted.
        let run = trellis(&[
            "inspect",
            &b_inbound,
            "--admin",
            &a_admin,
            "--spiffe-id",
            B_ID,
        ])
        .await?;
        println!(
            "$ trellis inspect {b_inbound} --admin {a_admin} --spiffe-id {B_ID}\n{}",
            run.stdout
        );
        ensure!(run.code() == Some(0), "{}", run.describe());
        for needle in [
            &format!("peer spiffe id  {B_ID}"),
            &format!("client cert     {A_ID}: requested, accepted"),
            "verified        yes",
            &format!("OK: verified {B_ID}"),
        ] {
            ensure!(
                run.stdout.contains(needle),
                "missing {needle:?} in:\n{}",
                run.describe()
            );
        }
        let run = trellis(&["inspect", &b_inbound, "--admin", &a_admin, "--json"]).await?;
        let r = run.json()?;
        ensure!(
            run.code() == Some(0)
                && r["ok"] == true
                && r["peer_spiffe_id"] == B_ID
                && r["client_cert"]["presented"] == A_ID
                && r["client_cert"]["accepted"] == true,
            "inspect --json via A:\n{r:#}"
        );

        // The same peer, expected as someone else: refused by us, for the right reason.
        let wrong = "spiffe://example.org/ns/demo/sa/c";
        let run = trellis(&[
            "inspect",
            &b_inbound,
            "--admin",
            &a_admin,
            "--spiffe-id",
            wrong,
            "--json",
        ])
        .await?;
        let r = run.json()?;
        ensure!(
            run.code() == Some(1)
                && r["ok"] == false
                && r["reason"] == "wrong_identity"
                && r["refused_by"] == "client"
                && r["peer_spiffe_id"] == B_ID,
            "inspect expecting {wrong}:\n{r:#}"
        );
        let run = trellis(&[
            "inspect",
            &b_inbound,
            "--admin",
            &a_admin,
            "--spiffe-id",
            wrong,
        ])
        .await?;
        ensure!(
            run.code() == Some(1) && run.stdout.contains("(wrong_identity)"),
            "{}",
            run.describe()
        );

        // Usage: --admin does not mix with local credentials; a control plane lends nothing.
        let bundle = mesh.cp.bundle_pem_path.display().to_string();
        let run = trellis(&[
            "inspect", &b_inbound, "--admin", &a_admin, "--bundle", &bundle,
        ])
        .await?;
        ensure!(
            run.code() == Some(2),
            "--admin with --bundle:\n{}",
            run.describe()
        );
        let cp_admin = mesh.cp.admin_addr.to_string();
        let run = trellis(&["inspect", &b_inbound, "--admin", &cp_admin]).await?;
        ensure!(
            run.code() == Some(2) && run.stderr.contains("no /inspect"),
            "--admin pointing at the control plane:\n{}",
            run.describe()
        );
        let nobody = format!("127.0.0.1:{}", free_port());
        let run = trellis(&["inspect", &b_inbound, "--admin", &nobody]).await?;
        if run.code() != Some(2) {
            bail!("--admin pointing at nothing:\n{}", run.describe());
        }
        Ok(())
    })
    .await
}
