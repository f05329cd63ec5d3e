//! `trellis policy`: check a policy before shipping it, explain a decision, test it against
//! expected decisions, replay recorded traffic under it, and diff two versions.
//!
//! Every command takes files or directories (a directory's `*.yaml`/`*.yml` files in name
//! order, as the sidecar reads it) and compiles them together, in the order given.

mod common;
mod diff;
mod replay;
mod test;

use common::{compile, print_out};

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use trellis_policy::{Action, ExplainedRequest, Reading};

/// `trellis policy …`.
#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Compile the files together as the sidecar would; print warnings (rules that can never
    /// match, shadowed rules, deny paths that another letter case steps around, …) as
    /// `file:line:column: warning: …`. Exits 1 on an error.
    Check {
        /// Policy files or directories, compiled together in this order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show the decision for one request (or TCP connection), the rule that made it, and
    /// why: for a path with `;` parameters, each reading (as sent, and without them) and
    /// which one decided. The first line is `ALLOW …` or `DENY …`. Exits 0 whatever the
    /// decision; 1 when the policy or the request is invalid.
    Explain {
        /// Policy files or directories, compiled together in this order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The caller's SPIFFE ID.
        #[arg(long)]
        from: String,
        /// The HTTP method.
        #[arg(long, default_value = "GET", conflicts_with = "port")]
        method: String,
        /// The request path (raw: it is normalized as the sidecar would).
        #[arg(long, required_unless_present = "port")]
        path: Option<String>,
        /// Explain a plain TCP connection to this inbound port instead of an HTTP request.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Decide again, under NEW, every request and TCP connection recorded in sidecar
    /// access logs (`--log-format json` with the access log on), exactly as the sidecar
    /// would, and report what changes: allow→deny and deny→allow, by rule and by caller,
    /// with examples. Exits 0 when nothing changes, 1 when something does, 2 on bad input
    /// (each malformed line is reported with file and line; the replay goes on unless
    /// `--strict`).
    Replay(replay::ReplayArgs),
    /// Where two policies decide differently, computed from their rules (not from
    /// traffic): one example request per region whose decision changes, with the old and
    /// new deciding rules. `trellis policy diff OLD… -- NEW…`, or two files. Exits 0 when
    /// no decision changes, 1 when some do, 2 on bad input.
    Diff(diff::DiffArgs),
    /// Run policy test files: each lists its policy files and requests with the decision
    /// (and rule) they must get. Prints `file:line: …` per failure. Exits 0 when all pass,
    /// 1 when any fails, 2 on a bad file.
    Test(test::TestArgs),
}

fn upper(action: Action) -> &'static str {
    match action {
        Action::Allow => "ALLOW",
        Action::Deny => "DENY",
    }
}

/// Runs a `policy` subcommand and returns its exit code.
pub fn run(cmd: PolicyCommand) -> ExitCode {
    let result = match cmd {
        PolicyCommand::Replay(args) => return replay::run(args),
        PolicyCommand::Diff(args) => return diff::run(args),
        PolicyCommand::Test(args) => return test::run(args),
        PolicyCommand::Check { files } => check(&files),
        PolicyCommand::Explain {
            files,
            from,
            method,
            path,
            port,
        } => explain(&files, &from, &method, path.as_deref(), port),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            crate::logging::print_error(&crate::logging::describe(&err));
            ExitCode::FAILURE
        }
    }
}

fn check(files: &[PathBuf]) -> anyhow::Result<()> {
    let policy = compile(files)?;
    for warning in policy.lint() {
        eprintln!("{warning}");
    }
    println!("ok: {} rules, hash {}", policy.rule_count(), policy.hash());
    Ok(())
}

fn explain(
    files: &[PathBuf],
    from: &str,
    method: &str,
    path: Option<&str>,
    port: Option<u16>,
) -> anyhow::Result<()> {
    let policy = compile(files)?;
    let explanation = match (port, path) {
        (Some(port), _) => policy.explain_l4(from, port),
        (None, Some(path)) => policy.explain(from, method, path),
        (None, None) => bail!("give --path (HTTP) or --port (TCP)"),
    };
    // Which reading of a path with `;` parameters decided, when it is not the path
    // as sent.
    let reading = match explanation.readings.iter().find(|r| r.decided) {
        Some(r) if r.reading != Reading::Literal => {
            format!(" (reading {})", r.reading.describe())
        }
        _ => String::new(),
    };
    match &explanation.decision {
        Some(d) if d.rule == trellis_policy::DEFAULT_RULE => {
            println!("{} by default{reading}", upper(d.action));
        }
        Some(d) => println!("{} by rule {}{reading}", upper(d.action), d.rule),
        None => println!("REFUSED with 400 before authorization{reading}"),
    }
    // `trellis policy explain … | head` closes the pipe early: that is not an error.
    print_out(&explanation.to_string())?;
    if let ExplainedRequest::Http {
        normalized: Err(e), ..
    } = &explanation.request
    {
        bail!(
            "the sidecar refuses this path with 400 ({}): {e}",
            e.reason()
        );
    }
    Ok(())
}
