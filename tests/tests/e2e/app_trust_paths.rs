//! What the app can trust about the path it is called with (issue 13, items 3 and 4): a
//! request that `deny /admin/**` refuses under *any* reading of its path never reaches the
//! app. Real processes: a control plane, sidecar A for service-a, sidecar B for service-b
//! run with `--policy DIR`, and the echo app B that records every request it receives.
//!
//! ```text
//!  test (app A) ──http/1.1 or h2c──▶ sidecar A ══ mTLS ══▶ sidecar B (--policy) ──▶ app B
//!  test (a peer with a valid SVID) ══ mTLS, h1 or h2 ═════╝
//! ```
//!
//! - **`;` parameters.** Tomcat, Jetty and Spring strip `;…` from every segment before they
//!   route: `/admin;x/user-export` is `/admin/user-export` to them, `/public/..;/admin` is
//!   `/admin`. Under the default `pathParameters: strictest` sidecar B decides such a path
//!   with and without its parameters and denies it if either reading is denied; under
//!   `reject` it answers 400 naming the reason.
//! - **Case.** IIS-like apps serve `/ADMIN/user-export` as `/admin/user-export`; with
//!   `caseInsensitivePaths: true` the policy matches both alike.
//!
//! Every attack is checked three ways: the sidecar's answer (403 naming the rule and the
//! caller, or 400 naming the reason), app B's record (it never saw the request), and a
//! legitimate request afterwards that does reach app B (so "never saw" means something).

use anyhow::{ensure, Context as _};
use http::{Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use trellis_identity::tls::PeerMatch;
use trellis_identity::{SpiffeId, Svid};
use trellis_tests::app_client::{echo_json, empty, get_once, read_reply, Proto, Reply};
use trellis_tests::policy_mesh::{PolicyMesh, B_HOST, SERVICE_A, SERVICE_B};
use trellis_tests::{e2e, fetch_svid, tls_client_config, tls_connect};

/// A peer of the trust domain that talks to sidecar B's inbound listener itself, with its
/// own valid SVID, bypassing sidecar A.
const DIRECT: &str = "spiffe://example.org/ns/prod/sa/direct-peer";

/// `deny /admin/**` is the only guard: everything else is allowed, so a spelling that
/// dodges the rule would reach the app. `settings` adds top-level keys.
fn policy(settings: &str) -> String {
    format!(
        "apiVersion: trellis.io/v1
kind: Policy
defaultAction: allow
{settings}rules:
  - name: no-admin
    action: deny
    from: [\"*\"]
    to:
      - paths: [/admin/**]
"
    )
}

/// The `;` spellings of the user export that servlet containers serve as
/// `/admin/user-export`.
const PARAM_SPELLINGS: &[&str] = &[
    "/admin;x/user-export",
    "/admin;jsessionid=0123ABCD/user-export",
    "/admin/user-export;x",
    "/;x/admin/user-export",
    "/admin;a=b;c=d/user-export",
];

/// Spellings of the user export that only a case-insensitive app serves.
const CASE_SPELLINGS: &[&str] = &[
    "/ADMIN/user-export",
    "/Admin/user-export",
    "/aDmIn/USER-EXPORT",
    "/%41DMIN/user-export",
    "/ADMIN;x/user-export",
];

/// The mesh, and the direct peer's SVID.
struct Fixture {
    mesh: PolicyMesh,
    /// [`DIRECT`]'s SVID, issued by the mesh's control plane for a join token.
    direct: Svid,
    /// Holds the policy directory.
    _dir: tempfile::TempDir,
}

/// Sidecar B enforcing `policy(settings)`, loaded from a directory as in production.
async fn fixture(settings: &str) -> anyhow::Result<Fixture> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("service-b.yaml"), policy(settings))?;
    let mesh = PolicyMesh::start(dir.path(), None).await?;
    let status = mesh.policy_status().await?;
    ensure!(
        status["loaded"] == true && status["last_error"].is_null(),
        "/policy: {status}"
    );
    let token = mesh.cp.create_token(DIRECT, "1h")?;
    let (direct, _bundle) = fetch_svid(&mesh.cp, &token).await?;
    Ok(Fixture {
        mesh,
        direct,
        _dir: dir,
    })
}

/// How the test reaches sidecar B.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// As app A, through sidecar A's outbound listener.
    App(Proto),
    /// As [`DIRECT`], straight to sidecar B's inbound listener over mTLS, with this ALPN.
    Direct(&'static str),
}

impl Via {
    /// Who sidecar B sees as the caller.
    fn caller(self) -> &'static str {
        match self {
            Via::App(_) => SERVICE_A,
            Via::Direct(_) => DIRECT,
        }
    }
}

/// Both ways to reach sidecar B's inbound listener directly: HTTP/1.1 and HTTP/2.
const DIRECT_BOTH: [Via; 2] = [Via::Direct("http/1.1"), Via::Direct("h2")];

/// `GET path` on service-b, `via` the app's sidecar or directly, on a fresh connection.
async fn get(f: &Fixture, via: Via, path: &str) -> anyhow::Result<Reply> {
    match via {
        Via::App(proto) => get_once(f.mesh.a.outbound(), proto, B_HOST, path, &[]).await,
        Via::Direct(alpn) => direct_get(f, alpn, path).await,
    }
}

/// `GET path` straight to sidecar B's inbound listener as [`DIRECT`] (a valid SVID from the
/// mesh's control plane), speaking `alpn`. The request-target goes out exactly as written.
async fn direct_get(f: &Fixture, alpn: &'static str, path: &str) -> anyhow::Result<Reply> {
    let mesh = &f.mesh;
    let config = tls_client_config(
        mesh.cp.bundle()?,
        PeerMatch::Exact(SpiffeId::parse(SERVICE_B)?),
        Some(&f.direct),
        &[alpn.as_bytes()],
    )?;
    let tls = tls_connect(mesh.b.addrs.inbound, config).await?;
    let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    ensure!(
        negotiated.as_deref() == Some(alpn.as_bytes()),
        "offered ALPN {alpn} only, sidecar B chose {negotiated:?}"
    );
    let io = TokioIo::new(tls);
    let resp = if alpn == "h2" {
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        let req = Request::get(format!("https://{B_HOST}{path}"))
            .version(Version::HTTP_2)
            .body(empty())?;
        tx.send_request(req).await?
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let req = Request::get(path).header("host", B_HOST).body(empty())?;
        tx.send_request(req).await?
    };
    read_reply(resp).await
}

/// `reply` is sidecar B's 403 naming `rule` and `caller`.
fn expect_forbidden(reply: &Reply, rule: &str, caller: &str, what: &str) -> anyhow::Result<()> {
    ensure!(
        reply.status == StatusCode::FORBIDDEN,
        "{what}: want 403 by {rule}, got {}",
        reply.summary()
    );
    let body = reply.json()?;
    ensure!(
        body == serde_json::json!({"error": "forbidden", "rule": rule, "caller": caller}),
        "{what}: 403 body: {body}"
    );
    Ok(())
}

/// App B has never been called with anything that names `admin`, in any case or spelling
/// (`%41` decodes to `A` before the app sees it).
fn app_never_saw_admin(mesh: &PolicyMesh) -> anyhow::Result<()> {
    let seen = mesh.app_b.seen();
    let admin: Vec<&str> = seen
        .iter()
        .map(|r| r.path.as_str())
        .filter(|p| p.to_ascii_lowercase().contains("admin"))
        .collect();
    ensure!(admin.is_empty(), "app B received {admin:?}");
    Ok(())
}

/// A legitimate request through `via` reaches app B with its path as sent: the app is up
/// and recording, so the absence of the attacks in its record is real.
async fn legitimate_request_reaches_the_app(f: &Fixture, via: Via) -> anyhow::Result<()> {
    let path = "/public/ok";
    let reply = get(f, via, path).await?;
    let echo = echo_json(&reply).with_context(|| format!("{via:?} GET {path}"))?;
    ensure!(echo["path"] == path, "{via:?}: app B saw {}", echo["path"]);
    ensure!(
        f.mesh.app_b.last_seen(path).is_some(),
        "app B did not record {path}"
    );
    Ok(())
}

/// Each spelling, `via` each way, gets the 403 of `no-admin`; app B sees none of them.
async fn all_denied_by_no_admin(
    f: &Fixture,
    vias: &[Via],
    spellings: &[&str],
) -> anyhow::Result<()> {
    for &via in vias {
        for path in spellings {
            let reply = get(f, via, path).await?;
            expect_forbidden(
                &reply,
                "no-admin",
                via.caller(),
                &format!("{via:?} GET {path}"),
            )?;
        }
        app_never_saw_admin(&f.mesh)?;
        legitimate_request_reaches_the_app(f, via).await?;
    }
    app_never_saw_admin(&f.mesh)?;
    let denied = f.mesh.b_metrics().await?.sum(
        "trellis_authz_decisions_total",
        &[("decision", "deny"), ("rule", "no-admin")],
    );
    let want = (vias.len() * spellings.len()) as f64;
    ensure!(
        denied == want,
        "deny/no-admin counted {denied}, want {want}"
    );
    Ok(())
}

// ------------------------------------------------------------------ `;` parameters

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn param_segment_cannot_reach_denied_admin_h1() -> anyhow::Result<()> {
    e2e(async {
        let f = fixture("").await?;
        all_denied_by_no_admin(&f, &[Via::App(Proto::H1)], PARAM_SPELLINGS).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn param_segment_cannot_reach_denied_admin_h2c() -> anyhow::Result<()> {
    e2e(async {
        let f = fixture("").await?;
        all_denied_by_no_admin(&f, &[Via::App(Proto::H2c)], PARAM_SPELLINGS).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn param_segment_cannot_reach_denied_admin_direct_inbound() -> anyhow::Result<()> {
    e2e(async {
        let f = fixture("").await?;
        all_denied_by_no_admin(&f, &DIRECT_BOTH, PARAM_SPELLINGS).await
    })
    .await
}

/// `/public/..;/admin/user-export` is under `/public` as sent and `/admin/user-export` to a
/// servlet container (CVE-2021-28164 and friends), over every way in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotdot_param_cannot_climb_into_admin() -> anyhow::Result<()> {
    e2e(async {
        let f = fixture("").await?;
        let vias = [
            Via::App(Proto::H1),
            Via::App(Proto::H2c),
            Via::Direct("http/1.1"),
            Via::Direct("h2"),
        ];
        all_denied_by_no_admin(
            &f,
            &vias,
            &["/public/..;/admin/user-export", "/public/x/..;y/..;z/admin"],
        )
        .await?;
        // Without its parameter, `/..;/admin` climbs above the root: refused, not guessed.
        let reply = get(&f, Via::App(Proto::H1), "/..;/admin/user-export").await?;
        ensure!(
            reply.status == StatusCode::BAD_REQUEST && reply.text().contains("above_root"),
            "/..;/admin/user-export: {}",
            reply.summary()
        );
        app_never_saw_admin(&f.mesh)
    })
    .await
}

/// Parameters the policy allows both ways (a session id) still reach the app, exactly as
/// sent: `strictest` refuses nothing harmless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsessionid_param_still_allowed() -> anyhow::Result<()> {
    e2e(async {
        let f = fixture("").await?;
        for (via, path) in [
            (Via::App(Proto::H1), "/public/page;jsessionid=0123ABCD"),
            (Via::App(Proto::H2c), "/public/h2c;jsessionid=4567EF"),
            (Via::Direct("http/1.1"), "/public/direct;jsessionid=89AB"),
        ] {
            let reply = get(&f, via, path).await?;
            let echo = echo_json(&reply).with_context(|| format!("{via:?} GET {path}"))?;
            ensure!(echo["path"] == path, "{via:?}: app B saw {}", echo["path"]);
            ensure!(
                f.mesh.app_b.last_seen(path).is_some(),
                "app B did not record {path}"
            );
        }
        let allowed = f.mesh.b_metrics().await?.sum(
            "trellis_authz_decisions_total",
            &[("decision", "allow"), ("rule", "default")],
        );
        ensure!(allowed == 3.0, "allow/default counted {allowed}, want 3");
        Ok(())
    })
    .await
}

/// `pathParameters: reject`: any `;` is answered 400 naming `path_parameters`, counted
/// under that reason, and reaches nobody; a path without `;` still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_answers_400_naming_reason() -> anyhow::Result<()> {
    e2e(async {
        let f = fixture("pathParameters: reject\n").await?;
        let status = f.mesh.policy_status().await?;
        ensure!(status["path_parameters"] == "reject", "/policy: {status}");
        let cases = [
            (Via::App(Proto::H1), "/admin;x/user-export"),
            (Via::App(Proto::H2c), "/public/page;jsessionid=0123ABCD"),
            (Via::Direct("http/1.1"), "/public/..;/admin"),
            (Via::Direct("h2"), "/public;x"),
        ];
        for (via, path) in cases {
            let reply = get(&f, via, path).await?;
            ensure!(
                reply.status == StatusCode::BAD_REQUEST,
                "{via:?} GET {path}: want 400, got {}",
                reply.summary()
            );
            let text = reply.text();
            ensure!(
                text.contains("path_parameters") && text.contains("pathParameters: reject"),
                "{via:?} GET {path}: the 400 does not name the reason: {text:?}"
            );
            ensure!(
                f.mesh.app_b.seen().iter().all(|r| !r.path.contains(';')),
                "app B received a path with `;`"
            );
        }
        let m = f.mesh.b_metrics().await?;
        let refused = m.sum(
            "trellis_authz_bad_paths_total",
            &[("reason", "path_parameters")],
        );
        ensure!(
            refused == cases.len() as f64,
            "bad_paths{{reason=path_parameters}} = {refused}, want {}:\n{}",
            cases.len(),
            m.lines_of("trellis_authz_bad_paths_total")
        );
        app_never_saw_admin(&f.mesh)?;
        legitimate_request_reaches_the_app(&f, Via::App(Proto::H1)).await
    })
    .await
}

// ------------------------------------------------------------------ case

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uppercase_admin_denied_with_case_insensitive_policy_h1() -> anyhow::Result<()> {
    e2e(async {
        let f = fixture("caseInsensitivePaths: true\n").await?;
        all_denied_by_no_admin(&f, &[Via::App(Proto::H1)], CASE_SPELLINGS).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uppercase_admin_denied_with_case_insensitive_policy_h2c() -> anyhow::Result<()> {
    e2e(async {
        let f = fixture("caseInsensitivePaths: true\n").await?;
        all_denied_by_no_admin(&f, &[Via::App(Proto::H2c)], CASE_SPELLINGS).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uppercase_admin_denied_with_case_insensitive_policy_direct_inbound() -> anyhow::Result<()>
{
    e2e(async {
        let f = fixture("caseInsensitivePaths: true\n").await?;
        let status = f.mesh.policy_status().await?;
        ensure!(
            status["case_insensitive_paths"] == true,
            "/policy: {status}"
        );
        all_denied_by_no_admin(&f, &DIRECT_BOTH, CASE_SPELLINGS).await?;
        // The forwarded path keeps its case: the app decides what `/Public/OK` means.
        let reply = get(&f, Via::Direct("h2"), "/Public/OK").await?;
        let echo = echo_json(&reply)?;
        ensure!(echo["path"] == "/Public/OK", "app B saw {}", echo["path"]);
        Ok(())
    })
    .await
}
