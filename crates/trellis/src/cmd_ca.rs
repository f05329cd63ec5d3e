//! `trellis ca`: offline CA material and CA rotation.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use trellis_control::ca::Ca;
use trellis_control::registry::DatabaseUrl;
use trellis_identity::TrustDomain;

use crate::cmd_token::open_registry;
use crate::operator_client;
use trellis_control::operator::{self, RotationMaterial, RotationScheduled, ScheduleRotation};

/// `trellis ca …`.
#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create an offline root CA and an intermediate for the control plane (or, with
    /// --root-cert/--root-key, a new intermediate under an existing root).
    Init {
        /// Trust domain, e.g. example.org.
        #[arg(long, env = "TRELLIS_TRUST_DOMAIN")]
        trust_domain: String,
        /// Output directory (created 0700; existing files are not overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Existing root certificate to sign the new intermediate with (root.pem).
        #[arg(long, requires = "root_key")]
        root_cert: Option<PathBuf>,
        /// Its private key (root-key.pem).
        #[arg(long, requires = "root_cert")]
        root_key: Option<PathBuf>,
    },
    /// Schedule a CA rotation on a control plane's state: the new CA joins the trust bundle
    /// at once (the running control plane pushes it to every workload within a second), signs
    /// from --activate-after on, and the old CA leaves the bundle once every SVID it signed
    /// has expired. Without --ca-cert, the new CA is a fresh self-signed root.
    ///
    /// Asks the running control plane over its operator socket (with PostgreSQL, every
    /// replica picks the rotation up within a second); --state-dir/--database write to the
    /// state directly instead (offline use).
    Rotate {
        /// The control plane's operator socket (`trellis control --operator-socket`)
        /// [default: $TRELLIS_STATE_DIR/operator.sock, else /var/lib/trellis/operator.sock].
        #[arg(
            long,
            env = "TRELLIS_OPERATOR_SOCKET",
            value_name = "PATH",
            conflicts_with_all = ["state_dir", "database"]
        )]
        socket: Option<PathBuf>,
        /// Offline: the control plane's state directory (its SQLite database), written
        /// directly instead of through the socket.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Offline: the control plane's database, written directly: the PostgreSQL URL its
        /// replicas share, or sqlite://PATH.
        #[arg(long, value_name = "URL")]
        database: Option<DatabaseUrl>,
        /// Trust domain, e.g. example.org: required offline; through the socket the control
        /// plane's own, and a different one is refused.
        #[arg(long, env = "TRELLIS_TRUST_DOMAIN")]
        trust_domain: Option<String>,
        /// How long every workload gets to receive the new bundle before the new CA signs.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        activate_after: Duration,
        /// New intermediate certificate (from `trellis ca init`).
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// Its private key.
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// Its root(s) [default: the self-signed last certificate of --ca-cert].
        #[arg(long, requires = "ca_cert")]
        ca_bundle: Option<PathBuf>,
    },
}

/// Runs a `ca` subcommand.
pub fn run(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init {
            trust_domain,
            out,
            root_cert,
            root_key,
        } => {
            let td = TrustDomain::parse(&trust_domain)?;
            let files = match (&root_cert, &root_key) {
                (Some(cert), Some(key)) => Ca::init_intermediate(&td, &out, cert, key)?,
                _ => Ca::init_offline(&td, &out)?,
            };
            println!("root CA:          {}", files.root_cert.display());
            if root_cert.is_none() {
                println!(
                    "root key:         {}  (keep offline; the control plane never needs it)",
                    files.root_key.display()
                );
            }
            println!("intermediate:     {}", files.intermediate_cert.display());
            println!("intermediate key: {}", files.intermediate_key.display());
            println!("trust bundle:     {}", files.bundle.display());
            println!();
            println!(
                "run: trellis control --trust-domain {td} --ca-cert {} --ca-key {} --ca-bundle {}",
                files.intermediate_cert.display(),
                files.intermediate_key.display(),
                files.bundle.display()
            );
            println!(
                "or rotate a running one: trellis ca rotate --state-dir <dir> --trust-domain {td} --ca-cert {} --ca-key {} --ca-bundle {}",
                files.intermediate_cert.display(),
                files.intermediate_key.display(),
                files.bundle.display()
            );
            Ok(())
        }
        CaCommand::Rotate {
            socket,
            state_dir,
            database,
            trust_domain,
            activate_after,
            ca_cert,
            ca_key,
            ca_bundle,
        } => {
            if activate_after < Duration::from_secs(1) {
                bail!("--activate-after must be at least 1s: workloads need time to receive the new trust bundle before the new CA signs");
            }
            if state_dir.is_none() && database.is_none() {
                let socket = operator_client::socket_or_default(socket);
                let material = match (&ca_cert, &ca_key) {
                    (Some(cert), Some(key)) => {
                        // The file checks (key mode, chain) need the operator's files; the
                        // server checks the trust domain and builds the CA again.
                        let td = trust_domain.as_deref().ok_or_else(|| {
                            anyhow::anyhow!("--trust-domain is required with --ca-cert")
                        })?;
                        let td = TrustDomain::parse(td)?;
                        let m = Ca::material_from_files(&td, cert, key, ca_bundle.as_deref())?;
                        Some(RotationMaterial {
                            chain_pem: m.chain_pem,
                            bundle_pem: m.bundle_pem,
                            key_pem: m.key_pem.to_string(),
                        })
                    }
                    _ => None,
                };
                let scheduled: RotationScheduled = operator_client::post(
                    &socket,
                    operator::ROTATIONS_PATH,
                    &ScheduleRotation {
                        activate_after_seconds: activate_after.as_secs(),
                        material,
                        trust_domain,
                    },
                )?;
                println!("scheduled CA rotation {}: {}", scheduled.id, scheduled.ca);
                println!(
                    "  joins the trust bundle: now (pushed to every connected workload within seconds)"
                );
                println!("  signs new SVIDs from:   {}", scheduled.activate_at);
                println!("  the old CA leaves the bundle one SVID lifetime (+60s) after that");
                println!(
                    "  watch: the control plane's admin /ca endpoint, and bundle.pem in its state directory"
                );
                return Ok(());
            }
            let trust_domain = trust_domain.ok_or_else(|| {
                anyhow::anyhow!("--trust-domain is required with --state-dir or --database")
            })?;
            let td = TrustDomain::parse(&trust_domain)?;
            let registry = open_registry(state_dir.as_ref(), database.as_ref())?;
            let db = registry.path().to_path_buf();
            let now = SystemTime::now();
            let material = match (&ca_cert, &ca_key) {
                (Some(cert), Some(key)) => {
                    Ca::material_from_files(&td, cert, key, ca_bundle.as_deref())?
                }
                _ => Ca::new_root(&td, now)?,
            };
            // The same checks the control plane applies when it loads the rotation.
            let ca = Ca::from_material(&td, &material, &db)?;
            let activate_at = now + activate_after;
            let id = registry
                .add_ca_rotation(&material, now, activate_at, now)
                .with_context(|| format!("cannot schedule the rotation in {}", db.display()))?;
            println!("scheduled CA rotation {id}: {}", ca.label());
            println!(
                "  joins the trust bundle: now (pushed to every connected workload within seconds)"
            );
            println!(
                "  signs new SVIDs from:   {}",
                humantime::format_rfc3339_seconds(activate_at)
            );
            println!("  the old CA leaves the bundle one SVID lifetime (+60s) after that");
            match (&state_dir, registry.is_shared()) {
                (Some(dir), false) => println!(
                    "  watch: the control plane's admin /ca endpoint, and {}",
                    dir.join("bundle.pem").display()
                ),
                _ => println!(
                    "  watch: each replica's admin /ca endpoint, and bundle.pem in its state directory"
                ),
            }
            Ok(())
        }
    }
}
