//! Every protocol a workload speaks (issue #15), with clients nobody here wrote: Python
//! `grpcio` (server and client, raw-bytes generic handlers) through two sidecars with
//! `--app-protocol h2c` on the server side; `curl -x` and Python `urllib` with `HTTP_PROXY`
//! through the outbound port; `CONNECT` refused with a reason; Python `websockets` through
//! two sidecars, with the idle timeout and the drain applied to its tunnel.
//!
//! ```text
//!  grpcio client ──h2c──▶ sidecar A ══ mTLS, HTTP/2 ══▶ sidecar B (--app-protocol h2c, policy) ──h2c──▶ grpcio server
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde_json::Value;
use trellis_tests::echo::EchoApp;
use trellis_tests::mesh::{A_ID, B_ID};
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{
    e2e, in_ci, run_with_timeout, tool_or_skip, workspace_root, Child, ControlPlane,
    ControlPlaneOpts, STARTUP_TIMEOUT,
};

/// The repo's virtualenv Python (tests/run.sh installs `grpcio` and `websockets` there), if
/// it can import `module`; outside CI a missing one skips the test.
pub(crate) fn venv_python_with(test: &str, module: &str) -> Option<PathBuf> {
    let python = workspace_root().join(".venv/bin/python");
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        !in_ci(),
        "{test}: {} cannot import {module}; tests/run.sh installs it",
        python.display()
    );
    eprintln!("SKIP {test}: .venv has no {module} (run `bash tests/run.sh`, which installs it)");
    None
}

fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests/fixtures").join(name)
}

/// Starts `python fixture server` and returns it with the address it printed.
pub(crate) fn start_python_server(
    python: &PathBuf,
    script: &str,
    name: &str,
    dir: &std::path::Path,
) -> anyhow::Result<(Child, SocketAddr)> {
    let mut cmd = Command::new(python);
    cmd.arg(fixture(script)).arg("server");
    let mut child = Child::spawn(name, cmd, dir)?;
    let line = child.stdout_line(STARTUP_TIMEOUT)?;
    let addr = line
        .strip_prefix("listening ")
        .with_context(|| format!("{name} said {line:?}"))?
        .parse()?;
    Ok((child, addr))
}

/// A Python fixture app (`tests/fixtures/<script> server`) behind sidecar B with `policy`
/// (and `b_args`), and sidecar A routing `Host: b` to it. Fields drop in order: sidecars,
/// apps, then the control plane.
struct FixtureMesh {
    a: Sidecar,
    b: Sidecar,
    _app_a: EchoApp,
    _server: Child,
    python: PathBuf,
    script: &'static str,
    cp: ControlPlane,
}

impl FixtureMesh {
    async fn start(
        python: &PathBuf,
        script: &'static str,
        policy: &str,
        b_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_with(python, script, policy, &[], b_args).await
    }

    /// As [`FixtureMesh::start`], with `a_args` for sidecar A too.
    async fn start_with(
        python: &PathBuf,
        script: &'static str,
        policy: &str,
        a_args: &[&str],
        b_args: &[&str],
    ) -> anyhow::Result<Self> {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let (server, app_addr) = start_python_server(python, script, "fixture-app", cp.dir.path())?;
        let policy_path = cp.dir.path().join("policy-b.yaml");
        std::fs::write(&policy_path, policy)?;
        let policy_path = policy_path.to_string_lossy().into_owned();
        let mut args = vec!["--policy", policy_path.as_str()];
        args.extend_from_slice(b_args);
        let b = Sidecar::start(
            &cp,
            SidecarOpts::new("sidecar-b", B_ID, app_addr).args(&args),
        )
        .await?;
        let app_a = EchoApp::start("app-a").await?;
        let a = Sidecar::start(
            &cp,
            SidecarOpts::new("sidecar-a", A_ID, app_a.addr)
                .upstream("b", b.addrs.inbound, B_ID)
                .args(a_args),
        )
        .await?;
        Ok(Self {
            a,
            b,
            _app_a: app_a,
            _server: server,
            python: python.clone(),
            script,
            cp,
        })
    }

    /// Starts `ws_peer.py hold` through sidecar A (one WebSocket, a message every `every`
    /// seconds or none, closed by the client after `hold_for` seconds) and waits until it says
    /// the socket is open.
    fn hold(&self, name: &str, every: f64, hold_for: f64) -> anyhow::Result<Child> {
        let mut cmd = Command::new(&self.python);
        cmd.arg(fixture(self.script))
            .arg("hold")
            .arg(self.a.outbound().to_string())
            .arg("b")
            .arg(every.to_string())
            .arg(hold_for.to_string());
        let mut child = Child::spawn(name, cmd, self.cp.dir.path())?;
        let line = child.stdout_line(STARTUP_TIMEOUT)?;
        ensure!(line.contains("\"open\""), "{name}: want open, got {line:?}");
        Ok(child)
    }

    /// Runs `<script> client <sidecar A's outbound> b`: one JSON line per case, by case name
    /// (and the raw output, for messages).
    fn run_client(&self, timeout: Duration) -> anyhow::Result<(HashMap<String, Value>, String)> {
        let mut cmd = Command::new(&self.python);
        cmd.arg(fixture(self.script))
            .arg("client")
            .arg(self.a.outbound().to_string())
            .arg("b");
        let out = run_with_timeout(cmd, timeout)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "{} client failed: {}\n{stdout}",
            self.script,
            String::from_utf8_lossy(&out.stderr)
        );
        let cases = stdout
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).with_context(|| format!("line {l:?}"))?;
                Ok((v["case"].as_str().unwrap_or_default().to_owned(), v))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok((cases, stdout))
    }
}

/// Sidecar B's policy: everything allowed but `test.Echo/Admin` (the grpcio and tonic tests).
pub(crate) const GRPC_POLICY: &str = "apiVersion: trellis.io/v1
kind: Policy
defaultAction: allow
rules:
  - name: no-grpc-admin
    action: deny
    from: [\"*\"]
    to:
      - paths: [/test.Echo/Admin]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcio_calls_cross_the_mesh_with_grpc_errors() -> anyhow::Result<()> {
    e2e(async {
        let test = "grpcio_calls_cross_the_mesh_with_grpc_errors";
        let Some(python) = venv_python_with(test, "grpc") else {
            return Ok(());
        };
        let mesh = FixtureMesh::start(
            &python,
            "grpc_peer.py",
            GRPC_POLICY,
            &["--app-protocol", "h2c"],
        )
        .await?;
        let (cases, stdout) = mesh.run_client(Duration::from_secs(120))?;
        let case = |name: &str| {
            cases
                .get(name)
                .with_context(|| format!("no {name}: {stdout}"))
        };

        let unary = case("unary")?;
        let reply = unary["reply"].as_str().unwrap_or_default();
        ensure!(
            unary["ok"] == true
                && reply.starts_with(&format!("hello|xfcc=By={B_ID};Hash="))
                && reply.ends_with(&format!(";URI={A_ID}")),
            "unary: {unary}"
        );
        ensure!(
            case("server_stream")?["replies"] == serde_json::json!(["0:x", "1:x", "2:x"]),
            "server streaming: {}",
            case("server_stream")?
        );
        ensure!(
            case("client_stream")?["reply"] == "count=5;bytes=15",
            "client streaming: {}",
            case("client_stream")?
        );
        ensure!(
            case("bidi")?["replies"] == serde_json::json!(["m0", "m1", "m2", "m3"]),
            "bidi: {}",
            case("bidi")?
        );
        ensure!(case("big")?["same"] == true, "5 MiB: {}", case("big")?);
        let denied = case("denied")?;
        ensure!(
            denied["ok"] == false
                && denied["code"] == "PERMISSION_DENIED"
                && denied["details"]
                    .as_str()
                    .is_some_and(|d| d.contains("no-grpc-admin")),
            "denied: want PERMISSION_DENIED naming no-grpc-admin, got {denied}"
        );
        let deadline = case("deadline")?;
        ensure!(
            deadline["code"] == "DEADLINE_EXCEEDED",
            "deadline: {deadline}"
        );
        let bad_path = case("bad_path")?;
        ensure!(
            bad_path["ok"] == false
                && bad_path["code"] == "INVALID_ARGUMENT"
                && bad_path["details"]
                    .as_str()
                    .is_some_and(|d| d.contains("encoded_slash")),
            "refused path: want INVALID_ARGUMENT naming encoded_slash, got {bad_path}"
        );
        let no_upstream = case("no_upstream")?;
        ensure!(
            no_upstream["ok"] == false
                && no_upstream["code"] == "UNAVAILABLE"
                && no_upstream["details"]
                    .as_str()
                    .is_some_and(|d| d.contains("nowhere")),
            "no upstream: want UNAVAILABLE naming the host, got {no_upstream}"
        );
        let stats = &case("stats")?["stats"];
        ensure!(
            stats["calls"].get("Admin").is_none(),
            "a denied call reached the app: {stats}"
        );
        ensure!(
            stats["cancelled"]
                .as_array()
                .is_some_and(|c| c.iter().any(|m| m == "Slow")),
            "the app never saw the expired call cancelled: {stats}"
        );
        Ok(())
    })
    .await
}

/// An HTTP/1.1-only app: Python's stdlib `http.server`.
const HTTP1_APP: &str = r#"
from http.server import HTTPServer, BaseHTTPRequestHandler

class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"http/1.1 only")

    def log_message(self, *args):
        pass

server = HTTPServer(("127.0.0.1", 0), Hello)
print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_app_that_speaks_http1_gets_a_one_line_reason() -> anyhow::Result<()> {
    e2e(async {
        let Some(python) =
            venv_python_with("h2c_app_that_speaks_http1_gets_a_one_line_reason", "grpc")
        else {
            return Ok(());
        };
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        // An HTTP/1.1-only app (Python's http.server) behind `--app-protocol h2c`.
        let script = cp.dir.path().join("http1_app.py");
        std::fs::write(&script, HTTP1_APP)?;
        let mut cmd = Command::new(&python);
        cmd.arg(&script);
        let mut app = Child::spawn("http1-app", cmd, cp.dir.path())?;
        let line = app.stdout_line(STARTUP_TIMEOUT)?;
        let app_addr: SocketAddr = line
            .strip_prefix("listening ")
            .with_context(|| format!("http1 app said {line:?}"))?
            .parse()?;
        let b = Sidecar::start(
            &cp,
            SidecarOpts::new("sidecar-b", B_ID, app_addr).args(&["--app-protocol", "h2c"]),
        )
        .await?;
        let app_a = EchoApp::start("app-a").await?;
        let a = Sidecar::start(
            &cp,
            SidecarOpts::new("sidecar-a", A_ID, app_a.addr).upstream("b", b.addrs.inbound, B_ID),
        )
        .await?;
        let reply = trellis_tests::app_client::get_once(
            a.outbound(),
            trellis_tests::app_client::Proto::H1,
            "b",
            "/x",
            &[],
        )
        .await?;
        ensure!(
            reply.status == http::StatusCode::BAD_GATEWAY
                && reply
                    .text()
                    .contains("app did not answer HTTP/2; check app_protocol"),
            "{}",
            reply.summary()
        );
        // The same for a gRPC caller: UNAVAILABLE with the reason.
        let mut cmd = Command::new(&python);
        cmd.args([
            "-c",
            "import grpc,sys\n\
             ch=grpc.insecure_channel(sys.argv[1],options=[('grpc.default_authority','b')])\n\
             try:\n  ch.unary_unary('/test.Echo/Unary')(b'x',timeout=10)\n\
             except grpc.RpcError as e: print(e.code().name, e.details())\n",
            &a.outbound().to_string(),
        ]);
        let out = run_with_timeout(cmd, Duration::from_secs(60))?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(
            said.starts_with("UNAVAILABLE") && said.contains("check app_protocol"),
            "grpc client got {said:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_proxy_clients_route_by_authority_and_connect_is_refused() -> anyhow::Result<()> {
    e2e(async {
        let test = "http_proxy_clients_route_by_authority_and_connect_is_refused";
        let Some(curl) = tool_or_skip(test, "curl") else {
            return Ok(());
        };
        let Some(python) = tool_or_skip(test, "python3") else {
            return Ok(());
        };
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let app_b = EchoApp::start("app-b").await?;
        let b = Sidecar::start(&cp, SidecarOpts::new("sidecar-b", B_ID, app_b.addr)).await?;
        let app_a = EchoApp::start("app-a").await?;
        let a = Sidecar::start(
            &cp,
            SidecarOpts::new("sidecar-a", A_ID, app_a.addr).upstream("b", b.addrs.inbound, B_ID),
        )
        .await?;
        let proxy = format!("http://{}", a.outbound());

        // curl -x: absolute-form request line, routed by the URI's authority.
        let mut cmd = Command::new(&curl);
        cmd.args(["-sS", "-x", &proxy, "http://b:8080/via-curl"]);
        let out = run_with_timeout(cmd, Duration::from_secs(30))?;
        let body = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && body.contains("\"app\":\"app-b\"") && body.contains("/via-curl"),
            "curl -x: {body} {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Python's urllib honours HTTP_PROXY from the environment.
        let mut cmd = Command::new(&python);
        cmd.env("HTTP_PROXY", &proxy).env("http_proxy", &proxy);
        cmd.env_remove("NO_PROXY").env_remove("no_proxy");
        cmd.args([
            "-c",
            "import urllib.request;print(urllib.request.urlopen('http://b/via-urllib',timeout=20).read().decode())",
        ]);
        let out = run_with_timeout(cmd, Duration::from_secs(30))?;
        let body = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && body.contains("\"app\":\"app-b\"") && body.contains("/via-urllib"),
            "urllib with HTTP_PROXY: {body} {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // HTTPS_PROXY-style tunnels are refused with what to do instead.
        let mut cmd = Command::new(&curl);
        cmd.args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            "-p",
            "-x",
            &proxy,
            "http://b:8080/tunnel",
        ]);
        let out = run_with_timeout(cmd, Duration::from_secs(30))?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(said.trim() == "405", "CONNECT through the outbound port answered {said:?}");
        let tcp = tokio::net::TcpStream::connect(a.outbound()).await?;
        let raw = trellis_tests::raw::exchange(
            tcp,
            b"CONNECT b:443 HTTP/1.1\r\nHost: b:443\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
        ensure!(
            raw.status() == Some(405) && raw.text.contains("not https:// through HTTPS_PROXY"),
            "CONNECT answer: {}",
            raw.text
        );
        let metrics = a.metrics().await?;
        ensure!(
            metrics.get("trellis_requests_refused_total", &[("reason", "connect")])? >= 2.0,
            "CONNECT refusals not counted"
        );
        Ok(())
    })
    .await
}

/// Sidecar B's policy for the WebSocket test: everything but `/denied`.
const WS_POLICY: &str = "apiVersion: trellis.io/v1
kind: Policy
defaultAction: allow
rules:
  - name: no-denied-socket
    action: deny
    from: [\"*\"]
    to:
      - paths: [/denied]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websockets_cross_the_mesh_and_follow_the_policy() -> anyhow::Result<()> {
    e2e(async {
        let test = "websockets_cross_the_mesh_and_follow_the_policy";
        let Some(python) = venv_python_with(test, "websockets") else {
            return Ok(());
        };
        let mesh = FixtureMesh::start(&python, "ws_peer.py", WS_POLICY, &[]).await?;
        let (cases, stdout) = mesh.run_client(Duration::from_secs(60))?;
        let a = &mesh.a;
        let echo = cases.get("echo").with_context(|| format!("no echo case: {stdout}"))?;
        let first = echo["first"].as_str().unwrap_or_default();
        ensure!(
            first.starts_with(&format!("xfcc=By={B_ID};Hash=")) && first.ends_with(&format!(";URI={A_ID}")),
            "the app's upgrade request did not carry sidecar B's XFCC: {echo}"
        );
        ensure!(
            echo["echoed"] == serde_json::json!([true, true, true]) && echo["close_code"] == 1000,
            "echo: {echo}"
        );
        let denied = cases.get("denied").with_context(|| format!("no denied case: {stdout}"))?;
        ensure!(
            denied["status"] == 403
                && denied["body"]
                    .as_str()
                    .is_some_and(|b| b.contains("no-denied-socket")),
            "denied upgrade: {denied}"
        );
        // Other Upgrade tokens are refused, not stripped into a plain answer.
        let tcp = tokio::net::TcpStream::connect(a.outbound()).await?;
        let raw = trellis_tests::raw::exchange(
            tcp,
            b"GET /x HTTP/1.1\r\nHost: b\r\nConnection: upgrade\r\nUpgrade: TLS/1.2\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
        ensure!(
            raw.status() == Some(501) && raw.text.contains("only websocket"),
            "Upgrade: TLS/1.2 answered {}",
            raw.text
        );
        Ok(())
    })
    .await
}

/// The last line of a `ws_peer.py hold` client, as JSON.
fn hold_result(child: &mut Child, name: &str, timeout: Duration) -> anyhow::Result<Value> {
    let line = child.stdout_line(timeout)?;
    serde_json::from_str(&line).with_context(|| format!("{name} said {line:?}"))
}

/// Seconds in a `ws_peer.py hold` result field.
fn secs(result: &Value, field: &str) -> f64 {
    result[field].as_f64().unwrap_or(f64::NAN)
}

/// `limits.http.idle_timeout` applies to a tunnel: with 2 s on both sidecars, a WebSocket
/// with no byte either way is closed by the mesh about 2 s after its last byte, while one that
/// exchanges a message every 0.5 s stays open three times as long and closes cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_tunnels_close_when_idle_not_while_busy() -> anyhow::Result<()> {
    e2e(async {
        let test = "websocket_tunnels_close_when_idle_not_while_busy";
        let Some(python) = venv_python_with(test, "websockets") else {
            return Ok(());
        };
        let idle = ["--idle-timeout", "2s"];
        let mesh = FixtureMesh::start_with(&python, "ws_peer.py", WS_POLICY, &idle, &idle).await?;
        // Quiet: waits up to 30 s for the mesh to close it. Busy: a message every 0.5 s for
        // 6 s, then the client's own close.
        let mut quiet = mesh.hold("ws-quiet", 0.0, 30.0)?;
        let mut busy = mesh.hold("ws-busy", 0.5, 6.0)?;
        let quiet = hold_result(&mut quiet, "ws-quiet", Duration::from_secs(45))?;
        ensure!(
            quiet["event"] == "closed",
            "a quiet tunnel outlived a 2 s idle timeout by 30 s: {quiet}"
        );
        // From the client's last byte; the sidecars' clocks started a little earlier, and the
        // lower bound only needs to show it was not closed at once.
        let quiet_for = secs(&quiet, "quiet_for");
        ensure!(
            (1.5..15.0).contains(&quiet_for),
            "a quiet tunnel closed {quiet_for} s after its last byte, want about 2 s: {quiet}"
        );
        let busy = hold_result(&mut busy, "ws-busy", Duration::from_secs(45))?;
        eprintln!("[websocket idle 2s] quiet: {quiet}; busy: {busy}");
        ensure!(
            busy["event"] == "kept"
                && busy["close_code"] == 1000
                && busy["echoes"].as_u64().is_some_and(|n| n >= 8)
                && secs(&busy, "open_for") >= 6.0,
            "a tunnel with a message every 0.5 s did not stay open 6 s past a 2 s idle timeout: {busy}"
        );
        Ok(())
    })
    .await
}

/// A tunnel counts toward sidecar A's drain: after SIGTERM it keeps carrying messages until
/// the drain timeout (3 s), then it is closed and the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_tunnel_is_held_then_cut_by_a_forced_drain() -> anyhow::Result<()> {
    e2e(async {
        let test = "websocket_tunnel_is_held_then_cut_by_a_forced_drain";
        let Some(python) = venv_python_with(test, "websockets") else {
            return Ok(());
        };
        let drain = ["--drain-timeout", "3s"];
        let mut mesh =
            FixtureMesh::start_with(&python, "ws_peer.py", WS_POLICY, &drain, &[]).await?;
        // Busy (a message every 0.5 s) for up to 60 s: only the drain ends it.
        let mut socket = mesh.hold("ws-drained", 0.5, 60.0)?;
        let sigterm = std::time::Instant::now();
        mesh.a.sigterm()?;
        let result = hold_result(&mut socket, "ws-drained", Duration::from_secs(45))?;
        let closed_after = sigterm.elapsed();
        eprintln!("[websocket drain 3s] closed {closed_after:?} after SIGTERM: {result}");
        ensure!(
            result["event"] == "closed",
            "the drain did not close the tunnel: {result}"
        );
        ensure!(
            closed_after >= Duration::from_millis(2500) && closed_after < Duration::from_secs(20),
            "the tunnel closed {closed_after:?} after SIGTERM, want at the 3 s drain timeout: {result}"
        );
        // A message every 0.5 s went through during the drain.
        ensure!(
            result["echoes"].as_u64().is_some_and(|n| n >= 4),
            "the tunnel stopped carrying messages at SIGTERM: {result}"
        );
        let status = mesh
            .a
            .wait_exit(Duration::from_secs(20))
            .await
            .context("sidecar A did not exit after its forced drain")?;
        ensure!(status.success(), "sidecar A exited {status}");
        Ok(())
    })
    .await
}

/// A tunnel that ends during sidecar B's drain releases it: B exits long before its 30 s drain
/// timeout, and the socket meanwhile kept working and closed with a clean close handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_tunnel_that_ends_during_a_drain_releases_it() -> anyhow::Result<()> {
    e2e(async {
        let test = "websocket_tunnel_that_ends_during_a_drain_releases_it";
        let Some(python) = venv_python_with(test, "websockets") else {
            return Ok(());
        };
        let drain = ["--drain-timeout", "30s"];
        let mut mesh =
            FixtureMesh::start_with(&python, "ws_peer.py", WS_POLICY, &[], &drain).await?;
        // A message every 0.5 s for 3 s, then the client closes.
        let mut socket = mesh.hold("ws-released", 0.5, 3.0)?;
        let sigterm = std::time::Instant::now();
        mesh.b.sigterm()?;
        let result = hold_result(&mut socket, "ws-released", Duration::from_secs(45))?;
        ensure!(
            result["event"] == "kept" && result["close_code"] == 1000,
            "the tunnel did not last through sidecar B's drain to a clean close: {result}"
        );
        let status = mesh
            .b
            .wait_exit(Duration::from_secs(40))
            .await
            .context("sidecar B did not exit after its drain")?;
        let exited_after = sigterm.elapsed();
        eprintln!("[websocket drain 30s] B exited {exited_after:?} after SIGTERM: {result}");
        ensure!(status.success(), "sidecar B exited {status}");
        ensure!(
            exited_after < Duration::from_secs(15),
            "sidecar B took {exited_after:?} to drain after the tunnel closed (drain timeout 30 s)"
        );
        Ok(())
    })
    .await
}
