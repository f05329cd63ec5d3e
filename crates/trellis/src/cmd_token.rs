//! `trellis token`: single-use join tokens.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::Subcommand;
use trellis_control::operator::{self, CreateToken, TokenCreated};
use trellis_control::registry::{Database, DatabaseUrl, Registry};

use crate::operator_client;
use trellis_identity::SpiffeId;

/// `trellis token …`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a single-use join token bound to a SPIFFE ID; prints it on stdout.
    ///
    /// The token reads `trellis-join.<selector>.<verifier>`; the database keeps the selector
    /// and the verifier's SHA-256 only, so the printed token cannot be shown again. Tokens
    /// from Trellis before split tokens (`trellis-join.<43 characters>`) are no longer
    /// accepted: create new ones with this command.
    ///
    /// Asks the running control plane over its operator socket, which checks the SPIFFE ID
    /// against its trust domain; --state-dir/--database write to the state directly instead
    /// (offline use: the control plane stopped, or not reachable).
    Create {
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
        /// replicas share (postgres://USER:PASSWORD@HOST:5432/DB), or sqlite://PATH. Wins
        /// over --state-dir.
        #[arg(long, value_name = "URL")]
        database: Option<DatabaseUrl>,
        /// The identity the token's holder receives.
        #[arg(long)]
        spiffe_id: String,
        /// How long the token can be redeemed.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

/// The registry a CLI command writes to: `--database`, else the SQLite file in `--state-dir`,
/// which must already exist (the control plane creates it on first start).
pub fn open_registry(
    state_dir: Option<&PathBuf>,
    database: Option<&DatabaseUrl>,
) -> anyhow::Result<Registry> {
    // A missing SQLite file means the wrong place, not a database to create here.
    let (db, missing) = match (database, state_dir) {
        (Some(url), _) => (
            Database::parse(url.expose())
                .map_err(|e| anyhow::anyhow!("--database (or TRELLIS_DATABASE): {e}"))?,
            "no such database; `trellis control` creates it on first start",
        ),
        (None, Some(dir)) => (
            Database::in_state_dir(dir),
            "no control-plane state here; pass the --state-dir that `trellis control` uses \
             (it creates the database on first start), or --database",
        ),
        (None, None) => bail!("pass --state-dir or --database"),
    };
    if let Database::Sqlite(file) = &db {
        match std::fs::metadata(file) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("{}: {missing}", file.display())
            }
            // Not "missing": the directory is there but not ours to read (the control
            // plane's, 0700). The operator socket needs no access to it.
            Err(e) => bail!(
                "{}: {e}; the control plane's state directory is readable by its user only: \
                 drop --state-dir to go through its operator socket (--socket)",
                file.display()
            ),
        }
    }
    Ok(Registry::connect(&db)?)
}

/// Runs a `token` subcommand.
pub fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            socket,
            state_dir,
            database,
            spiffe_id,
            ttl,
        } => {
            if state_dir.is_none() && database.is_none() {
                let socket = operator_client::socket_or_default(socket);
                let created: TokenCreated = operator_client::post(
                    &socket,
                    operator::TOKENS_PATH,
                    &CreateToken {
                        spiffe_id,
                        ttl_seconds: ttl.as_secs(),
                    },
                )?;
                println!("{}", created.token);
                return Ok(());
            }
            let id = SpiffeId::parse(&spiffe_id)?;
            if id.path().is_empty() {
                bail!("`{id}` is a trust domain ID; give a workload ID such as spiffe://{}/ns/prod/sa/web", id.trust_domain_name());
            }
            if ttl.is_zero() {
                bail!("--ttl must be positive");
            }
            // Offline: no running control plane to ask; the trust domain is not known here.
            let registry = open_registry(state_dir.as_ref(), database.as_ref())?;
            let token = registry
                .create_join_token(&id, ttl, SystemTime::now())
                .with_context(|| {
                    format!("cannot store the token in {}", registry.path().display())
                })?;
            println!("{}", token.as_str());
            Ok(())
        }
    }
}
