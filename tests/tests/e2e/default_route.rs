//! Issue #25, convention routes: unmodified clients (curl and Python `requests`, both
//! honouring `HTTP_PROXY`) call `http://service-b.shop.svc.cluster.local:8080/x` and the mesh
//! finds the peer and its identity by name, through `outbound.default_route`, with no upstream
//! listed for it.
//!
//! ```text
//!  curl / requests ──HTTP_PROXY──▶ sidecar A ══ mTLS ══▶ 127.0.0.2:15443 sidecar B (…/sa/service-b) ──▶ app B
//!                                      ╲ service-c ═════▶ 127.0.0.3:15443 impostor (…/sa/other)      ──▶ app C
//! ```
//!
//! The test runs itself again in network and mount namespaces of its own
//! ([`own_netns_with_hosts`]) where an `/etc/hosts` bind-mounted over the real one makes
//! `service-b.shop.svc.cluster.local` resolve to 127.0.0.2 and `service-c…` and `service-e…`
//! to 127.0.0.3 through the system resolver, exactly as the sidecar resolves names in a pod;
//! `service-z…` resolves nowhere. What must hold:
//! - the request crosses the mesh to app B, which sees the app's own `Host` (port 8080 kept)
//!   while the peer address is port 15443 from the template;
//! - a peer presenting another identity than the template's gets `502` naming both IDs;
//! - an unresolvable name gets `503` naming the name;
//! - a listed upstream for a host wins over the convention;
//! - a host matching nothing gets `404` naming the known hosts and the route's templates;
//! - metrics and the access log name the route (`default_route` or the upstream's name) and
//!   the identity that was required.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use trellis_tests::echo::EchoApp;
use trellis_tests::netns::own_netns_with_hosts;
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{e2e, run_with_timeout, tool_or_skip, ControlPlane, ControlPlaneOpts};

use crate::protocols::venv_python_with;

const SERVICE_B_ID: &str = "spiffe://example.org/ns/shop/sa/service-b";
const OTHER_ID: &str = "spiffe://example.org/ns/shop/sa/other";
const A_ID: &str = "spiffe://example.org/ns/web/sa/frontend";

const HOSTS: &str = "127.0.0.1 localhost
127.0.0.2 service-b.shop.svc.cluster.local
127.0.0.3 service-c.shop.svc.cluster.local
127.0.0.3 service-e.shop.svc.cluster.local
";

/// The issue's route, as `--default-route`.
const ROUTE: &str = "hosts={service}.{namespace}.svc.cluster.local;{service}.{namespace}.svc;{service}.{namespace},\
address={service}.{namespace}.svc.cluster.local:15443,\
identity=spiffe://{trust_domain}/ns/{namespace}/sa/{service}";

/// The identity label of the default route's metric series: its template, `*` for what varies.
const ROUTE_IDENTITY: &str = "spiffe://example.org/ns/*/sa/*";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// `curl -sS -w '\n%{http_code}' URL` with `http_proxy` set (curl reads only the lowercase
/// name for http://): `(status, body)`.
fn curl(curl: &std::path::Path, proxy: &str, url: &str) -> anyhow::Result<(u16, String)> {
    let mut cmd = Command::new(curl);
    cmd.env("http_proxy", proxy)
        .env("HTTP_PROXY", proxy)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .args(["-sS", "-w", "\n%{http_code}", url]);
    let out = run_with_timeout(cmd, Duration::from_secs(30))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
    let code = code
        .trim()
        .parse()
        .with_context(|| format!("curl status in {text:?}"))?;
    Ok((code, body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_reach_services_by_name_with_the_templated_identity() -> anyhow::Result<()> {
    let test = "default_route::clients_reach_services_by_name_with_the_templated_identity";
    if !own_netns_with_hosts(test, Duration::from_secs(180), HOSTS)? {
        return Ok(());
    }
    e2e(async {
        let Some(curl_bin) = tool_or_skip(test, "curl") else {
            return Ok(());
        };
        let Some(python) = venv_python_with(test, "requests") else {
            return Ok(());
        };
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let app_b = EchoApp::start("app-b").await?;
        let app_c = EchoApp::start("app-c").await?;
        let any = addr("127.0.0.1:0");
        let _b = Sidecar::start(
            &cp,
            SidecarOpts::new("sidecar-b", SERVICE_B_ID, app_b.addr)
                .on_ports(addr("127.0.0.2:15443"), any),
        )
        .await?;
        // Answers at service-c's (and service-e's) address with another identity.
        let _impostor = Sidecar::start(
            &cp,
            SidecarOpts::new("impostor", OTHER_ID, app_c.addr)
                .on_ports(addr("127.0.0.3:15443"), any),
        )
        .await?;
        let app_a = EchoApp::start("app-a").await?;
        // service-e resolves to the impostor, but the listed upstream sends it to B.
        let a = Sidecar::start(
            &cp,
            SidecarOpts::new("sidecar-a", A_ID, app_a.addr).args(&[
                "--upstream",
                &format!(
                    "name=listed-e,hosts=service-e.shop.svc.cluster.local,address=127.0.0.2:15443,identity={SERVICE_B_ID}"
                ),
                "--default-route",
                ROUTE,
                "--access-log",
                "true",
            ]),
        )
        .await?;
        let proxy = format!("http://{}", a.outbound());

        // curl with http_proxy: absolute-form, unchanged URL, crosses the mesh to app B.
        let (code, body) = curl(&curl_bin, &proxy, "http://service-b.shop.svc.cluster.local:8080/x")?;
        ensure!(code == 200, "curl to service-b: {code} {body}");
        let echo: serde_json::Value = serde_json::from_str(&body).context("app B's echo")?;
        ensure!(echo["app"] == "app-b" && echo["path"] == "/x", "curl reached {echo}");
        ensure!(
            echo["headers"]["host"][0] == "service-b.shop.svc.cluster.local:8080",
            "app B must see the app's own Host, port kept: {echo}"
        );

        // Python requests with HTTP_PROXY, and a shorter Kubernetes spelling of the same name.
        let mut cmd = Command::new(&python);
        cmd.env("HTTP_PROXY", &proxy)
            .env("http_proxy", &proxy)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .args([
                "-c",
                "import requests\n\
                 for u in ['http://service-b.shop.svc.cluster.local:8080/x', 'http://service-b.shop/y']:\n\
                 \x20   r = requests.get(u, timeout=20)\n\
                 \x20   print(r.status_code, r.json()['app'], r.json()['path'])",
            ]);
        let out = run_with_timeout(cmd, Duration::from_secs(60))?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && said.contains("200 app-b /x") && said.contains("200 app-b /y"),
            "python requests: {said} {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Another identity at service-c's address: 502 naming both.
        let (code, body) = curl(&curl_bin, &proxy, "http://service-c.shop.svc.cluster.local:8080/x")?;
        ensure!(
            code == 502
                && body.contains("spiffe://example.org/ns/shop/sa/service-c")
                && body.contains(OTHER_ID),
            "wrong identity: {code} {body}"
        );

        // A name the resolver does not know: 503 naming it.
        let (code, body) = curl(&curl_bin, &proxy, "http://service-z.shop.svc.cluster.local:8080/x")?;
        ensure!(
            code == 503 && body.contains("cannot resolve `service-z.shop.svc.cluster.local:15443`"),
            "unresolvable: {code} {body}"
        );

        // A listed upstream wins: service-e resolves to the impostor, the list says B.
        let (code, body) = curl(&curl_bin, &proxy, "http://service-e.shop.svc.cluster.local:8080/e")?;
        ensure!(code == 200 && body.contains("\"app\":\"app-b\""), "listed upstream: {code} {body}");

        // Matching nothing: 404 naming what was tried.
        let (code, body) = curl(&curl_bin, &proxy, "http://example:8080/x")?;
        ensure!(
            code == 404
                && body.contains("service-e.shop.svc.cluster.local")
                && body.contains("default_route hosts: {service}.{namespace}.svc.cluster.local"),
            "no route: {code} {body}"
        );

        let metrics = a.metrics().await?;
        let route = |route: &str, identity: &str, class: &str| {
            metrics.get(
                "trellis_route_requests_total",
                &[("route", route), ("identity", identity), ("class", class)],
            )
        };
        ensure!(route("default_route", ROUTE_IDENTITY, "2xx")? >= 3.0, "default_route 2xx");
        ensure!(route("default_route", ROUTE_IDENTITY, "5xx")? >= 2.0, "default_route 5xx");
        ensure!(route("listed-e", SERVICE_B_ID, "2xx")? >= 1.0, "listed-e 2xx");
        let log = a.child.stderr_tail(200);
        ensure!(
            log.lines().any(|l| l.contains("default_route") && l.contains(SERVICE_B_ID) && l.contains("/x")),
            "access log names the route and identity:\n{log}"
        );
        ensure!(
            log.lines().any(|l| l.contains("listed-e") && l.contains(SERVICE_B_ID)),
            "access log names the listed upstream:\n{log}"
        );
        Ok(())
    })
    .await
}
