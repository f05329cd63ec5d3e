//! `trellis inject -f FILE|-`: the injection webhook's decision run offline over manifests,
//! for teams that render and commit what the cluster runs. The injected documents go to
//! stdout, one line per object to stderr.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use clap::Args;
use trellis_control::config::ControlFile;
use trellis_control::webhook::inject::offline::{inject_documents, ObjectResult};
use trellis_control::webhook::inject::{DefaultRouteCheck, InjectConfig};
use trellis_control::webhook::WebhookSettings;
use trellis_identity::{TrustBundle, TrustDomain};

/// `trellis inject` flags. The injection settings are `trellis control`'s, with the same
/// names, variables, config keys and defaults.
#[derive(Args, Debug)]
pub struct InjectArgs {
    /// Manifests (multi-document YAML, or a List); `-` reads standard input. Pods,
    /// Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs are injected;
    /// other kinds pass through unchanged.
    #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
    filename: PathBuf,
    /// The trust bundle injected sidecars start with (TRELLIS_CONTROL_BUNDLE_PEM): bundle.pem
    /// from `trellis ca init`, or the control plane's `<state-dir>/bundle.pem`.
    #[arg(long, value_name = "PEM")]
    bundle: PathBuf,
    /// Namespace of objects without metadata.namespace, as `kubectl apply -n` would put them.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// The control plane's YAML config file: its trust_domain, sidecar_image,
    /// sidecar_control_plane, native_sidecar, no_proxy and sidecar_default_route apply here
    /// too (flags win).
    #[arg(long, env = "TRELLIS_CONFIG")]
    config: Option<PathBuf>,
    /// Trust domain, e.g. example.org.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// Image of the injected sidecar [default: ghcr.io/trellis-mesh/trellis:0.1.0].
    #[arg(long, env = "TRELLIS_SIDECAR_IMAGE")]
    sidecar_image: Option<String>,
    /// Control plane address (host:port) injected sidecars connect to
    /// [default: trellis-control.trellis-system.svc:8443].
    #[arg(long, env = "TRELLIS_SIDECAR_CONTROL_PLANE")]
    sidecar_control_plane: Option<String>,
    /// Inject a native sidecar (init container, restartPolicy Always; Kubernetes 1.29+);
    /// false: an ordinary container. A pod's trellis.io/native-sidecar annotation wins
    /// [default: true].
    #[arg(long, env = "TRELLIS_NATIVE_SIDECAR", value_name = "BOOL")]
    native_sidecar: Option<bool>,
    /// NO_PROXY entries every app container gets besides localhost and the pod's own addresses,
    /// comma-separated (hosts, .domains, addresses, CIDRs). A pod's trellis.io/no-proxy adds
    /// more; trellis.io/proxy-env: "false" leaves its proxy environment alone.
    #[arg(
        long,
        env = "TRELLIS_NO_PROXY",
        value_name = "LIST",
        value_delimiter = ','
    )]
    no_proxy: Option<Vec<String>>,
    /// Convention route every injected sidecar gets as TRELLIS_DEFAULT_ROUTE
    /// (`hosts=…;…,address=…,identity=…[,max_peers=N]`, checked as the sidecar checks it); a
    /// pod's trellis.io/default-route replaces it ("false": none) [default: none].
    #[arg(long, env = "TRELLIS_SIDECAR_DEFAULT_ROUTE", value_name = "ROUTE")]
    sidecar_default_route: Option<String>,
}

/// Runs `trellis inject`.
pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => ControlFile::load(path)?,
        None => ControlFile::default(),
    };
    let td = args
        .trust_domain
        .or(file.trust_domain)
        .ok_or_else(|| anyhow!("pass --trust-domain example.org (or trust_domain in --config)"))?;
    let td = TrustDomain::parse(&td).map_err(|e| anyhow!("--trust-domain: {e}"))?;
    let (image, control_plane, native_sidecar) = WebhookSettings::injection(
        args.sidecar_image.or(file.sidecar_image),
        args.sidecar_control_plane.or(file.sidecar_control_plane),
        args.native_sidecar.or(file.native_sidecar),
    )?;
    let no_proxy = WebhookSettings::no_proxy(args.no_proxy.or(file.no_proxy))?;
    let check: DefaultRouteCheck = trellis_sidecar::config::check_default_route;
    let default_route = WebhookSettings::default_route(
        args.sidecar_default_route.or(file.sidecar_default_route),
        Some(check),
        td.as_str(),
    )?;
    let pem = std::fs::read(&args.bundle)
        .with_context(|| format!("cannot read --bundle {}", args.bundle.display()))?;
    let bundle = TrustBundle::from_pem(td.clone(), &pem)
        .map_err(|e| anyhow!("--bundle {}: {e}", args.bundle.display()))?;
    let cfg = InjectConfig {
        trust_domain: td.as_str().to_owned(),
        image,
        control_plane,
        bundle_pem: bundle.to_pem(),
        native_sidecar,
        no_proxy,
        default_route,
        check_default_route: Some(check),
    };

    let (text, source) = if args.filename.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        (text, "<stdin>".to_owned())
    } else {
        let text = std::fs::read_to_string(&args.filename)
            .with_context(|| format!("cannot read {}", args.filename.display()))?;
        (text, args.filename.display().to_string())
    };
    let (out, reports) =
        inject_documents(&text, &cfg, &args.namespace).map_err(|e| anyhow!("{source}: {e}"))?;
    if reports.is_empty() {
        bail!("{source}: no Kubernetes objects in it");
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write standard output")?;
    let mut stderr = std::io::stderr().lock();
    for r in &reports {
        // Best effort: the manifests on stdout are what matters.
        let _ = match &r.result {
            ObjectResult::Injected(warnings) => {
                let line = writeln!(stderr, "{}: injected", r.object);
                for w in warnings {
                    let _ = writeln!(stderr, "  warning: {w}");
                }
                line
            }
            ObjectResult::Unchanged(why) => writeln!(stderr, "{}: unchanged ({why})", r.object),
            ObjectResult::OtherKind => Ok(()),
        };
    }
    Ok(())
}
