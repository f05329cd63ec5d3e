//! `trellis ca`: offline CA material.

use std::path::PathBuf;

use clap::Subcommand;
use trellis_control::ca::Ca;
use trellis_identity::TrustDomain;

/// `trellis ca …`.
#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create an offline root CA and an intermediate for the control plane.
    Init {
        /// Trust domain, e.g. example.org.
        #[arg(long)]
        trust_domain: String,
        /// Output directory (created 0700; existing files are not overwritten).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs a `ca` subcommand.
pub fn run(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init { trust_domain, out } => {
            let td = TrustDomain::parse(&trust_domain)?;
            let files = Ca::init_offline(&td, &out)?;
            println!("root CA:          {}", files.root_cert.display());
            println!(
                "root key:         {}  (keep offline; the control plane never needs it)",
                files.root_key.display()
            );
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
            Ok(())
        }
    }
}
