//! Replicated control plane on PostgreSQL (issue #7): two `trellis control` processes serve
//! one trust domain from the same CA and one shared database.
//!
//! - A join token made with `trellis token create --database …` and redeemed on replica 1 is
//!   refused on replica 2, with the error a second redemption gets on one node.
//! - Both replicas issue SVIDs that verify against one bundle; their issuance records land in
//!   the one `issuances` table; a CA rotation scheduled on the database reaches both bundles.
//! - With the embedded CA, two replicas started at once on an empty database agree on one
//!   root (`store_ca_if_absent`).
//!
//! PostgreSQL: `TRELLIS_TEST_POSTGRES_URL` (tests/run.sh), else a throwaway cluster started
//! by the test (see `trellis_tests::postgres`); skipped outside CI without either.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context as _};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use tonic::transport::{Endpoint, Uri};
use trellis_identity::tls::PeerMatch;
use trellis_identity::{certs_to_pem, key_to_pem, verify_svid_chain, Svid, TrustBundle, Usage};
use trellis_proto::SecretDiscoveryServiceClient;
use trellis_tests::postgres::TestPostgres;
use trellis_tests::sds_server::{LeafSpec, TestCa};
use trellis_tests::{
    bundle_from_secret, decode_secrets, e2e, eventually, grpc_code, run_with_timeout,
    svid_from_secret, tls_client_config, trellis_bin, ControlPlane, ControlPlaneOpts, SdsClient,
    SdsStream, COMMAND_TIMEOUT,
};

const TD: &str = "example.org";
/// Where the "other client" connects from: a second loopback address, so the replica sees a
/// different peer IP than the first redeemer's 127.0.0.1.
const OTHER_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const FIRST_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Runs `trellis <args>`; returns stdout, or fails with stderr.
fn trellis(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(trellis_bin());
    cmd.args(args);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "trellis {} failed ({}): {}",
            args.first().copied().unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn create_token(db_url: &str, spiffe_id: &str) -> anyhow::Result<String> {
    let out = trellis(&[
        "token",
        "create",
        "--database",
        db_url,
        "--spiffe-id",
        spiffe_id,
        "--ttl",
        "10m",
    ])?;
    Ok(out.trim().to_owned())
}

/// A replica: its own state directory and ports, the shared database, `extra` flags.
fn replica(db_url: &str, extra: &[String]) -> anyhow::Result<ControlPlane> {
    let mut extra_args = vec!["--database".to_string(), db_url.to_owned()];
    extra_args.extend_from_slice(extra);
    ControlPlane::start(ControlPlaneOpts {
        extra_args,
        ..Default::default()
    })
}

/// An SDS client whose TCP connection comes from `source` (a loopback address).
async fn sds_client_from(cp: &ControlPlane, source: IpAddr) -> anyhow::Result<SdsClient> {
    let config = tls_client_config(
        cp.bundle()?,
        PeerMatch::Exact(cp.control_id()),
        None,
        &[b"h2"],
    )?;
    let addr = cp.sds_addr;
    let connector = tower::service_fn(move |_: Uri| {
        let config = config.clone();
        async move {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source, 0))?;
            let tcp = socket.connect(addr).await?;
            let name = rustls::pki_types::ServerName::from(addr.ip());
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("SDS channel to {addr} from {source}"))?;
    Ok(SecretDiscoveryServiceClient::new(channel))
}

/// Redeems `token` on `cp` from `source` and returns the SVID and bundle it pushed. A refusal
/// comes back as the `tonic::Status` inside the error (see `grpc_code`).
async fn fetch_from(
    cp: &ControlPlane,
    token: &str,
    source: IpAddr,
) -> anyhow::Result<(Svid, TrustBundle)> {
    let mut client = sds_client_from(cp, source).await?;
    let mut stream = SdsStream::open(&mut client, Some(token), &["default", "ROOTCA"]).await?;
    let (mut svid, mut bundle) = (None, None);
    while svid.is_none() || bundle.is_none() {
        let resp = stream.recv(Duration::from_secs(20)).await?;
        let secrets = decode_secrets(&resp)?;
        if let Some(s) = secrets.get("default") {
            svid = Some(svid_from_secret(s)?);
        }
        if let Some(s) = secrets.get("ROOTCA") {
            bundle = Some(bundle_from_secret(s, &cp.trust_domain)?);
        }
        stream.ack(&resp).await?;
    }
    Ok((svid.context("svid")?, bundle.context("bundle")?))
}

/// The refusal a redemption gets, as `code: message`; fails if it was admitted.
async fn refusal(cp: &ControlPlane, token: &str, source: IpAddr) -> anyhow::Result<String> {
    match fetch_from(cp, token, source).await {
        Ok((svid, _)) => bail!(
            "token was honoured again: {} got {}",
            cp.sds_addr,
            svid.spiffe_id()
        ),
        Err(e) => {
            let code = grpc_code(&e).ok_or_else(|| anyhow!("not a gRPC refusal: {e:#}"))?;
            let status = e
                .chain()
                .find_map(|c| c.downcast_ref::<tonic::Status>())
                .context("status")?;
            Ok(format!("{code:?}: {}", status.message()))
        }
    }
}

fn verify_against(svid: &Svid, bundle: &TrustBundle) -> anyhow::Result<()> {
    verify_svid_chain(svid.chain(), bundle, SystemTime::now(), Usage::Either)
        .map(|_| ())
        .map_err(|e| anyhow!("SVID {} does not verify: {e}", svid.serial_hex()))
}

fn bundle_file(cp: &ControlPlane) -> anyhow::Result<String> {
    std::fs::read_to_string(&cp.bundle_pem_path)
        .with_context(|| format!("read {}", cp.bundle_pem_path.display()))
}

fn ca_init(dir: &Path) -> anyhow::Result<Vec<String>> {
    let out = dir.join("ca");
    trellis(&[
        "ca",
        "init",
        "--trust-domain",
        TD,
        "--out",
        out.to_str().context("utf-8 path")?,
    ])?;
    let f = |name: &str| out.join(name).display().to_string();
    Ok(vec![
        "--ca-cert".into(),
        f("intermediate.pem"),
        "--ca-key".into(),
        f("intermediate-key.pem"),
        "--ca-bundle".into(),
        f("bundle.pem"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_tokens_issuances_and_ca_rotations() -> anyhow::Result<()> {
    let test = "replicas_share_tokens_issuances_and_ca_rotations";
    let Some(pg) = TestPostgres::get_or_skip(test)? else {
        return Ok(());
    };
    e2e(async {
        let db = pg.fresh_schema("replicas")?;
        // The same CA material on both, as from one Kubernetes Secret.
        let ca_dir = tempfile::tempdir()?;
        let ca = ca_init(ca_dir.path())?;
        let one = replica(&db.url, &ca)?;
        let two = replica(&db.url, &ca)?;
        let bundle_pem = std::fs::read(ca_dir.path().join("ca/bundle.pem"))?;
        let bundle = TrustBundle::from_pem(one.trust_domain.clone(), &bundle_pem)?;
        assert_eq!(bundle_file(&one)?, bundle_file(&two)?);
        println!(
            "postgres: {} (schema {}), replicas sds={} and sds={}",
            if pg.started_here() {
                "started by the test"
            } else {
                "from TRELLIS_TEST_POSTGRES_URL"
            },
            db.name,
            one.sds_addr,
            two.sds_addr
        );

        // A token made against the database, redeemed on replica 1...
        let web = format!("spiffe://{TD}/ns/prod/sa/web");
        let token = create_token(&db.url, &web)?;
        let (svid_one, pushed_one) = fetch_from(&one, &token, FIRST_CLIENT).await?;
        assert_eq!(svid_one.spiffe_id().as_str(), web);
        // ...is refused on replica 2, exactly as a second redemption is on replica 1.
        let on_two = refusal(&two, &token, OTHER_CLIENT).await?;
        let on_one = refusal(&one, &token, OTHER_CLIENT).await?;
        println!(
            "redeemed on replica 1; replica 2 says `{on_two}`; replica 1 again says `{on_one}`"
        );
        assert_eq!(on_two, on_one);
        assert!(on_two.starts_with("Unauthenticated: "), "{on_two}");
        assert!(on_two.contains("already redeemed"), "{on_two}");

        // Both replicas issue, and everything verifies against the one bundle.
        let api = format!("spiffe://{TD}/ns/prod/sa/api");
        let token_two = create_token(&db.url, &api)?;
        let (svid_two, pushed_two) = fetch_from(&two, &token_two, FIRST_CLIENT).await?;
        assert_eq!(svid_two.spiffe_id().as_str(), api);
        for svid in [&svid_one, &svid_two] {
            verify_against(svid, &bundle)?;
            verify_against(svid, &pushed_one)?;
            verify_against(svid, &pushed_two)?;
        }
        println!(
            "replica 1 issued {} ({}), replica 2 issued {} ({}): both verify against ca/bundle.pem",
            svid_one.serial_hex(),
            svid_one.spiffe_id(),
            svid_two.serial_hex(),
            svid_two.spiffe_id()
        );

        // Both replicas' issuance records land in the shared table (written in batches).
        let serials = eventually(Duration::from_secs(30), "both serials in issuances", || {
            let db = &db;
            let want = [svid_one.serial_hex(), svid_two.serial_hex()];
            async move {
                let rows = db.query("SELECT serial FROM issuances ORDER BY id")?;
                let rows: Vec<&str> = rows.lines().collect();
                if want.iter().all(|s| rows.contains(s)) {
                    Ok(rows.len())
                } else {
                    bail!("issuances has {rows:?}, want {want:?}")
                }
            }
        })
        .await?;
        println!("issuances table: {serials} record(s), including both replicas' SVIDs");
        let tokens = db.query("SELECT count(*), count(redeemed_at) FROM join_tokens")?;
        assert_eq!(
            tokens.trim(),
            "2|2",
            "join_tokens: both created, both spent"
        );

        // A rotation scheduled once on the database reaches both replicas' bundles.
        let out = trellis(&[
            "ca",
            "rotate",
            "--database",
            &db.url,
            "--trust-domain",
            TD,
            "--activate-after",
            "1h",
        ])?;
        assert!(out.contains("scheduled CA rotation"), "{out}");
        for cp in [&one, &two] {
            eventually(
                Duration::from_secs(30),
                "the new root in bundle.pem",
                || async {
                    let roots = cp.bundle()?.roots().len();
                    if roots == 2 {
                        Ok(())
                    } else {
                        bail!("{} has {roots} root(s)", cp.bundle_pem_path.display())
                    }
                },
            )
            .await?;
        }
        assert_eq!(bundle_file(&one)?, bundle_file(&two)?);
        println!("CA rotation scheduled on the database: both replicas now publish 2 roots");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_the_embedded_ca_agree_on_one_root() -> anyhow::Result<()> {
    let test = "replicas_with_the_embedded_ca_agree_on_one_root";
    let Some(pg) = TestPostgres::get_or_skip(test)? else {
        return Ok(());
    };
    e2e(async {
        let db = pg.fresh_schema("embedded")?;
        // Two fresh replicas race to create the CA on an empty database.
        let (one, two) = std::thread::scope(|s| {
            let a = s.spawn(|| replica(&db.url, &[]));
            let b = s.spawn(|| replica(&db.url, &[]));
            (a.join().unwrap(), b.join().unwrap())
        });
        let (one, two) = (one?, two?);
        let (b1, b2) = (bundle_file(&one)?, bundle_file(&two)?);
        assert_eq!(b1, b2, "the replicas publish different roots");
        assert_eq!(one.bundle()?.roots().len(), 1);
        assert_eq!(db.query("SELECT count(*) FROM ca")?.trim(), "1");

        // SVIDs from each verify against the other's bundle.
        let a = create_token(&db.url, &format!("spiffe://{TD}/ns/prod/sa/a"))?;
        let b = create_token(&db.url, &format!("spiffe://{TD}/ns/prod/sa/b"))?;
        let (svid_a, _) = fetch_from(&one, &a, FIRST_CLIENT).await?;
        let (svid_b, _) = fetch_from(&two, &b, FIRST_CLIENT).await?;
        verify_against(&svid_a, &two.bundle()?)?;
        verify_against(&svid_b, &one.bundle()?)?;
        println!("embedded CA: both replicas serve one root; SVIDs cross-verify");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_connects_over_verified_tls() -> anyhow::Result<()> {
    let test = "replica_connects_over_verified_tls";
    let ca = TestCa::root("example.org");
    let ca_pem = ca.bundle_pem();
    let (server_chain, server_key) = ca.issue(&LeafSpec::server("127.0.0.1"));
    let tls = trellis_tests::postgres::ServerTls {
        cert_pem: certs_to_pem(&server_chain),
        key_pem: key_to_pem(&server_key).to_string(),
    };
    let Some(pg) = TestPostgres::start_with_tls(test, &tls)? else {
        return Ok(());
    };
    e2e(async {
        let db = pg.fresh_schema("tls")?;
        let files = tempfile::tempdir()?;
        let ca_file = files.path().join("pg-ca.pem");
        std::fs::write(&ca_file, &ca_pem)?;
        let wrong_pem = TestCa::root("example.org").bundle_pem();
        let wrong_file = files.path().join("other-ca.pem");
        std::fs::write(&wrong_file, wrong_pem)?;
        let with_root = |f: &Path| {
            format!(
                "{}&sslmode=verify-full&sslrootcert={}",
                db.url,
                f.display()
            )
        };
        let tls_url = with_root(&ca_file);

        let cp = replica(&tls_url, &[])?;
        let token = create_token(&tls_url, &format!("spiffe://{TD}/ns/prod/sa/tls"))?;
        let (svid, bundle) = fetch_from(&cp, &token, FIRST_CLIENT).await?;
        verify_against(&svid, &bundle)?;
        // The server saw the control plane's sessions over TLS.
        let sessions = db.query(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'trellis'",
        )?;
        let (tls_sessions, all) = sessions.trim().split_once('|').context("psql output")?;
        assert_eq!(tls_sessions, all, "sessions over TLS: {sessions}");
        assert_ne!(all, "0");
        println!("TLS: {tls_sessions} control-plane session(s), all over TLS verified against sslrootcert");

        // A server certificate the given root did not sign is refused, naming no password.
        let mut cmd = Command::new(trellis_bin());
        cmd.args(["token", "create", "--spiffe-id", "spiffe://example.org/x"])
            .args(["--database", &with_root(&wrong_file)]);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("certificate"), "{stderr}");
        assert!(stderr.contains(":***@"), "{stderr}");
        println!("wrong sslrootcert: {}", stderr.trim());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_database_urls_are_refused_without_showing_the_password() -> anyhow::Result<()> {
    // No PostgreSQL needed: a wrong scheme, and a server that is not there.
    for (url, want) in [
        ("mysql://trellis:hunter2@127.0.0.1/trellis", "--database"),
        (
            "postgres://trellis:hunter2@127.0.0.1:1/trellis?connect_timeout=5",
            "postgres://trellis:***@127.0.0.1:1/trellis",
        ),
    ] {
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new(trellis_bin());
        cmd.args(["control", "--trust-domain", TD, "--listen", "127.0.0.1:0"])
            .args(["--admin", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path().join("state"))
            .env("TRELLIS_DATABASE", url);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {want}: {stderr}");
        assert!(stderr.contains(want), "{stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
        println!(
            "refused: {}",
            stderr.trim().lines().last().unwrap_or_default()
        );

        let mut cmd = Command::new(trellis_bin());
        cmd.args(["token", "create", "--spiffe-id", "spiffe://example.org/x"])
            .env("TRELLIS_DATABASE", url);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
    // `--help` lists TRELLIS_DATABASE without its value.
    let mut cmd = Command::new(trellis_bin());
    cmd.args(["control", "--help"])
        .env("TRELLIS_DATABASE", "postgres://trellis:hunter2@db/trellis");
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("TRELLIS_DATABASE"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
    Ok(())
}
