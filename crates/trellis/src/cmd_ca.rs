//! `trellis ca`: offline CA material and CA rotation.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use trellis_control::ca::Ca;
use trellis_control::keys::{KeyRef, Keyring, Pkcs11Keyring, Pkcs11Settings, SigningKey};
use trellis_control::registry::CaMaterial;
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
        #[command(flatten)]
        pkcs11: Pkcs11Args,
        /// Generate the intermediate's key inside the PKCS#11 token under this label (needs
        /// --pkcs11-module and --pkcs11-pin-file); only the certificate, bundle and CSR are
        /// written.
        #[arg(long, value_name = "LABEL", requires = "pkcs11_module")]
        key_label: Option<String>,
        /// The token to generate the key in [default: the module's only token].
        #[arg(long, value_name = "LABEL", requires = "key_label")]
        pkcs11_token: Option<String>,
    },
    /// Generate an ECDSA P-256 key pair inside a PKCS#11 token (never outside it) and print
    /// its URI, e.g. for `trellis control --log-key`.
    Keygen {
        #[command(flatten)]
        pkcs11: Pkcs11Args,
        /// The new key's label (CKA_LABEL); an existing label is refused.
        #[arg(long, value_name = "LABEL")]
        key_label: String,
        /// The token to generate the key in [default: the module's only token].
        #[arg(long, value_name = "LABEL")]
        pkcs11_token: Option<String>,
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
        /// Its private key: a PEM file or a PKCS#11 URI ('pkcs11:token=…;object=…'). A token
        /// key is checked here when --pkcs11-module is given, and by the control plane (with
        /// its own module and PIN) in any case.
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        #[command(flatten)]
        pkcs11: Pkcs11Args,
        /// Its root(s) [default: the self-signed last certificate of --ca-cert].
        #[arg(long, requires = "ca_cert")]
        ca_bundle: Option<PathBuf>,
    },
}

/// The PKCS#11 module and PIN file (`trellis ca init`, `trellis ca rotate`).
#[derive(Args, Debug)]
pub struct Pkcs11Args {
    /// PKCS#11 module (the HSM vendor's .so), e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(
        long,
        env = "TRELLIS_PKCS11_MODULE",
        value_name = "PATH",
        requires = "pkcs11_pin_file"
    )]
    pkcs11_module: Option<PathBuf>,
    /// File holding the token's user PIN (the PIN is never a flag).
    #[arg(long, env = "TRELLIS_PKCS11_PIN_FILE", value_name = "PATH")]
    pkcs11_pin_file: Option<PathBuf>,
}

impl Pkcs11Args {
    /// A keyring over the module, if one is given.
    fn keyring(&self) -> anyhow::Result<Option<Keyring>> {
        let (Some(module), Some(pin_file)) = (&self.pkcs11_module, &self.pkcs11_pin_file) else {
            return Ok(None);
        };
        let ring = Pkcs11Keyring::open(
            Pkcs11Settings {
                module: module.clone(),
                pin_file: pin_file.clone(),
                sessions: 1,
            },
            Default::default(),
        )?;
        Ok(Some(Keyring::with_pkcs11(ring)))
    }
}

/// Rotation material from `--ca-cert`/`--ca-key`: a file key, or a token key's URI.
fn rotation_material(
    td: &TrustDomain,
    cert: &Path,
    key: &Path,
    bundle: Option<&Path>,
    pkcs11: &Pkcs11Args,
) -> anyhow::Result<CaMaterial> {
    match KeyRef::parse(&key.to_string_lossy())? {
        KeyRef::File(key) => Ok(Ca::material_from_files(td, cert, &key, bundle)?),
        KeyRef::Pkcs11(uri) => {
            let keys = pkcs11.keyring()?;
            Ok(Ca::material_from_token(
                td,
                cert,
                &uri,
                bundle,
                keys.as_ref(),
            )?)
        }
    }
}

/// Runs a `ca` subcommand.
pub fn run(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init {
            trust_domain,
            out,
            root_cert,
            root_key,
            pkcs11,
            key_label,
            pkcs11_token,
        } => {
            let td = TrustDomain::parse(&trust_domain)?;
            let root = root_cert.as_deref().zip(root_key.as_deref());
            let files = match (&key_label, pkcs11.keyring()?) {
                (Some(label), Some(keys)) => {
                    let ring = keys.pkcs11().context("PKCS#11 module")?;
                    // Before the key is made: a refusal afterwards would strand it.
                    Ca::check_init_out(&out)?;
                    let key = ring.generate(pkcs11_token.as_deref(), label)?;
                    Ca::init_with_token_key(&td, &out, root, SigningKey::token(key))?
                }
                (Some(_), None) => bail!("--key-label needs --pkcs11-module and --pkcs11-pin-file"),
                (None, _) => match root {
                    Some((cert, key)) => Ca::init_intermediate(&td, &out, cert, key)?,
                    None => Ca::init_offline(&td, &out)?,
                },
            };
            let key_arg = match &files.intermediate_key_uri {
                Some(uri) => format!("'{uri}'"),
                None => files.intermediate_key.display().to_string(),
            };
            let module_args = match (
                &files.intermediate_key_uri,
                &pkcs11.pkcs11_module,
                &pkcs11.pkcs11_pin_file,
            ) {
                (Some(_), Some(m), Some(p)) => format!(
                    " --pkcs11-module {} --pkcs11-pin-file {}",
                    m.display(),
                    p.display()
                ),
                _ => String::new(),
            };
            println!("root CA:          {}", files.root_cert.display());
            if root_cert.is_none() {
                println!(
                    "root key:         {}  (keep offline; the control plane never needs it)",
                    files.root_key.display()
                );
            }
            println!("intermediate:     {}", files.intermediate_cert.display());
            match &files.intermediate_key_uri {
                Some(uri) => {
                    println!("intermediate key: {uri}  (in the token; never written)");
                    println!("intermediate CSR: {}", files.intermediate_csr.display());
                }
                None => println!("intermediate key: {}", files.intermediate_key.display()),
            }
            println!("trust bundle:     {}", files.bundle.display());
            println!();
            println!(
                "run: trellis control --trust-domain {td} --ca-cert {} --ca-key {key_arg}{module_args} --ca-bundle {}",
                files.intermediate_cert.display(),
                files.bundle.display()
            );
            println!(
                "or rotate a running one: trellis ca rotate --state-dir <dir> --trust-domain {td} --ca-cert {} --ca-key {key_arg} --ca-bundle {}",
                files.intermediate_cert.display(),
                files.bundle.display()
            );
            Ok(())
        }
        CaCommand::Keygen {
            pkcs11,
            key_label,
            pkcs11_token,
        } => {
            let keys = pkcs11
                .keyring()?
                .context("--pkcs11-module and --pkcs11-pin-file are required")?;
            let ring = keys.pkcs11().context("PKCS#11 module")?;
            let key = ring.generate(pkcs11_token.as_deref(), &key_label)?;
            println!("{}", key.uri());
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
            pkcs11,
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
                        let m = rotation_material(&td, cert, key, ca_bundle.as_deref(), &pkcs11)?;
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
                    rotation_material(&td, cert, key, ca_bundle.as_deref(), &pkcs11)?
                }
                _ => Ca::new_root(&td, now)?,
            };
            // The same checks the control plane applies when it loads the rotation.
            let keys = pkcs11.keyring()?.unwrap_or_default();
            let ca = Ca::from_material_with(&td, &material, &db, &keys)?;
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
