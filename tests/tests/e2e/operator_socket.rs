//! The operator socket: `trellis token create` and `trellis ca rotate` through the running
//! control plane, with no access to its state.
//!
//! The honest setup for "the state directory is unreadable to the CLI": the control plane runs
//! as root with its state directory root-owned 0700 (as it creates it); the socket is handed
//! to an unprivileged operator uid (`chown`, the way an admin grants a group or user access to
//! SPIRE's socket); the CLI runs as that uid (`setpriv --reuid`), so it can connect to the
//! socket and provably cannot open the database (the same CLI with `--state-dir` is refused
//! by the kernel). Needs root and setpriv (util-linux); skipped loudly otherwise, outside CI.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use trellis_tests::{
    e2e, eventually, fetch_svid, in_ci, run_with_timeout, trellis_bin, which, ControlPlane,
    ControlPlaneOpts, COMMAND_TIMEOUT,
};

/// The operator's uid and gid (`nobody` on Debian; any uid that is not the control plane's).
const OPERATOR_UID: u32 = 65534;

fn is_root() -> bool {
    // /proc/self/status: "Uid:\treal\teffective\t…".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// `setpriv` when the test can switch uids; `None` after a loud SKIP (a failure under CI).
fn setpriv_or_skip(test: &str) -> Option<PathBuf> {
    match (is_root(), which("setpriv")) {
        (true, Some(p)) => Some(p),
        (root, _) => {
            assert!(
                !in_ci(),
                "{test}: needs root and setpriv under CI (root: {root})"
            );
            eprintln!(
                "SKIP {test}: needs root and setpriv (util-linux) to run the CLI as another uid"
            );
            None
        }
    }
}

/// `trellis args…` as the operator uid, with no supplementary groups and no capabilities.
fn as_operator(setpriv: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(setpriv);
    cmd.args([
        &format!("--reuid={OPERATOR_UID}"),
        &format!("--regid={OPERATOR_UID}"),
        "--clear-groups",
        "--inh-caps=-all",
        "--",
    ])
    .arg(trellis_bin())
    .args(args)
    .env_remove("TRELLIS_OPERATOR_SOCKET")
    .env_remove("TRELLIS_STATE_DIR");
    run_with_timeout(cmd, COMMAND_TIMEOUT)
}

fn trellis(args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(trellis_bin());
    cmd.args(args)
        .env_remove("TRELLIS_OPERATOR_SOCKET")
        .env_remove("TRELLIS_STATE_DIR");
    run_with_timeout(cmd, COMMAND_TIMEOUT)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A control plane whose operator socket is in `<dir>/run/`, outside its state directory.
fn start() -> anyhow::Result<(ControlPlane, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    std::fs::create_dir(&run)?;
    let socket = run.join("operator.sock");
    let cp = ControlPlane::start_in(
        dir,
        ControlPlaneOpts {
            extra_args: vec!["--operator-socket".into(), socket.display().to_string()],
            ..Default::default()
        },
    )?;
    ensure!(
        cp.operator_socket == socket,
        "{}",
        cp.operator_socket.display()
    );
    let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "socket mode {mode:o}");
    Ok((cp, socket))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_rotation_through_the_socket_without_access_to_the_state() -> anyhow::Result<()> {
    let test = "operator_socket::token_and_rotation_through_the_socket";
    let Some(setpriv) = setpriv_or_skip(test) else {
        return Ok(());
    };
    e2e(async {
        let (cp, socket) = start()?;
        // The operator may reach the socket (traverse, not list, its directories) and
        // connect to it; the state directory stays root's, 0700.
        for d in [cp.dir.path(), socket.parent().unwrap()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))?;
        }
        std::os::unix::fs::chown(&socket, Some(OPERATOR_UID), Some(OPERATOR_UID))?;
        let state_mode = std::fs::metadata(&cp.state_dir)?.permissions().mode() & 0o777;
        ensure!(state_mode == 0o700, "state dir mode {state_mode:o}");
        let sock = socket.to_str().unwrap();
        let state = cp.state_dir.to_str().unwrap();

        // Direct database access, as the operator: the kernel refuses.
        let direct = as_operator(
            &setpriv,
            &[
                "token",
                "create",
                "--state-dir",
                state,
                "--spiffe-id",
                "spiffe://example.org/w",
            ],
        )?;
        ensure!(
            !direct.status.success(),
            "the operator read the state directory"
        );
        let err = text(&direct.stderr);
        ensure!(
            err.contains("Permission denied") || err.contains("permission denied"),
            "{err}"
        );
        println!("offline as uid {OPERATOR_UID}: {}", err.trim());

        // Through the socket: a working token.
        let id = "spiffe://example.org/ns/batch/sa/report";
        let out = as_operator(
            &setpriv,
            &[
                "token",
                "create",
                "--socket",
                sock,
                "--spiffe-id",
                id,
                "--ttl",
                "10m",
            ],
        )?;
        ensure!(out.status.success(), "token create: {}", text(&out.stderr));
        let token = text(&out.stdout).trim().to_owned();
        ensure!(token.starts_with("trellis-join."), "{token}");
        let (svid, _) = fetch_svid(&cp, &token).await?;
        ensure!(svid.spiffe_id().as_str() == id, "{}", svid.spiffe_id());

        // A CA rotation through the socket: the new CA joins the bundle.
        let before = cp.bundle()?.roots().len();
        let out = as_operator(
            &setpriv,
            &["ca", "rotate", "--socket", sock, "--activate-after", "1h"],
        )?;
        ensure!(out.status.success(), "ca rotate: {}", text(&out.stderr));
        let printed = text(&out.stdout);
        ensure!(printed.contains("scheduled CA rotation"), "{printed}");
        println!("{printed}");
        eventually(
            Duration::from_secs(20),
            "the new CA in bundle.pem",
            || async {
                let now = cp.bundle()?.roots().len();
                ensure!(now == before + 1, "{before} -> {now} CAs");
                Ok(())
            },
        )
        .await?;

        // Both actions are in the audit log with the operator's uid, never the token.
        let audit = std::fs::read_to_string(cp.state_dir.join("audit.log"))?;
        for event in ["token_created", "ca_rotation_scheduled"] {
            let line = audit
                .lines()
                .find(|l| l.contains(&format!("\"event\":\"{event}\"")))
                .with_context(|| format!("no {event} in the audit log:\n{audit}"))?;
            ensure!(line.contains(&format!("\"uid\":{OPERATOR_UID}")), "{line}");
        }
        ensure!(!audit.contains(&token), "the audit log holds the token");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_a_foreign_trust_domain_is_refused_at_creation() -> anyhow::Result<()> {
    e2e(async {
        let (cp, socket) = start()?;
        let sock = socket.to_str().unwrap();
        let out = trellis(&[
            "token",
            "create",
            "--socket",
            sock,
            "--spiffe-id",
            "spiffe://partner.example/ns/prod/sa/web",
        ])?;
        let err = text(&out.stderr);
        ensure!(out.status.code() == Some(1), "{:?}: {err}", out.status);
        ensure!(
            out.stdout.is_empty(),
            "printed a token: {}",
            text(&out.stdout)
        );
        ensure!(
            err.contains("outside the trust domain example.org"),
            "the message names the trust domain: {err}"
        );
        println!("refused: {}", err.trim());
        // Nothing was stored: the control plane counts no token.
        let audit = std::fs::read_to_string(cp.state_dir.join("audit.log"))?;
        ensure!(!audit.contains("token_created"), "{audit}");
        // A rotation for another trust domain too.
        let out = trellis(&[
            "ca",
            "rotate",
            "--socket",
            sock,
            "--trust-domain",
            "partner.example",
        ])?;
        let err = text(&out.stderr);
        ensure!(
            out.status.code() == Some(1) && err.contains("example.org"),
            "{err}"
        );

        // An operator's intermediate travels over the socket (the CLI checks the files, the
        // control plane builds the CA again) and is scheduled.
        let ca = cp.dir.path().join("ca-2");
        let out = trellis(&[
            "ca",
            "init",
            "--trust-domain",
            "example.org",
            "--out",
            ca.to_str().unwrap(),
        ])?;
        ensure!(out.status.success(), "{}", text(&out.stderr));
        let file = |name: &str| ca.join(name).display().to_string();
        let out = trellis(&[
            "ca",
            "rotate",
            "--socket",
            sock,
            "--trust-domain",
            "example.org",
            "--ca-cert",
            &file("intermediate.pem"),
            "--ca-key",
            &file("intermediate-key.pem"),
            "--ca-bundle",
            &file("bundle.pem"),
        ])?;
        ensure!(out.status.success(), "{}", text(&out.stderr));
        ensure!(
            text(&out.stdout).contains("scheduled CA rotation 1"),
            "{}",
            text(&out.stdout)
        );
        Ok(())
    })
    .await
}

#[test]
fn a_missing_socket_names_the_path_and_the_flag() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nowhere/operator.sock");
    let m = missing.to_str().unwrap();
    for args in [
        &[
            "token",
            "create",
            "--socket",
            m,
            "--spiffe-id",
            "spiffe://example.org/w",
        ][..],
        &["ca", "rotate", "--socket", m][..],
    ] {
        let out = trellis(args)?;
        let err = text(&out.stderr);
        ensure!(out.status.code() == Some(1), "{args:?}: {err}");
        for want in [m, "--socket", "--operator-socket", "--state-dir"] {
            ensure!(err.contains(want), "{args:?}: {want:?} missing from: {err}");
        }
        println!("{}", err.trim());
    }
    // Without --socket: the default path the manifests use, named.
    if !Path::new("/var/lib/trellis/operator.sock").exists() {
        let out = trellis(&["token", "create", "--spiffe-id", "spiffe://example.org/w"])?;
        let err = text(&out.stderr);
        ensure!(
            out.status.code() == Some(1) && err.contains("/var/lib/trellis/operator.sock"),
            "{err}"
        );
    }
    Ok(())
}
