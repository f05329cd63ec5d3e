//! Logs: `--log-format json` gives one JSON object per stderr line with fixed keys, text stays
//! readable and plain when stderr is not a terminal, `RUST_LOG` filters, a bad format value is
//! refused by name, and no log line or audit line ever holds a join token or a private key.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use anyhow::{ensure, Context as _};
use base64::Engine as _;
use serde_json::Value;
use trellis_tests::app_client::{get_once, Proto};
use trellis_tests::echo::EchoApp;
use trellis_tests::mesh::{A_ID, B_ID};
use trellis_tests::sidecar::{parse_sidecar_line, Sidecar};
use trellis_tests::{
    e2e, fetch_svid, parse_listening_line, run_with_timeout, trellis_bin, wait_until, Child,
    ControlPlane, ControlPlaneOpts, COMMAND_TIMEOUT, STARTUP_TIMEOUT,
};

/// `trellis control` on loopback with exactly this environment for logging (the harness's
/// `ControlPlane::start` passes the test's own `RUST_LOG`).
fn start_control(env: &[(&str, &str)], args: &[&str]) -> anyhow::Result<ControlPlane> {
    let dir = tempfile::tempdir()?;
    let state_dir = dir.path().join("state");
    let mut cmd = Command::new(trellis_bin());
    cmd.args(["control", "--trust-domain", "example.org"])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(&state_dir)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("TRELLIS_LOG_FORMAT")
        .envs(env.iter().copied());
    let mut child = Child::spawn("trellis-control", cmd, dir.path())?;
    let line = child.stdout_line(STARTUP_TIMEOUT)?;
    let (sds_addr, admin_addr) = parse_listening_line(&line)?;
    Ok(ControlPlane {
        child,
        sds_addr,
        admin_addr,
        webhook_addr: None,
        bundle_endpoint_addr: None,
        bundle_pem_path: state_dir.join("bundle.pem"),
        operator_socket: state_dir.join("operator.sock"),
        state_dir,
        trust_domain: trellis_identity::TrustDomain::parse("example.org").unwrap(),
        dir,
        opts: ControlPlaneOpts::default(),
    })
}

/// `trellis sidecar` for `spiffe_id` with exactly this environment (the join token in
/// `TRELLIS_JOIN_TOKEN`, the logging settings) and `upstreams`; waits for `/ready`.
async fn start_sidecar(
    cp: &ControlPlane,
    name: &str,
    spiffe_id: &str,
    app: SocketAddr,
    upstreams: &[String],
    env: &[(&str, &str)],
    args: &[&str],
) -> anyhow::Result<Sidecar> {
    let mut cmd = Command::new(trellis_bin());
    cmd.arg("sidecar")
        .args(["--trust-domain", "example.org"])
        .args(["--control-plane", &cp.sds_addr.to_string()])
        .arg("--control-bundle")
        .arg(&cp.bundle_pem_path)
        .args(["--spiffe-id", spiffe_id])
        .args(["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0", "--app", &app.to_string()])
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("TRELLIS_LOG_FORMAT")
        .envs(env.iter().copied());
    for u in upstreams {
        cmd.args(["--upstream", u]);
    }
    let mut child = Child::spawn(name, cmd, cp.dir.path())?;
    let line = child.stdout_line(STARTUP_TIMEOUT)?;
    let addrs = parse_sidecar_line(&line)?;
    let sidecar = Sidecar {
        child,
        addrs,
        spiffe_id: spiffe_id.to_string(),
        opts: None,
    };
    sidecar.wait_ready().await?;
    Ok(sidecar)
}

/// Parses every stderr line of `who` as one JSON object with `timestamp` (RFC 3339, UTC),
/// `level`, `target`, `message`, and `fields` (an object) when present.
fn json_lines(who: &str, stderr: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for (n, line) in stderr.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{who} stderr line {}: not JSON: {line:?}", n + 1))?;
        let ctx = || format!("{who} stderr line {}: {line}", n + 1);
        ensure!(v.is_object(), "not an object: {}", ctx());
        let ts = v["timestamp"]
            .as_str()
            .with_context(|| format!("no timestamp: {}", ctx()))?;
        ensure!(
            ts.len() >= 20 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
            "timestamp {ts:?} is not RFC 3339 UTC: {}",
            ctx()
        );
        let level = v["level"]
            .as_str()
            .with_context(|| format!("no level: {}", ctx()))?;
        ensure!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
            "level {level:?}: {}",
            ctx()
        );
        ensure!(
            v["target"].as_str().is_some_and(|t| !t.is_empty()),
            "no target: {}",
            ctx()
        );
        ensure!(v["message"].is_string(), "no message: {}", ctx());
        if let Some(fields) = v.get("fields") {
            ensure!(fields.is_object(), "fields is not an object: {}", ctx());
        }
        out.push(v);
    }
    Ok(out)
}

/// The strings that must never reach a log: each join token's secret part (after the
/// `trellis-join.` prefix), PEM key armour, and the SVID key's base64 (whole and per PEM line)
/// and hex.
fn forbidden(tokens: &[&str], key_der: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in tokens {
        let secret = t.strip_prefix("trellis-join.").unwrap_or(t);
        assert!(secret.len() >= 16, "token {t:?} has a short secret part");
        out.push((format!("join token {t}"), secret.to_string()));
    }
    out.push(("PEM private key".into(), "PRIVATE KEY".into()));
    let b64 = base64::engine::general_purpose::STANDARD.encode(key_der);
    for (i, chunk) in b64.as_bytes().chunks(64).enumerate() {
        let chunk = String::from_utf8_lossy(chunk).into_owned();
        // The last PEM line can be short; a 24-character tail is still unique to the key.
        if chunk.len() >= 24 {
            out.push((format!("SVID key base64 line {}", i + 1), chunk));
        }
    }
    out.push(("SVID key hex".into(), hex::encode(key_der)));
    out
}

fn assert_no_secrets(who: &str, text: &str, secrets: &[(String, String)]) {
    for (what, s) in secrets {
        assert!(!text.contains(s.as_str()), "{who} contains the {what}");
    }
}

/// A control plane and two sidecars with `--log-format json` at `RUST_LOG=debug` (every
/// dependency's debug lines too): every stderr line is a JSON object with the fixed keys; and
/// across token creation, redemption, SVID issuance, a refused token, requests and a sidecar
/// shutdown, no stderr and no audit line holds a token or key material.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_objects_and_never_hold_secrets() -> anyhow::Result<()> {
    e2e(async {
        let env = [("RUST_LOG", "debug")];
        let cp = start_control(&env, &["--log-format", "json"])?;
        let token_a = cp.create_token(A_ID, "1h")?;
        let token_b = cp.create_token(B_ID, "1h")?;
        let token_c = cp.create_token("spiffe://example.org/ns/demo/sa/c", "1h")?;
        let app_a = EchoApp::start("app-a").await?;
        let app_b = EchoApp::start("app-b").await?;
        let json = ["--log-format", "json"];
        let mut b = start_sidecar(
            &cp,
            "sidecar-b",
            B_ID,
            app_b.addr,
            &[],
            &[("RUST_LOG", "debug"), ("TRELLIS_JOIN_TOKEN", &token_b)],
            &json,
        )
        .await?;
        let upstream = format!("name=b,hosts=b,address={},identity={B_ID}", b.addrs.inbound);
        // Sidecar A gets the format from the environment instead of the flag.
        let json_env = [
            ("RUST_LOG", "debug"),
            ("TRELLIS_LOG_FORMAT", "json"),
            ("TRELLIS_JOIN_TOKEN", &token_a),
        ];
        let mut a = start_sidecar(
            &cp,
            "sidecar-a",
            A_ID,
            app_a.addr,
            &[upstream],
            &json_env,
            &[],
        )
        .await?;

        for i in 0..5 {
            let reply =
                get_once(a.outbound(), Proto::H1, "b", &format!("/logs/{i}?q=1"), &[]).await?;
            ensure!(reply.status == 200, "request {i}: {}", reply.summary());
        }
        // An SVID whose key we hold, and a token that must be refused (one character off).
        let (svid, _) = fetch_svid(&cp, &token_c).await?;
        let mut wrong = token_c.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == 'A' { 'B' } else { 'A' });
        ensure!(
            fetch_svid(&cp, &wrong).await.is_err(),
            "a token one character off was accepted"
        );
        // Both reach the audit log before we read it.
        let audit_path = cp.state_dir.join("audit.log");
        let serial = svid.serial_hex().to_string();
        wait_until(
            STARTUP_TIMEOUT,
            "issuance and refusal in the audit log",
            || {
                let audit = std::fs::read_to_string(&audit_path).unwrap_or_default();
                audit.contains(&serial) && audit.contains("rejected")
            },
        )?;
        // Stopped (drained) so every line they will write is on stderr, shutdown included.
        a.stop(STARTUP_TIMEOUT).await?;
        b.stop(STARTUP_TIMEOUT).await?;

        let secrets = forbidden(
            &[&token_a, &token_b, &token_c, &wrong],
            svid.key().secret_der(),
        );
        let mut levels = std::collections::BTreeMap::<String, usize>::new();
        let mut access = std::collections::BTreeMap::<&str, Vec<Value>>::new();
        for (who, stderr) in [
            ("control plane", cp.child.stderr()),
            ("sidecar-a", a.child.stderr()),
            ("sidecar-b", b.child.stderr()),
        ] {
            let lines = json_lines(who, &stderr)?;
            ensure!(!lines.is_empty(), "{who} logged nothing at RUST_LOG=debug");
            ensure!(
                lines.iter().any(|l| l["level"] == "INFO"),
                "{who}: no INFO line"
            );
            for l in &lines {
                *levels
                    .entry(l["level"].as_str().unwrap().to_string())
                    .or_default() += 1;
                if l["target"] == "trellis::access" {
                    access.entry(who).or_default().push(l.clone());
                }
            }
            assert_no_secrets(who, &stderr, &secrets);
            println!("{who}: {} JSON lines; first: {}", lines.len(), lines[0]);
        }
        let cp_lines = json_lines("control plane", &cp.child.stderr())?;
        let issued = cp_lines
            .iter()
            .find(|l| l["message"] == "issued SVID" && l["fields"]["serial"] == serial.as_str())
            .context("no `issued SVID` line with our serial")?;
        println!("structured event: {issued}");
        ensure!(issued["fields"]["spiffe_id"] == "spiffe://example.org/ns/demo/sa/c");

        let audit = std::fs::read_to_string(&audit_path)?;
        for line in audit.lines() {
            serde_json::from_str::<Value>(line)
                .with_context(|| format!("audit line not JSON: {line}"))?;
        }
        assert_no_secrets("audit.log", &audit, &secrets);
        println!(
            "levels: {levels:?}; audit.log: {} lines; checked {} forbidden strings",
            audit.lines().count(),
            secrets.len()
        );
        // The access log: one INFO line per request on each side, fields structured (the
        // status a number), the query string left out.
        for who in ["sidecar-a", "sidecar-b"] {
            let lines = access.get(who).map(Vec::as_slice).unwrap_or_default();
            ensure!(
                lines.len() >= 5,
                "{who}: {} access lines for 5 requests",
                lines.len()
            );
            for l in lines {
                ensure!(l["level"] == "INFO", "{who}: access line not INFO: {l}");
                let f = &l["fields"];
                ensure!(
                    f["status"] == 200
                        && f["method"] == "GET"
                        && f["path"].as_str().is_some_and(|p| p.starts_with("/logs/")),
                    "{who}: access line lacks status/method/path: {l}"
                );
            }
            println!("{who}: {} access lines; first: {}", lines.len(), lines[0]);
        }
        Ok(())
    })
    .await
}

/// Text (the default) at `RUST_LOG=info`: readable lines with level, target, message and
/// `key=value` fields, none of them JSON, the access log included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_are_human_readable() -> anyhow::Result<()> {
    e2e(async {
        let env = [("RUST_LOG", "info")];
        let cp = start_control(&env, &[])?;
        let app_b = EchoApp::start("app-b").await?;
        let token = cp.create_token(B_ID, "1h")?;
        let b_env = [("RUST_LOG", "info"), ("TRELLIS_JOIN_TOKEN", &token)];
        let b = start_sidecar(&cp, "sidecar-b", B_ID, app_b.addr, &[], &b_env, &[]).await?;
        let app_a = EchoApp::start("app-a").await?;
        let upstream = format!("name=b,hosts=b,address={},identity={B_ID}", b.addrs.inbound);
        let token = cp.create_token(A_ID, "1h")?;
        let a = start_sidecar(
            &cp,
            "sidecar-a",
            A_ID,
            app_a.addr,
            &[upstream],
            &[("RUST_LOG", "info"), ("TRELLIS_JOIN_TOKEN", &token)],
            &["--log-format", "text"],
        )
        .await?;
        let reply = get_once(a.outbound(), Proto::H1, "b", "/text", &[]).await?;
        ensure!(reply.status == 200, "request: {}", reply.summary());

        for (who, stderr) in [
            ("control plane", cp.child.stderr()),
            ("sidecar-a", a.child.stderr()),
            ("sidecar-b", b.child.stderr()),
        ] {
            ensure!(!stderr.trim().is_empty(), "{who} logged nothing at info");
            for line in stderr.lines() {
                ensure!(
                    serde_json::from_str::<Value>(line).map_or(true, |v| !v.is_object()),
                    "{who}: a JSON line in text mode: {line}"
                );
                ensure!(!line.contains('\u{1b}'), "{who}: ANSI escape: {line:?}");
                ensure!(
                    !line.contains("DEBUG") && !line.contains("TRACE"),
                    "{who}: below info at RUST_LOG=info: {line}"
                );
            }
            let info = stderr
                .lines()
                .find(|l| l.contains(" INFO ") && l.contains("trellis"))
                .with_context(|| format!("{who}: no `<time>  INFO <target>: …` line:\n{stderr}"))?;
            println!("{who}: {info}");
        }
        let issued = cp
            .child
            .stderr()
            .lines()
            .find(|l| l.contains("issued SVID"))
            .map(str::to_string)
            .context("no `issued SVID` line")?;
        ensure!(
            issued.contains(" INFO ")
                && issued.contains("spiffe_id=spiffe://example.org/ns/demo/sa/")
                && issued.contains("serial="),
            "issuance line lacks its fields: {issued}"
        );
        // The access log is a line like any other. It may be written just after the response
        // reaches the app, so poll for it.
        let access = || {
            a.child
                .stderr()
                .lines()
                .chain(b.child.stderr().lines())
                .find(|l| l.contains("trellis::access"))
                .map(str::to_string)
        };
        wait_until(STARTUP_TIMEOUT, "an access line", || access().is_some())?;
        let line = access().unwrap();
        ensure!(
            line.contains(" INFO ")
                && line.contains("path=\"/text\"")
                && line.contains("status=200"),
            "access line: {line}"
        );
        println!("access line: {line}");
        Ok(())
    })
    .await
}

/// With stderr a file (not a terminal) and `NO_COLOR` unset, text logs carry no ANSI colour.
#[test]
fn text_is_plain_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("control.stderr.log");
    let mut child = Command::new(trellis_bin())
        .args(["control", "--trust-domain", "example.org"])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("TRELLIS_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    /// Kills and reaps the process whatever happens.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let _reap = Reap(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(STARTUP_TIMEOUT).unwrap();
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        line.starts_with("trellis control listening"),
        "{line:?}; stderr:\n{}",
        stderr()
    );
    wait_until(STARTUP_TIMEOUT, "the `control plane serving` line", || {
        stderr().contains("control plane serving")
    })
    .unwrap();
    let text = stderr();
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{text:?}"
    );
    println!("{}", text.lines().next().unwrap_or_default());
}

/// `RUST_LOG=warn` keeps warnings and drops info, on the control plane (an SVID issued, then a
/// refused token) and on a sidecar (start, SVID, ready).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_warn_silences_info() -> anyhow::Result<()> {
    e2e(async {
        let env = [("RUST_LOG", "warn"), ("TRELLIS_LOG_FORMAT", "json")];
        let cp = start_control(&env, &[])?;
        let token = cp.create_token("spiffe://example.org/ns/demo/sa/c", "1h")?;
        fetch_svid(&cp, &token).await?;
        let app = EchoApp::start("app-b").await?;
        let sidecar_token = cp.create_token(B_ID, "1h")?;
        let b = start_sidecar(
            &cp,
            "sidecar-b",
            B_ID,
            app.addr,
            &[],
            &[
                ("RUST_LOG", "warn"),
                ("TRELLIS_LOG_FORMAT", "json"),
                ("TRELLIS_JOIN_TOKEN", &sidecar_token),
            ],
            &[],
        )
        .await?;
        // A refusal is a warning: once it is on stderr, the issuance before it has been
        // logged too (or not at all).
        ensure!(fetch_svid(&cp, "trellis-join.not-a-real-token-0123456789")
            .await
            .is_err());
        wait_until(STARTUP_TIMEOUT, "the `attestation refused` warning", || {
            cp.child.stderr().contains("attestation refused")
        })?;
        for (who, stderr) in [
            ("control plane", cp.child.stderr()),
            ("sidecar-b", b.child.stderr()),
        ] {
            let lines = json_lines(who, &stderr)?;
            for l in &lines {
                ensure!(
                    l["level"] == "WARN" || l["level"] == "ERROR",
                    "{who} logged below warn at RUST_LOG=warn: {l}"
                );
            }
            println!("{who}: {} lines at RUST_LOG=warn", lines.len());
        }
        Ok(())
    })
    .await
}

/// An unparsable `RUST_LOG` is reported on stderr (and the default filter used), not ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rust_log_is_reported() -> anyhow::Result<()> {
    e2e(async {
        let cp = start_control(&[("RUST_LOG", "info,[")], &[])?;
        wait_until(STARTUP_TIMEOUT, "the RUST_LOG warning", || {
            cp.child.stderr().contains("ignoring RUST_LOG")
        })?;
        let stderr = cp.child.stderr();
        let line = stderr
            .lines()
            .find(|l| l.contains("ignoring RUST_LOG"))
            .unwrap();
        ensure!(line.contains("WARN"), "{line}");
        println!("{line}");
        Ok(())
    })
    .await
}

/// An unknown format, by flag or environment, on any subcommand: exit 2 with clap's message
/// naming the value and the choices, before anything starts.
#[test]
fn unknown_log_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let cases: Vec<(&str, Vec<&str>, Option<&str>)> = vec![
        (
            "flag before the subcommand",
            vec!["--log-format", "xml", "control", "--state-dir", state],
            None,
        ),
        (
            "flag after the subcommand",
            vec!["control", "--state-dir", state, "--log-format", "xml"],
            None,
        ),
        (
            "flag on a one-shot command",
            vec![
                "policy",
                "check",
                "--log-format",
                "xml",
                "/nonexistent.yaml",
            ],
            None,
        ),
        (
            "environment",
            vec!["control", "--state-dir", state],
            Some("xml"),
        ),
    ];
    for (what, args, env) in cases {
        let mut cmd = Command::new(trellis_bin());
        cmd.args(&args).env_remove("TRELLIS_LOG_FORMAT");
        if let Some(v) = env {
            cmd.env("TRELLIS_LOG_FORMAT", v);
        }
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(
            stderr.contains("invalid value 'xml'")
                && stderr.contains("--log-format")
                && stderr.contains("text")
                && stderr.contains("json"),
            "{what}: {stderr}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening"),
            "{what}: started anyway"
        );
        println!("{what}: {}", stderr.lines().next().unwrap_or_default());
    }
}

/// A fatal error of a long-running command is one JSON line too in JSON mode.
#[test]
fn fatal_error_is_a_json_line_in_json_mode() {
    let dir = tempfile::tempdir().unwrap();
    // A state directory that is a file: the control plane refuses it at startup.
    let not_a_dir = dir.path().join("state");
    std::fs::write(&not_a_dir, "x").unwrap();
    let mut cmd = Command::new(trellis_bin());
    cmd.args([
        "control",
        "--trust-domain",
        "example.org",
        "--log-format",
        "json",
    ])
    .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
    .arg("--state-dir")
    .arg(&not_a_dir)
    .env("RUST_LOG", "info");
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started on a file as state dir: {stderr}"
    );
    let lines = json_lines("control plane", &stderr).unwrap();
    let last = lines.last().expect("an error line");
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["message"].as_str().unwrap().contains("state"),
        "{last}"
    );
    println!("{last}");
}
