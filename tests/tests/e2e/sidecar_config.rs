//! Bad sidecar settings: each exits non-zero at startup, before serving anything, with a message
//! that names what to fix (the file and line, the file, the setting).

use std::path::Path;
use std::process::{Command, Output};

use anyhow::ensure;
use trellis_tests::{
    run_with_timeout, trellis_bin, ControlPlane, ControlPlaneOpts, COMMAND_TIMEOUT,
};

/// Runs `trellis sidecar <args>` with a join token in the environment; it must exit by itself.
fn sidecar(args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(trellis_bin());
    cmd.arg("sidecar")
        .args(args)
        .env("TRELLIS_JOIN_TOKEN", "trellis-join.unused")
        .env_remove("RUST_LOG");
    run_with_timeout(cmd, COMMAND_TIMEOUT)
}

/// Checks that `out` is a failure whose stderr contains every one of `needles`.
fn assert_fails_naming(what: &str, out: &Output, needles: &[&str]) -> anyhow::Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success(),
        "{what}: exited 0\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    ensure!(
        !stdout.contains("listening"),
        "{what}: started listening before failing: {stdout}"
    );
    for n in needles {
        ensure!(
            stderr.contains(n),
            "{what}: stderr does not mention {n:?}:\n{stderr}"
        );
    }
    eprintln!("{what}: {}", stderr.trim());
    Ok(())
}

/// Flags for a sidecar that would otherwise start (listeners on port 0).
fn base_args(bundle: &Path) -> Vec<String> {
    [
        "--trust-domain",
        "example.org",
        "--control-plane",
        "127.0.0.1:1",
        "--control-bundle",
        &bundle.to_string_lossy(),
        "--inbound",
        "127.0.0.1:0",
        "--outbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--app",
        "127.0.0.1:1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn config_file_with_unknown_field_names_file_and_line() -> anyhow::Result<()> {
    let cp = ControlPlane::start(ControlPlaneOpts::default())?;
    let path = cp.dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        format!(
            "trust_domain: example.org\n\
             identity:\n\
             \x20 sds:\n\
             \x20   control_plane: {}\n\
             \x20   control_bundle: {}\n\
             \x20   spiffe_idd: spiffe://example.org/a\n\
             admin: 127.0.0.1:0\n",
            cp.sds_addr,
            cp.bundle_pem_path.display()
        ),
    )?;
    let out = sidecar(&["--config", &path.to_string_lossy()])?;
    assert_fails_naming(
        "unknown field `spiffe_idd` on line 6",
        &out,
        &[&path.to_string_lossy(), "line 6", "spiffe_idd"],
    )
}

#[test]
fn config_file_with_bad_yaml_names_file_and_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("broken.yaml");
    std::fs::write(
        &path,
        "trust_domain: example.org\ninbound:\n  listen: [127.0.0.1:0\n",
    )?;
    let out = sidecar(&["--config", &path.to_string_lossy()])?;
    assert_fails_naming(
        "unterminated flow sequence",
        &out,
        &[&path.to_string_lossy(), "line"],
    )
}

#[test]
fn missing_config_file_names_the_file() -> anyhow::Result<()> {
    let out = sidecar(&["--config", "/nonexistent/sidecar.yaml"])?;
    assert_fails_naming("missing config file", &out, &["/nonexistent/sidecar.yaml"])
}

#[test]
fn missing_control_bundle_names_the_file() -> anyhow::Result<()> {
    let args = base_args(Path::new("/nonexistent/bundle.pem"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = sidecar(&args)?;
    assert_fails_naming(
        "--control-bundle /nonexistent/bundle.pem",
        &out,
        &["/nonexistent/bundle.pem"],
    )
}

#[test]
fn malformed_upstream_identity_flag_names_the_setting() -> anyhow::Result<()> {
    let cp = ControlPlane::start(ControlPlaneOpts::default())?;
    for (bad, why) in [
        ("http://example.org/b", "spiffe://"),
        // (A foreign trust domain is fine: federation, docs/federation.md.)
        ("spiffe://example.org/b/../c", ".."),
        ("spiffe://example.org/b?x=1", "b?x=1"),
    ] {
        let mut args = base_args(&cp.bundle_pem_path);
        args.push("--upstream".into());
        args.push(format!("name=b,hosts=b,address=127.0.0.1:1,identity={bad}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = sidecar(&args)?;
        assert_fails_naming(
            &format!("--upstream …identity={bad}"),
            &out,
            &["upstreams", "identity", why],
        )?;
    }
    Ok(())
}

#[test]
fn malformed_upstream_identity_in_file_names_the_setting() -> anyhow::Result<()> {
    let cp = ControlPlane::start(ControlPlaneOpts::default())?;
    let path = cp.dir.path().join("bad-identity.yaml");
    std::fs::write(
        &path,
        format!(
            "trust_domain: example.org\n\
             identity:\n\
             \x20 sds:\n\
             \x20   control_plane: {}\n\
             \x20   control_bundle: {}\n\
             inbound: {{ listen: 127.0.0.1:0, app: 127.0.0.1:1 }}\n\
             outbound:\n\
             \x20 listen: 127.0.0.1:0\n\
             \x20 upstreams:\n\
             \x20   - name: billing\n\
             \x20     hosts: [billing]\n\
             \x20     address: 127.0.0.1:1\n\
             \x20     identity: billing.example.org\n\
             admin: 127.0.0.1:0\n",
            cp.sds_addr,
            cp.bundle_pem_path.display()
        ),
    )?;
    let out = sidecar(&["--config", &path.to_string_lossy()])?;
    assert_fails_naming(
        "identity without spiffe://",
        &out,
        &[
            "outbound.upstreams[0]",
            "billing",
            "identity",
            "billing.example.org",
        ],
    )
}
