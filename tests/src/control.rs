//! `trellis control` as a process: start, restart, tokens, bundle, admin endpoints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use crate::metrics::Metrics;
use anyhow::{anyhow, bail, Context as _};
use tempfile::TempDir;
use tokio::net::TcpStream;
use trellis_identity::{SpiffeId, TrustBundle, TrustDomain};

use crate::{
    connect_sds, http_get, run_with_timeout, trellis_bin, Child, HttpResponse, SdsClient,
    COMMAND_TIMEOUT, STARTUP_TIMEOUT,
};

/// Kubernetes service-account token attestation settings.
#[derive(Debug, Clone)]
pub struct K8sOpts {
    /// The issuer's JWKS file.
    pub jwks: PathBuf,
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud`.
    pub audience: String,
}

/// Flags for `trellis control`. `None` leaves the binary's default.
#[derive(Debug, Clone)]
pub struct ControlPlaneOpts {
    /// `--trust-domain` (default `example.org`).
    pub trust_domain: String,
    /// `--svid-ttl`, e.g. `1h`.
    pub svid_ttl: Option<String>,
    /// `--rotate-every`, e.g. `2s`.
    pub rotate_every: Option<String>,
    /// `--k8s-jwks/--k8s-issuer/--k8s-audience`.
    pub k8s: Option<K8sOpts>,
    /// Anything else, appended as is.
    pub extra_args: Vec<String>,
    /// Runs the control plane in a mount namespace of its own (`unshare -m`, root only) with
    /// its state directory on a tmpfs of this size (`mount -o size=…`, e.g. `2m`): a small
    /// disk the test can fill. The test reaches its files through `/proc/<pid>/root`
    /// (`state_dir`, `bundle_pem_path` and `operator_socket` already point there).
    pub state_tmpfs: Option<String>,
    /// Extra environment variables for the process (e.g. libfaketime's).
    pub env: Vec<(String, String)>,
}

impl Default for ControlPlaneOpts {
    fn default() -> Self {
        ControlPlaneOpts {
            trust_domain: "example.org".to_string(),
            svid_ttl: None,
            rotate_every: None,
            k8s: None,
            extra_args: Vec::new(),
            state_tmpfs: None,
            env: Vec::new(),
        }
    }
}

/// A running `trellis control` on loopback, ports chosen by the kernel.
pub struct ControlPlane {
    /// The process (declared first: killed before the directory is removed).
    pub child: Child,
    /// SDS (gRPC over TLS) address.
    pub sds_addr: SocketAddr,
    /// Admin HTTP address.
    pub admin_addr: SocketAddr,
    /// The sidecar injection webhook's address, when started with `--webhook-listen`.
    pub webhook_addr: Option<SocketAddr>,
    /// `--state-dir` (inside `dir`).
    pub state_dir: PathBuf,
    /// `<state-dir>/bundle.pem`.
    pub bundle_pem_path: PathBuf,
    /// The operator API's Unix socket (`operator=` on the listening line).
    pub operator_socket: PathBuf,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// The test's temporary directory: logs, state, anything the test writes.
    pub dir: TempDir,
    /// The options it was started with (for [`ControlPlane::restart`]).
    pub opts: ControlPlaneOpts,
}

impl ControlPlane {
    /// Starts a control plane in a fresh temporary directory.
    pub fn start(opts: ControlPlaneOpts) -> anyhow::Result<Self> {
        Self::start_in(tempfile::tempdir()?, opts)
    }

    /// Starts a control plane with its state in `<dir>/state`, and waits for its
    /// `trellis control listening sds=… admin=…` line.
    pub fn start_in(dir: TempDir, opts: ControlPlaneOpts) -> anyhow::Result<Self> {
        Self::start_on(dir, opts, "127.0.0.1:0", "127.0.0.1:0")
    }

    /// Like [`ControlPlane::start_in`], on the given `--listen` and `--admin` addresses.
    fn start_on(
        dir: TempDir,
        opts: ControlPlaneOpts,
        listen: &str,
        admin: &str,
    ) -> anyhow::Result<Self> {
        let trust_domain = TrustDomain::parse(&opts.trust_domain)
            .map_err(|e| anyhow!("trust domain {}: {e}", opts.trust_domain))?;
        // Created by the control plane itself, with the permissions it wants.
        let state_dir = dir.path().join("state");
        let mut cmd = match &opts.state_tmpfs {
            None => Command::new(trellis_bin()),
            Some(size) => {
                // `sh` mounts, then execs trellis: one process, so /proc/<pid>/root is its view.
                let mut c = Command::new("unshare");
                c.args(["-m", "--propagation", "private", "sh", "-c"])
                    .arg(r#"mkdir -p "$0" && mount -t tmpfs -o "size=$1,mode=0700" trellis-state "$0" && shift && exec "$@""#)
                    .arg(&state_dir)
                    .arg(size)
                    .arg(trellis_bin());
                c
            }
        };
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("control")
            .args(["--trust-domain", &opts.trust_domain])
            .args(["--listen", listen, "--admin", admin])
            .arg("--state-dir")
            .arg(&state_dir);
        if let Some(ttl) = &opts.svid_ttl {
            cmd.args(["--svid-ttl", ttl]);
        }
        if let Some(every) = &opts.rotate_every {
            cmd.args(["--rotate-every", every]);
        }
        if let Some(k8s) = &opts.k8s {
            cmd.arg("--k8s-jwks").arg(&k8s.jwks).args([
                "--k8s-issuer",
                &k8s.issuer,
                "--k8s-audience",
                &k8s.audience,
            ]);
        }
        cmd.args(&opts.extra_args);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let mut child = Child::spawn("trellis-control", cmd, dir.path())?;
        let line = child.stdout_line(STARTUP_TIMEOUT)?;
        let ListeningAddrs {
            sds: sds_addr,
            admin: admin_addr,
            webhook: webhook_addr,
        } = parse_listening_addrs(&line).with_context(|| {
            format!("unexpected first stdout line from trellis control: {line:?}")
        })?;
        let operator_socket = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("operator="))
            .map(PathBuf::from)
            .with_context(|| format!("no operator= on the listening line {line:?}"))?;
        // Inside its own mount namespace, its files are seen through its root.
        let (state_dir, operator_socket) = match &opts.state_tmpfs {
            None => (state_dir, operator_socket),
            Some(_) => {
                let root = PathBuf::from(format!("/proc/{}/root", child.id()));
                let view = |p: &std::path::Path| root.join(p.strip_prefix("/").unwrap_or(p));
                (view(&state_dir), view(&operator_socket))
            }
        };
        let bundle_pem_path = state_dir.join("bundle.pem");
        if !bundle_pem_path.is_file() {
            bail!(
                "{} does not exist after the listening line",
                bundle_pem_path.display()
            );
        }
        Ok(ControlPlane {
            child,
            sds_addr,
            admin_addr,
            webhook_addr,
            state_dir,
            bundle_pem_path,
            operator_socket,
            trust_domain,
            dir,
            opts,
        })
    }

    /// Kills the process (SIGKILL, like a crash) and starts a new one on the same state
    /// directory with the same options. Ports change.
    pub fn restart(self) -> anyhow::Result<Self> {
        let ControlPlane {
            child, dir, opts, ..
        } = self;
        drop(child);
        Self::start_in(dir, opts)
    }

    /// Kills the process (SIGKILL, like a crash) and starts a new one on the same state
    /// directory, options and ports, so sidecars configured with the old address reconnect.
    pub fn restart_same_ports(self) -> anyhow::Result<Self> {
        let ControlPlane {
            child,
            dir,
            opts,
            sds_addr,
            admin_addr,
            ..
        } = self;
        drop(child);
        Self::start_on(dir, opts, &sds_addr.to_string(), &admin_addr.to_string())
    }

    /// Kills the process (SIGKILL) and leaves it down; [`ControlPlane::start_again`] brings it
    /// back on the same ports.
    pub fn kill(self) -> StoppedControlPlane {
        let ControlPlane {
            child,
            dir,
            opts,
            sds_addr,
            admin_addr,
            ..
        } = self;
        drop(child);
        StoppedControlPlane {
            dir,
            opts,
            sds_addr,
            admin_addr,
        }
    }

    /// `spiffe://<td>/trellis/control`, the identity the SDS endpoint presents.
    pub fn control_id(&self) -> SpiffeId {
        self.id("/trellis/control")
    }

    /// `spiffe://<td><path>`.
    pub fn id(&self, path: &str) -> SpiffeId {
        SpiffeId::from_parts(&self.trust_domain, path).expect("valid SPIFFE ID path")
    }

    /// The trust bundle from `bundle.pem`.
    pub fn bundle(&self) -> anyhow::Result<TrustBundle> {
        let pem = std::fs::read(&self.bundle_pem_path)
            .with_context(|| format!("read {}", self.bundle_pem_path.display()))?;
        TrustBundle::from_pem(self.trust_domain.clone(), &pem)
            .map_err(|e| anyhow!("{}: {e}", self.bundle_pem_path.display()))
    }

    /// `trellis token create` for `spiffe_id`; returns the token.
    pub fn create_token(&self, spiffe_id: &str, ttl: &str) -> anyhow::Result<String> {
        let mut cmd = Command::new(trellis_bin());
        cmd.args(["token", "create"]);
        // A replica on PostgreSQL keeps no database in its state directory; SQLite resolves
        // the /proc/<pid>/root link of a state directory in another mount namespace back
        // into ours, so such a control plane is asked over its operator socket.
        match self.opts.extra_args.iter().position(|a| a == "--database") {
            Some(i) if i + 1 < self.opts.extra_args.len() => {
                cmd.args(["--database", &self.opts.extra_args[i + 1]])
            }
            _ if self.opts.state_tmpfs.is_some() => cmd.arg("--socket").arg(&self.operator_socket),
            _ => cmd.arg("--state-dir").arg(&self.state_dir),
        };
        cmd.args(["--spiffe-id", spiffe_id, "--ttl", ttl]);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "trellis token create failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
        match lines.as_slice() {
            [token] => Ok(token.trim().to_string()),
            _ => bail!(
                "trellis token create printed {} lines, want 1: {stdout:?}",
                lines.len()
            ),
        }
    }

    /// An SDS client that verifies the control plane's SVID (`control_id`) against bundle.pem.
    pub async fn sds_client(&self) -> anyhow::Result<SdsClient> {
        connect_sds(self.sds_addr, self.bundle()?, self.control_id()).await
    }

    /// `GET path` on the admin port.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<HttpResponse> {
        let tcp = TcpStream::connect(self.admin_addr).await?;
        http_get(tcp, &self.admin_addr.to_string(), path).await
    }

    /// `/metrics`, parsed.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let r = self.admin_get("/metrics").await?;
        if r.status != 200 {
            bail!("control plane /metrics: {}", r.status);
        }
        Metrics::parse(&r.text())
    }
}

/// Runs `trellis control` on port 0 with a state directory in `dir` and `extra` flags, which
/// must make it exit non-zero before it listens; returns its stderr (the message a user sees).
pub fn control_must_fail_to_start(
    dir: &std::path::Path,
    extra: &[impl AsRef<std::ffi::OsStr>],
) -> anyhow::Result<String> {
    let mut cmd = Command::new(trellis_bin());
    cmd.args(["control", "--trust-domain", "example.org"])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(extra);
    let out = run_with_timeout(cmd, std::time::Duration::from_secs(60))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        bail!(
            "want a failed start, got {}; stdout: {stdout}; stderr: {stderr}",
            out.status
        );
    }
    if stdout.contains("listening") {
        bail!("it started listening: {stdout}");
    }
    eprintln!("failed start, as expected ({}): {stderr}", out.status);
    Ok(stderr)
}

/// A control plane killed by [`ControlPlane::kill`]: its state directory and ports, kept
/// for [`StoppedControlPlane::start_again`].
pub struct StoppedControlPlane {
    /// The test's temporary directory (state and logs).
    pub dir: TempDir,
    /// The options it ran with.
    pub opts: ControlPlaneOpts,
    /// Its SDS address.
    pub sds_addr: SocketAddr,
    /// Its admin address.
    pub admin_addr: SocketAddr,
}

impl StoppedControlPlane {
    /// Starts `trellis control` again on the same state directory, options and ports.
    pub fn start_again(self) -> anyhow::Result<ControlPlane> {
        ControlPlane::start_on(
            self.dir,
            self.opts,
            &self.sds_addr.to_string(),
            &self.admin_addr.to_string(),
        )
    }
}

/// Parses `trellis control listening sds=127.0.0.1:41233 admin=127.0.0.1:41234`.
pub fn parse_listening_line(line: &str) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let addrs = parse_listening_addrs(line)?;
    Ok((addrs.sds, addrs.admin))
}

/// Every address on the control plane's listening line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListeningAddrs {
    /// `sds=`.
    pub sds: SocketAddr,
    /// `admin=`.
    pub admin: SocketAddr,
    /// `webhook=`, present with `--webhook-listen`.
    pub webhook: Option<SocketAddr>,
}

/// Parses `trellis control listening sds=… admin=…[ webhook=…]`.
pub fn parse_listening_addrs(line: &str) -> anyhow::Result<ListeningAddrs> {
    let rest = line
        .trim()
        .strip_prefix("trellis control listening ")
        .context("missing prefix `trellis control listening `")?;
    let mut sds = None;
    let mut admin = None;
    let mut webhook = None;
    for field in rest.split_whitespace() {
        if let Some(v) = field.strip_prefix("sds=") {
            sds = Some(v.parse().with_context(|| format!("sds={v}"))?);
        } else if let Some(v) = field.strip_prefix("admin=") {
            admin = Some(v.parse().with_context(|| format!("admin={v}"))?);
        } else if let Some(v) = field.strip_prefix("webhook=") {
            webhook = Some(v.parse().with_context(|| format!("webhook={v}"))?);
        }
    }
    Ok(ListeningAddrs {
        sds: sds.context("no sds=")?,
        admin: admin.context("no admin=")?,
        webhook,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        let (sds, admin) = parse_listening_line(
            "trellis control listening sds=127.0.0.1:41233 admin=127.0.0.1:41234\n",
        )
        .expect("valid line");
        assert_eq!(sds, "127.0.0.1:41233".parse().expect("addr"));
        assert_eq!(admin, "127.0.0.1:41234".parse().expect("addr"));
        assert!(parse_listening_line("listening on 127.0.0.1:1").is_err());
        assert!(parse_listening_line("trellis control listening sds=127.0.0.1:1").is_err());
    }

    #[test]
    fn parses_the_optional_webhook_field() {
        let line = "trellis control listening sds=127.0.0.1:1 admin=127.0.0.1:2";
        assert_eq!(parse_listening_addrs(line).expect("valid").webhook, None);
        let with = format!("{line} webhook=127.0.0.1:3");
        let addrs = parse_listening_addrs(&with).expect("valid");
        assert_eq!(addrs.webhook, Some("127.0.0.1:3".parse().expect("addr")));
        assert_eq!(addrs.admin, "127.0.0.1:2".parse().expect("addr"));
        assert_eq!(
            parse_listening_line(&with).expect("valid").0,
            "127.0.0.1:1".parse().expect("addr")
        );
        assert!(parse_listening_addrs(&format!("{line} webhook=nope")).is_err());
    }
}
