//! `trellis sidecar` as a process: start against a control plane, admin endpoints, metrics,
//! memory, SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};
use tokio::net::TcpStream;

use crate::{
    eventually, http_get, trellis_bin, Child, ControlPlane, HttpResponse, STARTUP_TIMEOUT,
};

/// What to start a sidecar with. Identity comes from `trellis control` with a fresh join
/// token for `spiffe_id`.
#[derive(Debug, Clone)]
pub struct SidecarOpts {
    /// Process name in logs (`sidecar-a`).
    pub name: String,
    /// The SPIFFE ID it is issued (and must receive: `--spiffe-id`).
    pub spiffe_id: String,
    /// `--app`.
    pub app: SocketAddr,
    /// `--upstream` values.
    pub upstreams: Vec<String>,
    /// Anything else, appended as is.
    pub extra_args: Vec<String>,
    /// The join token to use instead of a fresh one for `spiffe_id`.
    pub join_token: Option<String>,
    /// `--inbound` (default `127.0.0.1:0`).
    pub inbound: Option<SocketAddr>,
    /// `--outbound`, the shared listener (default `127.0.0.1:0`).
    pub outbound: Option<SocketAddr>,
    /// `--control-bundle` instead of the control plane's current `bundle.pem` (a bootstrap
    /// bundle copied earlier).
    pub control_bundle: Option<std::path::PathBuf>,
    /// A command that runs the sidecar (`faketime -f -10m`): the binary and its arguments
    /// are appended to it.
    pub wrapper: Vec<String>,
}

impl SidecarOpts {
    /// A sidecar for `spiffe_id` in front of `app`, no upstreams.
    pub fn new(name: &str, spiffe_id: &str, app: SocketAddr) -> Self {
        SidecarOpts {
            name: name.to_string(),
            spiffe_id: spiffe_id.to_string(),
            app,
            upstreams: Vec::new(),
            extra_args: Vec::new(),
            join_token: None,
            inbound: None,
            outbound: None,
            control_bundle: None,
            wrapper: Vec::new(),
        }
    }

    /// Listens on these inbound and shared outbound addresses instead of kernel-chosen ports
    /// (a restart on the ports peers and apps already use).
    pub fn on_ports(mut self, inbound: SocketAddr, outbound: SocketAddr) -> Self {
        self.inbound = Some(inbound);
        self.outbound = Some(outbound);
        self
    }

    /// Adds `--upstream name=<name>,hosts=<name>,address=<address>,identity=<identity>`.
    pub fn upstream(mut self, name: &str, address: SocketAddr, identity: &str) -> Self {
        self.upstreams.push(format!(
            "name={name},hosts={name},address={address},identity={identity}"
        ));
        self
    }

    /// Appends raw arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra_args.extend(args.iter().map(|s| s.to_string()));
        self
    }
}

/// The addresses in `trellis sidecar listening inbound=… outbound=shared=…[,NAME=…] admin=…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarAddrs {
    /// The mTLS inbound listener.
    pub inbound: SocketAddr,
    /// Outbound listeners by name; `shared` is the Host-routed one.
    pub outbound: BTreeMap<String, SocketAddr>,
    /// The admin listener.
    pub admin: SocketAddr,
}

/// Parses the sidecar's listening line.
pub fn parse_sidecar_line(line: &str) -> anyhow::Result<SidecarAddrs> {
    let rest = line
        .trim()
        .strip_prefix("trellis sidecar listening ")
        .context("missing prefix `trellis sidecar listening `")?;
    let (mut inbound, mut admin) = (None, None);
    let mut outbound = BTreeMap::new();
    for field in rest.split_whitespace() {
        if let Some(v) = field.strip_prefix("inbound=") {
            inbound = Some(v.parse().with_context(|| format!("inbound={v}"))?);
        } else if let Some(v) = field.strip_prefix("admin=") {
            admin = Some(v.parse().with_context(|| format!("admin={v}"))?);
        } else if let Some(v) = field.strip_prefix("outbound=") {
            for pair in v.split(',') {
                let (name, addr) = pair
                    .split_once('=')
                    .with_context(|| format!("outbound entry {pair:?}"))?;
                let addr = addr
                    .parse()
                    .with_context(|| format!("outbound {name}={addr}"))?;
                outbound.insert(name.to_string(), addr);
            }
        }
    }
    Ok(SidecarAddrs {
        inbound: inbound.context("no inbound=")?,
        outbound,
        admin: admin.context("no admin=")?,
    })
}

/// A running `trellis sidecar`.
pub struct Sidecar {
    /// The process.
    pub child: Child,
    /// Its listeners.
    pub addrs: SidecarAddrs,
    /// The SPIFFE ID it was issued.
    pub spiffe_id: String,
    /// What it was started with ([`Sidecar::start`]); `None` for a raw command.
    pub opts: Option<SidecarOpts>,
}

impl Sidecar {
    /// Creates a join token for `opts.spiffe_id`, starts the sidecar against `cp` (logs in the
    /// control plane's directory) and waits for its listening line and `/ready`.
    pub async fn start(cp: &ControlPlane, opts: SidecarOpts) -> anyhow::Result<Self> {
        let name = opts.name.clone();
        let sidecar = Self::start_unready(cp, opts)?;
        sidecar
            .wait_ready()
            .await
            .with_context(|| format!("{name} did not turn ready"))?;
        Ok(sidecar)
    }

    /// Like [`Sidecar::start`], but returns after the listening line, without waiting for an
    /// SVID.
    pub fn start_unready(cp: &ControlPlane, opts: SidecarOpts) -> anyhow::Result<Self> {
        let token = match &opts.join_token {
            Some(t) => t.clone(),
            None => cp.create_token(&opts.spiffe_id, "1h")?,
        };
        let any = "127.0.0.1:0".to_string();
        let inbound = opts.inbound.map_or_else(|| any.clone(), |a| a.to_string());
        let outbound = opts.outbound.map_or_else(|| any.clone(), |a| a.to_string());
        let mut cmd = match opts.wrapper.split_first() {
            None => Command::new(trellis_bin()),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(trellis_bin());
                c
            }
        };
        cmd.arg("sidecar")
            .args(["--trust-domain", cp.trust_domain.as_str()])
            .args(["--control-plane", &cp.sds_addr.to_string()])
            .arg("--control-bundle")
            .arg(opts.control_bundle.as_ref().unwrap_or(&cp.bundle_pem_path))
            .args(["--spiffe-id", &opts.spiffe_id])
            .args(["--inbound", &inbound, "--outbound", &outbound])
            .args(["--admin", "127.0.0.1:0", "--app", &opts.app.to_string()])
            .env("TRELLIS_JOIN_TOKEN", token);
        for u in &opts.upstreams {
            cmd.args(["--upstream", u]);
        }
        cmd.args(&opts.extra_args);
        let mut sidecar = Self::launch(&opts.name, &opts.spiffe_id, cmd, cp.dir.path())?;
        sidecar.opts = Some(opts);
        Ok(sidecar)
    }

    /// The options to start this sidecar again on the same inbound and shared outbound ports
    /// (with a fresh join token: the old one is spent). `None` if it was started from a raw
    /// command.
    pub fn same_ports_opts(&self) -> Option<SidecarOpts> {
        let mut opts = self.opts.clone()?;
        opts.join_token = None;
        Some(opts.on_ports(self.addrs.inbound, self.outbound()))
    }

    /// SIGTERM, then waits up to `timeout` for the process to exit (it drains first).
    pub async fn stop(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.sigterm()?;
        self.wait_exit(timeout)
            .await
            .ok_or_else(|| anyhow!("did not exit within {timeout:?} of SIGTERM"))
    }

    /// Stops this sidecar (SIGTERM, drain, exit 0) and starts a new one against `cp` on the same
    /// inbound and shared outbound ports, with a fresh join token; waits for `/ready`.
    pub async fn restart(mut self, cp: &ControlPlane, timeout: Duration) -> anyhow::Result<Self> {
        let opts = self
            .same_ports_opts()
            .context("restart needs a sidecar started from SidecarOpts")?;
        let status = self.stop(timeout).await?;
        if !status.success() {
            bail!("{} exited {status} after SIGTERM, want 0", opts.name);
        }
        Self::start(cp, opts).await
    }

    /// Spawns `cmd` (a full `trellis sidecar …` command), waits for its listening line and
    /// `/ready`.
    pub async fn spawn(
        name: &str,
        spiffe_id: &str,
        cmd: Command,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let sidecar = Self::launch(name, spiffe_id, cmd, log_dir)?;
        sidecar.wait_ready().await?;
        Ok(sidecar)
    }

    /// Spawns `cmd` and waits for its listening line only (not for an SVID).
    pub fn launch(
        name: &str,
        spiffe_id: &str,
        mut cmd: Command,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        // Load tests send thousands of requests: an access-log line each would bury the log
        // tail shown on failure. Tests that look at the access log pass `--access-log true`.
        cmd.env("TRELLIS_ACCESS_LOG", "false");
        let mut child = Child::spawn(name, cmd, log_dir)?;
        let line = child.stdout_line(STARTUP_TIMEOUT)?;
        let addrs = parse_sidecar_line(&line)
            .with_context(|| format!("{name}: unexpected first stdout line: {line:?}"))?;
        Ok(Sidecar {
            child,
            addrs,
            spiffe_id: spiffe_id.to_string(),
            opts: None,
        })
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        eventually(STARTUP_TIMEOUT, "sidecar /ready", || async {
            let r = self.admin_get("/ready").await?;
            if r.status != 200 {
                bail!("/ready: {} {}", r.status, r.text());
            }
            Ok(())
        })
        .await
        .with_context(|| format!("stderr:\n{}", self.child.stderr_tail(40)))
    }

    /// The shared (Host-routed) outbound listener.
    pub fn outbound(&self) -> SocketAddr {
        self.addrs.outbound["shared"]
    }

    /// `GET path` on the admin port.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<HttpResponse> {
        let tcp = TcpStream::connect(self.addrs.admin).await?;
        http_get(tcp, &self.addrs.admin.to_string(), path).await
    }

    /// The serial of the SVID it presents now (`/certs`' `svid.serial`).
    pub async fn svid_serial(&self) -> anyhow::Result<String> {
        let certs: serde_json::Value =
            serde_json::from_str(&self.admin_get("/certs").await?.text())?;
        Ok(certs["svid"]["serial"]
            .as_str()
            .context("/certs has no svid.serial")?
            .to_owned())
    }

    /// Waits up to `within` for it to present an SVID other than serial `old`; returns it.
    pub async fn next_svid_serial(&self, old: &str, within: Duration) -> anyhow::Result<String> {
        eventually(within, "a new SVID", || async {
            let s = self.svid_serial().await?;
            if s == old {
                bail!("still {s}");
            }
            Ok(s)
        })
        .await
    }

    /// `/metrics`, parsed.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let r = self.admin_get("/metrics").await?;
        if r.status != 200 {
            bail!("/metrics: {}", r.status);
        }
        Metrics::parse(&r.text())
    }

    /// Resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.child.id())
    }

    /// Open file descriptors (entries of `/proc/<pid>/fd`).
    pub fn open_fds(&self) -> anyhow::Result<usize> {
        open_fds(self.child.id())
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let out = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .output()
            .context("run kill")?;
        if !out.status.success() {
            bail!("kill -TERM: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// After [`Self::sigterm`] at `signalled` and its in-flight requests done: the sidecar
    /// exits 0, and before its 10 s drain timeout could have forced it (the outcome, not the
    /// speed: the requests had at most 3 s left at SIGTERM).
    pub async fn exits_drained(&mut self, signalled: Instant) -> anyhow::Result<()> {
        let status = self
            .wait_exit(Duration::from_secs(10))
            .await
            .context("sidecar still running 10s after its in-flight requests finished")?;
        eprintln!(
            "sidecar exited {status} {:?} after SIGTERM",
            signalled.elapsed()
        );
        ensure!(
            status.success(),
            "sidecar exited {status} after SIGTERM, want 0"
        );
        ensure!(
            signalled.elapsed() < Duration::from_secs(9),
            "drain took {:?} for requests of 3s: it waited for the drain timeout",
            signalled.elapsed()
        );
        Ok(())
    }

    /// Waits (without blocking the runtime) up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_exit() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// VmRSS of process `pid`, KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// Open file descriptors of process `pid`: the entries of `/proc/<pid>/fd`.
pub fn open_fds(pid: u32) -> anyhow::Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("read {dir}"))?
        .count())
}

/// `/metrics`, parsed: see [`crate::metrics`].
pub use crate::metrics::Metrics;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        let a = parse_sidecar_line(
            "trellis sidecar listening inbound=127.0.0.1:1 outbound=shared=127.0.0.1:2,b=127.0.0.1:3 admin=127.0.0.1:4",
        )
        .expect("valid line");
        assert_eq!(a.inbound.port(), 1);
        assert_eq!(a.outbound["shared"].port(), 2);
        assert_eq!(a.outbound["b"].port(), 3);
        assert_eq!(a.admin.port(), 4);
        assert!(parse_sidecar_line("trellis sidecar listening inbound=127.0.0.1:1").is_err());
    }
}
