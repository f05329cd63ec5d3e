//! Issue #24: CA and transparency-log keys in a PKCS#11 token (SoftHSM2, one token directory
//! per test via SOFTHSM2_CONF). The control plane signs SVIDs inside the token, a sidecar's
//! SVID chains to the offline root through the token-held intermediate, no private key is
//! written to the state directory or the database, bad token setups stop the start with a
//! message naming the cause, and a CA rotation from a file key to a token key drops no
//! request. Skipped, saying so, where SoftHSM2 is not installed (tests/run.sh installs it).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use trellis_tests::app_client::{echo_json, get_once, Proto};
use trellis_tests::load::{Load, LoadOpts};
use trellis_tests::mesh::{Mesh, MeshOpts};
use trellis_tests::openssl::InitCa;
use trellis_tests::sidecar::Sidecar;
use trellis_tests::softhsm::{SoftHsm, PIN};
use trellis_tests::{e2e, run_with_timeout, ControlPlane, ControlPlaneOpts};

const TOKEN: &str = "trellis-ca";

fn subject_of(pem_file: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read(pem_file)?;
    let certs = trellis_identity::certs_from_pem(&pem)?;
    Ok(trellis_identity::cert_facts(certs.first().context("no cert")?)?.subject)
}

/// The issuer of the SVID a sidecar holds (its admin `/certs`).
async fn svid_issuer(s: &Sidecar) -> anyhow::Result<String> {
    let v: serde_json::Value = serde_json::from_str(&s.admin_get("/certs").await?.text())?;
    Ok(v["svid"]["issuer"]
        .as_str()
        .context("svid.issuer")?
        .to_owned())
}

/// `trellis ca init` with the intermediate's key made in the token; `root` signs it (an
/// existing offline root) or a new root is made.
fn init_token_ca(
    hsm: &SoftHsm,
    out: &Path,
    label: &str,
    root: Option<&InitCa>,
) -> anyhow::Result<InitCa> {
    let mut args: Vec<String> = vec![
        "ca".into(),
        "init".into(),
        "--trust-domain".into(),
        "example.org".into(),
        "--out".into(),
        out.display().to_string(),
        "--key-label".into(),
        label.into(),
        "--pkcs11-token".into(),
        TOKEN.into(),
    ];
    args.extend(hsm.args());
    if let Some(r) = root {
        args.extend([
            "--root-cert".into(),
            r.dir.join("root.pem").display().to_string(),
            "--root-key".into(),
            r.dir.join("root-key.pem").display().to_string(),
        ]);
    }
    let printed = hsm.run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    println!("{printed}");
    anyhow::ensure!(
        printed.contains(&format!("pkcs11:token={TOKEN};object={label}")),
        "{printed}"
    );
    let ca = InitCa {
        dir: out.to_path_buf(),
    };
    anyhow::ensure!(
        !ca.intermediate_key().exists(),
        "a token key must not be written to {}",
        ca.intermediate_key().display()
    );
    Ok(ca)
}

fn token_uri(label: &str) -> String {
    format!("pkcs11:token={TOKEN};object={label}")
}

/// `--ca-cert/--ca-key/--ca-bundle` for a token-held intermediate, plus the module flags.
fn token_ca_args(hsm: &SoftHsm, ca: &InitCa, label: &str) -> Vec<String> {
    let mut args = vec![
        "--ca-cert".into(),
        ca.intermediate().display().to_string(),
        "--ca-key".into(),
        token_uri(label),
        "--ca-bundle".into(),
        ca.bundle().display().to_string(),
    ];
    args.extend(hsm.args());
    args
}

/// Every file under `dir` (recursively), with what in it looks like private-key material:
/// a PEM private key, or the DER of an ECDSA P-256 PKCS#8 key (how the database keeps the
/// embedded CA's and the log's keys).
fn key_material(dir: &Path) -> anyhow::Result<Vec<(PathBuf, &'static str)>> {
    // PrivateKeyInfo: version 0, then AlgorithmIdentifier { id-ecPublicKey, prime256v1 }.
    const PKCS8_P256: &[u8] = &[
        0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
        0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let bytes = std::fs::read(&path)?;
                if bytes.windows(11).any(|w| w == b"PRIVATE KEY") {
                    found.push((path.clone(), "PEM private key"));
                }
                if bytes.windows(PKCS8_P256.len()).any(|w| w == PKCS8_P256) {
                    found.push((path, "PKCS#8 P-256 key"));
                }
            }
        }
    }
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_signs_with_token_keys_and_stores_no_private_key() -> anyhow::Result<()> {
    if !SoftHsm::available() {
        return Ok(());
    }
    e2e(async {
        let dir = tempfile::tempdir()?;
        let hsm = SoftHsm::create(dir.path(), TOKEN)?;
        let ca = init_token_ca(&hsm, &dir.path().join("ca"), "intermediate-1", None)?;
        // The log key too: `trellis ca keygen` makes it in the token and prints its URI.
        let log_uri = hsm
            .run(
                &[
                    &[
                        "ca",
                        "keygen",
                        "--key-label",
                        "log",
                        "--pkcs11-token",
                        TOKEN,
                    ][..],
                    &hsm.args().iter().map(String::as_str).collect::<Vec<_>>()[..],
                ]
                .concat(),
            )?
            .trim()
            .to_owned();
        assert_eq!(log_uri, token_uri("log"));
        let mut extra = token_ca_args(&hsm, &ca, "intermediate-1");
        extra.extend(["--log-key".into(), log_uri]);
        let mesh = Mesh::start(MeshOpts {
            control: ControlPlaneOpts {
                extra_args: extra,
                env: hsm.env(),
                ..Default::default()
            },
            ..Default::default()
        })
        .await?;
        // The sidecars' SVIDs come from the token-held intermediate, and the bundle is the
        // offline root only: B accepting A's SVID (and A B's) is the chain verifying.
        let intermediate = subject_of(&ca.intermediate())?;
        assert_eq!(svid_issuer(&mesh.a).await?, intermediate);
        assert_eq!(svid_issuer(&mesh.b).await?, intermediate);
        let roots: Vec<String> = mesh
            .cp
            .bundle()?
            .roots()
            .iter()
            .map(|r| trellis_identity::cert_facts(r).map(|f| f.subject))
            .collect::<Result<_, _>>()?;
        assert_eq!(roots, vec![subject_of(&ca.dir.join("root.pem"))?]);
        for i in 0..10 {
            let reply =
                get_once(mesh.a.outbound(), Proto::H1, "b", &format!("/hsm/{i}"), &[]).await?;
            let echo = echo_json(&reply)?;
            anyhow::ensure!(echo["app"] == "app-b", "a → b reached {echo}");
        }
        // The log signs heads with the token key; /log/key publishes its public half.
        let published = mesh.cp.admin_get("/log/key").await?.text();
        let on_disk = std::fs::read_to_string(mesh.cp.state_dir.join("log-key.pem"))?;
        assert_eq!(published.trim(), on_disk.trim());

        // No private key in the state directory or the database (SQLite, WAL included).
        let found = key_material(&mesh.cp.state_dir)?;
        assert!(found.is_empty(), "key material on disk: {found:?}");
        let found = key_material(&ca.dir)?;
        assert_eq!(
            found
                .iter()
                .map(|(p, _)| p.file_name().unwrap().to_owned())
                .collect::<Vec<_>>(),
            vec![std::ffi::OsString::from("root-key.pem")],
            "only the offline root's key is a file"
        );
        // The detector does find what a default control plane keeps in its database.
        let plain = ControlPlane::start(ControlPlaneOpts::default())?;
        let found = key_material(&plain.state_dir)?;
        assert!(
            !found.is_empty(),
            "the check must see the database-kept keys"
        );
        // The PIN appears in no log.
        for entry in std::fs::read_dir(mesh.cp.dir.path())? {
            let path = entry?.path();
            if path.is_file() {
                let text = String::from_utf8_lossy(&std::fs::read(&path)?).into_owned();
                if path != hsm.pin_file {
                    assert!(!text.contains(PIN), "PIN in {}", path.display());
                }
            }
        }
        Ok(())
    })
    .await
}

/// Runs `trellis control` with `extra` flags and the token directory; it must exit before
/// listening. Returns its stderr.
fn must_fail(hsm: &SoftHsm, dir: &Path, extra: &[String]) -> anyhow::Result<String> {
    let mut cmd = hsm.trellis();
    cmd.args(["control", "--trust-domain", "example.org"])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(extra);
    let out = run_with_timeout(cmd, Duration::from_secs(60))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() || stdout.contains("listening") {
        bail!(
            "want a failed start, got {}; stdout: {stdout}; stderr: {stderr}",
            out.status
        );
    }
    eprintln!("failed start, as expected: {stderr}");
    Ok(stderr)
}

#[test]
fn startup_refuses_bad_token_setups_naming_the_cause() -> anyhow::Result<()> {
    if !SoftHsm::available() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let hsm = SoftHsm::create(dir.path(), TOKEN)?;
    let ca = init_token_ca(&hsm, &dir.path().join("ca"), "intermediate", None)?;
    let good = token_ca_args(&hsm, &ca, "intermediate");
    let with = |from: &str, to: &str| -> Vec<String> {
        let mut args = good.clone();
        let i = args.iter().position(|a| a == from).unwrap();
        args[i + 1] = to.to_owned();
        args
    };

    // Wrong PIN: named as such, with the file, never the PIN.
    let bad_pin = dir.path().join("wrong-pin");
    std::fs::write(&bad_pin, "999999\n")?;
    std::fs::set_permissions(
        &bad_pin,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let err = must_fail(
        &hsm,
        dir.path(),
        &with("--pkcs11-pin-file", &bad_pin.display().to_string()),
    )?;
    assert!(
        err.contains("refused the PIN") && err.contains("wrong-pin"),
        "{err}"
    );
    assert!(!err.contains("999999"), "{err}");

    // Missing object and missing token.
    let err = must_fail(
        &hsm,
        dir.path(),
        &with("--ca-key", &token_uri("no-such-key")),
    )?;
    assert!(
        err.contains("holds no private key with object=no-such-key"),
        "{err}"
    );
    let err = must_fail(
        &hsm,
        dir.path(),
        &with("--ca-key", "pkcs11:token=nope;object=intermediate"),
    )?;
    assert!(
        err.contains("no token labelled `nope`") && err.contains(TOKEN),
        "{err}"
    );

    // A certificate whose key is not the token's.
    let other = InitCa::create("example.org", &dir.path().join("other"))?;
    let mut args = with("--ca-cert", &other.intermediate().display().to_string());
    let i = args.iter().position(|a| a == "--ca-bundle").unwrap();
    args[i + 1] = other.bundle().display().to_string();
    let err = must_fail(&hsm, dir.path(), &args)?;
    assert!(
        err.contains("private key does not match certificate"),
        "{err}"
    );
    assert!(err.contains(&token_uri("intermediate")), "{err}");

    // A module that cannot be loaded.
    let err = must_fail(
        &hsm,
        dir.path(),
        &with("--pkcs11-module", &ca.bundle().display().to_string()),
    )?;
    assert!(
        err.contains("PKCS#11 module") && err.contains("cannot load"),
        "{err}"
    );

    // A token key without a module, and a PIN in the URI.
    let no_module: Vec<String> = good.iter().take(6).cloned().collect();
    let err = must_fail(&hsm, dir.path(), &no_module)?;
    assert!(err.contains("--pkcs11-module"), "{err}");
    let err = must_fail(
        &hsm,
        dir.path(),
        &with(
            "--ca-key",
            &format!("{}?pin-value={PIN}", token_uri("intermediate")),
        ),
    )?;
    assert!(
        err.contains("--pkcs11-pin-file") && !err.contains(PIN),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_from_file_key_to_token_key_drops_no_request() -> anyhow::Result<()> {
    if !SoftHsm::available() {
        return Ok(());
    }
    e2e(async {
        let dir = tempfile::tempdir()?;
        let hsm = SoftHsm::create(dir.path(), TOKEN)?;
        // Today: an intermediate with a file key; the module is configured for what comes.
        let first = InitCa::create("example.org", &dir.path().join("first"))?;
        let mut extra = vec![
            "--ca-cert".into(),
            first.intermediate().display().to_string(),
            "--ca-key".into(),
            first.intermediate_key().display().to_string(),
            "--ca-bundle".into(),
            first.bundle().display().to_string(),
        ];
        extra.extend(hsm.args());
        let margin = vec!["--expiry-margin".to_owned(), "2s".to_owned()];
        let mesh = Mesh::start(MeshOpts {
            control: ControlPlaneOpts {
                svid_ttl: Some("10s".into()),
                rotate_every: Some("2s".into()),
                extra_args: extra,
                env: hsm.env(),
                ..Default::default()
            },
            a_args: margin.clone(),
            b_args: margin,
            ..Default::default()
        })
        .await?;
        // Tomorrow: a new intermediate under the same offline root, its key made in the token.
        let second = init_token_ca(
            &hsm,
            &dir.path().join("second"),
            "intermediate-2",
            Some(&first),
        )?;
        let old_issuer = subject_of(&first.intermediate())?;
        let new_issuer = subject_of(&second.intermediate())?;
        assert_eq!(svid_issuer(&mesh.a).await?, old_issuer);

        let load = Load::start(LoadOpts::new(mesh.a.outbound(), "b", "app-b"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let event = load.mark("file key -> token key rotation");
        let scheduled = Instant::now();
        // Through the operator socket: the control plane opens the token key with its own
        // module and PIN; the database keeps only the URI.
        let out = hsm.run(&[
            "ca",
            "rotate",
            "--socket",
            &mesh.cp.operator_socket.display().to_string(),
            "--trust-domain",
            "example.org",
            "--activate-after",
            "3s",
            "--ca-cert",
            &second.intermediate().display().to_string(),
            "--ca-key",
            &token_uri("intermediate-2"),
            "--ca-bundle",
            &second.bundle().display().to_string(),
        ])?;
        println!("{out}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let a = svid_issuer(&mesh.a).await?;
            let b = svid_issuer(&mesh.b).await?;
            if a == new_issuer && b == new_issuer {
                break;
            }
            if Instant::now() > deadline {
                bail!("sidecars not on the token-held intermediate after 60s: a={a} b={b}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!(
            "[pkcs11] both sidecars on the token-held intermediate {:.1}s after `ca rotate`",
            scheduled.elapsed().as_secs_f64()
        );
        // A few more SVID rotations signed by the token, under load.
        tokio::time::sleep(Duration::from_secs(5)).await;
        load.end(event);
        let report = load.stop().await;
        report.print("CA rotation from a file key to a token key (same root, activate after 3s)");
        // The rotation stored the token key's URI, not a key.
        let db = rusqlite::Connection::open(mesh.cp.state_dir.join("trellis.db"))?;
        let keys: Vec<String> = db
            .prepare("SELECT key_pem FROM ca_rotations")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        assert_eq!(keys, vec![token_uri("intermediate-2")]);
        report.assert_no_failures()
    })
    .await
}
