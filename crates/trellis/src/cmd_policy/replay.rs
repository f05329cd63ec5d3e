//! `trellis policy replay NEW… --access-log FILE…`: reads access logs (plain or gzip, `-`
//! for stdin), decides every recorded request again under NEW (`trellis_policy::Replay`)
//! and reports what changes.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use flate2::read::MultiGzDecoder;
use trellis_policy::{parse_access_line, LogLine, Replay, ReplayReport};

use super::common::{bad_input, compile, print_out, BAD_INPUT};

/// Malformed lines printed before the rest are only counted.
const SHOWN_ERRORS: u64 = 20;

/// `trellis policy replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The new policy: files or directories, compiled together in this order.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Sidecar access logs (JSON lines; other lines are skipped). Several files; `-` is
    /// stdin; gzip is detected and read.
    #[arg(long = "access-log", required = true, num_args = 1..)]
    access_log: Vec<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Stop at the first malformed line (exit 2) instead of reporting it and going on.
    #[arg(long)]
    strict: bool,
}

/// A log to read: its name in messages and its bytes, gunzipped when they are gzip.
fn open(path: &Path) -> anyhow::Result<(String, Box<dyn BufRead>)> {
    let (name, raw): (String, Box<dyn Read>) = if path == Path::new("-") {
        ("<stdin>".to_owned(), Box::new(std::io::stdin().lock()))
    } else {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        (path.display().to_string(), Box::new(file))
    };
    let mut reader = BufReader::with_capacity(1 << 16, raw);
    // gzip by its magic bytes (RFC 1952 §2.3.1), not the file name: rotated logs are named
    // every which way.
    let gzip = reader.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gzip {
        (
            name,
            Box::new(BufReader::with_capacity(
                1 << 16,
                MultiGzDecoder::new(reader),
            )),
        )
    } else {
        (name, Box::new(reader))
    })
}

/// What went wrong with the input, beyond the report.
#[derive(Default)]
struct Problems {
    malformed: u64,
    stopped: bool,
}

/// Reads one log into `replay`; malformed lines are printed (`file:line: …`) and counted.
fn read_log(
    name: &str,
    mut reader: Box<dyn BufRead>,
    replay: &mut Replay<'_>,
    strict: bool,
    problems: &mut Problems,
) -> anyhow::Result<u64> {
    let mut buf = Vec::with_capacity(1024);
    let mut lines = 0u64;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("{name}: read error after line {lines}"))?;
        if n == 0 {
            break;
        }
        lines += 1;
        let text = std::str::from_utf8(&buf)
            .map_err(|e| format!("not UTF-8 text ({e})"))
            .map(|t| t.trim_end_matches(['\n', '\r']));
        let parsed = text.and_then(|t| parse_access_line(t).map_err(|e| e.to_string()));
        match parsed {
            Ok(LogLine::Record(r)) => {
                replay.record(&r);
            }
            Ok(LogLine::Skipped(why)) => replay.skip(why),
            Err(e) => {
                problems.malformed += 1;
                if problems.malformed <= SHOWN_ERRORS || strict {
                    eprintln!("{name}:{lines}: {e}");
                }
                if strict {
                    problems.stopped = true;
                    return Ok(lines);
                }
            }
        }
    }
    Ok(lines)
}

/// Runs `trellis policy replay`.
pub fn run(args: ReplayArgs) -> ExitCode {
    let policy = match compile(&args.files) {
        Ok(p) => p,
        Err(e) => return bad_input(&e),
    };
    let mut replay = Replay::new(&policy);
    let mut problems = Problems::default();
    let mut bad_logs = Vec::new();
    for path in &args.access_log {
        let read = open(path).and_then(|(name, reader)| {
            let lines = read_log(&name, reader, &mut replay, args.strict, &mut problems)?;
            Ok((name, lines))
        });
        match read {
            Ok((name, 0)) => bad_logs.push(format!("{name}: the log is empty")),
            Ok(_) => {}
            Err(e) => bad_logs.push(crate::logging::describe(&e)),
        }
        if problems.stopped {
            break;
        }
    }
    let report = replay.finish();
    if problems.stopped {
        eprintln!("error: stopped at the first malformed line (--strict)");
        return ExitCode::from(BAD_INPUT);
    }
    if problems.malformed > SHOWN_ERRORS {
        eprintln!(
            "… and {} more malformed lines",
            problems.malformed - SHOWN_ERRORS
        );
    }
    for bad in &bad_logs {
        eprintln!("error: {bad}");
    }
    let decided = report.requests + report.connections;
    let nothing = decided == 0 && bad_logs.is_empty();
    if nothing {
        eprintln!(
            "error: no access-log lines to replay in {} ({} lines skipped): record them with \
             `trellis sidecar --log-format json --access-log true`",
            names(&args.access_log),
            report.other_lines + report.outbound + report.undecided
        );
    }
    let out = if args.json {
        match serde_json::to_string_pretty(&serde_json::json!({
            "report": &report,
            "malformed_lines": problems.malformed,
        })) {
            Ok(s) => s + "\n",
            Err(e) => return bad_input(&e.into()),
        }
    } else {
        render(&report)
    };
    if let Err(e) = print_out(&out) {
        return bad_input(&e.into());
    }
    if problems.malformed > 0 || !bad_logs.is_empty() || nothing {
        ExitCode::from(BAD_INPUT)
    } else if report.changed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn names(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `1 request`, `2 requests`.
fn counted(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A hash shortened for people (the JSON report has it whole).
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// The text report.
fn render(r: &ReplayReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "replayed {} and {} under policy {} ({} other lines, {} outbound, {} refused before \
         the policy skipped)",
        counted(r.requests, "request"),
        counted(r.connections, "connection"),
        short(&r.policy),
        r.other_lines,
        r.outbound,
        r.undecided
    );
    if !r.recorded_policies.is_empty() {
        let recorded: Vec<&str> = r.recorded_policies.iter().map(|h| short(h)).collect();
        let _ = writeln!(s, "recorded under policy {}", recorded.join(", "));
    }
    let _ = writeln!(
        s,
        "recorded: {} allow, {} deny, {} refused; replayed: {} allow, {} deny, {} refused",
        r.recorded.allow,
        r.recorded.deny,
        r.recorded.refused,
        r.replayed.allow,
        r.replayed.deny,
        r.replayed.refused
    );
    if r.changed == 0 {
        let _ = writeln!(
            s,
            "no decision changes ({} with another deciding rule)",
            r.rule_changed
        );
        return s;
    }
    let verb = if r.changed == 1 {
        "decision changes"
    } else {
        "decisions change"
    };
    let _ = writeln!(
        s,
        "{} {verb} ({} more keep their decision with another rule):",
        r.changed, r.rule_changed
    );
    for g in &r.changes {
        let _ = writeln!(s, "  {} → {}: {}", g.from, g.to, g.count);
        let _ = writeln!(s, "    by rule:");
        for c in &g.by_rule {
            let _ = writeln!(
                s,
                "      {} → {}: {}, e.g. {}: {} ({}) → {} ({})",
                c.old_rule, c.new_rule, c.count, c.example, g.from, c.old_rule, g.to, c.new_rule
            );
        }
        let _ = writeln!(s, "    by caller:");
        for c in &g.by_caller {
            let _ = writeln!(s, "      {}: {}", c.caller, c.count);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    const LINE: &str = r#"{"timestamp":"t","level":"INFO","target":"trellis::access","message":"request","fields":{"caller":"spiffe://example.org/a","direction":"inbound","method":"GET","path":"/x","raw_path":"/x","status":403,"duration_ms":0.1,"upstream":"u","rule":"default","decision":"deny","policy":"h"}}"#;

    fn replay_of(path: &Path) -> (ReplayReport, Problems) {
        let policy = trellis_policy::compile(&[(
            "p.yaml",
            "apiVersion: trellis.io/v1\nkind: Policy\ndefaultAction: allow\n",
        )])
        .unwrap();
        let mut replay = Replay::new(&policy);
        let mut problems = Problems::default();
        let (name, reader) = open(path).unwrap();
        read_log(&name, reader, &mut replay, false, &mut problems).unwrap();
        (replay.finish(), problems)
    }

    #[test]
    fn gzip_logs_are_read_like_plain_ones_even_concatenated() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("access.log.1");
        let mut file = File::create(&gz).unwrap();
        // Two gzip members, as `cat a.gz b.gz` or a rotating writer leaves them.
        for _ in 0..2 {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            writeln!(enc, "{LINE}\nnot json").unwrap();
            file.write_all(&enc.finish().unwrap()).unwrap();
        }
        drop(file);
        let (report, problems) = replay_of(&gz);
        assert_eq!((report.requests, report.other_lines), (2, 2));
        assert_eq!((report.changed, problems.malformed), (2, 0));
        let plain = dir.path().join("access.log");
        std::fs::write(&plain, format!("{LINE}\r\n{}", &LINE[..100])).unwrap();
        let (report, problems) = replay_of(&plain);
        assert_eq!((report.requests, problems.malformed), (1, 1));
    }
}
