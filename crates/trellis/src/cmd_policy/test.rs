//! `trellis policy test FILE…`: runs policy test files (`trellis_policy::parse_policy_test`)
//! against the policy files each names, relative to itself.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use trellis_policy::CompiledPolicy;

use super::common::{compile, print_out, BAD_INPUT};

/// `trellis policy test`.
#[derive(Args, Debug)]
pub struct TestArgs {
    /// Test files (YAML: `policy: [files…]` and `tests: [{from, method, path | port,
    /// expect, rule}]`).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

/// A test file read and its policy compiled.
fn load(file: &Path) -> anyhow::Result<(trellis_policy::PolicyTestFile, CompiledPolicy)> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let tests = trellis_policy::parse_policy_test(&file.display().to_string(), &text)?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let policy_files: Vec<PathBuf> = tests.policy.iter().map(|p| dir.join(p)).collect();
    let policy = compile(&policy_files)
        .with_context(|| format!("{}: the policy it tests", file.display()))?;
    Ok((tests, policy))
}

/// Runs `trellis policy test`.
pub fn run(args: TestArgs) -> ExitCode {
    let (mut total, mut failed, mut bad) = (0usize, 0usize, 0usize);
    let mut out = String::new();
    for file in &args.files {
        let (tests, policy) = match load(file) {
            Ok(loaded) => loaded,
            Err(e) => {
                bad += 1;
                crate::logging::print_error(&crate::logging::describe(&e));
                continue;
            }
        };
        for case in &tests.tests {
            total += 1;
            if let Some(failure) = case.run(&policy) {
                failed += 1;
                let _ = writeln!(out, "{}:{}: {failure}", file.display(), case.line);
            }
        }
    }
    let _ = writeln!(
        out,
        "{total} tests, {} passed, {failed} failed{}",
        total - failed,
        if bad > 0 {
            format!(", {bad} files not run")
        } else {
            String::new()
        }
    );
    let _ = print_out(&out);
    if bad > 0 {
        ExitCode::from(BAD_INPUT)
    } else if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
