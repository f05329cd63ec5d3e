//! `trellis`: the one binary. Parses flags, sets up logging, and calls into the libraries.

mod admin_client;
mod alloc;
mod build_version;
mod cmd_ca;
mod cmd_control;
mod cmd_inject;
mod cmd_jwt;
mod cmd_log;
mod cmd_policy;
mod cmd_sidecar;
mod cmd_status;
mod cmd_token;
mod demo;
mod inspect;
mod logging;
mod operator_client;
mod signal;
mod timespan;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Trellis: SPIFFE identities and mTLS for every workload.
#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    long_version = build_version::LONG_VERSION,
    about,
    propagate_version = true
)]
struct Cli {
    /// Log format on stderr: `text` (plain unless stderr is a terminal) or `json` (one
    /// object per line). Filter with RUST_LOG, e.g. `RUST_LOG=warn,trellis::access=info`.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TRELLIS_LOG_FORMAT"
    )]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the control plane: CA, attestation, SDS server.
    Control(cmd_control::ControlArgs),
    /// Run a sidecar: mTLS between workloads, plain HTTP to the app.
    Sidecar(cmd_sidecar::SidecarArgs),
    /// Certificate authority tools.
    #[command(subcommand)]
    Ca(cmd_ca::CaCommand),
    /// Join tokens.
    #[command(subcommand)]
    Token(cmd_token::TokenCommand),
    /// Authorization policy tools: check a policy, explain a decision, test, replay
    /// recorded traffic, diff two versions.
    #[command(subcommand)]
    Policy(cmd_policy::PolicyCommand),
    /// Handshake with a TLS endpoint and report its identity, chain, and why it fails
    /// (exit 0 verified, 1 failed, 2 bad usage).
    Inspect(inspect::InspectArgs),
    /// One-screen summary of a running sidecar or control plane, from its admin endpoint
    /// (exit 0 ready, 1 not ready, 2 unreachable or bad usage).
    Status(cmd_status::StatusArgs),
    /// The issuance transparency log: verify it, prove an SVID is in it, watch it (exit 0
    /// verified, 1 failed, 2 bad usage).
    #[command(subcommand)]
    Log(cmd_log::LogCommand),
    /// JWT-SVID tools: `jwt inspect` decodes and verifies a token against a bundle (exit 0
    /// valid, 1 refused, 2 bad usage).
    #[command(subcommand)]
    Jwt(cmd_jwt::JwtCommand),
    /// Add the sidecar to the pods of Kubernetes manifests, exactly as the injection webhook
    /// would, and print them (for manifests rendered and committed in CI).
    Inject(cmd_inject::InjectArgs),
    /// Start a local control plane and a workload on loopback and show an SVID being issued and rotated.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    build_version::record();
    let cli = Cli::parse();
    // Only returns if there is nothing to hand over to (or exec failed): then the sidecar
    // runs in this process, as it always could, and says why once logging is up.
    let not_handed_over = match cli.command {
        Command::Sidecar(_) => hand_over_to_sidecar_executable(cli.log_format),
        _ => None,
    };
    // Only long-running commands log; one-shot CLI commands keep stderr for their errors.
    match cli.command {
        Command::Control(_) | Command::Sidecar(_) => logging::init(cli.log_format, "info"),
        // The demo prints its own story; logs only for warnings unless RUST_LOG says otherwise.
        Command::Demo(_) => logging::init(cli.log_format, "warn"),
        _ => {}
    }
    if let Some(why) = not_handed_over {
        tracing::warn!("{why}; running the sidecar in this process");
    }
    alloc::log_options();
    let result = match cli.command {
        Command::Control(args) => cmd_control::run(args),
        Command::Sidecar(args) => cmd_sidecar::run(args),
        Command::Ca(cmd) => cmd_ca::run(cmd),
        Command::Token(cmd) => cmd_token::run(cmd),
        // Its own exit codes: replay, diff and test use 1 for "changed"/"failed", 2 for bad
        // input.
        Command::Policy(cmd) => return cmd_policy::run(cmd),
        Command::Inject(args) => cmd_inject::run(args),
        // Its own exit codes: 1 is a failed inspection, 2 bad usage.
        Command::Inspect(args) => return inspect::run(args),
        // Its own exit codes: 1 is reachable but not ready, 2 unreachable or bad usage.
        Command::Status(args) => return cmd_status::run(args),
        Command::Demo(args) => demo::run(args),
        // Its own exit codes: 1 is a failed verification, 2 bad usage.
        Command::Log(cmd) => return cmd_log::run(cmd),
        // Its own exit codes: 1 is a refused token, 2 bad usage.
        Command::Jwt(cmd) => return cmd_jwt::run(cmd),
    };
    logging::exit_code(result)
}

/// `trellis sidecar` becomes `trellis-sidecar` (exec: same PID, arguments and environment)
/// when that executable sits next to this one and reports the same version and commit: it
/// holds only the sidecar's code, so an idle sidecar keeps fewer executable pages resident
/// (see src/bin/trellis-sidecar.rs). Returns, with what to warn about if anything, when
/// there is none or the exec fails.
fn hand_over_to_sidecar_executable(log_format: logging::LogFormat) -> Option<String> {
    use std::os::unix::process::CommandExt as _;
    let sidecar = match sidecar_executable() {
        Ok(Some(sidecar)) => sidecar,
        Ok(None) => return None,
        Err(why) => return Some(why),
    };
    // What follows the `sidecar` subcommand; a `--log-format` given before it travels in the
    // environment (the same flag after it is among the arguments, and wins).
    let args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .skip_while(|a| a != "sidecar")
        .skip(1)
        .collect();
    let format = match log_format {
        logging::LogFormat::Text => "text",
        logging::LogFormat::Json => "json",
    };
    let err = std::process::Command::new(&sidecar)
        .args(args)
        .env("TRELLIS_LOG_FORMAT", format)
        .exec();
    Some(format!("cannot run {}: {err}", sidecar.display()))
}

/// `trellis-sidecar` next to this executable, if it reports this build's version and commit;
/// `Err` says why one that is there is not used (a stale one left from an older build is never
/// run, and the sidecar then costs the whole binary's resident pages).
fn sidecar_executable() -> Result<Option<std::path::PathBuf>, String> {
    let Ok(here) = std::env::current_exe() else {
        return Ok(None);
    };
    let candidate = here.with_file_name("trellis-sidecar");
    if !candidate.is_file() {
        return Ok(None);
    }
    let out = std::process::Command::new(&candidate)
        .arg("--version")
        .output();
    let version = out.as_ref().ok().and_then(|out| {
        let printed = String::from_utf8_lossy(&out.stdout);
        let version = printed.trim().strip_prefix("trellis-sidecar ")?.to_owned();
        out.status.success().then_some(version)
    });
    if version.as_deref() == Some(build_version::LONG_VERSION) {
        return Ok(Some(candidate));
    }
    Err(format!(
        "{} is not from this build ({}): install both executables from one build, or remove it",
        candidate.display(),
        version.as_deref().unwrap_or("its --version failed")
    ))
}
