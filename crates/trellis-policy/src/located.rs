//! Scalars that remember where they were written, and serde_yaml_ng errors turned into
//! [`PolicyError`]s.
//!
//! serde_yaml_ng attaches the position of the current YAML event to any error a visitor
//! returns (`fix_mark`). [`Located`] uses that: its visitor stores the scalar's text and
//! returns a sentinel error; the position is read back from the error, and the error is
//! dropped. The scalar event has been consumed by then, so the deserializer carries on as
//! if the value had been read normally. This costs one short string per scalar and needs
//! no second YAML parser whose idea of positions could differ from libyaml's.

use std::convert::Infallible;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

use crate::error::PolicyError;

/// Marks the error `Located` provokes; never shown to anyone.
const SENTINEL: &str = "\u{1}trellis-policy-locate\u{1}";

/// A scalar's text and its 1-based position (line 0 if it could not be found).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Located {
    pub value: String,
    pub line: usize,
    pub column: usize,
}

impl Located {
    pub(crate) fn error(&self, source: &str, message: impl Into<String>) -> PolicyError {
        PolicyError::new(source, self.line, self.column, message)
    }
}

impl<'de> Deserialize<'de> for Located {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut slot = None;
        match deserializer.deserialize_str(Capture { slot: &mut slot }) {
            Ok(never) => match never {},
            Err(err) => match slot {
                Some(value) => {
                    let (line, column) = location_after_sentinel(&err.to_string());
                    Ok(Located {
                        value,
                        line,
                        column,
                    })
                }
                // Not a scalar: a real error, already positioned by serde_yaml_ng.
                None => Err(err),
            },
        }
    }
}

struct Capture<'a> {
    slot: &'a mut Option<String>,
}

impl<'de> Visitor<'de> for Capture<'_> {
    type Value = Infallible;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Infallible, E> {
        *self.slot = Some(v.to_owned());
        Err(E::custom(SENTINEL))
    }
}

/// Reads `"... SENTINEL at line L column C"`. serde_yaml_ng leaves the position out of
/// the message for line 1 column 1; any other shape gives line 0 (unknown).
fn location_after_sentinel(msg: &str) -> (usize, usize) {
    let Some(i) = msg.find(SENTINEL) else {
        return (0, 0);
    };
    let rest = &msg[i + SENTINEL.len()..];
    if rest.is_empty() {
        return (1, 1);
    }
    parse_at_line_column(rest).unwrap_or((0, 0))
}

/// Parses a leading `" at line L column C"`.
fn parse_at_line_column(s: &str) -> Option<(usize, usize)> {
    let s = s.strip_prefix(" at line ")?;
    let (line, rest) = s.split_once(" column ")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    Some((line.parse().ok()?, rest[..digits].parse().ok()?))
}

/// Turns a serde_yaml_ng error into a located [`PolicyError`], without the
/// `" at line L column C"` that serde_yaml_ng appends to its message.
pub(crate) fn yaml_error(source: &str, err: &serde_yaml_ng::Error) -> PolicyError {
    let mut message = err.to_string();
    let (line, column) = match err.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            if let Some(i) = message.find(&suffix) {
                message.replace_range(i..i + suffix.len(), "");
            }
            (loc.line(), loc.column())
        }
        None => (1, 1),
    };
    // The two mistakes YAML makes easy, spelled out.
    if message.contains("while scanning an alias") {
        message.push_str(
            "; a value that starts with `*` is a YAML alias: quote it, as in `from: [\"*\"]`",
        );
    } else if message.contains("invalid type: string") && message.ends_with("expected a sequence") {
        message.push_str("; write a list, as in `[GET]` or `- GET` on the next line");
    }
    PolicyError::new(source, line, column, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        a: Located,
        b: Vec<Located>,
        c: Option<Located>,
    }

    #[test]
    fn located_scalars_carry_their_positions() {
        let text = "a: hello\nb:\n  - one\n  - 'two'\nc: [3]\n";
        let err = serde_yaml_ng::from_str::<Doc>(text).err().unwrap();
        // `c` is a sequence, not a scalar: a real, positioned error.
        assert_eq!(err.location().unwrap().line(), 5);

        let text = "a: hello\nb:\n  - one\n  -   'two'\nc: 3\n";
        let doc: Doc = serde_yaml_ng::from_str(text).unwrap();
        assert_eq!(
            (doc.a.value.as_str(), doc.a.line, doc.a.column),
            ("hello", 1, 4)
        );
        assert_eq!((doc.b[0].line, doc.b[0].column), (3, 5));
        assert_eq!(
            (doc.b[1].value.as_str(), doc.b[1].line, doc.b[1].column),
            ("two", 4, 7)
        );
        let c = doc.c.unwrap();
        assert_eq!((c.value.as_str(), c.line), ("3", 5));
    }

    #[test]
    fn located_scalar_at_start_of_text_is_line_one() {
        let v: Located = serde_yaml_ng::from_str("hello").unwrap();
        assert_eq!((v.value.as_str(), v.line, v.column), ("hello", 1, 1));
    }

    #[test]
    fn located_scalar_in_flow_sequence_has_its_own_column() {
        let v: Vec<Located> = serde_yaml_ng::from_str("[a, bb, ccc]").unwrap();
        let cols: Vec<_> = v.iter().map(|l| l.column).collect();
        assert_eq!(cols, [2, 5, 9]);
    }

    #[test]
    fn located_scalar_through_alias_is_read() {
        #[derive(serde::Deserialize)]
        struct Two {
            x: Located,
            y: Located,
        }
        let t: Two = serde_yaml_ng::from_str("x: &v hi\ny: *v\n").unwrap();
        assert_eq!((t.x.value.as_str(), t.y.value.as_str()), ("hi", "hi"));
    }

    #[test]
    fn yaml_error_strips_the_position_from_the_message() {
        let err = serde_yaml_ng::from_str::<Doc>("a: x\nb: []\nzz: 1\n")
            .err()
            .unwrap();
        let e = yaml_error("f.yaml", &err);
        assert_eq!(e.line, 3);
        assert!(!e.message.contains("at line"), "{}", e.message);
        assert!(e.message.contains("unknown field `zz`"), "{}", e.message);
    }
}
