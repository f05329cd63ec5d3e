//! `outbound.default_route`: convention routes for hosts that match no listed upstream.
//!
//! ```yaml
//! outbound:
//!   default_route:
//!     hosts: ["{service}.{namespace}.svc.cluster.local", "{service}.{namespace}.svc", "{service}.{namespace}"]
//!     address: "{service}.{namespace}.svc.cluster.local:15443"
//!     identity: "spiffe://{trust_domain}/ns/{namespace}/sa/{service}"
//!     max_peers: 1024    # peers kept at once (pooled connection each); least recently used goes
//! ```
//!
//! A host template is a dot-separated list of labels, each either literal text or exactly one
//! of `{service}` and `{namespace}`; `{service}` is required. A placeholder matches one DNS
//! label (RFC 1123: `a-z`, `0-9`, `-`, at most 63 bytes), so `{service}.{namespace}` matches
//! `billing.prod` but not `billing.prod.example.com`. The address and identity templates are
//! free text with `{service}`, `{namespace}` and `{trust_domain}`; each of `{service}` and
//! `{namespace}` they use must be bound by every host template. Templates are checked while
//! the file is parsed, so a mistake is reported with the file's name and line.

use serde::Deserialize;
use std::fmt;

/// A placeholder of a route template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// `{service}`: the Kubernetes Service name (one DNS label).
    Service,
    /// `{namespace}`: the Kubernetes namespace (one DNS label).
    Namespace,
    /// `{trust_domain}`: this sidecar's trust domain.
    TrustDomain,
}

impl Placeholder {
    /// The spelling in templates.
    pub fn as_str(self) -> &'static str {
        match self {
            Placeholder::Service => "{service}",
            Placeholder::Namespace => "{namespace}",
            Placeholder::TrustDomain => "{trust_domain}",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "service" => Some(Placeholder::Service),
            "namespace" => Some(Placeholder::Namespace),
            "trust_domain" => Some(Placeholder::TrustDomain),
            _ => None,
        }
    }
}

fn allowed_list(allowed: &[Placeholder]) -> String {
    allowed
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One piece of an address or identity template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(Box<str>),
    Var(Placeholder),
}

/// Splits `text` into literal text and placeholders, refusing any placeholder not in `allowed`
/// and any unbalanced brace.
fn pieces(text: &str, allowed: &[Placeholder]) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        match (rest.find('{'), rest.find('}')) {
            (None, None) => {
                out.push(Piece::Text(rest.into()));
                break;
            }
            (Some(open), Some(close)) if open < close => {
                if open > 0 {
                    out.push(Piece::Text(rest[..open].into()));
                }
                let name = &rest[open + 1..close];
                let p = Placeholder::parse(name)
                    .filter(|p| allowed.contains(p))
                    .ok_or_else(|| {
                        format!(
                            "`{text}`: unknown placeholder `{{{name}}}` (allowed here: {})",
                            allowed_list(allowed)
                        )
                    })?;
                out.push(Piece::Var(p));
                rest = &rest[close + 1..];
            }
            (Some(_), None) => return Err(format!("`{text}`: `{{` without `}}`")),
            // A `}` with no `{` before it.
            (_, Some(_)) => return Err(format!("`{text}`: `}}` without `{{`")),
        }
    }
    Ok(out)
}

/// The values a matched host binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound<'h> {
    /// `{service}`.
    pub service: &'h str,
    /// `{namespace}`, when the matching template has one.
    pub namespace: Option<&'h str>,
}

/// One label of a host template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Label {
    Text(Box<str>),
    Service,
    Namespace,
}

/// A host template such as `{service}.{namespace}.svc.cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HostTemplate {
    text: Box<str>,
    labels: Box<[Label]>,
}

/// RFC 1123 label: what a placeholder may bind (Kubernetes Service and namespace names are
/// such labels, lowercase).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl TryFrom<String> for HostTemplate {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        let mut labels = Vec::new();
        let (mut service, mut namespace) = (0, 0);
        for label in lower.split('.') {
            if label.is_empty() {
                return Err(format!("host template `{text}` has an empty label"));
            }
            if !label.contains(['{', '}']) {
                labels.push(Label::Text(label.into()));
                continue;
            }
            let parsed = pieces(label, &[Placeholder::Service, Placeholder::Namespace])
                .map_err(|e| format!("host template {e}"))?;
            match parsed.as_slice() {
                [Piece::Var(Placeholder::Service)] => {
                    service += 1;
                    labels.push(Label::Service);
                }
                [Piece::Var(Placeholder::Namespace)] => {
                    namespace += 1;
                    labels.push(Label::Namespace);
                }
                _ => {
                    return Err(format!(
                        "host template `{text}`: a placeholder must be a whole label \
                         (`{label}` mixes it with text)"
                    ))
                }
            }
        }
        if service != 1 {
            return Err(format!(
                "host template `{text}` must contain {{service}} exactly once \
                 (e.g. \"{{service}}.{{namespace}}.svc.cluster.local\")"
            ));
        }
        if namespace > 1 {
            return Err(format!(
                "host template `{text}` contains {{namespace}} more than once"
            ));
        }
        Ok(Self {
            text: text.into(),
            labels: labels.into(),
        })
    }
}

impl HostTemplate {
    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether it binds `{namespace}`.
    pub fn binds_namespace(&self) -> bool {
        self.labels.contains(&Label::Namespace)
    }

    /// The values `host` (lowercase, no port) binds, if it matches. Allocates nothing.
    pub fn matches<'h>(&self, host: &'h str) -> Option<Bound<'h>> {
        let host = host.strip_suffix('.').unwrap_or(host);
        let mut service = None;
        let mut namespace = None;
        let mut parts = host.split('.');
        for label in self.labels.iter() {
            let part = parts.next()?;
            match label {
                Label::Text(t) => {
                    if **t != *part {
                        return None;
                    }
                }
                Label::Service | Label::Namespace if !is_dns_label(part) => return None,
                Label::Service => service = Some(part),
                Label::Namespace => namespace = Some(part),
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some(Bound {
            service: service?,
            namespace,
        })
    }
}

impl fmt::Display for HostTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// An address or identity template: text with `{service}`, `{namespace}`, `{trust_domain}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: Box<str>,
    pieces: Box<[Piece]>,
}

impl Template {
    fn parse(text: &str) -> Result<Self, String> {
        let pieces = pieces(
            text,
            &[
                Placeholder::Service,
                Placeholder::Namespace,
                Placeholder::TrustDomain,
            ],
        )?;
        Ok(Self {
            text: text.into(),
            pieces: pieces.into(),
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `p` appears in it.
    pub fn uses(&self, p: Placeholder) -> bool {
        self.pieces.contains(&Piece::Var(p))
    }

    /// The text with the placeholders filled in (`{namespace}` unbound: empty; validation
    /// makes sure that cannot happen).
    pub fn expand(&self, bound: Bound<'_>, trust_domain: &str) -> String {
        let mut out = String::with_capacity(self.text.len() + 32);
        for piece in self.pieces.iter() {
            out.push_str(match piece {
                Piece::Text(t) => t,
                Piece::Var(Placeholder::Service) => bound.service,
                Piece::Var(Placeholder::Namespace) => bound.namespace.unwrap_or_default(),
                Piece::Var(Placeholder::TrustDomain) => trust_domain,
            });
        }
        out
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `outbound.default_route` in the file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultRouteRaw {
    /// Host templates, tried in order.
    pub hosts: Vec<HostTemplate>,
    /// The peer sidecar's `host:port` template.
    pub address: String,
    /// The SPIFFE ID template the peer must present.
    pub identity: String,
    /// Peers (each with its pooled connection) kept at once.
    pub max_peers: Option<usize>,
}

/// `outbound.default_route`, checked: templates parse, placeholders are known and bound.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "DefaultRouteRaw")]
pub struct DefaultRouteFile {
    /// Host templates, tried in order.
    pub hosts: Vec<HostTemplate>,
    /// The peer's `host:port`.
    pub address: Template,
    /// The SPIFFE ID the peer must present.
    pub identity: Template,
    /// Peers kept at once.
    pub max_peers: Option<usize>,
}

impl TryFrom<DefaultRouteRaw> for DefaultRouteFile {
    type Error = String;

    fn try_from(raw: DefaultRouteRaw) -> Result<Self, String> {
        if raw.hosts.is_empty() {
            return Err(
                "default_route.hosts is empty: give at least one host template, \
                 e.g. \"{service}.{namespace}.svc.cluster.local\""
                    .into(),
            );
        }
        let address =
            Template::parse(&raw.address).map_err(|e| format!("default_route.address {e}"))?;
        let identity =
            Template::parse(&raw.identity).map_err(|e| format!("default_route.identity {e}"))?;
        check_address(&raw.address)?;
        if !raw.identity.starts_with("spiffe://") {
            return Err(format!(
                "default_route.identity `{}` must be a SPIFFE ID template \
                 (e.g. \"spiffe://{{trust_domain}}/ns/{{namespace}}/sa/{{service}}\")",
                raw.identity
            ));
        }
        // `{namespace}` in the address or identity needs a value from every host that can
        // match: a host template without it would leave a hole in the peer's name.
        if address.uses(Placeholder::Namespace) || identity.uses(Placeholder::Namespace) {
            if let Some(h) = raw.hosts.iter().find(|h| !h.binds_namespace()) {
                return Err(format!(
                    "default_route: address or identity uses {{namespace}} but host template \
                     `{h}` binds none; add {{namespace}} to it or remove it"
                ));
            }
        }
        Ok(Self {
            hosts: raw.hosts,
            address,
            identity,
            max_peers: raw.max_peers,
        })
    }
}

/// The address template must end in a literal `:port`: the app's port is for the app side
/// (its `Host`), never the peer's.
fn check_address(address: &str) -> Result<(), String> {
    let port_ok = address
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && !host.ends_with(':'))
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .is_some_and(|p| p != 0);
    if port_ok {
        Ok(())
    } else {
        Err(format!(
            "default_route.address `{address}` must be host:port with a literal port \
             (e.g. \"{{service}}.{{namespace}}.svc.cluster.local:15443\")"
        ))
    }
}

impl DefaultRouteFile {
    /// Parses the one-line form `hosts=a;b,address=…,identity=…[,max_peers=N]` (the sidecar's
    /// `--default-route` and `TRELLIS_DEFAULT_ROUTE`, the injector's `trellis.io/default-route`),
    /// with the same checks as the file's `outbound.default_route`.
    pub fn parse_spec(spec: &str) -> Result<Self, String> {
        let mut raw = DefaultRouteRaw {
            hosts: Vec::new(),
            address: String::new(),
            identity: String::new(),
            max_peers: None,
        };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not key=value"))?;
            match k {
                "hosts" => {
                    for h in v.split(';').filter(|h| !h.is_empty()) {
                        raw.hosts.push(HostTemplate::try_from(h.to_owned())?);
                    }
                }
                "address" => raw.address = v.to_owned(),
                "identity" => raw.identity = v.to_owned(),
                "max_peers" => {
                    raw.max_peers = Some(
                        v.parse()
                            .map_err(|_| format!("max_peers `{v}` is not a number"))?,
                    )
                }
                _ => {
                    return Err(format!(
                        "unknown key `{k}` (hosts, address, identity, max_peers)"
                    ))
                }
            }
        }
        for (field, value) in [("address", &raw.address), ("identity", &raw.identity)] {
            if value.is_empty() {
                return Err(format!("`{field}=` is required"));
            }
        }
        Self::try_from(raw)
    }

    /// The first host template `host` (lowercase, no port) matches, and what it binds.
    pub fn matches<'h>(&self, host: &'h str) -> Option<Bound<'h>> {
        self.hosts.iter().find_map(|t| t.matches(host))
    }

    /// `a, b, c`: the host templates, for `404` bodies.
    pub fn hosts_list(&self) -> String {
        self.hosts
            .iter()
            .map(HostTemplate::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn host(t: &str) -> HostTemplate {
        HostTemplate::try_from(t.to_owned()).unwrap()
    }

    fn route(hosts: &[&str], address: &str, identity: &str) -> Result<DefaultRouteFile, String> {
        DefaultRouteFile::try_from(DefaultRouteRaw {
            hosts: hosts
                .iter()
                .map(|h| HostTemplate::try_from((*h).to_owned()))
                .collect::<Result<_, _>>()?,
            address: address.into(),
            identity: identity.into(),
            max_peers: None,
        })
    }

    fn issue_route() -> DefaultRouteFile {
        route(
            &[
                "{service}.{namespace}.svc.cluster.local",
                "{service}.{namespace}.svc",
                "{service}.{namespace}",
            ],
            "{service}.{namespace}.svc.cluster.local:15443",
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service}",
        )
        .unwrap()
    }

    #[test]
    fn matches_each_kubernetes_spelling() {
        let r = issue_route();
        let want = Some(Bound {
            service: "service-b",
            namespace: Some("shop"),
        });
        for h in [
            "service-b.shop.svc.cluster.local",
            "service-b.shop.svc.cluster.local.",
            "service-b.shop.svc",
            "service-b.shop",
        ] {
            assert_eq!(r.matches(h), want, "{h}");
        }
    }

    #[test]
    fn does_not_match_other_shapes() {
        let r = issue_route();
        for h in [
            "service-b",
            "service-b.shop.svc.cluster",
            "service-b.shop.svc.cluster.local.evil",
            "a.b.c.d",
            ".shop",
            "service-b..svc",
            "-b.shop",
            "b_c.shop",
            "",
        ] {
            assert_eq!(r.matches(h), None, "{h}");
        }
        let long = format!("{}.shop", "a".repeat(64));
        assert_eq!(r.matches(&long), None);
    }

    #[test]
    fn literal_labels_compare_exactly_and_templates_are_lowercased() {
        let t = host("{service}.PROD.Internal");
        assert_eq!(
            t.matches("billing.prod.internal").unwrap().service,
            "billing"
        );
        assert_eq!(t.matches("billing.prod.internal").unwrap().namespace, None);
        assert!(t.matches("billing.staging.internal").is_none());
    }

    #[test]
    fn expands_address_and_identity() {
        let r = issue_route();
        let b = r.matches("service-b.shop").unwrap();
        assert_eq!(
            r.address.expand(b, "example.org"),
            "service-b.shop.svc.cluster.local:15443"
        );
        assert_eq!(
            r.identity.expand(b, "example.org"),
            "spiffe://example.org/ns/shop/sa/service-b"
        );
    }

    #[test]
    fn refuses_host_template_without_service() {
        let e = HostTemplate::try_from("{namespace}.svc".to_owned()).unwrap_err();
        assert!(e.contains("{service} exactly once"), "{e}");
        let e = HostTemplate::try_from("{service}.{service}".to_owned()).unwrap_err();
        assert!(e.contains("{service} exactly once"), "{e}");
    }

    #[test]
    fn refuses_unknown_placeholder_naming_the_allowed_ones() {
        let e = HostTemplate::try_from("{svc}.{namespace}".to_owned()).unwrap_err();
        assert!(
            e.contains("unknown placeholder `{svc}`") && e.contains("{service}, {namespace}"),
            "{e}"
        );
        let e = route(
            &["{service}.{namespace}"],
            "{service}:15443",
            "spiffe://{td}/x",
        )
        .unwrap_err();
        assert!(
            e.contains("default_route.identity")
                && e.contains("`{td}`")
                && e.contains("{trust_domain}"),
            "{e}"
        );
        let e = HostTemplate::try_from("{trust_domain}.{service}".to_owned()).unwrap_err();
        assert!(e.contains("unknown placeholder"), "{e}");
    }

    #[test]
    fn refuses_placeholder_inside_a_label_and_bad_braces() {
        let e = HostTemplate::try_from("{service}-x.{namespace}".to_owned()).unwrap_err();
        assert!(e.contains("whole label"), "{e}");
        for bad in ["{service.ns", "service}.ns", "{service}..ns"] {
            assert!(HostTemplate::try_from(bad.to_owned()).is_err(), "{bad}");
        }
        assert!(route(&["{service}"], "{service:15443", "spiffe://x/y").is_err());
    }

    #[test]
    fn refuses_namespace_unbound_by_a_host_template() {
        let e = route(
            &["{service}.{namespace}", "{service}"],
            "{service}.{namespace}:15443",
            "spiffe://{trust_domain}/{service}",
        )
        .unwrap_err();
        assert!(e.contains("`{service}` binds none"), "{e}");
        // Without {namespace} on the peer side, a bare service name is fine.
        route(
            &["{service}"],
            "{service}.mesh.internal:15443",
            "spiffe://{trust_domain}/svc/{service}",
        )
        .unwrap();
    }

    #[test]
    fn refuses_address_without_literal_port() {
        for bad in [
            "{service}.{namespace}",
            "{service}.{namespace}:{service}",
            "{service}:0",
            ":15443",
        ] {
            let e = route(&["{service}.{namespace}"], bad, "spiffe://x/{service}").unwrap_err();
            assert!(e.contains("literal port"), "{bad}: {e}");
        }
    }

    #[test]
    fn refuses_identity_that_is_not_spiffe() {
        let e = route(&["{service}.{namespace}"], "{service}:15443", "{service}").unwrap_err();
        assert!(e.contains("SPIFFE ID template"), "{e}");
    }
}
