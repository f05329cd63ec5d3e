//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default per command), text or JSON.
//!
//! Text is tracing-subscriber's usual line (`<time> <LEVEL> <target>: <message> k=v …`),
//! coloured only when stderr is a terminal and `NO_COLOR` is unset, so a file or a pipe gets
//! plain text. JSON is one object per line with fixed top-level keys
//! (`timestamp`, `level`, `target`, `message`) and the event's own fields under `fields`:
//! nested rather than flattened because events may carry fields named `target` or `message`
//! (a pool's peer target, a gRPC status message) that would otherwise collide with the
//! top-level keys.

use std::fmt;
use std::io::IsTerminal as _;
use std::sync::OnceLock;
use std::time::SystemTime;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The format [`init`] installed, so a fatal error is reported in the same shape.
static INSTALLED: OnceLock<LogFormat> = OnceLock::new();

/// Installs the global subscriber: `RUST_LOG` if set (an invalid value is reported and
/// replaced by `default_filter`), else `default_filter`.
pub fn init(format: LogFormat, default_filter: &str) {
    let (filter, bad_env) = filter_from_env(std::env::var("RUST_LOG").ok(), default_filter);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(want_ansi()).init(),
        LogFormat::Json => builder.with_ansi(false).event_format(JsonLines).init(),
    }
    let _ = INSTALLED.set(format);
    if let Some(warning) = bad_env {
        tracing::warn!("{warning}");
    }
}

/// Prints the error that ends the process: a JSON line (level `ERROR`, target `trellis`) when
/// JSON logging is installed, so a log pipeline parsing stderr sees it; `error: …` otherwise.
pub fn print_error(message: &str) {
    if INSTALLED.get() == Some(&LogFormat::Json) {
        let line = json_line(SystemTime::now(), "ERROR", "trellis", message, Map::new());
        eprintln!("{line}");
    } else {
        eprintln!("error: {message}");
    }
}

/// The filter for `RUST_LOG` (`None` or blank: unset), with a warning if it did not parse.
fn filter_from_env(rust_log: Option<String>, default_filter: &str) -> (EnvFilter, Option<String>) {
    match rust_log {
        Some(directives) if !directives.trim().is_empty() => {
            match EnvFilter::try_new(&directives) {
                Ok(filter) => (filter, None),
                Err(e) => (
                    EnvFilter::new(default_filter),
                    Some(format!(
                        "ignoring RUST_LOG={directives:?} ({e}); logging at {default_filter:?} \
                         (examples: RUST_LOG=warn, RUST_LOG=info,trellis::access=off)"
                    )),
                ),
            }
        }
        _ => (EnvFilter::new(default_filter), None),
    }
}

/// Colours only for a person looking at a terminal (https://no-color.org/ opts out even then).
fn want_ansi() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The JSON event format: one object per line.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut visitor = JsonVisitor::default();
        event.record(&mut visitor);
        // Records bridged from the `log` crate (rustls) arrive with target `log` and the real
        // one in `log.target`.
        let target = visitor
            .log_target
            .take()
            .unwrap_or_else(|| meta.target().to_string());
        let mut fields = visitor.fields;
        // Span names only: Trellis keeps request context in event fields, not span fields.
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|span| Value::from(span.name()))
                .collect();
            if !spans.is_empty() {
                fields.insert("spans".to_string(), Value::Array(spans));
            }
        }
        let line = json_line(
            SystemTime::now(),
            meta.level().as_str(),
            &target,
            visitor.message.as_deref().unwrap_or(""),
            fields,
        );
        writeln!(writer, "{line}")
    }
}

/// `{"timestamp":…,"level":…,"target":…,"message":…[,"fields":{…}]}`, keys in that order (a
/// person reads the line too); `fields` is left out when empty.
fn json_line(
    now: SystemTime,
    level: &str,
    target: &str,
    message: &str,
    fields: Map<String, Value>,
) -> String {
    let timestamp = humantime::format_rfc3339_micros(now).to_string();
    let mut line = format!(
        "{{\"timestamp\":{},\"level\":{},\"target\":{},\"message\":{}",
        Value::from(timestamp),
        Value::from(level),
        Value::from(target),
        Value::from(message),
    );
    if !fields.is_empty() {
        line.push_str(",\"fields\":");
        line.push_str(&Value::Object(fields).to_string());
    }
    line.push('}');
    line
}

/// Collects an event's fields as JSON values; the format-string message separately.
#[derive(Default)]
struct JsonVisitor {
    message: Option<String>,
    log_target: Option<String>,
    fields: Map<String, Value>,
}

impl JsonVisitor {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        match name {
            // The first `message` is the format string; an explicit `message = …` field seen
            // after it stays a field rather than replacing it.
            "message" if self.message.is_none() => {
                self.message = Some(match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                });
            }
            "log.target" => {
                if let Value::String(s) = value {
                    self.log_target = Some(s);
                }
            }
            // The rest of the `log` bridge's metadata is noise in a log line.
            "log.module_path" | "log.file" | "log.line" => {}
            _ => {
                self.fields.insert(name.to_string(), value);
            }
        }
    }
}

impl Visit for JsonVisitor {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: keep them readable as strings.
        let v = serde_json::Number::from_f64(value)
            .map(Value::Number)
            .unwrap_or_else(|| Value::from(value.to_string()));
        self.put(field, v);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The error and its causes on one line, like the text format.
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        self.put(field, Value::from(text));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::from(format!("{value:?}")));
    }
}

/// The exit code of a command that reports failure only as an error: the error goes to
/// stderr (a JSON line when JSON logging is on, so a log pipeline does not drop the reason).
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            print_error(&describe(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the message before it
/// already quotes (library errors name their file *and* include the OS error).
pub fn describe(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_has_fixed_keys_and_nested_fields() {
        let mut fields = Map::new();
        fields.insert("target".to_string(), Value::from("b.svc:443"));
        fields.insert("status".to_string(), Value::from(200));
        let line = json_line(
            SystemTime::UNIX_EPOCH,
            "INFO",
            "trellis::access",
            "request",
            fields,
        );
        let v: Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "trellis::access");
        assert_eq!(v["message"], "request");
        assert_eq!(v["fields"]["target"], "b.svc:443");
        assert_eq!(v["fields"]["status"], 200);
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with(r#"{"timestamp":"1970-01-01T00:00:00.000000Z","level":"INFO","target":"trellis::access","message":"request","fields":{"#),
            "{line}"
        );
    }

    #[test]
    fn json_line_omits_empty_fields() {
        let line = json_line(SystemTime::UNIX_EPOCH, "WARN", "t", "m", Map::new());
        let v: Value = serde_json::from_str(&line).expect("valid JSON");
        assert!(v.get("fields").is_none());
    }

    #[test]
    fn message_with_newlines_and_quotes_stays_one_line() {
        let line = json_line(
            SystemTime::UNIX_EPOCH,
            "ERROR",
            "trellis",
            "bad \"policy\"\nline 2\u{1b}[31m",
            Map::new(),
        );
        assert_eq!(line.lines().count(), 1);
        let v: Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(v["message"], "bad \"policy\"\nline 2\u{1b}[31m");
    }

    #[test]
    fn invalid_rust_log_falls_back_with_a_warning() {
        let (_, warning) = filter_from_env(Some("info,[".to_string()), "info");
        let warning = warning.expect("a warning");
        assert!(warning.contains("RUST_LOG"), "{warning}");
        let (_, none) = filter_from_env(Some("warn,trellis::access=off".to_string()), "info");
        assert!(none.is_none());
        let (_, unset) = filter_from_env(None, "info");
        assert!(unset.is_none());
        let (_, blank) = filter_from_env(Some("  ".to_string()), "info");
        assert!(blank.is_none());
    }
}
