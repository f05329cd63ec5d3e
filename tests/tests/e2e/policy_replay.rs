//! `trellis policy replay`, `diff` and `test` end to end.
//!
//! The replay test records real traffic: sidecar B enforces an old policy with the JSON access
//! log on while app A sends HTTP requests and opens a TCP connection through sidecar A; the log
//! feeds `trellis policy replay NEW`; then NEW is loaded into the running sidecar B, the same
//! requests are sent again, and what B does must be what replay predicted, request by request
//! and in total.
//!
//! ```text
//!  test (app A) ──http / tcp──▶ sidecar A ══ mTLS ══▶ sidecar B (--policy DIR, JSON access log)
//!                                                        │ stderr ─▶ replay NEW --access-log
//! ```

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use flate2::write::GzEncoder;
use flate2::Compression;
use http::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use trellis_tests::app_client::{empty, AppConn, Proto};
use trellis_tests::echo::TcpEcho;
use trellis_tests::mesh::{Mesh, MeshOpts, A_ID, B_ID};
use trellis_tests::{
    e2e, eventually, free_port, run_with_stdin, run_with_timeout, trellis_bin, workspace_root,
    COMMAND_TIMEOUT, STARTUP_TIMEOUT,
};

/// The policy sidecar B starts with: A may GET and POST under /api, and open TCP to `{port}`.
const OLD: &str = "apiVersion: trellis.io/v1
kind: Policy
rules:
  - name: api
    action: allow
    from: [spiffe://example.org/ns/demo/sa/a]
    to:
      - methods: [GET, POST]
        paths: [/api/**]
  - name: db
    action: allow
    from: [spiffe://example.org/ns/demo/sa/*]
    ports: [{port}]
";

/// The policy to roll out: reads only, no admin, a new public area, no TCP.
const NEW: &str = "apiVersion: trellis.io/v1
kind: Policy
rules:
  - name: api-read
    action: allow
    from: [spiffe://example.org/ns/demo/sa/a]
    to:
      - methods: [GET]
        paths: [/api/**]
  - name: public
    action: allow
    from: [\"*\"]
    to:
      - paths: [/public/**]
  - name: no-admin
    action: deny
    from: [\"*\"]
    to:
      - paths: [/api/admin/**]
";

/// The requests app A sends, raw paths as a caller writes them.
const REQUESTS: &[(&str, &str)] = &[
    ("GET", "/api/orders"),
    ("GET", "/api/orders?page=2"),
    ("POST", "/api/orders"),
    ("POST", "/api//orders/./42"),
    ("GET", "/api/admin/users"),
    ("GET", "/api/admin;jsessionid=1/users"),
    ("GET", "/public/logo.png"),
    ("DELETE", "/api/orders/42"),
    ("GET", "/a/%2f"),
];

/// `trellis <args>` with a deadline.
fn trellis(args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(trellis_bin());
    cmd.args(args);
    run_with_timeout(cmd, COMMAND_TIMEOUT)
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What sidecar B did with each request (by status) and the TCP connection (echo or close).
async fn send_all(mesh: &Mesh, db: std::net::SocketAddr) -> anyhow::Result<Vec<&'static str>> {
    let mut outcomes = Vec::new();
    for (method, path) in REQUESTS {
        // A fresh connection each: a denial must not cost the next request its connection.
        let mut conn = AppConn::connect(mesh.a.outbound(), Proto::H1).await?;
        let req = conn
            .request(Method::from_bytes(method.as_bytes())?, "b", path)
            .body(empty())?;
        let reply = conn.send_read(req).await?;
        outcomes.push(match reply.status {
            StatusCode::OK => "allow",
            StatusCode::FORBIDDEN => "deny",
            StatusCode::BAD_REQUEST => "refused",
            other => anyhow::bail!("{method} {path}: unexpected {other}: {}", reply.summary()),
        });
    }
    let mut tcp = tokio::net::TcpStream::connect(db).await?;
    let _ = tcp.write_all(b"ping").await;
    let mut buf = [0u8; 4];
    let echoed = tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut buf))
        .await
        .context("TCP connection neither echoed nor closed within 10s")?;
    outcomes.push(if echoed.is_ok() && &buf == b"ping" {
        "allow"
    } else {
        "deny"
    });
    Ok(outcomes)
}

/// Sidecar B's inbound access lines (HTTP requests and TCP connections) in `stderr`.
fn access_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "trellis::access" && l["fields"]["direction"] == "inbound")
        .collect()
}

/// Waits until sidecar B has logged `n` inbound access lines; returns its stderr.
async fn wait_logged(mesh: &Mesh, n: usize) -> anyhow::Result<String> {
    eventually(
        STARTUP_TIMEOUT,
        "access lines in sidecar B's log",
        || async {
            let stderr = mesh.b.child.stderr();
            let got = access_lines(&stderr).len();
            ensure!(got >= n, "{got} access lines, want {n}");
            Ok(stderr)
        },
    )
    .await
}

fn tally(outcomes: &[&str]) -> Value {
    let count = |o: &str| outcomes.iter().filter(|x| **x == o).count();
    serde_json::json!({"allow": count("allow"), "deny": count("deny"), "refused": count("refused")})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_predicts_what_the_sidecar_does_after_the_rollout() -> anyhow::Result<()> {
    e2e(async {
        let echo = TcpEcho::start().await?;
        let b_tcp = free_port();
        let dir = tempfile::tempdir()?;
        let policy_dir = dir.path().join("policy");
        std::fs::create_dir(&policy_dir)?;
        let policy_file = policy_dir.join("service-b.yaml");
        std::fs::write(&policy_file, OLD.replace("{port}", &b_tcp.to_string()))?;
        let new_file = dir.path().join("new.yaml");
        std::fs::write(&new_file, NEW)?;
        let b_config = dir.path().join("sidecar-b.yaml");
        std::fs::write(
            &b_config,
            format!(
                "inbound:\n  tcp:\n    - listen: 127.0.0.1:{b_tcp}\n      app: {}\n",
                echo.addr
            ),
        )?;
        let path = |p: &Path| p.display().to_string();
        let mesh = Mesh::start(MeshOpts {
            b_args: vec![
                "--log-format".into(),
                "json".into(),
                "--access-log".into(),
                "true".into(),
                "--policy".into(),
                path(&policy_dir),
                "--config".into(),
                path(&b_config),
            ],
            a_upstreams: vec![format!(
                "name=db,listen=127.0.0.1:0,protocol=tcp,address=127.0.0.1:{b_tcp},identity={B_ID}"
            )],
            ..Default::default()
        })
        .await?;
        let db = *mesh
            .a
            .addrs
            .outbound
            .get("db")
            .context("sidecar A did not report its `db` listener")?;

        // 1. Traffic under the old policy, recorded.
        let before = send_all(&mesh, db).await?;
        let n = before.len();
        let stderr = wait_logged(&mesh, n).await?;
        let lines = access_lines(&stderr);
        let tcp_line = lines
            .iter()
            .find(|l| l["message"] == "connection")
            .context("no TCP connection line")?;
        ensure!(
            tcp_line["fields"]["port"] == b_tcp
                && tcp_line["fields"]["caller"] == A_ID
                && tcp_line["fields"]["decision"] == "allow"
                && tcp_line["fields"]["rule"] == "db"
                && tcp_line["fields"]["policy"].is_string(),
            "TCP access line: {tcp_line}"
        );
        let odd = lines
            .iter()
            .find(|l| l["fields"]["raw_path"] == "/api//orders/./42")
            .context("no line with the raw path as sent")?;
        ensure!(
            odd["fields"]["path"] == "/api/orders/42"
                && odd["fields"]["decision"] == "allow"
                && odd["fields"]["rule"] == "api",
            "access line of a path to normalize: {odd}"
        );
        let log = dir.path().join("b-old.log");
        std::fs::write(&log, &stderr)?;

        // 2. Replay under the new policy.
        let out = trellis(&[
            "policy",
            "replay",
            &path(&new_file),
            "--access-log",
            &path(&log),
            "--json",
        ])?;
        ensure!(code(&out) == Some(1), "replay: {}", text(&out));
        let replay: Value = serde_json::from_slice(&out.stdout).context(text(&out))?;
        let report = &replay["report"];
        println!("replay report: {report}");
        ensure!(
            report["requests"] == REQUESTS.len() && report["connections"] == 1,
            "replay counted {} requests, {} connections",
            report["requests"],
            report["connections"]
        );
        ensure!(
            report["recorded"] == tally(&before),
            "recorded {} but the sidecar did {}",
            report["recorded"],
            tally(&before)
        );
        let human = trellis(&[
            "policy",
            "replay",
            &path(&new_file),
            "--access-log",
            &path(&log),
        ])?;
        let human_text = String::from_utf8_lossy(&human.stdout);
        println!("{human_text}");
        ensure!(
            human_text.contains(&format!(
                "POST /api/orders from {A_ID}: allow (api) → deny (default)"
            )),
            "no example of a change: {}",
            text(&human)
        );

        // The same log in two parts, the second gzipped on stdin (`kubectl logs … | gzip`, a
        // rotated log): several inputs, `-` among them, give the same report as one file.
        let all: Vec<&str> = stderr.lines().collect();
        let access_at: Vec<usize> = (0..all.len())
            .filter(|&i| !access_lines(all[i]).is_empty())
            .collect();
        // Split between two access lines, so each part holds decisions to replay.
        let cut = access_at[access_at.len() / 2];
        let part = |lines: &[&str]| lines.iter().map(|l| format!("{l}\n")).collect::<String>();
        let first = dir.path().join("b-old.1.log");
        std::fs::write(&first, part(&all[..cut]))?;
        let second = dir.path().join("b-old.2.log.gz");
        let mut gz = GzEncoder::new(std::fs::File::create(&second)?, Compression::default());
        gz.write_all(part(&all[cut..]).as_bytes())?;
        gz.finish()?;
        let mut cmd = Command::new(trellis_bin());
        cmd.args(["policy", "replay", &path(&new_file), "--access-log"])
            .args([&path(&first), "-", "--json"]);
        let out = run_with_stdin(cmd, std::fs::File::open(&second)?, COMMAND_TIMEOUT)?;
        ensure!(code(&out) == Some(1), "replay FILE -: {}", text(&out));
        let parts: Value = serde_json::from_slice(&out.stdout).context(text(&out))?;
        ensure!(
            parts == replay,
            "replay of {} + gzipped stdin: {parts}\nreplay of the whole log: {replay}",
            path(&first)
        );

        // 3. Roll the new policy out to the running sidecar and wait until it is in force.
        let tmp = policy_dir.join(".service-b.yaml.tmp");
        std::fs::write(&tmp, NEW)?;
        std::fs::rename(&tmp, &policy_file)?;
        let new_hash = report["policy"]
            .as_str()
            .context("no policy hash")?
            .to_owned();
        eventually(STARTUP_TIMEOUT, "the new policy in force", || async {
            let r = mesh.b.admin_get("/policy").await?;
            let status: Value = serde_json::from_str(&r.text())?;
            ensure!(status["hash"] == new_hash.as_str(), "/policy: {status}");
            Ok(())
        })
        .await?;

        // 4. The same traffic again: what the sidecar does is what replay said it would.
        let after = send_all(&mesh, db).await?;
        let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        println!("before: {before:?}\nafter:  {after:?}");
        ensure!(
            report["replayed"] == tally(&after),
            "replay predicted {}, the sidecar did {}",
            report["replayed"],
            tally(&after)
        );
        ensure!(
            report["changed"] == changed,
            "replay predicted {} changes, the sidecar changed {changed}",
            report["changed"]
        );
        ensure!(
            changed >= 4,
            "the policies should differ on several requests"
        );

        // Request by request, too: each line of the second run, replayed under NEW, is
        // unchanged, and each line of the first run changed as the sidecar then did.
        let stderr = wait_logged(&mesh, 2 * n).await?;
        let second: String = stderr
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .is_ok_and(|v| v["fields"]["policy"] == new_hash.as_str())
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let log2 = dir.path().join("b-new.log");
        std::fs::write(&log2, second)?;
        let out = trellis(&[
            "policy",
            "replay",
            &path(&new_file),
            "--access-log",
            &path(&log2),
        ])?;
        ensure!(
            code(&out) == Some(0)
                && String::from_utf8_lossy(&out.stdout).contains("no decision changes"),
            "replaying the new policy's own log: {}",
            text(&out)
        );
        Ok(())
    })
    .await
}

/// Writes `lines` to a file in `dir` and replays it under `policy`.
fn replay_file(dir: &Path, name: &str, content: &str, extra: &[&str]) -> anyhow::Result<Output> {
    let log = dir.join(name);
    std::fs::write(&log, content)?;
    let policy = workspace_root().join("examples/policy/service-b.yaml");
    let mut args = vec![
        "policy".to_owned(),
        "replay".into(),
        policy.display().to_string(),
        "--access-log".into(),
        log.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    trellis(&args)
}

const GOOD: &str = r#"{"timestamp":"2026-12-06T00:00:00.000001Z","level":"INFO","target":"trellis::access","message":"request","fields":{"caller":"spiffe://example.org/ns/prod/sa/service-a","direction":"inbound","method":"GET","path":"/api/orders","raw_path":"/api/orders","status":200,"duration_ms":0.2,"upstream":"127.0.0.1:9","rule":"prod-api","decision":"allow","policy":"0123"}}"#;

#[test]
fn replay_bad_inputs_get_clear_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cases: &[(&str, String, &str)] = &[
        ("empty.log", String::new(), "empty.log: the log is empty"),
        (
            "truncated.log",
            format!("{GOOD}\n{}\n", &GOOD[..GOOD.len() - 30]),
            "truncated.log:2: truncated JSON",
        ),
        (
            "older.log",
            format!(
                "{GOOD}\n{}\n",
                GOOD.replace(r#""raw_path":"/api/orders","#, "")
                    .replace(r#","decision":"allow","policy":"0123""#, "")
            ),
            "older.log:2: access-log line from an older sidecar",
        ),
        (
            "unknown.log",
            format!(
                "{GOOD}\n{}\n",
                GOOD.replace(r#""rule""#, r#""tenant":"x","rule""#)
            ),
            "unknown.log:2: malformed access-log line: unknown field `tenant`",
        ),
        (
            "text.log",
            "2026-12-06T00:00:00Z  INFO trellis::access: request caller=x\n".to_owned(),
            "no access-log lines to replay",
        ),
    ];
    for (name, content, want) in cases {
        let out = replay_file(dir.path(), name, content, &[])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), Some(2), "{name}: {}", text(&out));
        assert!(
            stderr.contains(want),
            "{name}: want {want:?} in {}",
            text(&out)
        );
    }
    // A malformed line does not stop the replay (the good line after it is counted) unless
    // --strict.
    let content = format!("{}\n{GOOD}\n", &GOOD[..GOOD.len() - 10]);
    let out = replay_file(dir.path(), "mixed.log", &content, &["--json"])?;
    let report: Value = serde_json::from_slice(&out.stdout).context(text(&out))?;
    assert_eq!(code(&out), Some(2));
    assert_eq!(report["report"]["requests"], 1, "{report}");
    let out = replay_file(dir.path(), "mixed.log", &content, &["--json", "--strict"])?;
    assert_eq!(code(&out), Some(2));
    assert!(
        out.stdout.is_empty(),
        "--strict printed a report: {}",
        text(&out)
    );
    // A good log under the policy that made it: nothing changes.
    let out = replay_file(dir.path(), "good.log", &format!("{GOOD}\n"), &[])?;
    assert_eq!(code(&out), Some(0), "{}", text(&out));
    Ok(())
}

#[test]
fn policy_test_runs_the_example_and_locates_failures() -> anyhow::Result<()> {
    let example = workspace_root().join("examples/policy/service-b.test.yaml");
    let out = trellis(&["policy", "test", &example.display().to_string()])?;
    assert_eq!(code(&out), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 failed"),
        "{}",
        text(&out)
    );

    let dir = tempfile::tempdir()?;
    std::fs::copy(
        workspace_root().join("examples/policy/service-b.yaml"),
        dir.path().join("service-b.yaml"),
    )?;
    let failing = dir.path().join("failing.test.yaml");
    std::fs::write(
        &failing,
        "policy: [service-b.yaml]\ntests:\n  - { from: spiffe://example.org/ns/prod/sa/service-a, method: GET, path: /admin/x, expect: allow }\n",
    )?;
    let out = trellis(&["policy", "test", &failing.display().to_string()])?;
    assert_eq!(code(&out), Some(1), "{}", text(&out));
    let want = format!(
        "{}:3: GET /admin/x from spiffe://example.org/ns/prod/sa/service-a: expected allow, got deny (rule no-export)",
        failing.display()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&want),
        "want {want}: {}",
        text(&out)
    );

    let bad = dir.path().join("bad.test.yaml");
    std::fs::write(
        &bad,
        "policy: [service-b.yaml]\ntests:\n  - { from: spiffe://example.org/x, path: /, expect: maybe }\n",
    )?;
    let out = trellis(&["policy", "test", &bad.display().to_string()])?;
    assert_eq!(code(&out), Some(2), "{}", text(&out));
    let want = format!("{}:3:", bad.display());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&want),
        "{}",
        text(&out)
    );
    Ok(())
}

#[test]
fn policy_diff_reports_changes_and_ignores_reordering() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let old = dir.path().join("old.yaml");
    let new = dir.path().join("new.yaml");
    let reordered = dir.path().join("reordered.yaml");
    std::fs::write(&old, OLD.replace("{port}", "5432"))?;
    std::fs::write(&new, NEW)?;
    // The same decisions: rules split, renamed and reordered.
    std::fs::write(
        &reordered,
        OLD.replace("{port}", "5432")
            .replace("methods: [GET, POST]", "methods: [GET]")
            + "  - name: api-post\n    action: allow\n    from: [spiffe://example.org/ns/demo/sa/a]\n    to:\n      - methods: [POST]\n        paths: [/api/**]\n",
    )?;
    let p = |f: &Path| f.display().to_string();
    let out = trellis(&["policy", "diff", &p(&old), &p(&reordered)])?;
    assert_eq!(code(&out), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("no decision changes"),
        "{}",
        text(&out)
    );

    let out = trellis(&["policy", "diff", &p(&old), "--", &p(&new)])?;
    assert_eq!(code(&out), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    for want in [
        format!("POST /api from {A_ID}: allow (api) → deny (default)"),
        "→ deny (no-admin)".to_owned(),
        "→ allow (public)".to_owned(),
        "TCP port 5432 from".to_owned(),
    ] {
        assert!(stdout.contains(&want), "want {want:?}: {}", text(&out));
    }
    let out = trellis(&["policy", "diff", &p(&old)])?;
    assert_eq!(code(&out), Some(2), "{}", text(&out));
    Ok(())
}
