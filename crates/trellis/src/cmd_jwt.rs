//! `trellis jwt inspect TOKEN --bundle PATH`: decodes a JWT-SVID, verifies it against a
//! JWT bundle (a SPIFFE bundle or a JWKS) and says precisely why one is refused.
//!
//! Exit codes as `trellis inspect` and `trellis log verify`: 0 valid, 1 refused, 2 bad usage
//! or a file that cannot be read.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context as _};
use clap::{Args, Subcommand};
use trellis_identity::jwt::{self, DecodedJwt, JwtBundle};
use trellis_identity::{SpiffeId, TrustDomain};

/// `trellis jwt …`.
#[derive(Subcommand, Debug)]
pub enum JwtCommand {
    /// Decode and verify a JWT-SVID; print its header and claims, and why it is refused
    /// (exit 0 valid, 1 refused, 2 bad usage).
    Inspect(InspectArgs),
}

/// `trellis jwt inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The token, or `-` to read it from stdin.
    token: String,
    /// JWT bundle: a SPIFFE bundle (`{"keys": [...]}` with `use: jwt-svid` keys) or a JWKS,
    /// e.g. what the Workload API's FetchJWTBundles returns.
    #[arg(long)]
    bundle: PathBuf,
    /// The audience the token must carry.
    #[arg(long)]
    audience: Option<String>,
    /// Trust domain of the bundle [default: the token's `sub`'s].
    #[arg(long)]
    trust_domain: Option<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    skew: Duration,
}

/// Runs `trellis jwt …` with its own exit codes.
pub fn run(cmd: JwtCommand) -> ExitCode {
    let JwtCommand::Inspect(args) = cmd;
    match inspect(&args) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(why)) => {
            eprintln!("refused: {why}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("error: {}", crate::logging::describe(&err));
            ExitCode::from(2)
        }
    }
}

/// Prints what the token says; `Some(reason)` when it is refused.
fn inspect(args: &InspectArgs) -> anyhow::Result<Option<String>> {
    let token = if args.token == "-" {
        let mut s = String::new();
        std::io::stdin()
            .take(jwt::MAX_TOKEN_BYTES as u64 + 1)
            .read_to_string(&mut s)
            .context("cannot read the token from stdin")?;
        s.trim().to_owned()
    } else {
        args.token.trim().to_owned()
    };
    let json = std::fs::read(&args.bundle)
        .with_context(|| format!("cannot read the bundle {}", args.bundle.display()))?;
    let decoded = match DecodedJwt::decode(&token) {
        Ok(d) => d,
        Err(e) => return Ok(Some(format!("({}) {e}", e.reason()))),
    };
    println!(
        "header: {}",
        serde_json::Value::Object(decoded.header.clone())
    );
    println!(
        "claims: {}",
        serde_json::to_string_pretty(&serde_json::Value::Object(decoded.claims.clone()))
            .unwrap_or_default()
    );
    // The bundle's trust domain: given, else the one the token claims to be from (a token
    // from elsewhere then fails on its key, not on a guess).
    let td = match &args.trust_domain {
        Some(td) => TrustDomain::parse(td).map_err(|e| anyhow!("--trust-domain `{td}`: {e}"))?,
        None => {
            let sub = decoded
                .claims
                .get("sub")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            match SpiffeId::parse(sub) {
                Ok(id) => TrustDomain::parse(id.trust_domain_name())
                    .map_err(|e| anyhow!("trust domain of `{sub}`: {e}"))?,
                Err(e) => return Ok(Some(format!("(subject) `sub` is not a SPIFFE ID: {e}"))),
            }
        }
    };
    let bundle = JwtBundle::parse(td, &json).with_context(|| {
        format!(
            "{}: not a usable JWT bundle (want a SPIFFE bundle or JWKS)",
            args.bundle.display()
        )
    })?;
    let now = SystemTime::now();
    match jwt::validate(&token, &bundle, args.audience.as_deref(), now, args.skew) {
        Ok(valid) => {
            let now_s = trellis_serve::time::unix_seconds(now);
            let left = i64::try_from(valid.expires_at).unwrap_or(i64::MAX) - now_s;
            println!("subject: {}", valid.spiffe_id);
            println!("audiences: {}", valid.audiences.join(", "));
            println!(
                "expires: {} ({})",
                trellis_serve::time::rfc3339_unix(i64::try_from(valid.expires_at).unwrap_or(0)),
                if left >= 0 {
                    format!("in {left}s")
                } else {
                    format!("{}s ago, within the skew", -left)
                }
            );
            println!(
                "valid: ES256 signature by key `{}` of trust domain `{}`",
                valid.kid,
                bundle.trust_domain()
            );
            Ok(None)
        }
        Err(e) => Ok(Some(format!("({}) {e}", e.reason()))),
    }
}
