//! `trellis token`: single-use join tokens.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::Subcommand;
use trellis_control::registry::{Database, DatabaseUrl, Registry};
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
    Create {
        /// The control plane's state directory (its SQLite database).
        #[arg(long, env = "TRELLIS_STATE_DIR", required_unless_present = "database")]
        state_dir: Option<PathBuf>,
        /// The control plane's database instead: the PostgreSQL URL its replicas share
        /// (postgres://USER:PASSWORD@HOST:5432/DB), or sqlite://PATH. Wins over --state-dir.
        #[arg(
            long,
            env = "TRELLIS_DATABASE",
            value_name = "URL",
            hide_env_values = true
        )]
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
        if !file.exists() {
            bail!("{}: {missing}", file.display());
        }
    }
    Ok(Registry::connect(&db)?)
}

/// Runs a `token` subcommand.
pub fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            state_dir,
            database,
            spiffe_id,
            ttl,
        } => {
            let id = SpiffeId::parse(&spiffe_id)?;
            if id.path().is_empty() {
                bail!("`{id}` is a trust domain ID; give a workload ID such as spiffe://{}/ns/prod/sa/web", id.trust_domain_name());
            }
            if ttl.is_zero() {
                bail!("--ttl must be positive");
            }
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
