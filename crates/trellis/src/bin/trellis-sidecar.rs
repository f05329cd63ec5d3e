//! `trellis-sidecar`: the sidecar alone, without the control plane, the CLI tools and their
//! libraries (SQLite, PostgreSQL, PKCS#11, the transparency log's verifier, …) linked in.
//!
//! An idle sidecar's memory is mostly pages of its executable: the kernel maps code around
//! every function it runs, and in the one `trellis` binary the sidecar's code sits among
//! everyone else's. This binary holds only what a sidecar runs. `trellis sidecar` hands over
//! to it (exec, same PID, same arguments) when it sits next to `trellis` and was built from
//! the same commit, so every manifest, script and test that runs `trellis sidecar` gets it.

#[path = "../alloc.rs"]
mod alloc;
#[path = "../build_version.rs"]
mod build_version;
#[path = "../cmd_sidecar.rs"]
mod cmd_sidecar;
#[path = "../logging.rs"]
mod logging;
#[path = "../signal.rs"]
mod signal;

use std::process::ExitCode;

use clap::Parser;

/// A Trellis sidecar: mTLS between workloads, plain HTTP to the app (`trellis sidecar`).
#[derive(Parser)]
#[command(name = "trellis-sidecar", version, long_version = build_version::LONG_VERSION, about)]
struct Cli {
    /// Log format on stderr: `text` or `json`, as `trellis --log-format`.
    #[arg(long, value_enum, default_value = "text", env = "TRELLIS_LOG_FORMAT")]
    log_format: logging::LogFormat,
    #[command(flatten)]
    args: cmd_sidecar::SidecarArgs,
}

fn main() -> ExitCode {
    build_version::record();
    let cli = Cli::parse();
    logging::init(cli.log_format, "info");
    alloc::log_options();
    logging::exit_code(cmd_sidecar::run(cli.args))
}
