//! The example configs in `examples/` parse, with every setting they show commented out
//! turned on too: a renamed or mistyped field there would otherwise only surface when an
//! operator copies it.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use trellis_control::config::ControlFile;
use trellis_sidecar::config::SidecarFile;

fn example(name: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

/// `# key: value` and `# - key: value` lines (a lowercase key, as opposed to prose) lose
/// their `# `.
fn with_comments_enabled(text: &str) -> String {
    text.lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if is_setting(rest) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_setting(line: &str) -> bool {
    // A list item's first key (`- trust_domain: b.org`) counts too.
    let key = line.trim_start();
    let key = key.strip_prefix("- ").unwrap_or(key);
    let Some((name, _)) = key.split_once(':') else {
        return false;
    };
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[test]
fn control_example_parses_with_every_setting_enabled() {
    let (path, text) = example("control.yaml");
    ControlFile::parse(&text, &path).unwrap();
    let all = with_comments_enabled(&text);
    assert_ne!(all, text, "no commented settings found");
    ControlFile::parse(&all, &path).unwrap_or_else(|e| panic!("{e}\n---\n{all}"));
}

#[test]
fn sidecar_examples_parse_with_every_setting_enabled() {
    for name in ["sidecar-a.yaml", "sidecar-b.yaml"] {
        let (path, text) = example(name);
        SidecarFile::parse(&text, &path).unwrap();
        let all = with_comments_enabled(&text);
        SidecarFile::parse(&all, &path).unwrap_or_else(|e| panic!("{e}\n---\n{all}"));
    }
}
