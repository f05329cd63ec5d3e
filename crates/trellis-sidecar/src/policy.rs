//! Authorization: the [`PolicyEngine`] decides every inbound request (and raw TCP
//! connection) against the compiled policy in force; the [`PolicyWatcher`] reloads it when
//! the file or directory changes.
//!
//! **No policy configured** (`policy` unset): every authenticated peer of the trust domain
//! may call anything, as before policies existed. Nothing is counted in
//! `trellis_authz_decisions_total` then.
//!
//! **A policy configured**: a file, or a directory whose `*.yaml`/`*.yml` files (dotfiles
//! and Kubernetes' `..data` internals skipped, symlinks followed) are merged in name order.
//! It must load at start, or the sidecar refuses to start. Afterwards every update is
//! read → compiled → swapped; one that fails keeps the last good policy in force, logs
//! `file:line:column: message`, counts `trellis_policy_reload_errors_total` and shows on
//! `/policy` (DESIGN.md, "Policy change": "A file that fails keeps the last good policy in
//! force, logs the error with file and line, and counts it.").
//!
//! The request path reads the policy with one `ArcSwap::load` and takes no lock
//! (STYLE.md: "Shared state is a value you swap, not a lock you hold").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use notify::{RecursiveMode, Watcher};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{mpsc, watch};
use trellis_policy::{
    Action, CompiledPolicy, Decision, NormalizedPath, PathError, PolicyError, Reading,
};

use crate::identity_files::{may_change_content, parent_dir};
use crate::metrics::{AuthzLabel, SidecarMetrics};

/// Quiet time after the last file event before the policy is read.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// A policy that could not be loaded. `Display` starts with the file (and, for a policy
/// error, `line:column`).
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    /// A file or the directory could not be read.
    #[error("{}: cannot read the policy: {source}", path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A directory without policy files (a half-written ConfigMap must not load as
    /// "deny everything").
    #[error("{}: no policy files (*.yaml, *.yml) in this directory", dir.display())]
    NoFiles {
        /// The directory.
        dir: PathBuf,
    },
    /// The policy text was refused: `file:line:column: message`.
    #[error(transparent)]
    Invalid(#[from] PolicyError),
}

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> PolicyLoadError + '_ {
    move |source| PolicyLoadError::Read {
        path: path.to_owned(),
        source,
    }
}

/// Reads the policy sources at `path`: the file itself, or the directory's `*.yaml` and
/// `*.yml` files in name order (names starting with `.` skipped, symlinks followed), each
/// named by its path.
pub fn read_sources(path: &Path) -> Result<Vec<(String, String)>, PolicyLoadError> {
    let meta = std::fs::metadata(path).map_err(read_error(path))?;
    if !meta.is_dir() {
        let text = std::fs::read_to_string(path).map_err(read_error(path))?;
        return Ok(vec![(path.display().to_string(), text)]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_error(path))? {
        let entry = entry.map_err(read_error(path))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let full = entry.path();
        // Follows symlinks (Kubernetes: `policy.yaml -> ..data/policy.yaml`). A link that
        // dangles mid-swap is skipped; the swap's own events trigger another read.
        if std::fs::metadata(&full).is_ok_and(|m| m.is_file()) {
            files.push((name.to_owned(), full));
        }
    }
    if files.is_empty() {
        return Err(PolicyLoadError::NoFiles {
            dir: path.to_owned(),
        });
    }
    files.sort();
    files
        .into_iter()
        .map(|(_, full)| {
            let text = std::fs::read_to_string(&full).map_err(read_error(&full))?;
            Ok((full.display().to_string(), text))
        })
        .collect()
}

/// Reads and compiles the policy at `path` (what `trellis policy check DIR` and the
/// sidecar do).
pub fn compile_path(path: &Path) -> Result<CompiledPolicy, PolicyLoadError> {
    let sources = read_sources(path)?;
    Ok(trellis_policy::compile(&sources)?)
}

/// Counter handles for one rule name, created on first use (so a policy of 10,000 rules
/// does not export 30,000 zero series) and then kept: the family lookup, which takes a
/// lock, happens once per rule, decision and policy load, never again per request.
#[derive(Default)]
struct RuleCounters {
    allow: OnceLock<Counter>,
    deny: OnceLock<Counter>,
    audit_deny: OnceLock<Counter>,
}

/// A compiled policy in force, with where and when it came from.
pub struct LoadedPolicy {
    /// The matcher.
    pub compiled: CompiledPolicy,
    /// When it was installed.
    pub loaded_at: SystemTime,
    /// The files it was compiled from, in order.
    pub sources: Vec<String>,
    decisions: Family<AuthzLabel, Counter>,
    /// Keyed by rule name; the key is shared with access-log lines (no copy per request).
    counters: HashMap<Arc<str>, RuleCounters>,
    /// The policy's SHA-256, shared with access-log lines.
    hash: Arc<str>,
}

impl LoadedPolicy {
    fn new(compiled: CompiledPolicy, metrics: &SidecarMetrics) -> Self {
        let counters = compiled
            .rule_names()
            .chain(std::iter::once(trellis_policy::DEFAULT_RULE))
            .map(|rule| (Arc::from(rule), RuleCounters::default()))
            .collect();
        Self {
            hash: Arc::from(compiled.hash()),
            sources: compiled.source_names().map(str::to_owned).collect(),
            compiled,
            loaded_at: SystemTime::now(),
            decisions: metrics.authz_decisions.clone(),
            counters,
        }
    }

    fn inc(&self, decision: &'static str, rule: &str) {
        let Some(c) = self.counters.get(rule) else {
            return;
        };
        let cell = match decision {
            "allow" => &c.allow,
            "deny" => &c.deny,
            _ => &c.audit_deny,
        };
        cell.get_or_init(|| {
            self.decisions
                .get_or_create(&AuthzLabel {
                    decision,
                    rule: rule.to_owned(),
                })
                .clone()
        })
        .inc();
    }

    /// Counts a decision: the enforced one always; an audit `deny` as well.
    fn count(&self, d: &Decision<'_>) {
        self.inc(d.action.as_str(), d.rule);
        if let Some(audit) = d.audit.filter(|a| a.action == Action::Deny) {
            self.inc("audit_deny", audit.rule);
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What the inbound proxy does with one HTTP request, from
/// [`PolicyEngine::authorize_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpAuthorization<'r> {
    /// Forward it with this path: the literal path in normal form, borrowed from the
    /// request when it was already normal (then nothing needs rewriting).
    Allow(NormalizedPath<'r>),
    /// Answer `403`: denied by `rule`, under `reading` of the path.
    Deny {
        /// The deciding rule, or `default`.
        rule: String,
        /// Which reading of the path was denied.
        reading: Reading,
    },
    /// Answer `400`: the path cannot be authorized (it cannot be normalized under some
    /// reading, or it has `;` parameters under `pathParameters: reject`).
    BadPath(PathError),
}

/// What a connection was admitted for, so that a reload can be checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionScope {
    /// HTTP: requests are decided one by one; the connection is revoked once the caller is
    /// allowed nothing at all.
    Http,
    /// Raw TCP to the inbound listen `port`: decided at admission and again on every reload.
    Tcp {
        /// The inbound forward's listen port, as `l4` rules name it.
        port: u16,
    },
}

/// An admitted connection's hold on the policy: the one owner of "authorize, then watch for
/// revocation" for HTTP and TCP alike. Drop it with the connection.
pub struct ConnectionGrant {
    engine: Arc<PolicyEngine>,
    caller: Box<str>,
    scope: ConnectionScope,
    generation: watch::Receiver<u64>,
}

impl ConnectionGrant {
    /// Resolves after a reload that takes away what the connection was admitted for (never,
    /// if none does): the connection then closes (HTTP gracefully, TCP at once).
    pub async fn revoked(&mut self) {
        loop {
            if self.generation.changed().await.is_err() {
                return std::future::pending().await;
            }
            if self.engine.withdraws(&self.caller, self.scope) {
                return;
            }
        }
    }
}

/// What the access log records of one policy decision (filled only with the access log on):
/// everything `trellis policy replay` needs to decide the request again under another policy
/// and compare.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessDecision {
    /// `allow`, `deny`, or `refused` (400: the path cannot be authorized).
    pub decision: Option<&'static str>,
    /// The deciding rule, or `default` (`None`: refused, or no policy loaded).
    pub rule: Option<Arc<str>>,
    /// SHA-256 of the policy in force, as `trellis policy check` prints it (`None`: no policy).
    pub policy: Option<Arc<str>>,
}

impl AccessDecision {
    fn record(
        &mut self,
        loaded: Option<&LoadedPolicy>,
        decision: &'static str,
        rule: Option<&str>,
    ) {
        // Reference counts, not copies: the access log is on by default.
        self.decision = Some(decision);
        self.rule = rule.and_then(|rule| {
            let (name, _) = loaded?.counters.get_key_value(rule)?;
            Some(Arc::clone(name))
        });
        self.policy = loaded.map(|p| Arc::clone(&p.hash));
    }
}

/// The policy in force and how to reload it. Shared by the inbound proxy, the watcher and
/// the admin endpoint.
pub struct PolicyEngine {
    current: ArcSwapOption<LoadedPolicy>,
    path: Option<PathBuf>,
    /// The last reload error and when; admin only, never read on the request path.
    last_error: Mutex<Option<(String, SystemTime)>>,
    /// Bumped on every successful reload; open connections re-check their caller.
    generation: watch::Sender<u64>,
    metrics: Arc<SidecarMetrics>,
}

impl PolicyEngine {
    /// No policy: every authenticated peer of the trust domain is allowed.
    pub fn allow_all(metrics: Arc<SidecarMetrics>) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwapOption::empty(),
            path: None,
            last_error: Mutex::new(None),
            generation: watch::channel(0).0,
            metrics,
        })
    }

    /// Loads the policy at `path` (a file or a directory); an error refuses the start.
    pub fn load(path: &Path, metrics: Arc<SidecarMetrics>) -> Result<Arc<Self>, PolicyLoadError> {
        let compiled = compile_path(path)?;
        let engine = Arc::new(Self {
            current: ArcSwapOption::empty(),
            path: Some(path.to_owned()),
            last_error: Mutex::new(None),
            generation: watch::channel(0).0,
            metrics,
        });
        engine.install(compiled);
        Ok(engine)
    }

    /// The file or directory the policy comes from (`None`: no policy, allow all).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The policy in force, if any.
    pub fn current(&self) -> Option<Arc<LoadedPolicy>> {
        self.current.load_full()
    }

    /// The last reload error (`file:line:column: message`) and when it happened; cleared
    /// by the next successful load.
    pub fn last_error(&self) -> Option<(String, SystemTime)> {
        self.last_error.lock().map(|e| e.clone()).unwrap_or(None)
    }

    /// Installs a compiled policy: swap, metrics, and a new generation for open connections.
    pub fn install(&self, compiled: CompiledPolicy) {
        let loaded = LoadedPolicy::new(compiled, &self.metrics);
        self.metrics
            .policy_loaded
            .set(i64::try_from(unix(loaded.loaded_at)).unwrap_or(i64::MAX));
        self.metrics
            .policy_rules
            .set(i64::try_from(loaded.compiled.rule_count()).unwrap_or(i64::MAX));
        self.current.store(Some(Arc::new(loaded)));
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Re-reads the policy. `Ok(true)`: a new policy is in force; `Ok(false)`: same content
    /// (or no policy configured); `Err`: refused, logged, counted and recorded, the last
    /// good policy stays in force.
    pub fn reload(&self) -> Result<bool, PolicyLoadError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        match compile_path(path) {
            Ok(compiled) => {
                let same = self
                    .current
                    .load()
                    .as_ref()
                    .is_some_and(|cur| cur.compiled.hash() == compiled.hash());
                if same {
                    if let Ok(mut e) = self.last_error.lock() {
                        *e = None;
                    }
                    return Ok(false);
                }
                let (hash, rules) = (compiled.hash().to_owned(), compiled.rule_count());
                self.install(compiled);
                tracing::info!(policy = %path.display(), %hash, rules, "policy reloaded");
                Ok(true)
            }
            Err(e) => {
                // Recorded before it is counted: whoever sees the count sees the error.
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some((e.to_string(), SystemTime::now()));
                }
                self.metrics.policy_reload_errors.inc();
                tracing::warn!(policy = %path.display(), error = %e, "policy refused; keeping the last good policy");
                Err(e)
            }
        }
    }

    /// Decides an HTTP request from its **raw** path (the request-target's path, query
    /// split off) with [`CompiledPolicy::decide_request`]: normalization, the `;`
    /// parameter readings and case folding the policy asks for, then the decision. Counts
    /// the decision, logs a denial (info) and an audit-mode "would deny" / "would allow",
    /// with the reading that decided. Without a policy loaded, only normalizes.
    pub fn authorize_request<'r>(
        &self,
        caller: &str,
        method: &str,
        raw_path: &'r str,
    ) -> HttpAuthorization<'r> {
        self.authorize_request_logged(caller, method, raw_path, None)
    }

    /// [`authorize_request`](Self::authorize_request), also filling `log` (when given) with
    /// the decision, the deciding rule and the policy hash for the access log.
    pub fn authorize_request_logged<'r>(
        &self,
        caller: &str,
        method: &str,
        raw_path: &'r str,
        log: Option<&mut AccessDecision>,
    ) -> HttpAuthorization<'r> {
        let guard = self.current.load();
        let loaded = guard.as_deref();
        let outcome = |log: Option<&mut AccessDecision>, decision, rule: Option<&str>| {
            if let Some(log) = log {
                log.record(loaded, decision, rule);
            }
        };
        let Some(loaded) = loaded else {
            return match trellis_policy::normalize_path(raw_path) {
                Ok(path) => {
                    outcome(log, "allow", None);
                    HttpAuthorization::Allow(path)
                }
                Err(e) => {
                    outcome(log, "refused", None);
                    HttpAuthorization::BadPath(e)
                }
            };
        };
        let r = match loaded.compiled.decide_request(caller, method, raw_path) {
            Ok(r) => r,
            Err(e) => {
                outcome(log, "refused", None);
                return HttpAuthorization::BadPath(e);
            }
        };
        let (d, path, reading) = (r.decision, &r.path, r.reading.as_str());
        outcome(log, d.action.as_str(), Some(d.rule));
        loaded.count(&d);
        if let Some(audit) = d.audit {
            tracing::info!(%caller, %method, %path, reading, rule = audit.rule, enforced = d.rule, "audit: would {}", audit.action);
        }
        match d.action {
            Action::Allow => HttpAuthorization::Allow(r.path),
            Action::Deny => {
                tracing::info!(%caller, %method, %path, reading, rule = d.rule, "request denied by policy");
                HttpAuthorization::Deny {
                    rule: d.rule.to_owned(),
                    reading: r.reading,
                }
            }
        }
    }

    /// Decides a raw TCP connection to the inbound listen `port`: `true` to let it through.
    /// Counted and logged like HTTP.
    pub fn authorize_l4(&self, caller: &str, port: u16) -> bool {
        self.authorize_l4_logged(caller, port, None)
    }

    /// [`authorize_l4`](Self::authorize_l4), also filling `log` (when given) for the
    /// access log.
    pub fn authorize_l4_logged(
        &self,
        caller: &str,
        port: u16,
        log: Option<&mut AccessDecision>,
    ) -> bool {
        let guard = self.current.load();
        let Some(loaded) = guard.as_ref() else {
            if let Some(log) = log {
                log.record(None, "allow", None);
            }
            return true;
        };
        let d = loaded.compiled.decide_l4(caller, port);
        if let Some(log) = log {
            log.record(Some(loaded), d.action.as_str(), Some(d.rule));
        }
        loaded.count(&d);
        if let Some(audit) = d.audit {
            tracing::info!(%caller, port, rule = audit.rule, enforced = d.rule, "audit: would {} TCP connection", audit.action);
        }
        if d.action == Action::Deny {
            tracing::info!(%caller, port, rule = d.rule, "TCP connection denied by policy");
        }
        d.is_allowed()
    }

    /// True when the policy in force allows `caller` nothing at all.
    pub fn denies_everything_from(&self, caller: &str) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|p| p.compiled.denies_everything_from(caller))
    }

    /// Admits a connection from `caller`: raw TCP is decided now (counted and logged like a
    /// request), HTTP always (each request is decided on its own). `None`: refuse it.
    ///
    /// The grant is subscribed to reloads before the decision, so a reload that lands between
    /// the decision and the connection's first wait is not missed.
    pub fn admit(
        self: &Arc<Self>,
        caller: &str,
        scope: ConnectionScope,
    ) -> Option<ConnectionGrant> {
        self.admit_logged(caller, scope, None)
    }

    /// [`PolicyEngine::admit`], filling `log` with the decision for the access log.
    pub fn admit_logged(
        self: &Arc<Self>,
        caller: &str,
        scope: ConnectionScope,
        log: Option<&mut AccessDecision>,
    ) -> Option<ConnectionGrant> {
        let generation = self.generation.subscribe();
        if let ConnectionScope::Tcp { port } = scope {
            if !self.authorize_l4_logged(caller, port, log) {
                return None;
            }
        }
        Some(ConnectionGrant {
            engine: Arc::clone(self),
            caller: caller.into(),
            scope,
            generation,
        })
    }

    /// True when the policy in force takes away what `scope` admitted `caller` for.
    fn withdraws(&self, caller: &str, scope: ConnectionScope) -> bool {
        let current = self.current.load();
        let Some(loaded) = current.as_ref() else {
            return false;
        };
        match scope {
            ConnectionScope::Http => loaded.compiled.denies_everything_from(caller),
            ConnectionScope::Tcp { port } => !loaded.compiled.decide_l4(caller, port).is_allowed(),
        }
    }

    /// `/policy`: what is loaded and the last reload error.
    pub fn status_json(&self) -> serde_json::Value {
        let current = self.current();
        let last_error = self.last_error();
        serde_json::json!({
            "loaded": current.is_some(),
            "path": self.path.as_ref().map(|p| p.display().to_string()),
            "sources": current.as_ref().map_or_else(Vec::new, |p| p.sources.clone()),
            "hash": current.as_ref().map(|p| p.compiled.hash().to_owned()),
            "loaded_at": current.as_ref().map(|p| unix(p.loaded_at)),
            "rules": current.as_ref().map_or(0, |p| p.compiled.rule_count()),
            "path_parameters": current.as_ref().map(|p| p.compiled.path_parameters().as_str()),
            "case_insensitive_paths": current.as_ref().map(|p| p.compiled.case_insensitive_paths()),
            "last_error": last_error.as_ref().map(|(e, _)| e.clone()),
            "last_error_at": last_error.as_ref().map(|(_, t)| unix(*t)),
        })
    }
}

/// Watches the policy's directory (the file's parent, or the directory itself) and reloads
/// on change: in-place writes, rename-over and Kubernetes' `..data` symlink swap all show up
/// as events in that directory (the same approach as
/// [`identity_files::watch`](crate::identity_files::watch)).
pub struct PolicyWatcher {
    engine: Arc<PolicyEngine>,
}

impl PolicyWatcher {
    /// A watcher for `engine`'s policy path.
    pub fn new(engine: Arc<PolicyEngine>) -> Self {
        Self { engine }
    }

    /// Runs until `shutdown` turns true. Does nothing without a policy path.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let Some(path) = self.engine.path().map(Path::to_owned) else {
            return;
        };
        let dir = if path.is_dir() {
            path.clone()
        } else {
            parent_dir(&path)
        };
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let mut watcher = match notify::recommended_watcher(
            move |event: notify::Result<notify::Event>| match event {
                Ok(event) if may_change_content(&event.kind) => {
                    let _ = tx.try_send(());
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "policy watch error"),
            },
        ) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the policy; changes will not be picked up");
                return;
            }
        };
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::error!(dir = %dir.display(), error = %e, "cannot watch the policy directory; changes will not be picked up");
            return;
        }
        tracing::info!(dir = %dir.display(), "watching the policy");
        let stopped = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        let mut stopped = std::pin::pin!(stopped);
        // A change between the first load and the watch being set up would otherwise go
        // unseen.
        let _ = self.reload().await;
        loop {
            tokio::select! {
                event = rx.recv() => if event.is_none() { return },
                () = &mut stopped => return,
            }
            loop {
                tokio::select! {
                    event = rx.recv() => if event.is_none() { return },
                    () = tokio::time::sleep(DEBOUNCE) => break,
                    () = &mut stopped => return,
                }
            }
            let _ = self.reload().await;
        }
    }

    async fn reload(&self) -> Result<bool, PolicyLoadError> {
        let engine = Arc::clone(&self.engine);
        match tokio::task::spawn_blocking(move || engine.reload()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "policy reload task failed");
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: trellis.io/v1
kind: Policy
defaultAction: deny
rules:
  - name: lb-health
    action: allow
    from: [spiffe://example.org/ns/prod/sa/service-a]
    to:
      - methods: [GET]
        paths: [/load-balancer/health]
";
    const A: &str = "spiffe://example.org/ns/prod/sa/service-a";

    /// `None`: allowed; `Some(rule)`: denied by `rule`.
    fn denied_by(e: &PolicyEngine, method: &str, raw: &str) -> Option<String> {
        match e.authorize_request(A, method, raw) {
            HttpAuthorization::Allow(_) => None,
            HttpAuthorization::Deny { rule, .. } => Some(rule),
            HttpAuthorization::BadPath(err) => panic!("{raw}: refused: {err}"),
        }
    }

    #[test]
    fn no_policy_allows_everything_and_counts_nothing() {
        let m = Arc::new(SidecarMetrics::new());
        let e = PolicyEngine::allow_all(m.clone());
        assert_eq!(denied_by(&e, "DELETE", "/admin"), None);
        assert!(e.authorize_l4(A, 5432));
        assert!(!e.denies_everything_from("spiffe://example.org/x"));
        assert!(!m.encode().contains("trellis_authz_decisions_total{"));
        assert_eq!(e.status_json()["loaded"], false);
    }

    #[test]
    fn decides_counts_and_reloads_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, POLICY).unwrap();
        let m = Arc::new(SidecarMetrics::new());
        let e = PolicyEngine::load(&file, m.clone()).unwrap();
        assert_eq!(denied_by(&e, "GET", "/load-balancer/health"), None);
        assert_eq!(denied_by(&e, "GET", "/admin").as_deref(), Some("default"));
        let text = m.encode();
        assert!(
            text.contains("trellis_authz_decisions_total{decision=\"allow\",rule=\"lb-health\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("trellis_authz_decisions_total{decision=\"deny\",rule=\"default\"} 1"),
            "{text}"
        );
        assert!(text.contains("trellis_policy_rules 1"), "{text}");
        // Only series that were used are exported.
        assert!(!text.contains("decision=\"audit_deny\""), "{text}");
        assert!(e.denies_everything_from("spiffe://example.org/other"));
        assert!(!e.denies_everything_from(A));

        // Same content: nothing to do. Broken content: refused, recorded, counted.
        assert!(!e.reload().unwrap());
        std::fs::write(
            &file,
            "apiVersion: trellis.io/v1\nkind: Policy\nrules:\n  - name: x\n    acton: allow\n",
        )
        .unwrap();
        let err = e.reload().unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:5:", file.display())), "{err}");
        assert_eq!(denied_by(&e, "GET", "/load-balancer/health"), None);
        let status = e.status_json();
        assert_eq!(status["last_error"], err.as_str());
        assert_eq!(status["rules"], 1);
        assert!(m.encode().contains("trellis_policy_reload_errors_total 1"));

        std::fs::write(&file, POLICY.replace("GET]", "POST]")).unwrap();
        assert!(e.reload().unwrap());
        assert!(e.status_json()["last_error"].is_null());
        assert_eq!(
            denied_by(&e, "GET", "/load-balancer/health").as_deref(),
            Some("default")
        );
    }

    #[test]
    fn audit_denials_are_logged_and_counted_but_not_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        let audit = format!(
            "{POLICY}  - name: new-deny
    action: deny
    mode: audit
    from: [\"*\"]
"
        );
        std::fs::write(&file, audit).unwrap();
        let m = Arc::new(SidecarMetrics::new());
        let e = PolicyEngine::load(&file, m.clone()).unwrap();
        assert_eq!(denied_by(&e, "GET", "/load-balancer/health"), None);
        let text = m.encode();
        for line in [
            "trellis_authz_decisions_total{decision=\"allow\",rule=\"lb-health\"} 1",
            "trellis_authz_decisions_total{decision=\"audit_deny\",rule=\"new-deny\"} 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
    }

    #[test]
    fn raw_paths_are_read_both_ways_and_case_insensitively() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        std::fs::write(
            &file,
            "apiVersion: trellis.io/v1
kind: Policy
defaultAction: deny
caseInsensitivePaths: true
rules:
  - name: public
    action: allow
    from: [\"*\"]
    to: [{paths: [/public/**]}]
  - name: no-admin
    action: deny
    from: [\"*\"]
    to: [{paths: [/admin/**]}]
",
        )
        .unwrap();
        let m = Arc::new(SidecarMetrics::new());
        let e = PolicyEngine::load(&file, m.clone()).unwrap();
        let deny = |rule: &str, reading| HttpAuthorization::Deny {
            rule: rule.to_owned(),
            reading,
        };
        // Both readings are denied (the literal one by default): the literal one decides.
        assert_eq!(
            e.authorize_request(A, "GET", "/admin;x/user-export"),
            deny("default", Reading::Literal)
        );
        // Allowed as sent (under /public), denied once `..;` is read as `..`.
        assert_eq!(
            e.authorize_request(A, "GET", "/public/..;/admin"),
            deny("no-admin", Reading::WithoutParameters)
        );
        assert_eq!(
            e.authorize_request(A, "GET", "/ADMIN/user-export"),
            deny("no-admin", Reading::Literal)
        );
        // Allowed both ways: forwarded as sent, without a copy.
        match e.authorize_request(A, "GET", "/Public/page;jsessionid=1") {
            HttpAuthorization::Allow(p) => {
                assert_eq!(p.as_str(), "/Public/page;jsessionid=1");
                assert!(p.is_borrowed());
            }
            other => panic!("{other:?}"),
        }
        match e.authorize_request(A, "GET", "/public/./a") {
            HttpAuthorization::Allow(p) => assert_eq!(p.as_str(), "/public/a"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            e.authorize_request(A, "GET", "/..;/admin"),
            HttpAuthorization::BadPath(PathError::AboveRoot)
        );
        let text = m.encode();
        assert!(
            text.contains("trellis_authz_decisions_total{decision=\"deny\",rule=\"no-admin\"} 2"),
            "{text}"
        );
        let status = e.status_json();
        assert_eq!(status["path_parameters"], "strictest");
        assert_eq!(status["case_insensitive_paths"], true);

        std::fs::write(
            &file,
            "apiVersion: trellis.io/v1\nkind: Policy\npathParameters: reject\ndefaultAction: allow\n",
        )
        .unwrap();
        assert!(e.reload().unwrap());
        assert_eq!(
            e.authorize_request(A, "GET", "/public/page;jsessionid=1"),
            HttpAuthorization::BadPath(PathError::PathParameters)
        );
        assert_eq!(e.status_json()["path_parameters"], "reject");
    }

    #[test]
    fn without_a_policy_paths_are_only_normalized() {
        let e = PolicyEngine::allow_all(Arc::new(SidecarMetrics::new()));
        assert_eq!(
            e.authorize_request(A, "GET", "/admin;x/../y"),
            HttpAuthorization::Allow(trellis_policy::normalize_path("/y").unwrap())
        );
        assert_eq!(
            e.authorize_request(A, "GET", "/a%2Fb"),
            HttpAuthorization::BadPath(PathError::EncodedSlash)
        );
    }

    #[test]
    fn a_directory_merges_yaml_files_in_name_order_and_skips_dotfiles() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("b.yml"),
            POLICY.replace("lb-health", "second"),
        )
        .unwrap();
        std::fs::write(dir.path().join("a.yaml"), POLICY).unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "not: a policy").unwrap();
        std::fs::write(dir.path().join("README.md"), "# not a policy").unwrap();
        let sources = read_sources(dir.path()).unwrap();
        let names: Vec<_> = sources.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(
            names,
            [
                dir.path().join("a.yaml").display().to_string(),
                dir.path().join("b.yml").display().to_string()
            ]
        );
        let empty = tempfile::tempdir().unwrap();
        let err = compile_path(empty.path()).unwrap_err();
        assert!(matches!(err, PolicyLoadError::NoFiles { .. }), "{err}");
    }
}
