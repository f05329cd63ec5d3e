//! Envoy as a process: bootstrap templates, validation, start, admin.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use anyhow::bail;
use tokio::net::TcpStream;

use crate::{
    http_get, run_with_timeout, wait_until, Child, HttpResponse, COMMAND_TIMEOUT, STARTUP_TIMEOUT,
};

/// Fills `{{NAME}}` placeholders in a template; errors if one is left unfilled.
pub fn render_template(template: &str, vars: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(pos) = out.find("{{") {
        let end = out[pos..].find("}}").map_or(out.len(), |e| pos + e + 2);
        bail!("template placeholder {} not filled", &out[pos..end]);
    }
    Ok(out)
}

/// A running Envoy.
pub struct Envoy {
    /// The process.
    pub child: Child,
    /// Envoy's admin address (read from `--admin-address-path`).
    pub admin_addr: SocketAddr,
}

impl Envoy {
    /// Checks `config` with `envoy --mode validate`; errors with Envoy's output.
    pub fn validate(bin: &Path, config: &Path) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin);
        cmd.args(["--mode", "validate", "-c"]).arg(config);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "envoy --mode validate {} failed ({}):\n{}{}",
                config.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts Envoy with bootstrap `config` (`--concurrency 1`, no hot restart, a random base
    /// id), logs in `log_dir`, and waits until it has written its admin address.
    pub fn start(bin: &Path, config: &Path, log_dir: &Path) -> anyhow::Result<Self> {
        let admin_path = log_dir.join("envoy-admin-address.txt");
        let base_id = (u64::from(std::process::id()) << 8)
            ^ SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::from(d.subsec_nanos()));
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(config)
            .args(["--concurrency", "1", "--disable-hot-restart"])
            .args(["--base-id", &(base_id % 1_000_000_000).to_string()])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args([
                "--log-level",
                "info",
                "--component-log-level",
                "config:debug,secret:debug",
            ]);
        let mut child = Child::spawn("envoy", cmd, log_dir)?;
        let mut addr = None;
        // Stops early if Envoy exits (a bad bootstrap, a port in use).
        let _ = wait_until(STARTUP_TIMEOUT, "Envoy's admin address file", || {
            addr = std::fs::read_to_string(&admin_path)
                .ok()
                .and_then(|s| s.trim().parse::<SocketAddr>().ok());
            addr.is_some() || child.try_exit().is_some()
        });
        match addr {
            Some(admin_addr) => Ok(Envoy { child, admin_addr }),
            None => bail!(
                "Envoy did not start within {STARTUP_TIMEOUT:?} (exit: {:?}); stderr:\n{}",
                child.try_exit(),
                child.stderr_tail(60)
            ),
        }
    }

    /// `GET path` on Envoy's admin port (e.g. `/ready`, `/certs`, `/config_dump`).
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<HttpResponse> {
        let tcp = TcpStream::connect(self.admin_addr).await?;
        http_get(tcp, &self.admin_addr.to_string(), path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_placeholders_must_all_be_filled() {
        let t = "port: {{PORT}} id: {{ID}}";
        assert_eq!(
            render_template(t, &[("PORT", "1"), ("ID", "x")]).expect("filled"),
            "port: 1 id: x"
        );
        let err = render_template(t, &[("PORT", "1")]).expect_err("ID unfilled");
        assert!(err.to_string().contains("{{ID}}"), "{err}");
    }
}
