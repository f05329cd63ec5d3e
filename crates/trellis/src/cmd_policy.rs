//! `trellis policy`: check a policy before shipping it, and explain a decision.
//!
//! Both take files or directories (a directory's `*.yaml`/`*.yml` files in name order, as
//! the sidecar reads it) and compile them together, in the order given.

use std::path::PathBuf;

use std::io::Write as _;

use anyhow::bail;
use clap::Subcommand;
use trellis_policy::{Action, CompiledPolicy, ExplainedRequest, Reading};
use trellis_sidecar::policy::read_sources;

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
}

fn compile(files: &[PathBuf]) -> anyhow::Result<CompiledPolicy> {
    let mut sources = Vec::new();
    for file in files {
        sources.extend(read_sources(file)?);
    }
    Ok(trellis_policy::compile(&sources)?)
}

fn upper(action: Action) -> &'static str {
    match action {
        Action::Allow => "ALLOW",
        Action::Deny => "DENY",
    }
}

/// Runs a `policy` subcommand.
pub fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Check { files } => {
            let policy = compile(&files)?;
            for warning in policy.lint() {
                eprintln!("{warning}");
            }
            println!("ok: {} rules, hash {}", policy.rule_count(), policy.hash());
            Ok(())
        }
        PolicyCommand::Explain {
            files,
            from,
            method,
            path,
            port,
        } => {
            let policy = compile(&files)?;
            let explanation = match (port, path) {
                (Some(port), _) => policy.explain_l4(&from, port),
                (None, Some(path)) => policy.explain(&from, &method, &path),
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
            let mut out = std::io::stdout().lock();
            match write!(out, "{explanation}").and_then(|()| out.flush()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                other => other?,
            }
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
    }
}
