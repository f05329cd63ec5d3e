//! Network faults for reliability tests: a test re-runs itself inside a network namespace of
//! its own (`unshare -n`), where it brings loopback up, starts every process it needs, and
//! drops packets with iptables without touching the machine's own network.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use trellis_tests::netns::{own_netns, Blackhole};
//! // First thing in the test: outside, this runs the test again in a namespace and reports.
//! if !own_netns("faults_network::blackhole_between_sidecars", Duration::from_secs(120))? {
//!     return Ok(());
//! }
//! // Inside: loopback is up and private to this test.
//! let mut hole = Blackhole::port(15443)?;
//! hole.heal()?;
//! # Ok(()) }
//! ```
//!
//! Both need root (or `CAP_NET_ADMIN` and `CAP_SYS_ADMIN`), `unshare` (util-linux), `ip`
//! (iproute2) and `iptables` (which `tests/run.sh` installs). Without them the test skips with
//! a message saying what is missing; under CI a missing `iptables` fails instead.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};

use crate::{in_ci, run_with_timeout, tool_or_skip, COMMAND_TIMEOUT};

/// Set in the environment of the test's second run, inside the namespace.
pub const INSIDE_ENV: &str = "TRELLIS_TEST_IN_NETNS";

/// Runs test `test` (its full path in the e2e binary, e.g. `faults_network::blackhole`) in a
/// new network namespace. Outside one, re-runs this test binary under `unshare -n` for that one
/// test, prints its output, and returns `Ok(false)` once it passed (or after a skip message);
/// an `Err` carries its output. Inside, brings loopback up and returns `Ok(true)`: the caller
/// runs the scenario.
pub fn own_netns(test: &str, timeout: Duration) -> anyhow::Result<bool> {
    if std::env::var_os(INSIDE_ENV).is_some() {
        let out = run_with_timeout(ip(["link", "set", "lo", "up"]), COMMAND_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "ip link set lo up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return Ok(true);
    }
    if !can_isolate(test)? {
        return Ok(false);
    }
    let mut cmd = Command::new("unshare");
    cmd.arg("--net").arg("--");
    rerun(test, timeout, cmd)
}

/// Like [`own_netns`], in a mount namespace too, where `hosts` (the text of an `/etc/hosts`)
/// is bind-mounted over `/etc/hosts`: names the test makes up resolve through the system
/// resolver (`getaddrinfo`) to the loopback addresses it chooses, and nothing outside sees it.
/// Needs `unshare` and `mount` (util-linux) and root; skips (fails under CI) without them.
pub fn own_netns_with_hosts(test: &str, timeout: Duration, hosts: &str) -> anyhow::Result<bool> {
    if std::env::var_os(INSIDE_ENV).is_some() {
        return own_netns(test, timeout);
    }
    for tool in ["unshare", "ip", "mount"] {
        if tool_or_skip(test, tool).is_none() {
            return Ok(false);
        }
    }
    let probe = Command::new("unshare")
        .args(["--net", "--mount", "--", "true"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match probe {
            Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(
            !in_ci(),
            "{test}: `unshare --net --mount true` failed under CI (needs root): {why}"
        );
        eprintln!("SKIP {test}: cannot make network and mount namespaces (needs root): {why}");
        return Ok(false);
    }
    let dir = tempfile::tempdir().context("a directory for the test's /etc/hosts")?;
    let file = dir.path().join("hosts");
    std::fs::write(&file, hosts).with_context(|| format!("writing {}", file.display()))?;
    // `unshare --mount` makes every mount private to the new namespace first, so the bind
    // mount never reaches the machine's own /etc/hosts.
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "--mount", "--", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
        .arg(&file);
    rerun(test, timeout, cmd)
}

/// Runs `prefix` (a command that ends by running what follows it) with this test binary for
/// `test` appended, inside; reports its output.
fn rerun(test: &str, timeout: Duration, mut cmd: Command) -> anyhow::Result<bool> {
    let exe = std::env::current_exe().context("the test binary's path")?;
    cmd.arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE_ENV, "1");
    let out = run_with_timeout(cmd, timeout)
        .with_context(|| format!("{test} in its own network namespace"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown with `--nocapture` (the figures) and kept in the output of a failing test.
    println!("{stdout}");
    eprintln!("{stderr}");
    ensure!(
        out.status.success(),
        "{test} failed in its network namespace ({})",
        out.status
    );
    // The filter matched the one test and it ran (an empty run also exits 0).
    ensure!(
        stdout.contains("1 passed"),
        "{test} did not run in its network namespace"
    );
    Ok(false)
}

/// Whether this machine can give a test its own network namespace with iptables in it; prints
/// why not (and fails under CI where only a missing package would be the reason).
fn can_isolate(test: &str) -> anyhow::Result<bool> {
    for tool in ["unshare", "ip", "iptables"] {
        if tool_or_skip(test, tool).is_none() {
            return Ok(false);
        }
    }
    let probe = Command::new("unshare")
        .args(["--net", "--", "iptables", "-S"])
        .output();
    match probe {
        Ok(out) if out.status.success() => Ok(true),
        other => {
            let why = match other {
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            };
            assert!(
                !in_ci(),
                "{test}: `unshare --net iptables -S` failed under CI (needs root): {why}"
            );
            eprintln!(
                "SKIP {test}: cannot make a network namespace with iptables in it (needs root: \
                 `unshare --net -- iptables -S` said: {why})"
            );
            Ok(false)
        }
    }
}

fn ip<const N: usize>(args: [&str; N]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    cmd
}

/// Every TCP packet to or from one port on this namespace's loopback dropped (not rejected):
/// what a broken path or a partition looks like to both ends. Healed when dropped.
#[derive(Debug)]
pub struct Blackhole {
    port: u16,
    on: bool,
}

impl Blackhole {
    /// Starts dropping packets to and from `port`. Only inside [`own_netns`].
    pub fn port(port: u16) -> anyhow::Result<Self> {
        ensure!(
            std::env::var_os(INSIDE_ENV).is_some(),
            "a blackhole outside a test's own network namespace would cut the machine's traffic"
        );
        let mut hole = Blackhole { port, on: false };
        hole.rules("-I")?;
        hole.on = true;
        Ok(hole)
    }

    /// Lets packets through again.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        if self.on {
            self.rules("-D")?;
            self.on = false;
        }
        Ok(())
    }

    fn rules(&self, op: &str) -> anyhow::Result<()> {
        let port = self.port.to_string();
        // On loopback both directions pass INPUT: to the port (dport) and from it (sport).
        for side in ["--dport", "--sport"] {
            let mut cmd = Command::new("iptables");
            cmd.args([op, "INPUT", "-p", "tcp", side, &port, "-j", "DROP"]);
            let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
            if !out.status.success() {
                bail!(
                    "iptables {op} INPUT {side} {port}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = self.heal();
    }
}
