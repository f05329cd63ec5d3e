//! `trellis token`: single-use join tokens.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::Subcommand;
use trellis_control::registry::Registry;
use trellis_identity::SpiffeId;

/// `trellis token …`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a join token bound to a SPIFFE ID; prints the token on stdout.
    Create {
        /// The control plane's state directory.
        #[arg(long, env = "TRELLIS_STATE_DIR")]
        state_dir: PathBuf,
        /// The identity the token's holder receives.
        #[arg(long)]
        spiffe_id: String,
        /// How long the token can be redeemed.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

/// Runs a `token` subcommand.
pub fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            state_dir,
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
            let db = state_dir.join("trellis.db");
            if !db.exists() {
                bail!(
                    "{}: no control-plane state here; pass the --state-dir that `trellis control` uses (it creates the database on first start)",
                    state_dir.display()
                );
            }
            let registry = Registry::open(&db)?;
            let token = registry
                .create_join_token(&id, ttl, SystemTime::now())
                .with_context(|| format!("cannot store the token in {}", db.display()))?;
            println!("{}", token.as_str());
            Ok(())
        }
    }
}
