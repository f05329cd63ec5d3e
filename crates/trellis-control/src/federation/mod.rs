//! SPIFFE federation (SPIFFE Trust Domain and Bundle): the bundle endpoint that publishes our
//! bundle, and one relationship per foreign trust domain whose bundle we fetch, check, keep,
//! store in the registry and push to sidecars next to our own.
//!
//! The relationships are the `federation:` list of the control plane's config file. The file
//! is polled (every [`RELOAD_POLL`]) and a changed, valid list takes effect without a restart;
//! an invalid one is logged with its file and line and the list in force stays.
//!
//! Every fetched bundle goes parse → check → swap: a document that does not parse, whose CAs
//! name another trust domain, or whose `spiffe_sequence` is lower than the one in force is
//! refused, counted (`trellis_federation_refresh_failures_total{trust_domain,reason}`) and
//! logged, and the last good bundle stays in force.

pub mod document;
pub mod endpoint;
pub mod fetch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use trellis_identity::{SpiffeId, TrustBundle, TrustDomain};
use trellis_serve::config::ConfigError;
use trellis_serve::time::unix_seconds;

use crate::metrics::ControlMetrics;
use crate::registry::Registry;
use fetch::{parse_endpoint_url, EndpointUrl, Profile};

/// How often the config file is looked at for a changed `federation:` list.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);
/// `spiffe_refresh_hint` we publish unless `bundle_refresh_hint` says otherwise.
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);
/// Refresh interval when the foreign endpoint gives no hint.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// One `federation:` entry as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelationshipFile {
    /// `trust_domain: b.org`
    pub trust_domain: String,
    /// `bundle_endpoint_url: https://cp.b.org:8443`
    pub bundle_endpoint_url: String,
    /// `profile: https_spiffe` or `https_web`.
    pub profile: ProfileName,
    /// `endpoint_spiffe_id: spiffe://b.org/trellis/control` (https_spiffe).
    #[serde(default)]
    pub endpoint_spiffe_id: Option<String>,
    /// `bootstrap_bundle: /etc/trellis/b.org-bundle.pem` (https_spiffe).
    #[serde(default)]
    pub bootstrap_bundle: Option<PathBuf>,
}

/// `profile:` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileName {
    /// Authenticated with the foreign trust domain's SVID.
    HttpsSpiffe,
    /// Authenticated with a Web PKI certificate.
    HttpsWeb,
}

/// One validated federation relationship.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relationship {
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint.
    pub url: EndpointUrl,
    /// How the endpoint is authenticated.
    pub profile: Profile,
    /// The PEM bundle trusted until the first fetch (required for `https_spiffe`).
    pub bootstrap_bundle: Option<PathBuf>,
}

/// Validates the `federation:` list: each entry's fields, no duplicate trust domain, never
/// our own. Errors name `federation[i]` and what to write instead.
pub fn relationships(
    own: &TrustDomain,
    list: Vec<RelationshipFile>,
) -> Result<Vec<Relationship>, ConfigError> {
    let mut out: Vec<Relationship> = Vec::with_capacity(list.len());
    for (i, f) in list.into_iter().enumerate() {
        let field = |name: &str| format!("federation[{i}].{name}");
        let trust_domain = TrustDomain::parse(&f.trust_domain)
            .map_err(|e| ConfigError::invalid(field("trust_domain"), e.to_string()))?;
        if &trust_domain == own {
            return Err(ConfigError::invalid(
                field("trust_domain"),
                format!("`{trust_domain}` is this control plane's own trust domain: federate with other domains only"),
            ));
        }
        if out.iter().any(|r| r.trust_domain == trust_domain) {
            return Err(ConfigError::invalid(
                field("trust_domain"),
                format!("`{trust_domain}` is listed twice: one relationship per trust domain"),
            ));
        }
        let url = parse_endpoint_url(&f.bundle_endpoint_url)
            .map_err(|e| ConfigError::invalid(field("bundle_endpoint_url"), e))?;
        let profile = match f.profile {
            ProfileName::HttpsSpiffe => {
                let id = f.endpoint_spiffe_id.ok_or_else(|| {
                    ConfigError::invalid(
                        field("endpoint_spiffe_id"),
                        format!("missing: profile https_spiffe needs the endpoint's SPIFFE ID, e.g. spiffe://{trust_domain}/trellis/control"),
                    )
                })?;
                let endpoint_id = SpiffeId::parse(&id).map_err(|e| {
                    ConfigError::invalid(field("endpoint_spiffe_id"), e.to_string())
                })?;
                if !endpoint_id.is_member_of(&trust_domain) {
                    return Err(ConfigError::invalid(
                        field("endpoint_spiffe_id"),
                        format!("`{endpoint_id}` is not in trust domain `{trust_domain}`"),
                    ));
                }
                if f.bootstrap_bundle.is_none() {
                    return Err(ConfigError::invalid(
                        field("bootstrap_bundle"),
                        "missing: profile https_spiffe needs the foreign trust domain's bundle (PEM) to authenticate its endpoint the first time",
                    ));
                }
                Profile::HttpsSpiffe { endpoint_id }
            }
            ProfileName::HttpsWeb => {
                if f.endpoint_spiffe_id.is_some() {
                    return Err(ConfigError::invalid(
                        field("endpoint_spiffe_id"),
                        "only for profile https_spiffe (https_web checks the URL's host name)",
                    ));
                }
                Profile::HttpsWeb
            }
        };
        out.push(Relationship {
            trust_domain,
            url,
            profile,
            bootstrap_bundle: f.bootstrap_bundle,
        });
    }
    Ok(out)
}

/// `limits.federation` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationLimitsFile {
    /// Shortest refresh interval, whatever the hint says (default 10s); also the retry delay
    /// after a failed fetch.
    #[serde(default, with = "humantime_serde")]
    pub min_refresh: Option<Duration>,
    /// Longest refresh interval (default 1h).
    #[serde(default, with = "humantime_serde")]
    pub max_refresh: Option<Duration>,
    /// One whole fetch (default 10s).
    #[serde(default, with = "humantime_serde")]
    pub fetch_timeout: Option<Duration>,
    /// Largest bundle document read (default 1 MiB).
    pub max_bundle_bytes: Option<usize>,
}

/// Validated `limits.federation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FederationLimits {
    /// Shortest refresh interval and retry delay.
    pub min_refresh: Duration,
    /// Longest refresh interval.
    pub max_refresh: Duration,
    /// One whole fetch.
    pub fetch_timeout: Duration,
    /// Largest document.
    pub max_bundle_bytes: usize,
}

impl Default for FederationLimits {
    fn default() -> Self {
        Self {
            min_refresh: Duration::from_secs(10),
            max_refresh: Duration::from_secs(3600),
            fetch_timeout: Duration::from_secs(10),
            max_bundle_bytes: 1024 * 1024,
        }
    }
}

impl FederationLimits {
    /// Checks `limits.federation`.
    pub fn from_file(f: &FederationLimitsFile) -> Result<Self, ConfigError> {
        let d = Self::default();
        let limits = Self {
            min_refresh: f.min_refresh.unwrap_or(d.min_refresh),
            max_refresh: f.max_refresh.unwrap_or(d.max_refresh),
            fetch_timeout: f.fetch_timeout.unwrap_or(d.fetch_timeout),
            max_bundle_bytes: f.max_bundle_bytes.unwrap_or(d.max_bundle_bytes),
        };
        if limits.min_refresh < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "limits.federation.min_refresh",
                "too short: use at least 100ms",
            ));
        }
        if limits.max_refresh < limits.min_refresh {
            return Err(ConfigError::invalid(
                "limits.federation.max_refresh",
                "must be at least limits.federation.min_refresh",
            ));
        }
        if limits.max_bundle_bytes < 1024 {
            return Err(ConfigError::invalid(
                "limits.federation.max_bundle_bytes",
                "too small: use at least 1024 (a bundle document is a few KiB)",
            ));
        }
        Ok(limits)
    }

    /// When to fetch again after a good fetch: the endpoint's `spiffe_refresh_hint` (5
    /// minutes without one), kept within `min_refresh..=max_refresh`, so a foreign endpoint
    /// can neither make us poll it in a loop nor stop us refreshing (nor overflow the clock).
    pub fn refresh_after(&self, hint: Option<Duration>) -> Duration {
        hint.unwrap_or(DEFAULT_REFRESH)
            .clamp(self.min_refresh, self.max_refresh)
    }
}

/// One federated trust domain as `/bundles` and `trellis status` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DomainStatus {
    /// The foreign trust domain.
    pub trust_domain: String,
    /// Its bundle endpoint URL.
    pub bundle_endpoint_url: String,
    /// `https_spiffe` or `https_web`.
    pub profile: String,
    /// Where the bundle in force came from: `bootstrap`, `endpoint`, `registry`, or `none`.
    pub source: String,
    /// `spiffe_sequence` of the bundle in force, if known.
    pub sequence: Option<u64>,
    /// CA certificates in the bundle in force.
    pub cas: usize,
    /// Last successful fetch (RFC 3339), if any.
    pub last_refresh: Option<String>,
    /// Next fetch (RFC 3339).
    pub next_refresh: String,
    /// Why the last fetch failed, if it did (cleared by a good one).
    pub last_error: Option<String>,
    /// Failed fetches since start.
    pub failures: u64,
}

/// What `/bundles` answers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BundlesReport {
    /// Our trust domain.
    pub trust_domain: String,
    /// Our bundle's `spiffe_sequence`.
    pub sequence: u64,
    /// The bundle endpoint's address, if it is on.
    pub bundle_endpoint: Option<String>,
    /// The last `federation:` reload error, if the file in force failed to load.
    pub config_error: Option<String>,
    /// Each federated trust domain.
    pub federated: Vec<DomainStatus>,
}

struct Domain {
    rel: Relationship,
    bundle: Option<TrustBundle>,
    sequence: Option<u64>,
    source: &'static str,
    last_refresh: Option<SystemTime>,
    next_refresh: SystemTime,
    last_error: Option<String>,
    failures: u64,
}

/// The federation component: follows our own bundle, keeps each foreign one fresh, and
/// publishes the union (ours with the foreign ones attached) to every SDS stream.
pub struct Federation {
    own_td: TrustDomain,
    limits: FederationLimits,
    registry: Arc<Registry>,
    metrics: Arc<ControlMetrics>,
    own: watch::Receiver<Arc<TrustBundle>>,
    out: watch::Sender<Arc<TrustBundle>>,
    report: Arc<ArcSwap<BundlesReport>>,
    sequence: Arc<std::sync::atomic::AtomicU64>,
    config: Option<(PathBuf, Vec<u8>)>,
    config_error: Option<String>,
    domains: BTreeMap<TrustDomain, Domain>,
}

/// What [`Federation::new`] starts from.
pub struct FederationSetup {
    /// Our trust domain.
    pub own_td: TrustDomain,
    /// The relationships at start.
    pub relationships: Vec<Relationship>,
    /// `limits.federation`.
    pub limits: FederationLimits,
    /// The file whose `federation:` list is reloaded when it changes.
    pub config: Option<PathBuf>,
    /// Where fetched bundles are stored and shared.
    pub registry: Arc<Registry>,
    /// Metrics.
    pub metrics: Arc<ControlMetrics>,
    /// Our own bundle, from the CA rotator.
    pub own: watch::Receiver<Arc<TrustBundle>>,
    /// Our bundle's `spiffe_sequence`.
    pub sequence: Arc<std::sync::atomic::AtomicU64>,
}

impl Federation {
    /// Starts with the relationships (bootstrap bundles read now, newer stored ones from the
    /// registry preferred) and returns the bundle channel SDS streams follow.
    pub async fn new(setup: FederationSetup) -> (Self, watch::Receiver<Arc<TrustBundle>>) {
        let FederationSetup {
            own_td,
            relationships,
            limits,
            config,
            registry,
            metrics,
            own,
            sequence,
        } = setup;
        let initial = own.borrow().clone();
        let (out, out_rx) = watch::channel(initial);
        let config = config.map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_default();
            (p, bytes)
        });
        let mut fed = Federation {
            report: Arc::new(ArcSwap::from_pointee(BundlesReport {
                trust_domain: own_td.to_string(),
                ..Default::default()
            })),
            own_td,
            limits,
            registry,
            metrics,
            own,
            out,
            sequence,
            config,
            config_error: None,
            domains: BTreeMap::new(),
        };
        fed.configure(relationships).await;
        fed.publish();
        (fed, out_rx)
    }

    /// The `/bundles` report, kept current.
    pub fn report(&self) -> Arc<ArcSwap<BundlesReport>> {
        Arc::clone(&self.report)
    }

    /// Sets the bundle endpoint's address shown in the report.
    pub fn set_endpoint(&mut self, addr: Option<std::net::SocketAddr>) {
        let mut r = BundlesReport::clone(&self.report.load());
        r.bundle_endpoint = addr.map(|a| a.to_string());
        self.report.store(Arc::new(r));
    }

    /// Applies a (new) relationship list: unchanged ones keep their state, new ones start
    /// from the stored or bootstrap bundle and are fetched at once, removed ones are dropped.
    async fn configure(&mut self, relationships: Vec<Relationship>) {
        let now = SystemTime::now();
        let mut domains = BTreeMap::new();
        for rel in relationships {
            let td = rel.trust_domain.clone();
            if let Some(d) = self.domains.remove(&td) {
                if d.rel == rel {
                    domains.insert(td, d);
                    continue;
                }
            }
            let mut d = Domain {
                rel,
                bundle: None,
                sequence: None,
                source: "none",
                last_refresh: None,
                next_refresh: now,
                last_error: None,
                failures: 0,
            };
            if let Some(path) = &d.rel.bootstrap_bundle {
                match read_bootstrap(&td, path) {
                    Ok(b) => {
                        d.bundle = Some(b);
                        d.source = "bootstrap";
                    }
                    Err(e) => {
                        tracing::error!(trust_domain = %td, error = %e, "cannot use the bootstrap bundle");
                        d.last_error = Some(e);
                    }
                }
            }
            self.adopt_stored(&mut d).await;
            if d.last_refresh.is_none() {
                // Never fetched: age from the epoch, so TrellisFederatedBundleStale fires if
                // the first fetch never succeeds.
                self.metrics.federated_bundle(td.as_str(), 0, 0);
            }
            tracing::info!(trust_domain = %td, url = d.rel.url.as_str(), profile = d.rel.profile.as_str(), source = d.source, "federation relationship in force");
            domains.insert(td, d);
        }
        // What is left was taken out of the new list's way above: removed relationships.
        for td in self.domains.keys() {
            tracing::info!(trust_domain = %td, "federation relationship removed");
            self.metrics.forget_federated_bundle(td.as_str());
        }
        self.domains = domains;
    }

    /// Takes the registry's copy of `d`'s bundle when it is newer than the one in force
    /// (another replica fetched it, or this one before a restart).
    async fn adopt_stored(&self, d: &mut Domain) {
        let registry = Arc::clone(&self.registry);
        let td = d.rel.trust_domain.clone();
        let stored = tokio::task::spawn_blocking(move || registry.federated_bundle(&td))
            .await
            .ok()
            .and_then(|r| {
                r.map_err(|e| tracing::warn!(error = %e, "cannot read stored federated bundle"))
                    .ok()
            })
            .flatten();
        let Some(row) = stored else { return };
        // Only a newer one: a bootstrap bundle has no sequence, so any stored one is newer.
        if d.sequence.is_some_and(|s| s >= row.sequence) {
            return;
        }
        match TrustBundle::from_pem(d.rel.trust_domain.clone(), row.bundle_pem.as_bytes()) {
            Ok(b) => {
                d.bundle = Some(b);
                d.sequence = Some(row.sequence);
                d.source = "registry";
                d.last_refresh = Some(row.fetched_at);
                self.metrics.federated_bundle(
                    d.rel.trust_domain.as_str(),
                    row.sequence,
                    unix_seconds(row.fetched_at),
                );
            }
            Err(e) => {
                tracing::warn!(trust_domain = %d.rel.trust_domain, error = %e, "stored federated bundle unusable; ignored")
            }
        }
    }

    /// Publishes our bundle with every foreign one in force, if the CAs changed, and the
    /// report.
    fn publish(&mut self) {
        let own = self.own.borrow_and_update().clone();
        let combined = own
            .own()
            .with_federated(self.domains.values().filter_map(|d| d.bundle.clone()));
        if !self.out.borrow().same_cas(&combined) {
            self.out.send_replace(Arc::new(combined));
        }
        let prev = self.report.load();
        self.report.store(Arc::new(BundlesReport {
            trust_domain: self.own_td.to_string(),
            sequence: self.sequence.load(std::sync::atomic::Ordering::Acquire),
            bundle_endpoint: prev.bundle_endpoint.clone(),
            config_error: self.config_error.clone(),
            federated: self.domains.values().map(status_of).collect(),
        }));
    }

    /// Fetches one domain's bundle and applies the result.
    async fn refresh(&mut self, td: &TrustDomain) {
        let limits = self.limits;
        let Some(mut d) = self.domains.remove(td) else {
            return;
        };
        self.adopt_stored(&mut d).await;
        let result = fetch::fetch(
            td,
            &d.rel.url,
            &d.rel.profile,
            d.bundle.as_ref(),
            limits.max_bundle_bytes,
            limits.fetch_timeout,
        )
        .await
        .map_err(|e| (e.reason(), e.to_string()))
        .and_then(|doc| match (d.sequence, doc.sequence) {
            // Spec 4.2.1: the sequence only grows; a lower one is an older (or replayed)
            // bundle.
            (Some(have), Some(got)) if got < have => Err((
                "sequence_backwards",
                format!("spiffe_sequence {got} is lower than {have} in force (an older or replayed bundle)"),
            )),
            _ => Ok(doc),
        });
        let now = SystemTime::now();
        match result {
            Ok(doc) => {
                let changed = d.bundle.as_ref().map(|b| b.roots()) != Some(doc.bundle.roots());
                d.sequence = doc.sequence.or(d.sequence);
                d.next_refresh = now + limits.refresh_after(doc.refresh_hint);
                d.last_refresh = Some(now);
                d.last_error = None;
                d.source = "endpoint";
                if changed {
                    tracing::info!(trust_domain = %td, sequence = ?d.sequence, cas = doc.bundle.roots().len(), "federated bundle updated");
                }
                let pem = doc.bundle.to_pem();
                d.bundle = Some(doc.bundle);
                let seq = d.sequence.unwrap_or(0);
                self.metrics
                    .federated_bundle(td.as_str(), seq, unix_seconds(now));
                let registry = Arc::clone(&self.registry);
                let td2 = td.clone();
                let stored = tokio::task::spawn_blocking(move || {
                    registry.store_federated_bundle(&td2, seq, &pem, now)
                })
                .await;
                if let Ok(Err(e)) = stored {
                    tracing::warn!(trust_domain = %td, error = %e, "cannot store the federated bundle in the registry; in force here anyway");
                }
            }
            Err((reason, message)) => {
                d.failures += 1;
                d.last_error = Some(message.clone());
                d.next_refresh = now + limits.min_refresh;
                self.metrics.federation_refresh_failed(td.as_str(), reason);
                tracing::warn!(trust_domain = %td, url = d.rel.url.as_str(), reason, error = %message, "federated bundle refresh failed; keeping the bundle in force");
            }
        }
        self.domains.insert(td.clone(), d);
    }

    /// Re-reads the config file if it changed; a valid `federation:` list is applied.
    async fn reload(&mut self) {
        let Some((path, last)) = &self.config else {
            return;
        };
        let Ok(bytes) = std::fs::read(path) else {
            return;
        };
        if &bytes == last {
            return;
        }
        let path = path.clone();
        self.config = Some((path.clone(), bytes.clone()));
        match parse_federation(&path, &bytes).and_then(|l| relationships(&self.own_td, l)) {
            Ok(rels) => {
                tracing::info!(path = %path.display(), relationships = rels.len(), "federation: config reloaded");
                self.config_error = None;
                self.configure(rels).await;
            }
            Err(e) => {
                let e = match e {
                    ConfigError::Invalid { .. } => format!("{}: {e}", path.display()),
                    other => other.to_string(),
                };
                tracing::error!(error = %e, "federation: config reload refused; the relationships in force stay");
                self.config_error = Some(e);
            }
        }
    }

    /// Runs until `shutdown`: refreshes due bundles, follows our own bundle and the file.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut own = self.own.clone();
        let mut poll = tokio::time::interval(RELOAD_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = SystemTime::now();
            let due = self
                .domains
                .values()
                .map(|d| d.next_refresh)
                .min()
                .map_or(Duration::from_secs(3600), |t| {
                    t.duration_since(now).unwrap_or_default()
                });
            tokio::select! {
                () = tokio::time::sleep(due) => {
                    let now = SystemTime::now();
                    let due: Vec<TrustDomain> = self
                        .domains
                        .iter()
                        .filter(|(_, d)| d.next_refresh <= now)
                        .map(|(td, _)| td.clone())
                        .collect();
                    for td in due {
                        self.refresh(&td).await;
                    }
                }
                changed = own.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = poll.tick() => self.reload().await,
                _ = shutdown.changed() => return,
            }
            self.publish();
        }
    }
}

/// The `federation:` list of a config file, ignoring every other key (the rest is read only
/// at start). Syntax errors carry the file, line and column.
pub fn parse_federation(path: &Path, bytes: &[u8]) -> Result<Vec<RelationshipFile>, ConfigError> {
    #[derive(Deserialize)]
    struct Only {
        #[serde(default)]
        federation: Option<Vec<RelationshipFile>>,
    }
    let text = String::from_utf8_lossy(bytes);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let only: Only =
        serde_yaml_ng::from_str(&text).map_err(|e| ConfigError::parse(path, e.to_string(), &[]))?;
    Ok(only.federation.unwrap_or_default())
}

fn read_bootstrap(td: &TrustDomain, path: &Path) -> Result<TrustBundle, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("{}: cannot read bootstrap_bundle: {e}", path.display()))?;
    TrustBundle::from_pem(td.clone(), &pem)
        .map_err(|e| format!("{}: bootstrap_bundle for `{td}`: {e}", path.display()))
}

fn status_of(d: &Domain) -> DomainStatus {
    DomainStatus {
        trust_domain: d.rel.trust_domain.to_string(),
        bundle_endpoint_url: d.rel.url.as_str().to_owned(),
        profile: d.rel.profile.as_str().to_owned(),
        source: d.source.to_owned(),
        sequence: d.sequence,
        cas: d.bundle.as_ref().map_or(0, |b| b.roots().len()),
        last_refresh: d
            .last_refresh
            .map(|t| trellis_identity::rfc3339(trellis_identity::unix_secs(t))),
        next_refresh: trellis_identity::rfc3339(trellis_identity::unix_secs(d.next_refresh)),
        last_error: d.last_error.clone(),
        failures: d.failures,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn own() -> TrustDomain {
        TrustDomain::parse("a.org").unwrap()
    }

    fn parse(yaml: &str) -> Result<Vec<Relationship>, ConfigError> {
        relationships(
            &own(),
            parse_federation(Path::new("control.yaml"), yaml.as_bytes())?,
        )
    }

    #[test]
    fn accepts_the_issue_example() {
        let rels = parse(
            "federation:\n  - trust_domain: b.org\n    bundle_endpoint_url: https://cp.b.org:8443\n    profile: https_spiffe\n    endpoint_spiffe_id: spiffe://b.org/trellis/control\n    bootstrap_bundle: /etc/trellis/b.org-bundle.pem\n",
        )
        .unwrap();
        assert_eq!(rels.len(), 1);
        assert_eq!(rels[0].trust_domain.as_str(), "b.org");
        assert_eq!(rels[0].profile.as_str(), "https_spiffe");
    }

    #[test]
    fn unknown_profile_names_file_line_and_allowed_values() {
        let err = parse("federation:\n  - trust_domain: b.org\n    bundle_endpoint_url: https://cp.b.org\n    profile: https\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("control.yaml"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(
            err.contains("https_spiffe") && err.contains("https_web"),
            "{err}"
        );
    }

    #[test]
    fn refuses_bad_entries() {
        let base = "federation:\n  - trust_domain: b.org\n    bundle_endpoint_url: https://cp.b.org\n    profile: https_spiffe\n";
        let err = parse(base).unwrap_err().to_string();
        assert!(err.contains("federation[0].endpoint_spiffe_id"), "{err}");
        let err = parse(&format!(
            "{base}    endpoint_spiffe_id: spiffe://c.org/x\n    bootstrap_bundle: /b.pem\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("not in trust domain `b.org`"), "{err}");
        let err = parse("federation:\n  - trust_domain: a.org\n    bundle_endpoint_url: https://x\n    profile: https_web\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("own trust domain"), "{err}");
        let err = parse("federation:\n  - trust_domain: b.org\n    bundle_endpoint_url: http://x\n    profile: https_web\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("https://"), "{err}");
        let two = "federation:\n  - trust_domain: b.org\n    bundle_endpoint_url: https://x\n    profile: https_web\n  - trust_domain: b.org\n    bundle_endpoint_url: https://y\n    profile: https_web\n";
        assert!(parse(two).unwrap_err().to_string().contains("twice"));
        let err = parse("federation:\n  - trust_domain: b.org\n    bundle_endpoint_url: https://x\n    profile: https_web\n    colour: red\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour") && err.contains("line 5"), "{err}");
    }

    #[test]
    fn refresh_hint_is_kept_within_min_and_max_refresh() {
        let secs = Duration::from_secs;
        let d = FederationLimits::default();
        assert_eq!((d.min_refresh, d.max_refresh), (secs(10), secs(3600)));
        for (hint, want) in [
            (None, secs(300)),
            (Some(secs(600)), secs(600)),
            (Some(secs(10)), secs(10)),
            (Some(secs(3600)), secs(3600)),
            // An endpoint asking to be polled in a loop, or never again.
            (Some(Duration::ZERO), secs(10)),
            (Some(secs(1)), secs(10)),
            (Some(secs(3601)), secs(3600)),
            (Some(secs(u64::MAX)), secs(3600)),
        ] {
            assert_eq!(d.refresh_after(hint), want, "default limits, hint {hint:?}");
        }
        // limits.federation from the file; the 5-minute default for no hint is bounded too.
        let narrow = FederationLimits::from_file(&FederationLimitsFile {
            min_refresh: Some(secs(30)),
            max_refresh: Some(secs(60)),
            ..Default::default()
        })
        .unwrap();
        for (hint, want) in [
            (None, secs(60)),
            (Some(secs(1)), secs(30)),
            (Some(secs(45)), secs(45)),
            (Some(secs(300)), secs(60)),
        ] {
            assert_eq!(narrow.refresh_after(hint), want, "30s..60s, hint {hint:?}");
        }
        let wide = FederationLimits::from_file(&FederationLimitsFile {
            min_refresh: Some(Duration::from_millis(100)),
            max_refresh: Some(secs(86_400)),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(wide.refresh_after(Some(secs(7200))), secs(7200));
        assert_eq!(
            wide.refresh_after(Some(Duration::ZERO)),
            Duration::from_millis(100)
        );
    }
}
