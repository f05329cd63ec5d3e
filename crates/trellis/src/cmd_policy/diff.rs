//! `trellis policy diff OLD… -- NEW…` (or two files): the semantic diff of
//! `trellis_policy::diff`, printed.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::Args;

use super::common::{bad_input, compile, print_out};

/// `trellis policy diff`.
#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The old policy's files or directories (or, without `--`, exactly two: old and new).
    #[arg(required = true)]
    old: Vec<PathBuf>,
    /// After `--`: the new policy's files or directories.
    #[arg(last = true)]
    new: Vec<PathBuf>,
    /// Print the changes as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs `trellis policy diff`.
pub fn run(args: DiffArgs) -> ExitCode {
    let (old, new) = match (args.old.as_slice(), args.new.as_slice()) {
        ([old, new], []) => (vec![old.clone()], vec![new.clone()]),
        (_, []) => {
            return bad_input(&anyhow!(
                "give two files (`trellis policy diff OLD NEW`) or separate the new policy's \
                 files with `--` (`trellis policy diff OLD… -- NEW…`)"
            ))
        }
        (old, new) => (old.to_vec(), new.to_vec()),
    };
    let compiled = compile(&old).and_then(|o| Ok((o, compile(&new)?)));
    let (old, new) = match compiled {
        Ok(p) => p,
        Err(e) => return bad_input(&e),
    };
    let report = match trellis_policy::diff(&old, &new) {
        Ok(r) => r,
        Err(e) => return bad_input(&e.into()),
    };
    let settings = trellis_policy::settings_changed(&old, &new);
    let out = if args.json {
        match serde_json::to_string_pretty(&serde_json::json!({
            "old": old.hash(),
            "new": new.hash(),
            "settings": settings,
            "regions": report.regions,
            "changes": report.changes,
        })) {
            Ok(s) => s + "\n",
            Err(e) => return bad_input(&e.into()),
        }
    } else {
        let mut s = String::new();
        if report.changes.is_empty() {
            let _ = writeln!(
                s,
                "no decision changes ({} regions compared)",
                report.regions
            );
        } else {
            let n = report.changes.len();
            let noun = if n == 1 {
                "decision change"
            } else {
                "decision changes"
            };
            let _ = writeln!(s, "{n} {noun} ({} regions compared):", report.regions);
            for c in &report.changes {
                let _ = writeln!(s, "  {c}");
            }
        }
        for setting in &settings {
            let _ = writeln!(s, "setting changed: {setting}");
        }
        s
    };
    if let Err(e) = print_out(&out) {
        return bad_input(&e.into());
    }
    if report.changes.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
