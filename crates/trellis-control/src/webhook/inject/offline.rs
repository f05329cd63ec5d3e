//! Injection over manifests, for `trellis inject -f FILE|-` (GitOps: render, inject, review
//! and commit the pod specs the cluster will run). The webhook's own decision
//! ([`super::inject_pod`]) runs on every pod template and its JSONPatch is applied to the
//! document, so the output is what admission would produce. No I/O: text in, text out.
//!
//! - Injected kinds and where their pod is: `Pod` (the object), `Deployment`, `StatefulSet`,
//!   `DaemonSet`, `ReplicaSet`, `Job` (`spec.template`), `CronJob`
//!   (`spec.jobTemplate.spec.template`); a `List` has its items handled one by one. Every
//!   other kind passes through unchanged.
//! - Namespaces as the webhook's configuration treats them: objects in `trellis-system` and
//!   `kube-system` are never injected (k8s/base/webhook.yaml never selects them). An object
//!   without `metadata.namespace` is taken to be in the default namespace given.
//! - Annotations as the webhook reads them on the pod template; `trellis.io/inject: "false"`
//!   on the workload's own metadata also leaves it alone (there it states the same intent).
//! - Idempotent: a template that has the sidecar already is left as it is, so injecting the
//!   output again changes nothing.
//! - Documents are re-serialized (key order kept, comments dropped); empty documents are
//!   dropped.

use serde::Deserialize as _;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use thiserror::Error;

use super::{inject_pod, InjectConfig, Outcome, PodInjection, ANNOTATION_INJECT};

/// Namespaces the webhook's configuration never selects, so never injected.
pub const NEVER_INJECTED_NAMESPACES: [&str; 2] = ["trellis-system", "kube-system"];

/// Where each injected kind keeps its pod (a JSON pointer; empty: the object itself).
pub const POD_TEMPLATES: [(&str, &str); 7] = [
    ("Pod", ""),
    ("Deployment", "/spec/template"),
    ("StatefulSet", "/spec/template"),
    ("DaemonSet", "/spec/template"),
    ("ReplicaSet", "/spec/template"),
    ("Job", "/spec/template"),
    ("CronJob", "/spec/jobTemplate/spec/template"),
];

/// Why manifests could not be injected. Each names the document (1-based) and the object.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OfflineError {
    /// A document is not YAML.
    #[error("document {doc}: not YAML: {message}")]
    Yaml {
        /// 1-based position in the input.
        doc: usize,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The webhook would refuse this pod; the message says why.
    #[error("document {doc}: {object}: {message}")]
    Refused {
        /// 1-based position in the input.
        doc: usize,
        /// `Kind namespace/name`.
        object: String,
        /// The webhook's message.
        message: String,
    },
    /// The object has no pod template where its kind keeps one, or it is not plain data.
    #[error("document {doc}: {object}: {message}")]
    Malformed {
        /// 1-based position in the input.
        doc: usize,
        /// `Kind namespace/name`.
        object: String,
        /// What is wrong.
        message: String,
    },
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectReport {
    /// 1-based position of its document in the input.
    pub doc: usize,
    /// `Kind namespace/name`.
    pub object: String,
    /// What was done.
    pub result: ObjectResult,
}

/// What was done to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectResult {
    /// The sidecar was added; the webhook's warnings, if any.
    Injected(Vec<String>),
    /// An injectable kind left unchanged, and why (opted out, already injected, …).
    Unchanged(String),
    /// Not a kind that carries a pod.
    OtherKind,
}

/// Injects every pod template in the YAML documents of `text` as the webhook would; objects
/// without a namespace are in `default_namespace`. Returns the documents (joined by `---`)
/// and one report per object.
pub fn inject_documents(
    text: &str,
    cfg: &InjectConfig,
    default_namespace: &str,
) -> Result<(String, Vec<ObjectReport>), OfflineError> {
    let mut out = Vec::new();
    let mut reports = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let mut value = Yaml::deserialize(de).map_err(|e| OfflineError::Yaml {
            doc,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, doc, cfg, default_namespace, &mut reports)?;
        let text = serde_yaml_ng::to_string(&value).map_err(|e| OfflineError::Yaml {
            doc,
            message: e.to_string(),
        })?;
        out.push(quote_yaml11_booleans(&text));
    }
    Ok((out.join("---\n"), reports))
}

/// YAML 1.1's boolean words other than `true`/`false` (<https://yaml.org/type/bool.html>).
const YAML11_BOOLEANS: &[&str] = &[
    "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
    "OFF",
];

/// Quotes the plain scalars of `text` (as serde_yaml_ng writes YAML) that YAML 1.1 reads as
/// booleans. serde_yaml_ng follows YAML 1.2, where `value: "yes"` may be written `value: yes`;
/// kubectl and kustomize follow YAML 1.1 and would read a boolean where the API wants a string
/// (an env value, an annotation), so `kubectl apply` of the output would fail.
fn quote_yaml11_booleans(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    // Inside a literal or folded block: lines indented deeper than this column are its text.
    let mut block: Option<usize> = None;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let indent = body.len() - body.trim_start().len();
        if let Some(column) = block {
            if body.trim().is_empty() || indent > column {
                out.push_str(line);
                continue;
            }
        }
        let (quoted, opens) = quote_line(body);
        block = opens;
        out.push_str(&quoted);
        out.push_str(&line[body.len()..]);
    }
    out
}

/// One block-style line as serde_yaml_ng writes it: indentation, `- ` prefixes, then a
/// scalar, `KEY:` or `KEY: VALUE` (keys and scalars plain or quoted). Returns the line with
/// YAML 1.1 booleans quoted and, if it opens a literal or folded block, the column its text
/// must be indented beyond.
fn quote_line(body: &str) -> (String, Option<usize>) {
    let quote = |s: &str| {
        if YAML11_BOOLEANS.contains(&s) {
            format!("'{s}'")
        } else {
            s.to_owned()
        }
    };
    let indent = body.len() - body.trim_start().len();
    let mut rest = &body[indent..];
    let mut out = String::from(&body[..indent]);
    let mut dashes = 0;
    while let Some(r) = rest.strip_prefix("- ") {
        out.push_str("- ");
        rest = r;
        dashes += 1;
    }
    // The key (or the whole scalar): a quoted token runs to its closing quote; a plain key
    // cannot contain `: `, and serde_yaml_ng quotes any plain value that would.
    let token_end = match rest.chars().next() {
        Some(q @ ('\'' | '"')) => quoted_end(rest, q).unwrap_or(rest.len()),
        _ => rest
            .find(": ")
            .unwrap_or_else(|| rest.strip_suffix(':').map_or(rest.len(), str::len)),
    };
    let (token, after) = rest.split_at(token_end);
    // A quoted token is never a boolean word nor a block header: `quote` leaves it alone.
    let column = indent + 2 * dashes;
    if let Some(value) = after.strip_prefix(": ") {
        out.push_str(&quote(token));
        out.push_str(": ");
        if is_block_indicator(value) {
            out.push_str(value);
            return (out, Some(column));
        }
        out.push_str(&quote(value));
    } else if after == ":" {
        out.push_str(&quote(token));
        out.push(':');
    } else if is_block_indicator(rest) {
        // `- |-`: the text is indented beyond the item's dash.
        out.push_str(rest);
        return (out, Some(column.saturating_sub(2).max(indent)));
    } else {
        out.push_str(&quote(rest));
    }
    (out, None)
}

/// Where the quoted token at the start of `s` (quoted with `q`) ends, closing quote included.
fn quoted_end(s: &str, q: char) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if q == '"' => i += 2,
            b'\'' if q == '\'' && bytes.get(i + 1) == Some(&b'\'') => i += 2,
            b if b == q as u8 => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// `|`, `>-`, `|2+`, …: a literal or folded block's header.
fn is_block_indicator(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('|' | '>'))
        && chars.as_str().len() <= 2
        && chars.all(|c| matches!(c, '+' | '-' | '1'..='9'))
}

fn str_at<'a>(v: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    let mut v = v;
    for key in path {
        v = v.get(*key)?;
    }
    v.as_str()
}

fn inject_object(
    value: &mut Yaml,
    doc: usize,
    cfg: &InjectConfig,
    default_namespace: &str,
    reports: &mut Vec<ObjectReport>,
) -> Result<(), OfflineError> {
    let kind = str_at(value, &["kind"]).unwrap_or("").to_owned();
    if kind == "List" {
        if let Some(items) = value.get_mut("items").and_then(Yaml::as_sequence_mut) {
            for item in items {
                inject_object(item, doc, cfg, default_namespace, reports)?;
            }
        }
        return Ok(());
    }
    let namespace = str_at(value, &["metadata", "namespace"])
        .filter(|n| !n.is_empty())
        .unwrap_or(default_namespace)
        .to_owned();
    let name = str_at(value, &["metadata", "name"])
        .or_else(|| str_at(value, &["metadata", "generateName"]))
        .unwrap_or("?");
    let object = format!(
        "{} {namespace}/{name}",
        if kind.is_empty() { "?" } else { &kind }
    );
    let report = |result| ObjectReport {
        doc,
        object: object.clone(),
        result,
    };
    let Some(template) = POD_TEMPLATES
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, pointer)| *pointer)
    else {
        reports.push(report(ObjectResult::OtherKind));
        return Ok(());
    };
    if NEVER_INJECTED_NAMESPACES.contains(&namespace.as_str()) {
        reports.push(report(ObjectResult::Unchanged(format!(
            "namespace {namespace} is never injected (the webhook does not select it)"
        ))));
        return Ok(());
    }
    let opted_out = |v: &Yaml| {
        v.get("metadata")
            .and_then(|m| m.get("annotations"))
            .and_then(|a| a.get(ANNOTATION_INJECT))
            .and_then(Yaml::as_str)
            .is_some_and(|s| s.trim().eq_ignore_ascii_case("false"))
    };
    if !template.is_empty() && opted_out(value) {
        reports.push(report(ObjectResult::Unchanged(format!(
            "{ANNOTATION_INJECT}: false"
        ))));
        return Ok(());
    }
    let malformed = |message: String| OfflineError::Malformed {
        doc,
        object: object.clone(),
        message,
    };
    let pod_yaml = pointer(value, template)
        .ok_or_else(|| malformed(format!("no pod template at {}", dotted(template))))?;
    let pod: Json = serde_json::to_value(pod_yaml)
        .map_err(|e| malformed(format!("the pod template is not plain data: {e}")))?;
    match inject_pod(&pod, &namespace, cfg) {
        PodInjection::Injected { patch, warnings } => {
            for op in &patch {
                let (Some(path), Some(v)) =
                    (op.get("path").and_then(Json::as_str), op.get("value"))
                else {
                    return Err(malformed(format!("unexpected patch operation {op}")));
                };
                let v = serde_yaml_ng::to_value(v).map_err(|e| malformed(e.to_string()))?;
                add(value, &format!("{template}{path}"), v).map_err(&malformed)?;
            }
            reports.push(report(ObjectResult::Injected(warnings)));
        }
        PodInjection::Unchanged { outcome, why, .. } => {
            debug_assert!(matches!(outcome, Outcome::OptedOut | Outcome::Skipped));
            reports.push(report(ObjectResult::Unchanged(why)));
        }
        PodInjection::Refused(message) => {
            return Err(OfflineError::Refused {
                doc,
                object,
                message,
            })
        }
    }
    Ok(())
}

/// `/spec/template` → `spec.template`, for messages.
fn dotted(pointer: &str) -> String {
    pointer.trim_start_matches('/').replace('/', ".")
}

/// RFC 6901 reference tokens of `pointer` ("~1" is '/', "~0" is '~').
fn tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

fn pointer<'a>(root: &'a Yaml, pointer: &str) -> Option<&'a Yaml> {
    let mut v = root;
    for t in tokens(pointer) {
        v = match v {
            Yaml::Mapping(m) => m.get(t.as_str())?,
            Yaml::Sequence(s) => s.get(t.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// JSONPatch `add` (RFC 6902 section 4.1) on a YAML document: "-" appends to an array, an
/// index inserts before it, a key is set in an existing object.
fn add(root: &mut Yaml, path: &str, value: Yaml) -> Result<(), String> {
    let tokens = tokens(path);
    let Some((last, parents)) = tokens.split_last() else {
        return Err(format!("cannot add at `{path}`"));
    };
    let mut v = root;
    for t in parents {
        v = match v {
            Yaml::Mapping(m) => m.get_mut(t.as_str()),
            Yaml::Sequence(s) => t.parse::<usize>().ok().and_then(|i| s.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("`{path}`: no `{t}` to add below"))?;
    }
    match v {
        Yaml::Mapping(m) => {
            m.insert(Yaml::String(last.clone()), value);
        }
        Yaml::Sequence(s) if last == "-" => s.push(value),
        Yaml::Sequence(s) => match last.parse::<usize>() {
            Ok(i) if i <= s.len() => s.insert(i, value),
            _ => return Err(format!("`{path}`: index out of range")),
        },
        _ => return Err(format!("`{path}`: not an object or array")),
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn yaml11_booleans_are_quoted_and_nothing_else_changes() {
        let input = r#"
metadata:
  annotations: {a: "on", "yes": "Off", c: "yes please", d: "true", e: "y"}
  labels: {n: "1"}
list: ["no", "NO", "No?", "n", "plain"]
nested: [["on"], {k: "ON"}]
script: "line one\n- yes\n  on: off\nlast"
folded: "off"
"#;
        let value: Yaml = serde_yaml_ng::from_str(input).unwrap();
        let plain = serde_yaml_ng::to_string(&value).unwrap();
        assert!(
            plain.contains(": on\n"),
            "serde_yaml_ng writes YAML 1.2: {plain}"
        );
        let quoted = quote_yaml11_booleans(&plain);
        // The same document to a YAML 1.2 reader...
        assert_eq!(
            serde_yaml_ng::from_str::<Yaml>(&quoted).unwrap(),
            value,
            "{quoted}"
        );
        // ...with every YAML 1.1 boolean quoted for kubectl.
        for expected in [
            "a: 'on'",
            "'yes': 'Off'",
            "e: 'y'",
            "- 'no'",
            "- 'NO'",
            "- 'n'",
            "- - 'on'",
            "k: 'ON'",
            "folded: 'off'",
        ] {
            assert!(quoted.contains(expected), "{expected:?} in:\n{quoted}");
        }
        // The literal block's content is text, not YAML: untouched.
        assert!(quoted.contains("\n  - yes\n    on: off\n"), "{quoted}");
        assert!(quoted.contains("c: yes please"), "{quoted}");
    }

    #[test]
    fn yaml11_booleans_after_blocks_and_quoted_keys_are_quoted_too() {
        let input = r#"
env:
- name: SCRIPT
  value: "first\n- yes\nlast"
  flag: "yes"
- name: "on"
  value: "a>"
  next: "no"
keys: {"1": "on", "it's": "off", "x:y": "Y"}
items: ["one\ntwo", "n"]
"#;
        let value: Yaml = serde_yaml_ng::from_str(input).unwrap();
        let quoted = quote_yaml11_booleans(&serde_yaml_ng::to_string(&value).unwrap());
        assert_eq!(
            serde_yaml_ng::from_str::<Yaml>(&quoted).unwrap(),
            value,
            "{quoted}"
        );
        for expected in [
            "flag: 'yes'",
            "name: 'on'",
            "next: 'no'",
            "'1': 'on'",
            ": 'off'",
            ": 'Y'",
            "- 'n'",
        ] {
            assert!(quoted.contains(expected), "{expected:?} in:\n{quoted}");
        }
        assert!(
            quoted.contains("\n    - yes\n"),
            "block text untouched:\n{quoted}"
        );
        assert!(is_block_indicator("|-") && is_block_indicator(">2+") && !is_block_indicator("a>"));
    }

    fn cfg() -> InjectConfig {
        InjectConfig {
            trust_domain: "example.org".into(),
            image: "img:1".into(),
            control_plane: "cp:8443".into(),
            bundle_pem: "PEM".into(),
            native_sidecar: true,
            no_proxy: Vec::new(),
            default_route: None,
            check_default_route: None,
        }
    }

    #[test]
    fn a_list_has_its_items_injected_and_other_kinds_kept() {
        let text = "apiVersion: v1\nkind: List\nitems:\n\
                    - {apiVersion: v1, kind: Service, metadata: {name: s}, spec: {ports: [{port: 1}]}}\n\
                    - apiVersion: v1\n  kind: Pod\n  metadata: {name: p}\n  spec:\n    containers: [{name: app, image: a}]\n\
                    ---\n---\n";
        let (out, reports) = inject_documents(text, &cfg(), "team").unwrap();
        let objects: Vec<(&str, &ObjectResult)> = reports
            .iter()
            .map(|r| (r.object.as_str(), &r.result))
            .collect();
        assert_eq!(
            objects,
            [
                ("Service team/s", &ObjectResult::OtherKind),
                ("Pod team/p", &ObjectResult::Injected(Vec::new())),
            ]
        );
        let doc: Yaml = serde_yaml_ng::from_str(&out).unwrap();
        let pod = &doc["items"][1];
        assert_eq!(pod["spec"]["initContainers"][0]["name"], "trellis-sidecar");
        assert_eq!(pod["spec"]["initContainers"][0]["restartPolicy"], "Always");
        assert_eq!(
            pod["spec"]["containers"][0]["name"], "app",
            "the app keeps its place"
        );
        // Empty documents are dropped; injecting again changes nothing.
        assert!(!out.contains("---"), "{out}");
        let (again, reports) = inject_documents(&out, &cfg(), "team").unwrap();
        assert_eq!(again, out);
        assert_eq!(
            reports[1].result,
            ObjectResult::Unchanged("already injected".into())
        );
    }

    #[test]
    fn a_workload_without_a_template_is_an_error_naming_it() {
        let err = inject_documents(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: x}\nspec: {}\n",
            &cfg(),
            "default",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "document 1: Deployment x/d: no pod template at spec.template"
        );
        let err = inject_documents("a: [", &cfg(), "default").unwrap_err();
        assert!(err.to_string().starts_with("document 1: not YAML"), "{err}");
    }

    #[test]
    fn add_follows_rfc6902_for_keys_appends_and_inserts() {
        let mut doc: Yaml =
            serde_yaml_ng::from_str("spec:\n  a: [1, 2]\n  b: {}\nk~/x: 1\n").unwrap();
        add(&mut doc, "/spec/a/-", Yaml::from(3)).unwrap();
        add(&mut doc, "/spec/a/0", Yaml::from(0)).unwrap();
        add(&mut doc, "/spec/b/c", Yaml::from("d")).unwrap();
        add(&mut doc, "/spec/e", Yaml::from(true)).unwrap();
        let want: Yaml =
            serde_yaml_ng::from_str("spec:\n  a: [0, 1, 2, 3]\n  b: {c: d}\n  e: true\nk~/x: 1\n")
                .unwrap();
        assert_eq!(doc, want);
        assert_eq!(pointer(&doc, "/k~0~1x"), Some(&Yaml::from(1)));
        assert!(add(&mut doc, "/spec/a/9", Yaml::from(1)).is_err());
        assert!(add(&mut doc, "/nope/x", Yaml::from(1)).is_err());
    }
}
