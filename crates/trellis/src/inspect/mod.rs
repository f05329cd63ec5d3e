//! `trellis inspect HOST:PORT`: the `openssl s_client` of the mesh. One handshake as a sidecar
//! would make it, then what was negotiated, who the peer is, and if it failed, why and which
//! side refused. Exit status: 0 verified and accepted, 1 failed, 2 bad usage.
//!
//! With `--admin ADDR` the handshake is made by a running sidecar (`POST /inspect` on its admin
//! endpoint) with its own SVID and bundle, so its key never leaves it; the report is the same.
//!
//! This module turns flags and files into options and picks where the handshake runs; the
//! handshake engine and its JSON report are `trellis_sidecar::inspect` (a sidecar runs it for
//! `POST /inspect` too), and `render` writes the human report.

mod render;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use clap::Args;
use trellis_identity::{certs_from_pem, key_from_pem, SpiffeId, TrustDomain};
use trellis_sidecar::inspect::{inspect, ClientIdentity, InspectOptions, InspectReport, Target};

use crate::admin_client::{query_escape, AdminClient};
use render::render;

/// `trellis inspect …`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The TLS endpoint: a sidecar's inbound, an Envoy listener, the control plane (HOST:PORT,
    /// [IPv6]:PORT).
    #[arg(value_name = "HOST:PORT")]
    target: String,
    /// Trust bundle (PEM CA certificates, e.g. the control plane's bundle.pem) the peer must
    /// chain to.
    #[arg(long, required_unless_present = "admin")]
    bundle: Option<PathBuf>,
    /// Borrow a running sidecar's identity: its admin endpoint (HOST:PORT, loopback) makes
    /// the handshake with its current SVID and bundle.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["bundle", "cert", "key"])]
    admin: Option<String>,
    /// Client certificate chain to present (PEM, leaf first). Without it, none is offered.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key of --cert (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Trust domain the peer must belong to [default: the bundle CAs' spiffe://<td>, else the
    /// peer's own].
    #[arg(long)]
    trust_domain: Option<String>,
    /// Exact SPIFFE ID the peer must present [default: any ID in the trust domain].
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Offer TLS 1.2 as well as 1.3 (Trellis itself speaks 1.3 only by default).
    #[arg(long)]
    tls12: bool,
    /// Give up if connecting and the handshake take longer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the report as JSON (for scripts); the exit status is the same.
    #[arg(long)]
    json: bool,
}

/// Runs `trellis inspect`; prints the report on stdout, usage errors on stderr.
pub fn run(args: InspectArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    let report = if let Some(admin) = &args.admin {
        match runtime.block_on(inspect_via_admin(admin, &args)) {
            Ok(report) => report,
            Err(err) => {
                eprintln!("error: {}", crate::logging::describe(&err));
                return ExitCode::from(2);
            }
        }
    } else {
        let (target, opts) = match prepare(&args) {
            Ok(prepared) => prepared,
            Err(err) => {
                eprintln!("error: {}", crate::logging::describe(&err));
                return ExitCode::from(2);
            }
        };
        runtime.block_on(inspect(&target, &opts))
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(err) => {
                eprintln!("error: cannot encode the report: {err}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", render(&report, args.tls12, SystemTime::now()));
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `POST /inspect` on a sidecar's admin endpoint; the sidecar makes the handshake.
async fn inspect_via_admin(admin: &str, args: &InspectArgs) -> anyhow::Result<InspectReport> {
    // Checked here too, so a typo is a usage error before anything is sent.
    let target = Target::parse(&args.target)?;
    if args.timeout.is_zero() {
        bail!("--timeout must be positive");
    }
    let mut query = format!(
        "/inspect?target={}&timeout={}ms",
        query_escape(&target.to_string()),
        args.timeout.as_millis()
    );
    if let Some(id) = &args.spiffe_id {
        let id = SpiffeId::parse(id).context("--spiffe-id")?;
        let _ = write!(query, "&spiffe_id={}", query_escape(id.as_str()));
    }
    if let Some(td) = &args.trust_domain {
        let td = TrustDomain::parse(td).context("--trust-domain")?;
        let _ = write!(query, "&trust_domain={}", query_escape(td.as_str()));
    }
    if args.tls12 {
        query.push_str("&tls12=true");
    }
    let client = AdminClient::parse(admin, Duration::from_secs(5)).context("--admin")?;
    // The sidecar's handshake has its own deadline and a settle time after it.
    let resp = client
        .request(
            http::Method::POST,
            &query,
            args.timeout + Duration::from_secs(5),
        )
        .await
        .with_context(|| format!("cannot reach the sidecar admin endpoint {}", client.url()))?;
    match resp.status {
        200 => serde_json::from_str(&resp.body)
            .with_context(|| format!("{}/inspect: the answer is not an inspection report", client.url())),
        404 => bail!(
            "{} has no /inspect: --admin must be a sidecar's admin endpoint (a control plane cannot lend an identity)",
            client.url()
        ),
        status => bail!("{}/inspect: HTTP {status}: {}", client.url(), resp.body.trim()),
    }
}

/// Everything that can be wrong before connecting: files, flags.
fn prepare(args: &InspectArgs) -> anyhow::Result<(Target, InspectOptions)> {
    let target = Target::parse(&args.target)?;
    if args.timeout.is_zero() {
        bail!("--timeout must be positive");
    }
    let Some(bundle) = &args.bundle else {
        bail!("--bundle is required (or --admin to borrow a running sidecar's identity)");
    };
    let bundle_pem = read(bundle, "--bundle")?;
    let roots =
        certs_from_pem(&bundle_pem).with_context(|| format!("--bundle {}", bundle.display()))?;
    let mut opts = InspectOptions::new(roots)
        .with_context(|| format!("--bundle {}", bundle.display()))?
        .tls12(args.tls12)
        .timeout(args.timeout);
    if let Some(td) = &args.trust_domain {
        opts = opts.trust_domain(TrustDomain::parse(td).context("--trust-domain")?);
    }
    if let Some(id) = &args.spiffe_id {
        let id = SpiffeId::parse(id).context("--spiffe-id")?;
        if id.path().is_empty() {
            bail!("--spiffe-id `{id}` is a trust domain ID; use --trust-domain for that");
        }
        opts = opts.expect(id);
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let chain = certs_from_pem(&read(cert, "--cert")?)
            .with_context(|| format!("--cert {}", cert.display()))?;
        let key_der = key_from_pem(&read(key, "--key")?)
            .with_context(|| format!("--key {}", key.display()))?;
        let identity = ClientIdentity::new(chain, key_der)
            .with_context(|| format!("--cert {} with --key {}", cert.display(), key.display()))?;
        opts = opts.client(identity);
    }
    Ok((target, opts))
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}
