//! What every `trellis policy` subcommand shares: reading and compiling the policy files,
//! printing to stdout, and the bad-input exit code.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use trellis_policy::CompiledPolicy;
use trellis_sidecar::policy::read_sources;

/// Exit code of `replay`, `diff` and `test` for bad input (1 means "something changed" or
/// "a test failed" there).
pub(super) const BAD_INPUT: u8 = 2;

/// Reads and compiles `files` together, in the order given.
pub(super) fn compile(files: &[PathBuf]) -> anyhow::Result<CompiledPolicy> {
    let mut sources = Vec::new();
    for file in files {
        sources.extend(read_sources(file)?);
    }
    Ok(trellis_policy::compile(&sources)?)
}

/// Prints `err` and returns the bad-input exit code (2).
pub(super) fn bad_input(err: &anyhow::Error) -> ExitCode {
    crate::logging::print_error(&crate::logging::describe(err));
    ExitCode::from(BAD_INPUT)
}

/// Writes `text` to stdout; a closed pipe (`… | head`) is not an error.
pub(super) fn print_out(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
