//! Parsing, validation and compilation of policy files into a [`CompiledPolicy`], and
//! evaluation against it.

use std::collections::HashMap;
use std::fmt;

use sha2::{Digest, Sha256};

use crate::decision::{Action, AuditHit, Decision, Mode, DEFAULT_RULE};
use crate::error::PolicyError;
use crate::index::{Best, Class, Index, IndexRule};
use crate::located::{yaml_error, Located};
use crate::model::{RawPolicy, RawRule, RawTo};
use crate::path::NormalizedPath;
use crate::pattern::{parse_method, PathPattern, Principal};
use crate::reading::PathParameters;

/// The only `apiVersion` this crate reads.
pub const API_VERSION: &str = "trellis.io/v1";
/// The only `kind` this crate reads.
pub const KIND: &str = "Policy";
/// Longest rule name accepted (names are metric labels and appear in 403 bodies).
pub const MAX_RULE_NAME_LEN: usize = 128;
/// Most rules a policy may hold across all its files.
pub const MAX_RULES: usize = 1_000_000;

/// Where something was written: which source (index into the compile input), line, column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub source: usize,
    pub line: usize,
    pub column: usize,
}

impl Loc {
    fn of(source: usize, l: &Located) -> Loc {
        Loc {
            source,
            line: l.line,
            column: l.column,
        }
    }
}

/// One compiled rule.
#[derive(Debug)]
pub(crate) struct Rule {
    pub name: String,
    pub action: Action,
    /// Effective: the rule's `mode: audit` or the policy's.
    pub audit: bool,
    /// `mode` as written on the rule, and where.
    pub mode: Option<(Mode, Loc)>,
    pub from: Vec<Principal>,
    pub to: Option<Vec<ToEntry>>,
    pub ports: Option<Vec<u16>>,
    /// Where the rule's `name` value is.
    pub loc: Loc,
}

/// One compiled `to` entry.
#[derive(Debug)]
pub(crate) struct ToEntry {
    /// `None`: any method. Each with where it was written.
    pub methods: Option<Vec<(Box<str>, Loc)>>,
    /// `None`: any path.
    pub paths: Option<Vec<PathPattern>>,
    /// Where each of `paths` was written (same order).
    pub path_locs: Vec<Loc>,
    /// Uppercase method names alone, for the index.
    pub method_names: Option<Vec<Box<str>>>,
}

impl ToEntry {
    pub(crate) fn method_ok(&self, method: &str) -> bool {
        self.method_names
            .as_ref()
            .is_none_or(|ms| ms.iter().any(|m| m.eq_ignore_ascii_case(method)))
    }

    pub(crate) fn path_ok(&self, view: &str, case_insensitive: bool) -> bool {
        self.paths
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|p| p.matches(view, case_insensitive)))
    }

    /// An entry with an empty `methods` or `paths` list matches nothing.
    pub(crate) fn is_dead(&self) -> bool {
        self.method_names.as_ref().is_some_and(Vec::is_empty)
            || self.paths.as_ref().is_some_and(Vec::is_empty)
    }
}

/// Which HTTP requests a rule applies to (before `from`).
pub(crate) enum HttpScope<'a> {
    /// None: the rule is L4-only (`ports`).
    None,
    /// Every request: no `to` and no `ports`.
    All,
    /// The requests its `to` entries describe.
    Entries(&'a [ToEntry]),
}

impl Rule {
    pub(crate) fn class(&self) -> Class {
        Class {
            deny: self.action == Action::Deny,
            audit: self.audit,
        }
    }

    pub(crate) fn http_scope(&self) -> HttpScope<'_> {
        match (&self.to, &self.ports) {
            (Some(to), _) => HttpScope::Entries(to),
            (None, Some(_)) => HttpScope::None,
            (None, None) => HttpScope::All,
        }
    }

    /// `None`: no L4 scope (the rule has `to`). `Some(None)`: every port.
    pub(crate) fn l4_scope(&self) -> Option<Option<&[u16]>> {
        match &self.to {
            Some(_) => None,
            None => Some(self.ports.as_deref()),
        }
    }

    pub(crate) fn caller_matches(&self, caller: &str) -> bool {
        self.from.iter().any(|p| p.matches(caller))
    }

    /// Reference semantics for one HTTP request (no index).
    pub(crate) fn matches_http(
        &self,
        caller: &str,
        method: &str,
        view: &str,
        case_insensitive: bool,
    ) -> bool {
        self.caller_matches(caller)
            && match self.http_scope() {
                HttpScope::None => false,
                HttpScope::All => true,
                HttpScope::Entries(es) => es
                    .iter()
                    .any(|e| e.method_ok(method) && e.path_ok(view, case_insensitive)),
            }
    }

    /// Reference semantics for one TCP connection (no index).
    pub(crate) fn matches_l4(&self, caller: &str, port: u16) -> bool {
        self.caller_matches(caller)
            && match self.l4_scope() {
                None => false,
                Some(None) => true,
                Some(Some(ports)) => ports.contains(&port),
            }
    }

    /// No request or connection can ever match this rule.
    pub(crate) fn never_matches(&self) -> bool {
        let no_http = match self.http_scope() {
            HttpScope::None => true,
            HttpScope::All => false,
            HttpScope::Entries(es) => es.iter().all(ToEntry::is_dead),
        };
        let no_l4 = matches!(self.l4_scope(), None | Some(Some([])));
        self.from.is_empty() || (no_http && no_l4)
    }
}

/// A validated, compiled policy: evaluate requests with [`decide`](Self::decide) and
/// connections with [`decide_l4`](Self::decide_l4). Immutable, `Send + Sync`: build a new
/// one on change and swap it in (`ArcSwap<CompiledPolicy>`).
pub struct CompiledPolicy {
    pub(crate) sources: Vec<String>,
    hash: String,
    pub(crate) default_action: Action,
    pub(crate) mode: Mode,
    pub(crate) path_parameters: PathParameters,
    pub(crate) case_insensitive_paths: bool,
    /// Some file wrote `caseInsensitivePaths` (either way): the operator has decided, so
    /// the case lint stays quiet.
    pub(crate) case_setting_written: bool,
    pub(crate) rules: Vec<Rule>,
    index: Index,
}

impl fmt::Debug for CompiledPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledPolicy")
            .field("sources", &self.sources)
            .field("hash", &self.hash)
            .field("default_action", &self.default_action)
            .field("mode", &self.mode)
            .field("path_parameters", &self.path_parameters)
            .field("case_insensitive_paths", &self.case_insensitive_paths)
            .field("rules", &self.rules.len())
            .finish()
    }
}

/// Parses, validates and compiles policy files: `(source name, text)` pairs, merged in
/// the order given (callers sort file names). The source name is only used in error
/// messages and lints; nothing is read from disk.
///
/// Returns the first problem found, located in its file.
///
/// ```
/// let policy = trellis_policy::compile(&[(
///     "policy.yaml",
///     "apiVersion: trellis.io/v1\nkind: Policy\nrules:\n  - name: health\n    action: allow\n    from: [\"*\"]\n    to:\n      - paths: [/health]\n",
/// )])
/// .unwrap();
/// let path = trellis_policy::normalize_path("/health").unwrap();
/// let d = policy.decide("spiffe://example.org/ns/prod/sa/lb", "GET", &path);
/// assert!(d.is_allowed());
/// assert_eq!(d.rule, "health");
/// ```
pub fn compile<S: AsRef<str>, T: AsRef<str>>(
    sources: &[(S, T)],
) -> Result<CompiledPolicy, PolicyError> {
    if sources.is_empty() {
        return Err(PolicyError::new(
            "<policy>",
            0,
            0,
            "no policy files given: a policy needs at least one file",
        ));
    }
    let mut default_action: Option<(Action, Loc)> = None;
    let mut mode: Option<(Mode, Loc)> = None;
    let mut path_parameters: Option<(PathParameters, Loc)> = None;
    let mut case_insensitive: Option<(bool, Loc)> = None;
    let mut names: HashMap<String, Loc> = HashMap::new();
    let mut rules: Vec<Rule> = Vec::new();
    let names_of: Vec<&str> = sources.iter().map(|(n, _)| n.as_ref()).collect();
    let place = |loc: Loc| {
        format!(
            "{}:{}:{}",
            names_of.get(loc.source).copied().unwrap_or("?"),
            loc.line,
            loc.column
        )
    };

    for (si, (name, text)) in sources.iter().enumerate() {
        let (src, text) = (name.as_ref(), text.as_ref());
        let raw = parse_file(src, text)?;

        if raw.api_version.value != API_VERSION {
            return Err(raw.api_version.error(
                src,
                format!(
                    "unsupported apiVersion `{}`: expected `{API_VERSION}`",
                    raw.api_version.value
                ),
            ));
        }
        if raw.kind.value != KIND {
            return Err(raw.kind.error(
                src,
                format!("unsupported kind `{}`: expected `{KIND}`", raw.kind.value),
            ));
        }
        if let Some(l) = &raw.default_action {
            let a = parse_action(src, l, "defaultAction")?;
            match default_action {
                None => default_action = Some((a, Loc::of(si, l))),
                Some((prev, at)) if prev != a => {
                    return Err(l.error(
                        src,
                        format!(
                            "defaultAction `{a}` disagrees with `{prev}` set at {}: files that \
                             set defaultAction must agree (or leave it out)",
                            place(at)
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(l) = &raw.mode {
            let m = parse_mode(src, l)?;
            match mode {
                None => mode = Some((m, Loc::of(si, l))),
                Some((prev, at)) if prev != m => {
                    return Err(l.error(
                        src,
                        format!(
                            "mode `{m}` disagrees with `{prev}` set at {}: files that set the \
                             policy's mode must agree (or leave it out)",
                            place(at)
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(l) = &raw.path_parameters {
            let v = parse_path_parameters(src, l)?;
            agree(
                &mut path_parameters,
                v,
                si,
                src,
                l,
                "pathParameters",
                &place,
            )?;
        }
        if let Some(l) = &raw.case_insensitive_paths {
            let v = parse_bool(src, l, "caseInsensitivePaths")?;
            agree(
                &mut case_insensitive,
                v,
                si,
                src,
                l,
                "caseInsensitivePaths",
                &place,
            )?;
        }
        for raw_rule in raw.rules {
            if rules.len() >= MAX_RULES {
                return Err(raw_rule.name.error(
                    src,
                    format!("too many rules: a policy may hold at most {MAX_RULES}"),
                ));
            }
            let rule = compile_rule(si, src, raw_rule)?;
            if let Some(first) = names.get(&rule.name) {
                return Err(PolicyError::new(
                    src,
                    rule.loc.line,
                    rule.loc.column,
                    format!(
                        "duplicate rule name `{}`: first defined at {}; rule names must be \
                         unique across all policy files",
                        rule.name,
                        place(*first)
                    ),
                ));
            }
            names.insert(rule.name.clone(), rule.loc);
            rules.push(rule);
        }
    }

    let mode = mode.map_or(Mode::Enforce, |(m, _)| m);
    let case_insensitive_paths = case_insensitive.is_some_and(|(v, _)| v);
    for rule in &mut rules {
        rule.audit = mode == Mode::Audit || matches!(rule.mode, Some((Mode::Audit, _)));
        if case_insensitive_paths {
            // "lowercases both sides for matching": the patterns here, once; the request
            // path in `decide`.
            for pattern in rule
                .to
                .iter_mut()
                .flatten()
                .flat_map(|e| e.paths.iter_mut().flatten())
            {
                pattern.fold_case();
            }
        }
    }
    let any_path = PathPattern::any();
    let index = Index::build(rules.iter().map(|r| index_rule(r, &any_path)));

    let mut hasher = Sha256::new();
    for (_, text) in sources {
        hasher.update(text.as_ref().as_bytes());
    }

    Ok(CompiledPolicy {
        sources: sources.iter().map(|(n, _)| n.as_ref().to_owned()).collect(),
        hash: hex::encode(hasher.finalize()),
        default_action: default_action.map_or(Action::Deny, |(a, _)| a),
        mode,
        path_parameters: path_parameters.map_or(PathParameters::default(), |(p, _)| p),
        case_insensitive_paths,
        case_setting_written: case_insensitive.is_some(),
        rules,
        index,
    })
}

fn index_rule<'a>(rule: &'a Rule, any_path: &'a PathPattern) -> IndexRule<'a> {
    let http = match rule.http_scope() {
        HttpScope::None => None,
        HttpScope::All => Some(vec![(None, vec![any_path])]),
        HttpScope::Entries(entries) => Some(
            entries
                .iter()
                .filter(|e| !e.is_dead())
                .map(|e| {
                    let paths = match &e.paths {
                        None => vec![any_path],
                        Some(ps) => ps.iter().collect(),
                    };
                    (e.method_names.as_deref(), paths)
                })
                .collect(),
        ),
    };
    IndexRule {
        from: &rule.from,
        class: rule.class(),
        http,
        l4: rule.l4_scope(),
    }
}

fn parse_file(src: &str, text: &str) -> Result<RawPolicy, PolicyError> {
    serde_yaml_ng::from_str::<RawPolicy>(text).map_err(|e| {
        let blank = text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
        });
        if blank {
            PolicyError::new(
                src,
                1,
                1,
                format!(
                    "the file is empty: a policy file is a YAML mapping with `apiVersion: \
                     {API_VERSION}`, `kind: {KIND}` and `rules`"
                ),
            )
        } else {
            yaml_error(src, &e)
        }
    })
}

fn parse_action(src: &str, l: &Located, field: &str) -> Result<Action, PolicyError> {
    match l.value.as_str() {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        v if v.eq_ignore_ascii_case("allow") || v.eq_ignore_ascii_case("deny") => Err(l.error(
            src,
            format!(
                "{field} `{v}`: write it in lowercase: `{}`",
                v.to_ascii_lowercase()
            ),
        )),
        v => Err(l.error(
            src,
            format!("unknown {field} `{v}`: expected `allow` or `deny`"),
        )),
    }
}

fn parse_mode(src: &str, l: &Located) -> Result<Mode, PolicyError> {
    match l.value.as_str() {
        "enforce" => Ok(Mode::Enforce),
        "audit" => Ok(Mode::Audit),
        v => Err(l.error(
            src,
            format!("unknown mode `{v}`: expected `enforce` or `audit`"),
        )),
    }
}

fn parse_path_parameters(src: &str, l: &Located) -> Result<PathParameters, PolicyError> {
    match l.value.as_str() {
        "strictest" => Ok(PathParameters::Strictest),
        "reject" => Ok(PathParameters::Reject),
        "literal" => Ok(PathParameters::Literal),
        v => Err(l.error(
            src,
            format!(
                "unknown pathParameters `{v}`: expected `strictest` (the default: a path with \
                 `;` parameters is decided with and without them, and the stricter decision \
                 wins), `reject` (refuse paths with `;`, 400) or `literal` (`;` is an ordinary \
                 character)"
            ),
        )),
    }
}

fn parse_bool(src: &str, l: &Located, field: &str) -> Result<bool, PolicyError> {
    match l.value.as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        v if v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("false") => Err(l.error(
            src,
            format!(
                "{field} `{v}`: write it in lowercase: `{}`",
                v.to_ascii_lowercase()
            ),
        )),
        v => Err(l.error(src, format!("{field} `{v}`: expected `true` or `false`"))),
    }
}

/// Records a policy-wide setting from file `si`; files that set it must agree, as
/// `defaultAction` and `mode` do.
fn agree<T: Copy + PartialEq + fmt::Display>(
    slot: &mut Option<(T, Loc)>,
    value: T,
    si: usize,
    src: &str,
    l: &Located,
    field: &str,
    place: &impl Fn(Loc) -> String,
) -> Result<(), PolicyError> {
    match *slot {
        None => *slot = Some((value, Loc::of(si, l))),
        Some((prev, at)) if prev != value => {
            return Err(l.error(
                src,
                format!(
                    "{field} `{value}` disagrees with `{prev}` set at {}: files that set \
                     {field} must agree (or leave it out)",
                    place(at)
                ),
            ))
        }
        Some(_) => {}
    }
    Ok(())
}

fn check_rule_name(src: &str, l: &Located) -> Result<(), PolicyError> {
    let name = l.value.as_str();
    if name.is_empty() {
        return Err(l.error(src, "rule name is empty"));
    }
    if name == DEFAULT_RULE {
        return Err(l.error(
            src,
            format!(
                "rule name `{DEFAULT_RULE}` is reserved: it reports decisions that no rule \
                 made; choose another name"
            ),
        ));
    }
    if name.len() > MAX_RULE_NAME_LEN {
        return Err(l.error(
            src,
            format!("rule name is longer than {MAX_RULE_NAME_LEN} characters"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(l.error(
            src,
            format!(
                "rule name `{name}`: `{c}` is not allowed; use letters, digits, `-`, `_` and \
                 `.` (the name appears in metrics, logs and 403 responses)"
            ),
        ));
    }
    Ok(())
}

fn compile_rule(si: usize, src: &str, raw: RawRule) -> Result<Rule, PolicyError> {
    check_rule_name(src, &raw.name)?;
    let action = parse_action(src, &raw.action, "action")?;
    let mode = match &raw.mode {
        Some(l) => Some((parse_mode(src, l)?, Loc::of(si, l))),
        None => None,
    };
    let from = raw
        .from
        .iter()
        .map(|l| Principal::parse(&l.value).map_err(|m| l.error(src, m)))
        .collect::<Result<Vec<_>, _>>()?;
    let to = match raw.to {
        None => None,
        Some(entries) => Some(
            entries
                .into_iter()
                .map(|e| compile_to(si, src, e))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let ports = match &raw.ports {
        None => None,
        Some(ports) => Some(
            ports
                .iter()
                .map(|l| match l.value.parse::<u16>() {
                    Ok(p) if p != 0 => Ok(p),
                    _ => Err(l.error(
                        src,
                        format!(
                            "port `{}`: expected a TCP port number from 1 to 65535",
                            l.value
                        ),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    if to.is_some() && ports.is_some() {
        let at = raw
            .ports
            .as_ref()
            .and_then(|p| p.first())
            .unwrap_or(&raw.name);
        return Err(at.error(
            src,
            format!(
                "rule `{}` has both `to` (HTTP requests) and `ports` (plain TCP connections): \
                 split it into an HTTP rule and a TCP rule",
                raw.name.value
            ),
        ));
    }
    Ok(Rule {
        name: raw.name.value.clone(),
        action,
        audit: false,
        mode,
        from,
        to,
        ports,
        loc: Loc::of(si, &raw.name),
    })
}

fn compile_to(si: usize, src: &str, raw: RawTo) -> Result<ToEntry, PolicyError> {
    let methods = match raw.methods {
        None => None,
        Some(ms) => Some(
            ms.iter()
                .map(|l| {
                    parse_method(&l.value)
                        .map(|m| (m, Loc::of(si, l)))
                        .map_err(|m| l.error(src, m))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let paths = match &raw.paths {
        None => None,
        Some(ps) => Some(
            ps.iter()
                .map(|l| PathPattern::parse(&l.value).map_err(|m| l.error(src, m)))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let path_locs = raw.paths.iter().flatten().map(|l| Loc::of(si, l)).collect();
    let method_names = methods
        .as_ref()
        .map(|ms: &Vec<(Box<str>, Loc)>| ms.iter().map(|(m, _)| m.clone()).collect());
    Ok(ToEntry {
        methods,
        paths,
        path_locs,
        method_names,
    })
}

impl CompiledPolicy {
    /// Decides an HTTP request from `caller` (its verified SPIFFE ID) for `method` and
    /// one normalized path, as it is (one reading: `;` is an ordinary character here).
    /// A sidecar deciding a request as it arrived calls
    /// [`decide_request`](Self::decide_request) with the raw path instead, which applies
    /// `pathParameters`.
    ///
    /// Allocates nothing, except to lowercase a path with uppercase letters under
    /// `caseInsensitivePaths: true`; cost depends on the caller's and the path's depth, not
    /// on the number of rules about other callers.
    pub fn decide(&self, caller: &str, method: &str, path: &NormalizedPath<'_>) -> Decision<'_> {
        let view = path.match_view();
        if self.case_insensitive_paths && view.bytes().any(|b| b.is_ascii_uppercase()) {
            let folded = view.to_ascii_lowercase();
            return self.finish(self.index.http(caller, method, &folded));
        }
        self.finish(self.index.http(caller, method, view))
    }

    /// Decides a plain TCP connection from `caller` to the inbound listen `port`. Only
    /// rules without `to` take part (with `ports`, only on those ports).
    pub fn decide_l4(&self, caller: &str, port: u16) -> Decision<'_> {
        self.finish(self.index.l4(caller, port))
    }

    // The semantics, applied to the first matching rule of each kind:
    //
    //   "A matching `deny` wins; else a matching `allow`; else `defaultAction`."
    //
    // `action`/`rule` apply it to the enforced rules only (none in an audit-mode policy,
    // whose effective default is then `allow`: nothing is enforced). The would-be decision
    // applies it to all rules with the policy's `defaultAction`; it is reported in
    // `audit` when its action differs.
    fn finish(&self, best: Best) -> Decision<'_> {
        let enforced_default = match self.mode {
            Mode::Enforce => self.default_action,
            Mode::Audit => Action::Allow,
        };
        let (action, rule) = self.pick(best.enforced_deny, best.enforced_allow, enforced_default);
        let (would, would_rule) = self.pick(best.any_deny, best.any_allow, self.default_action);
        Decision {
            action,
            rule,
            audit: (would != action).then_some(AuditHit {
                action: would,
                rule: would_rule,
            }),
        }
    }

    fn pick(&self, deny: u32, allow: u32, default: Action) -> (Action, &str) {
        if let Some(r) = self.rule(deny) {
            (Action::Deny, &r.name)
        } else if let Some(r) = self.rule(allow) {
            (Action::Allow, &r.name)
        } else {
            (default, DEFAULT_RULE)
        }
    }

    fn rule(&self, id: u32) -> Option<&Rule> {
        if id == Best::NONE {
            return None;
        }
        self.rules.get(usize::try_from(id).ok()?)
    }

    /// Reference evaluation over every rule in order, without the index: what `decide`
    /// must always agree with (checked by tests and used by `explain`).
    pub(crate) fn decide_reference(&self, caller: &str, method: &str, view: &str) -> Decision<'_> {
        let mut best = Best::new();
        for (id, rule) in self.rules.iter().enumerate() {
            if rule.matches_http(caller, method, view, self.case_insensitive_paths) {
                best.offer(u32::try_from(id).unwrap_or(Best::NONE - 1), rule.class());
            }
        }
        self.finish(best)
    }

    /// Reference evaluation of a TCP connection (see [`Self::decide_reference`]).
    pub(crate) fn decide_l4_reference(&self, caller: &str, port: u16) -> Decision<'_> {
        let mut best = Best::new();
        for (id, rule) in self.rules.iter().enumerate() {
            if rule.matches_l4(caller, port) {
                best.offer(u32::try_from(id).unwrap_or(Best::NONE - 1), rule.class());
            }
        }
        self.finish(best)
    }

    /// True when no enforced rule could allow `caller` anything, HTTP or TCP: either an
    /// enforced `deny` without `to` and `ports` names it, or `defaultAction` is `deny` and
    /// no enforced `allow` that can match anything names it. After a reload the sidecar
    /// closes such callers' open connections. Conservative: `false` when unsure (each
    /// HTTP request is still decided on its own; re-check TCP connections with
    /// [`decide_l4`](Self::decide_l4)). Always `false` in an audit-mode policy.
    pub fn denies_everything_from(&self, caller: &str) -> bool {
        if self.mode == Mode::Audit {
            return false;
        }
        let mut total_deny = false;
        let mut some_allow = false;
        self.index.for_each_bucket(caller, |bucket| {
            for &id in &bucket.rules {
                let Some(rule) = self.rule(id) else { continue };
                if rule.audit || rule.never_matches() {
                    continue;
                }
                match rule.action {
                    Action::Deny => total_deny |= rule.to.is_none() && rule.ports.is_none(),
                    Action::Allow => some_allow = true,
                }
            }
        });
        total_deny || (self.default_action == Action::Deny && !some_allow)
    }

    /// SHA-256 (lowercase hex) of the source texts concatenated in order; for one file,
    /// what `sha256sum FILE` prints. Shows which version is loaded.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// How many rules the policy holds, across all its files.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The rule names in evaluation order (file order, then position in the file).
    pub fn rule_names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// The source names, in the order given to [`compile`].
    pub fn source_names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.sources.iter().map(String::as_str)
    }

    /// `defaultAction` (`deny` when no file sets it).
    pub fn default_action(&self) -> Action {
        self.default_action
    }

    /// The policy's `mode` (`enforce` when no file sets it).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Rule ids (with repeats) matching an HTTP request, through the index.
    pub(crate) fn http_rule_ids(&self, caller: &str, method: &str, view: &str, out: &mut Vec<u32>) {
        self.index
            .http_matches(caller, method, view, |r, _| out.push(r));
    }

    /// Rule ids (with repeats) matching a TCP connection, through the index.
    pub(crate) fn l4_rule_ids(&self, caller: &str, port: u16, out: &mut Vec<u32>) {
        self.index.l4_matches(caller, port, |r, _| out.push(r));
    }

    /// `source:line:column` of a location.
    pub(crate) fn place(&self, loc: Loc) -> String {
        format!(
            "{}:{}:{}",
            self.sources.get(loc.source).map_or("?", String::as_str),
            loc.line,
            loc.column
        )
    }
}
