//! Sidecar injection as a pure function: an `admission.k8s.io/v1` AdmissionReview in, the
//! AdmissionReview response out (with a base64 JSONPatch that adds the `trellis-sidecar`
//! container, its volumes and mounts). No I/O: [`super`] serves it over HTTPS.
//!
//! What is added, and why each annotation exists, is the contract of issue #7 (README,
//! "Automatic sidecar injection"):
//! - container `trellis-sidecar` running `trellis sidecar`, configured by `TRELLIS_*`
//!   variables, ports `trellis-mtls` 15443 and `trellis-admin` 15000, probes on the admin
//!   port, small requests and limits, and a locked-down securityContext;
//! - volume `trellis-token` (projected service-account token, audience `trellis`) mounted at
//!   `/var/run/secrets/trellis`, and with `trellis.io/policy-configmap` the volume
//!   `trellis-policy` mounted at `/etc/trellis/policy`.
//!
//! Answers, and why (the webhook runs with `failurePolicy: Fail`, which says "a pod this
//! webhook could not process must not be admitted": in a labelled namespace a pod without its
//! sidecar would serve unauthenticated):
//! - not an AdmissionReview v1 with a request uid → [`BadReview`] (the server answers HTTP
//!   400; the API server counts that as a webhook failure and `Fail` refuses the pod). Without
//!   a uid no response could be matched to the request anyway.
//! - a review of something we cannot read as a pod, or a pod whose `trellis.io/*`
//!   annotations are wrong → `allowed: false` with a status message naming the problem: the
//!   same outcome `Fail` would give, but with a message the user can act on.
//! - opted out (`trellis.io/inject: "false"`), already injected, not a CREATE, a subresource,
//!   or a `hostNetwork` pod → `allowed: true` without a patch (nothing to add, or nothing we
//!   could add safely), with a warning where the user may not expect it.

use base64::Engine as _;
use serde_json::{json, Map, Value};

/// Name of the injected container; a pod that has one is left alone (idempotence).
pub const SIDECAR_CONTAINER: &str = "trellis-sidecar";
/// The projected service-account token volume.
pub const TOKEN_VOLUME: &str = "trellis-token";
/// The policy ConfigMap volume.
pub const POLICY_VOLUME: &str = "trellis-policy";
/// Where the token volume is mounted in the sidecar.
pub const TOKEN_DIR: &str = "/var/run/secrets/trellis";
/// The token file the sidecar reads (`TRELLIS_TOKEN_FILE`).
pub const TOKEN_FILE: &str = "/var/run/secrets/trellis/token";
/// Where the policy ConfigMap is mounted (`TRELLIS_POLICY`).
pub const POLICY_DIR: &str = "/etc/trellis/policy";
/// Audience of the projected token; the control plane's `--k8s-audience` default.
pub const TOKEN_AUDIENCE: &str = "trellis";
/// Lifetime the kubelet gives the projected token (it refreshes it at 80%).
pub const TOKEN_EXPIRATION_SECONDS: u64 = 3600;
/// The sidecar's mTLS inbound port (`trellis-mtls`): Services target it for mesh traffic.
pub const INBOUND_PORT: u16 = 15443;
/// The sidecar's admin port (`trellis-admin`): probes and metrics.
pub const ADMIN_PORT: u16 = 15000;
/// The sidecar's shared outbound port on loopback.
pub const OUTBOUND_PORT: u16 = 15001;
/// `TRELLIS_APP` port when neither the annotation nor a containerPort says otherwise.
pub const DEFAULT_APP_PORT: u16 = 8080;
/// The uid the sidecar runs as (distroless nonroot).
pub const SIDECAR_UID: u64 = 65532;

/// Pod annotation: `"false"` opts the pod out of injection.
pub const ANNOTATION_INJECT: &str = "trellis.io/inject";
/// Pod annotation: the app's port on 127.0.0.1 (`TRELLIS_APP`).
pub const ANNOTATION_APP_PORT: &str = "trellis.io/app-port";
/// Pod annotation: upstreams, `--upstream` syntax, separated by whitespace (`TRELLIS_UPSTREAMS`).
pub const ANNOTATION_UPSTREAMS: &str = "trellis.io/upstreams";
/// Pod annotation: name of a ConfigMap in the pod's namespace holding the policy.
pub const ANNOTATION_POLICY_CONFIGMAP: &str = "trellis.io/policy-configmap";

/// The only AdmissionReview version served (the webhook configuration asks for it alone).
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// What injection puts into pods, as configured on the control plane.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// `TRELLIS_TRUST_DOMAIN`.
    pub trust_domain: String,
    /// The sidecar container's image.
    pub image: String,
    /// `TRELLIS_CONTROL_PLANE` (`host:port`).
    pub control_plane: String,
    /// `TRELLIS_CONTROL_BUNDLE_PEM`: the trust bundle in force when the pod is admitted.
    pub bundle_pem: String,
}

/// How a review ended; the `result` label of `trellis_webhook_reviews_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A patch adding the sidecar was returned.
    Injected,
    /// Allowed unchanged: already injected, not a CREATE, a subresource, `hostNetwork`.
    Skipped,
    /// Allowed unchanged: `trellis.io/inject: "false"`.
    OptedOut,
    /// Refused (`allowed: false`), or not a usable review at all ([`BadReview`]).
    Error,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Skipped => "skipped",
            Outcome::OptedOut => "opted_out",
            Outcome::Error => "error",
        }
    }
}

/// A body that is not an `admission.k8s.io/v1` AdmissionReview with a request uid; answered
/// with HTTP 400 and this message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadReview {
    /// Not JSON, or not a JSON object.
    #[error("not a JSON AdmissionReview: {0}")]
    NotJson(String),
    /// `apiVersion` is missing or not `admission.k8s.io/v1`.
    #[error("apiVersion `{0}` is not served: only admission.k8s.io/v1 (set admissionReviewVersions: [\"v1\"])")]
    ApiVersion(String),
    /// `kind` is missing or not `AdmissionReview`.
    #[error("kind `{0}` is not AdmissionReview")]
    Kind(String),
    /// No `request` object.
    #[error("the AdmissionReview has no request")]
    NoRequest,
    /// No `request.uid`.
    #[error("the AdmissionReview request has no uid")]
    NoUid,
}

/// The answer to one well-formed review.
#[derive(Debug, Clone)]
pub struct Review {
    /// `request.uid`, echoed in the response.
    pub uid: String,
    /// `namespace/name` of the pod (`generateName` + `*` before the API server names it), for logs.
    pub pod: String,
    /// The result.
    pub outcome: Outcome,
    /// Why, in a few words, for logs.
    pub detail: String,
    /// The JSONPatch operations (empty unless injected).
    pub patch: Vec<Value>,
    /// The AdmissionReview response, serialized.
    pub body: Vec<u8>,
}

/// Answers one AdmissionReview (the raw request body).
pub fn review(body: &[u8], cfg: &InjectConfig) -> Result<Review, BadReview> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| BadReview::NotJson(e.to_string()))?;
    let doc = doc
        .as_object()
        .ok_or_else(|| BadReview::NotJson("the body is not a JSON object".into()))?;
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if api_version != API_VERSION {
        return Err(BadReview::ApiVersion(api_version.to_owned()));
    }
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind != "AdmissionReview" {
        return Err(BadReview::Kind(kind.to_owned()));
    }
    let request = doc
        .get("request")
        .and_then(Value::as_object)
        .ok_or(BadReview::NoRequest)?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or(BadReview::NoUid)?
        .to_owned();

    let pod = pod_label(request);
    let decision = decide(request, cfg);
    let mut response = Map::new();
    response.insert("uid".into(), Value::String(uid.clone()));
    let (outcome, detail, patch) = match decision {
        Decision::Inject { patch, warnings } => {
            response.insert("allowed".into(), Value::Bool(true));
            response.insert("patchType".into(), Value::String("JSONPatch".into()));
            let bytes = serde_json::to_vec(&patch).unwrap_or_default();
            response.insert(
                "patch".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
            add_warnings(&mut response, warnings);
            (Outcome::Injected, "sidecar added".to_owned(), patch)
        }
        Decision::Allow {
            outcome,
            why,
            warnings,
        } => {
            response.insert("allowed".into(), Value::Bool(true));
            add_warnings(&mut response, warnings);
            (outcome, why, Vec::new())
        }
        Decision::Deny(message) => {
            response.insert("allowed".into(), Value::Bool(false));
            response.insert(
                "status".into(),
                json!({
                    "code": 400,
                    "reason": "BadRequest",
                    "message": format!("trellis sidecar injection: {message}"),
                }),
            );
            (Outcome::Error, message, Vec::new())
        }
    };
    let answer = json!({
        "apiVersion": API_VERSION,
        "kind": "AdmissionReview",
        "response": Value::Object(response),
    });
    Ok(Review {
        uid,
        pod,
        outcome,
        detail,
        patch,
        body: serde_json::to_vec(&answer).unwrap_or_default(),
    })
}

fn add_warnings(response: &mut Map<String, Value>, warnings: Vec<String>) {
    if !warnings.is_empty() {
        response.insert(
            "warnings".into(),
            Value::Array(warnings.into_iter().map(Value::String).collect()),
        );
    }
}

/// What to answer, before it is written as a response.
enum Decision {
    Inject {
        patch: Vec<Value>,
        warnings: Vec<String>,
    },
    Allow {
        outcome: Outcome,
        why: String,
        warnings: Vec<String>,
    },
    Deny(String),
}

fn skip(outcome: Outcome, why: impl Into<String>, warning: Option<String>) -> Decision {
    Decision::Allow {
        outcome,
        why: why.into(),
        warnings: warning.into_iter().collect(),
    }
}

fn pod_label(request: &Map<String, Value>) -> String {
    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .or_else(|| {
            request
                .get("object")
                .and_then(|o| o.pointer("/metadata/namespace"))
                .and_then(Value::as_str)
        })
        .unwrap_or("");
    let meta = request.get("object").and_then(|o| o.get("metadata"));
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .or_else(|| {
            meta.and_then(|m| m.get("generateName"))
                .and_then(Value::as_str)
                .map(|g| format!("{g}*"))
        })
        .or_else(|| {
            request
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".to_owned());
    format!("{namespace}/{name}")
}

fn decide(request: &Map<String, Value>, cfg: &InjectConfig) -> Decision {
    let str_at = |v: Option<&Value>, key: &str| -> String {
        v.and_then(|v| v.get(key))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let field = |key: &str| str_at_map(request, key);
    // A subresource (pods/binding, pods/eviction, pods/ephemeralcontainers) is not a pod
    // being created: nothing to inject, and refusing would break evictions.
    let sub = field("subResource");
    if !sub.is_empty() {
        return skip(
            Outcome::Skipped,
            format!("subresource `{sub}`"),
            Some(format!(
                "trellis sidecar injection ignores the `{sub}` subresource; check the webhook's rules (CREATE pods only)"
            )),
        );
    }
    let kind = request.get("kind");
    let (group, kind_name) = (str_at(kind, "group"), str_at(kind, "kind"));
    if !group.is_empty() || kind_name != "Pod" {
        let shown = if group.is_empty() {
            kind_name
        } else {
            format!("{group}/{kind_name}")
        };
        return Decision::Deny(format!(
            "the review is for `{shown}`, not a Pod: the webhook's rules must select CREATE of pods only"
        ));
    }
    let operation = field("operation");
    if operation != "CREATE" {
        // Pod specs cannot gain containers after creation: there is nothing we could add.
        return skip(
            Outcome::Skipped,
            format!("operation `{operation}`"),
            Some(format!(
                "trellis sidecar injection only acts on CREATE, not `{operation}`; check the webhook's rules"
            )),
        );
    }
    let Some(object) = request.get("object").and_then(Value::as_object) else {
        return Decision::Deny("the review has no pod object".into());
    };
    if let Some(k) = object.get("kind").and_then(Value::as_str) {
        if k != "Pod" {
            return Decision::Deny(format!("the object is a `{k}`, not a Pod"));
        }
    }
    let annotations = match object.get("metadata").map(|m| m.get("annotations")) {
        None | Some(None) | Some(Some(Value::Null)) => Map::new(),
        Some(Some(Value::Object(a))) => a.clone(),
        Some(Some(_)) => return Decision::Deny("metadata.annotations is not a map".into()),
    };
    let annotation = |key: &str| annotations.get(key).and_then(Value::as_str).map(str::trim);

    match annotation(ANNOTATION_INJECT) {
        Some(v) if v.eq_ignore_ascii_case("false") => {
            return skip(Outcome::OptedOut, format!("{ANNOTATION_INJECT}: false"), None)
        }
        Some(v) if !v.eq_ignore_ascii_case("true") => {
            return Decision::Deny(format!(
                "annotation {ANNOTATION_INJECT}: `{v}` must be \"true\" or \"false\" (\"false\" opts the pod out)"
            ))
        }
        _ => {}
    }

    let Some(spec) = object.get("spec").and_then(Value::as_object) else {
        return Decision::Deny("the pod has no spec".into());
    };
    let containers = match list(spec, "containers") {
        Ok(c) => c,
        Err(why) => return Decision::Deny(why),
    };
    let init_containers = match list(spec, "initContainers") {
        Ok(c) => c,
        Err(why) => return Decision::Deny(why),
    };
    let volumes = match list(spec, "volumes") {
        Ok(v) => v,
        Err(why) => return Decision::Deny(why),
    };
    let named = |items: &Option<&Vec<Value>>, name: &str| {
        items
            .iter()
            .flat_map(|v| v.iter())
            .any(|c| c.get("name").and_then(Value::as_str) == Some(name))
    };
    // Idempotence: the sidecar is there already (reinvocation, or a pod spec copied from an
    // injected pod). An empty answer keeps the pod exactly as it is.
    if named(&containers, SIDECAR_CONTAINER) || named(&init_containers, SIDECAR_CONTAINER) {
        return skip(Outcome::Skipped, "already injected", None);
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        // The sidecar's fixed ports would be the node's ports, shared by every such pod.
        return skip(
            Outcome::Skipped,
            "hostNetwork pod",
            Some("trellis sidecar injection skips hostNetwork pods: the sidecar's ports would collide on the node; this pod is not in the mesh".into()),
        );
    }
    for name in [TOKEN_VOLUME, POLICY_VOLUME] {
        if named(&volumes, name) {
            return Decision::Deny(format!(
                "the pod already has a volume named `{name}` but no `{SIDECAR_CONTAINER}` container; rename the volume, or opt out with {ANNOTATION_INJECT}: \"false\""
            ));
        }
    }

    let reserved = [INBOUND_PORT, ADMIN_PORT, OUTBOUND_PORT];
    let app_port = match annotation(ANNOTATION_APP_PORT) {
        Some(v) => match v.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                return Decision::Deny(format!(
                    "annotation {ANNOTATION_APP_PORT}: `{v}` is not a port number (1-65535)"
                ))
            }
        },
        None => first_container_port(&containers).unwrap_or(DEFAULT_APP_PORT),
    };
    if reserved.contains(&app_port) {
        return Decision::Deny(format!(
            "the app port {app_port} is one the sidecar uses ({INBOUND_PORT}, {ADMIN_PORT}, {OUTBOUND_PORT}); set {ANNOTATION_APP_PORT} to the app's own port"
        ));
    }
    let upstreams = match annotation(ANNOTATION_UPSTREAMS) {
        Some(v) => match check_upstreams(v) {
            Ok(u) if u.is_empty() => None,
            Ok(u) => Some(u),
            Err(why) => return Decision::Deny(format!("annotation {ANNOTATION_UPSTREAMS}: {why}")),
        },
        None => None,
    };
    let policy_configmap = match annotation(ANNOTATION_POLICY_CONFIGMAP) {
        Some(v) if is_dns_subdomain(v) => Some(v.to_owned()),
        Some(v) => {
            return Decision::Deny(format!(
                "annotation {ANNOTATION_POLICY_CONFIGMAP}: `{v}` is not a ConfigMap name (lowercase letters, digits, '-' and '.', at most 253)"
            ))
        }
        None => None,
    };

    let mut warnings = Vec::new();
    for c in containers.iter().flat_map(|v| v.iter()) {
        for p in ports_of(c) {
            if reserved.contains(&p) {
                warnings.push(format!(
                    "container `{}` declares port {p}, which the trellis sidecar binds; one of them will fail to start",
                    c.get("name").and_then(Value::as_str).unwrap_or("?")
                ));
            }
        }
    }

    let container = sidecar_container(
        cfg,
        app_port,
        upstreams.as_deref(),
        policy_configmap.is_some(),
    );
    let mut new_volumes = vec![json!({
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [{
                "serviceAccountToken": {
                    "audience": TOKEN_AUDIENCE,
                    "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                    "path": "token",
                }
            }]
        }
    })];
    if let Some(name) = &policy_configmap {
        new_volumes.push(json!({ "name": POLICY_VOLUME, "configMap": { "name": name } }));
    }
    let mut patch = append(containers.is_some(), "/spec/containers", vec![container]);
    patch.extend(append(volumes.is_some(), "/spec/volumes", new_volumes));
    Decision::Inject { patch, warnings }
}

fn str_at_map(map: &Map<String, Value>, key: &str) -> String {
    map.get(key)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// `spec.<key>`: absent or null is `None`; anything but an array is a malformed pod.
fn list<'a>(spec: &'a Map<String, Value>, key: &str) -> Result<Option<&'a Vec<Value>>, String> {
    match spec.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(_) => Err(format!("spec.{key} is not a list")),
    }
}

/// JSONPatch (RFC 6902) adds: "-" appends to an existing array (section 4.1: "the '-'
/// character ... index the end of the array"); a missing array is added whole, since an add
/// below a missing member fails (section 4.1: "the target location MUST reference ... a
/// member to add to an existing object").
fn append(exists: bool, path: &str, items: Vec<Value>) -> Vec<Value> {
    if exists {
        items
            .into_iter()
            .map(|value| json!({ "op": "add", "path": format!("{path}/-"), "value": value }))
            .collect()
    } else {
        vec![json!({ "op": "add", "path": path, "value": Value::Array(items) })]
    }
}

fn ports_of(container: &Value) -> impl Iterator<Item = u16> + '_ {
    container
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("containerPort").and_then(Value::as_u64))
        .filter_map(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

/// The first containerPort of the first container.
fn first_container_port(containers: &Option<&Vec<Value>>) -> Option<u16> {
    containers
        .and_then(|c| c.first())
        .and_then(|c| ports_of(c).next())
}

/// Checks `trellis.io/upstreams` the way `trellis sidecar --upstream` will parse it, so a
/// typo is refused at admission (with this message) instead of crash-looping the sidecar.
/// Returns the specs joined by single spaces, as `TRELLIS_UPSTREAMS` is split.
fn check_upstreams(value: &str) -> Result<String, String> {
    const KEYS: [&str; 6] = ["name", "address", "identity", "hosts", "listen", "protocol"];
    let specs: Vec<&str> = value.split_whitespace().collect();
    for spec in &specs {
        let mut seen = Vec::new();
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err(format!("`{part}` in `{spec}` is not key=value"));
            };
            if !KEYS.contains(&k) {
                return Err(format!(
                    "unknown key `{k}` in `{spec}` (name, address, identity, hosts, listen, protocol)"
                ));
            }
            if k == "identity" && !v.starts_with("spiffe://") {
                return Err(format!("identity `{v}` in `{spec}` is not a spiffe:// ID"));
            }
            if !v.is_empty() {
                seen.push(k);
            }
        }
        for required in ["name", "address", "identity"] {
            if !seen.contains(&required) {
                return Err(format!("`{spec}` lacks `{required}=`"));
            }
        }
    }
    Ok(specs.join(" "))
}

/// RFC 1123 subdomain, the rule for ConfigMap names.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn env(name: &str, value: impl Into<String>) -> Value {
    json!({ "name": name, "value": value.into() })
}

/// The `trellis-sidecar` container.
fn sidecar_container(
    cfg: &InjectConfig,
    app_port: u16,
    upstreams: Option<&str>,
    policy: bool,
) -> Value {
    let mut envs = vec![
        env("TRELLIS_TRUST_DOMAIN", cfg.trust_domain.as_str()),
        env("TRELLIS_CONTROL_PLANE", cfg.control_plane.as_str()),
        // Inline, because a pod cannot mount the `trellis-bundle` ConfigMap of another
        // namespace. It is the bundle at admission; the SDS stream keeps it current after.
        env("TRELLIS_CONTROL_BUNDLE_PEM", cfg.bundle_pem.as_str()),
        env("TRELLIS_TOKEN_FILE", TOKEN_FILE),
        env("TRELLIS_INBOUND", format!("0.0.0.0:{INBOUND_PORT}")),
        env("TRELLIS_OUTBOUND", format!("127.0.0.1:{OUTBOUND_PORT}")),
        // Not loopback: the kubelet probes from the node.
        env("TRELLIS_ADMIN", format!("0.0.0.0:{ADMIN_PORT}")),
        env("TRELLIS_APP", format!("127.0.0.1:{app_port}")),
    ];
    if let Some(u) = upstreams {
        envs.push(env("TRELLIS_UPSTREAMS", u));
    }
    if policy {
        envs.push(env("TRELLIS_POLICY", POLICY_DIR));
    }
    let mut mounts =
        vec![json!({ "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true })];
    if policy {
        mounts.push(json!({ "name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": true }));
    }
    let probe = |path: &str, period: u32| {
        json!({
            "httpGet": { "path": path, "port": ADMIN_PORT, "scheme": "HTTP" },
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        })
    };
    json!({
        "name": SIDECAR_CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["sidecar"],
        "env": envs,
        "ports": [
            { "name": "trellis-mtls", "containerPort": INBOUND_PORT, "protocol": "TCP" },
            { "name": "trellis-admin", "containerPort": ADMIN_PORT, "protocol": "TCP" },
        ],
        "readinessProbe": probe("/ready", 5),
        "livenessProbe": probe("/healthz", 10),
        "resources": {
            "requests": { "cpu": "50m", "memory": "32Mi" },
            "limits": { "cpu": "500m", "memory": "128Mi" },
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
            // The Pod Security "restricted" profile requires a seccomp profile.
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": mounts,
    })
}

/// Fuzzing entry point (`fuzz/fuzz_targets/admission_review.rs`, run on stable by
/// `tests/fuzz_bodies.rs`): a request body → [`review`] must not panic; a review it answers
/// echoes the uid, is `allowed: false` exactly when the outcome is an error, and carries a
/// base64 JSONPatch (the one in [`Review::patch`]) exactly when injecting. Returns the pod and
/// the patch when injecting, so callers can apply one to the other. Not API.
#[doc(hidden)]
pub fn fuzz_review(data: &[u8]) -> Option<(Value, Vec<Value>)> {
    let cfg = InjectConfig {
        trust_domain: "example.org".into(),
        image: "ghcr.io/trellis-mesh/trellis:fuzz".into(),
        control_plane: "trellis-control.trellis-system.svc:8443".into(),
        bundle_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
    };
    let review = review(data, &cfg).ok()?;
    let answer: Value = serde_json::from_slice(&review.body).ok()?;
    assert_eq!(answer["apiVersion"], API_VERSION);
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"].as_str(), Some(review.uid.as_str()));
    assert_eq!(
        response["allowed"].as_bool(),
        Some(review.outcome != Outcome::Error)
    );
    let injected = review.outcome == Outcome::Injected;
    assert_eq!(!review.patch.is_empty(), injected, "{}", review.detail);
    assert_eq!(response.get("patch").is_some(), injected);
    if !injected {
        return None;
    }
    let encoded = response["patch"].as_str().unwrap_or_default();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<Value>>(&b).ok());
    assert_eq!(decoded.as_ref(), Some(&review.patch));
    let doc: Value = serde_json::from_slice(data).ok()?;
    Some((doc["request"]["object"].clone(), review.patch))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const BUNDLE: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn cfg() -> InjectConfig {
        InjectConfig {
            trust_domain: "example.org".into(),
            image: "ghcr.io/trellis-mesh/trellis:0.1.0".into(),
            control_plane: "trellis-control.trellis-system.svc:8443".into(),
            bundle_pem: BUNDLE.into(),
        }
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/admission")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn fixture_json(name: &str) -> Value {
        serde_json::from_slice(&fixture(name)).unwrap()
    }

    /// The response object of a review's answer.
    fn response_of(r: &Review) -> Value {
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["apiVersion"], API_VERSION);
        assert_eq!(v["kind"], "AdmissionReview");
        v["response"].clone()
    }

    /// Decodes the base64 patch of a response and applies it to `pod` with `json-patch`, as
    /// the API server does.
    fn apply(pod: &Value, response: &Value) -> Value {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut out = pod.clone();
        json_patch::patch(&mut out, &patch).unwrap();
        out
    }

    /// Runs the review in fixture `name` and returns (pod before, response, pod after).
    fn inject(name: &str) -> (Value, Value, Value) {
        let review = review(&fixture(name), &cfg()).unwrap();
        assert_eq!(review.outcome, Outcome::Injected, "{}", review.detail);
        let response = response_of(&review);
        assert_eq!(response["allowed"], true);
        let pod = fixture_json(name)["request"]["object"].clone();
        let after = apply(&pod, &response);
        (pod, response, after)
    }

    fn sidecar(pod: &Value) -> &Value {
        pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == SIDECAR_CONTAINER)
            .expect("sidecar container")
    }

    fn env_of(container: &Value) -> Vec<(String, String)> {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_owned(),
                    e["value"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    fn env_value(container: &Value, name: &str) -> Option<String> {
        env_of(container)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// Rewrites a fixture's review with the injected pod as its object (the reinvocation or
    /// copy case) and serializes it.
    fn review_of_pod(name: &str, pod: &Value) -> Vec<u8> {
        let mut doc = fixture_json(name);
        doc["request"]["object"] = pod.clone();
        serde_json::to_vec(&doc).unwrap()
    }

    /// Sets the member at `pointer`, creating it in its (existing) parent object if needed.
    fn set_at(doc: &mut Value, pointer: &str, value: Value) {
        match doc.pointer_mut(pointer) {
            Some(slot) => *slot = value,
            None => {
                let (parent, key) = pointer.rsplit_once('/').unwrap();
                doc.pointer_mut(parent)
                    .unwrap_or_else(|| panic!("{parent}"))
                    .as_object_mut()
                    .unwrap()
                    .insert(key.to_owned(), value);
            }
        }
    }

    #[test]
    fn injects_into_a_deployment_pod_without_volumes() {
        let (before, response, after) = inject("deployment-pod.json");
        assert!(response.get("warnings").is_none(), "{response}");
        // The app container is untouched and still first.
        assert_eq!(
            after["spec"]["containers"][0],
            before["spec"]["containers"][0]
        );
        assert_eq!(after["spec"]["containers"].as_array().unwrap().len(), 2);
        let s = sidecar(&after);
        assert_eq!(s["image"], "ghcr.io/trellis-mesh/trellis:0.1.0");
        assert_eq!(s["args"], json!(["sidecar"]));
        let env = env_of(s);
        let want = [
            ("TRELLIS_TRUST_DOMAIN", "example.org"),
            (
                "TRELLIS_CONTROL_PLANE",
                "trellis-control.trellis-system.svc:8443",
            ),
            ("TRELLIS_CONTROL_BUNDLE_PEM", BUNDLE),
            ("TRELLIS_TOKEN_FILE", "/var/run/secrets/trellis/token"),
            ("TRELLIS_INBOUND", "0.0.0.0:15443"),
            ("TRELLIS_OUTBOUND", "127.0.0.1:15001"),
            ("TRELLIS_ADMIN", "0.0.0.0:15000"),
            // The first containerPort of the first container.
            ("TRELLIS_APP", "127.0.0.1:5678"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(env, want, "no upstreams, no policy without annotations");
        assert_eq!(
            s["ports"],
            json!([
                { "name": "trellis-mtls", "containerPort": 15443, "protocol": "TCP" },
                { "name": "trellis-admin", "containerPort": 15000, "protocol": "TCP" },
            ])
        );
        assert_eq!(s["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(s["readinessProbe"]["httpGet"]["port"], 15000);
        assert_eq!(s["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(s["livenessProbe"]["httpGet"]["port"], 15000);
        assert_eq!(
            s["resources"],
            json!({
                "requests": { "cpu": "50m", "memory": "32Mi" },
                "limits": { "cpu": "500m", "memory": "128Mi" },
            })
        );
        let sc = &s["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["runAsUser"], 65532);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(
            s["volumeMounts"],
            json!([{ "name": "trellis-token", "mountPath": "/var/run/secrets/trellis", "readOnly": true }])
        );
        // The pod had no volumes: the whole array was added.
        assert!(before["spec"].get("volumes").is_none());
        assert_eq!(
            after["spec"]["volumes"],
            json!([{
                "name": "trellis-token",
                "projected": { "sources": [{ "serviceAccountToken": {
                    "audience": "trellis", "expirationSeconds": 3600, "path": "token"
                }}]}
            }])
        );
        // Nothing else about the pod changed.
        let mut rest_before = before.clone();
        let mut rest_after = after.clone();
        for v in [&mut rest_before, &mut rest_after] {
            let spec = v["spec"].as_object_mut().unwrap();
            spec.remove("containers");
            spec.remove("volumes");
        }
        assert_eq!(rest_before, rest_after);
    }

    #[test]
    fn existing_volumes_and_ports_are_kept_and_appended_to() {
        let (before, response, after) = inject("pod-with-volumes-and-ports.json");
        // The patch appends with `/-` rather than replacing the arrays.
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().unwrap())
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&bytes).unwrap();
        let paths: Vec<&str> = ops.iter().map(|o| o["path"].as_str().unwrap()).collect();
        assert_eq!(paths, ["/spec/containers/-", "/spec/volumes/-"]);
        assert!(ops.iter().all(|o| o["op"] == "add"));

        let before_containers = before["spec"]["containers"].as_array().unwrap();
        let after_containers = after["spec"]["containers"].as_array().unwrap();
        assert_eq!(after_containers.len(), before_containers.len() + 1);
        assert_eq!(
            &after_containers[..before_containers.len()],
            &before_containers[..]
        );
        assert_eq!(after_containers.last().unwrap()["name"], SIDECAR_CONTAINER);

        let before_volumes = before["spec"]["volumes"].as_array().unwrap();
        let after_volumes = after["spec"]["volumes"].as_array().unwrap();
        assert_eq!(after_volumes.len(), before_volumes.len() + 1);
        assert_eq!(&after_volumes[..before_volumes.len()], &before_volumes[..]);
        assert_eq!(after_volumes.last().unwrap()["name"], TOKEN_VOLUME);
        // First containerPort of the first container (not the metrics port of the second).
        assert_eq!(
            env_value(sidecar(&after), "TRELLIS_APP").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(
            before["spec"]["initContainers"],
            after["spec"]["initContainers"]
        );
    }

    #[test]
    fn all_annotations_are_honoured() {
        let (_before, _response, after) = inject("pod-all-annotations.json");
        let s = sidecar(&after);
        assert_eq!(
            env_value(s, "TRELLIS_APP").as_deref(),
            Some("127.0.0.1:9000")
        );
        assert_eq!(
            env_value(s, "TRELLIS_UPSTREAMS").as_deref(),
            Some(
                "name=service-b,address=service-b.demo.svc:15443,identity=spiffe://example.org/ns/demo/sa/service-b \
                 name=db,address=db.demo.svc:15432,identity=spiffe://example.org/ns/demo/sa/db,listen=127.0.0.1:5432,protocol=tcp"
            )
        );
        assert_eq!(
            env_value(s, "TRELLIS_POLICY").as_deref(),
            Some("/etc/trellis/policy")
        );
        assert_eq!(
            s["volumeMounts"],
            json!([
                { "name": "trellis-token", "mountPath": "/var/run/secrets/trellis", "readOnly": true },
                { "name": "trellis-policy", "mountPath": "/etc/trellis/policy", "readOnly": true },
            ])
        );
        let volumes = after["spec"]["volumes"].as_array().unwrap();
        assert_eq!(
            volumes.last().unwrap(),
            &json!({ "name": "trellis-policy", "configMap": { "name": "service-b-policy" } })
        );
        assert_eq!(volumes[volumes.len() - 2]["name"], TOKEN_VOLUME);
    }

    #[test]
    fn a_pod_without_ports_gets_the_default_app_port() {
        let mut doc = fixture_json("deployment-pod.json");
        doc["request"]["object"]["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("ports");
        let r = review(&serde_json::to_vec(&doc).unwrap(), &cfg()).unwrap();
        let after = apply(&doc["request"]["object"], &response_of(&r));
        assert_eq!(
            env_value(sidecar(&after), "TRELLIS_APP").as_deref(),
            Some("127.0.0.1:8080")
        );
    }

    #[test]
    fn injection_is_idempotent() {
        for name in [
            "deployment-pod.json",
            "pod-with-volumes-and-ports.json",
            "pod-all-annotations.json",
        ] {
            let (_before, _response, after) = inject(name);
            let again = review(&review_of_pod(name, &after), &cfg()).unwrap();
            assert_eq!(again.outcome, Outcome::Skipped, "{name}");
            assert!(again.patch.is_empty(), "{name}");
            let response = response_of(&again);
            assert_eq!(response["allowed"], true, "{name}");
            assert!(response.get("patch").is_none(), "{name}: {response}");
            assert!(response.get("patchType").is_none(), "{name}: {response}");
        }
    }

    #[test]
    fn an_already_injected_pod_gets_no_patch() {
        let r = review(&fixture("pod-already-injected.json"), &cfg()).unwrap();
        assert_eq!(r.outcome, Outcome::Skipped);
        assert_eq!(r.detail, "already injected");
        let response = response_of(&r);
        assert_eq!(response["uid"], "3c8a4f0e-0d1b-4a55-9d0e-7f2f8e1b6a01");
        assert_eq!(response["allowed"], true);
        assert!(response.get("patch").is_none());
    }

    #[test]
    fn opt_out_annotation_is_respected() {
        let r = review(&fixture("pod-opted-out.json"), &cfg()).unwrap();
        assert_eq!(r.outcome, Outcome::OptedOut);
        let response = response_of(&r);
        assert_eq!(response["allowed"], true);
        assert!(response.get("patch").is_none());
        assert!(response.get("status").is_none());
    }

    #[test]
    fn the_bundle_in_the_env_is_the_one_configured_now() {
        let mut c = cfg();
        c.bundle_pem = format!("{BUNDLE}{BUNDLE}");
        let r = review(&fixture("deployment-pod.json"), &c).unwrap();
        let after = apply(
            &fixture_json("deployment-pod.json")["request"]["object"],
            &response_of(&r),
        );
        assert_eq!(
            env_value(sidecar(&after), "TRELLIS_CONTROL_BUNDLE_PEM"),
            Some(c.bundle_pem)
        );
    }

    #[test]
    fn malformed_bodies_are_bad_reviews_with_a_message() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (fixture("malformed-not-json.txt"), "not a JSON AdmissionReview"),
            (b"[1,2,3]".to_vec(), "not a JSON object"),
            (b"".to_vec(), "not a JSON AdmissionReview"),
            (fixture("malformed-v1beta1.json"), "admission.k8s.io/v1beta1"),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"Pod"}"#.to_vec(),
                "kind `Pod` is not AdmissionReview",
            ),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
                "no request",
            ),
            (fixture("malformed-no-uid.json"), "no uid"),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":""}}"#.to_vec(),
                "no uid",
            ),
        ];
        for (body, want) in cases {
            let err = review(&body, &cfg()).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn a_review_of_something_else_is_refused_with_a_status() {
        let r = review(&fixture("malformed-not-a-pod.json"), &cfg()).unwrap();
        assert_eq!(r.outcome, Outcome::Error);
        let response = response_of(&r);
        assert_eq!(response["uid"], "7d1c2b3a-4e5f-4a6b-8c7d-9e0f1a2b3c4d");
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["code"], 400);
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("apps/Deployment") && message.contains("not a Pod"),
            "{message}"
        );
        assert!(response.get("patch").is_none());
    }

    /// A well-formed review with a broken pod is refused (failurePolicy: Fail semantics), never
    /// a panic.
    #[test]
    fn broken_pods_are_refused_not_crashed_on() {
        let base = fixture_json("deployment-pod.json");
        let cases: Vec<(&str, Value, &str)> = vec![
            ("/request/object", Value::Null, "no pod object"),
            ("/request/object", json!("a string"), "no pod object"),
            ("/request/object/kind", json!("Service"), "not a Pod"),
            ("/request/object/spec", Value::Null, "no spec"),
            (
                "/request/object/spec/containers",
                json!({"a": 1}),
                "spec.containers is not a list",
            ),
            (
                "/request/object/spec/volumes",
                json!("x"),
                "spec.volumes is not a list",
            ),
            (
                "/request/object/metadata/annotations",
                json!([1]),
                "annotations is not a map",
            ),
            (
                "/request/object/metadata/annotations",
                json!({"trellis.io/app-port": "http"}),
                "trellis.io/app-port",
            ),
            (
                "/request/object/metadata/annotations",
                json!({"trellis.io/app-port": "70000"}),
                "not a port number",
            ),
            (
                "/request/object/metadata/annotations",
                json!({"trellis.io/app-port": "15443"}),
                "sidecar uses",
            ),
            (
                "/request/object/metadata/annotations",
                json!({"trellis.io/upstreams": "name=b,address=b:1"}),
                "lacks `identity=`",
            ),
            (
                "/request/object/metadata/annotations",
                json!({"trellis.io/upstreams": "name=b,adress=b:1,identity=spiffe://example.org/b"}),
                "unknown key `adress`",
            ),
            (
                "/request/object/metadata/annotations",
                json!({"trellis.io/upstreams": "name=b,address=b:1,identity=http://b"}),
                "not a spiffe:// ID",
            ),
            (
                "/request/object/metadata/annotations",
                json!({"trellis.io/policy-configmap": "Bad_Name"}),
                "not a ConfigMap name",
            ),
            (
                "/request/object/metadata/annotations",
                json!({"trellis.io/inject": "maybe"}),
                "must be \"true\" or \"false\"",
            ),
            (
                "/request/object/spec/volumes",
                json!([{"name": "trellis-token", "emptyDir": {}}]),
                "already has a volume named `trellis-token`",
            ),
        ];
        for (pointer, value, want) in cases {
            let mut doc = base.clone();
            set_at(&mut doc, pointer, value);
            let r = review(&serde_json::to_vec(&doc).unwrap(), &cfg()).unwrap();
            assert_eq!(r.outcome, Outcome::Error, "{pointer}: {}", r.detail);
            let response = response_of(&r);
            assert_eq!(response["allowed"], false, "{pointer}");
            let message = response["status"]["message"].as_str().unwrap();
            assert!(
                message.contains(want),
                "{pointer}: want {want:?} in {message}"
            );
        }
    }

    #[test]
    fn non_create_subresources_and_host_network_are_allowed_unchanged() {
        let base = fixture_json("deployment-pod.json");
        for (pointer, value, want) in [
            ("/request/operation", json!("UPDATE"), "only acts on CREATE"),
            (
                "/request/subResource",
                json!("ephemeralcontainers"),
                "subresource",
            ),
            (
                "/request/object/spec/hostNetwork",
                json!(true),
                "hostNetwork",
            ),
        ] {
            let mut doc = base.clone();
            set_at(&mut doc, pointer, value);
            let r = review(&serde_json::to_vec(&doc).unwrap(), &cfg()).unwrap();
            assert_eq!(r.outcome, Outcome::Skipped, "{pointer}");
            let response = response_of(&r);
            assert_eq!(response["allowed"], true);
            assert!(response.get("patch").is_none());
            let warning = response["warnings"][0].as_str().unwrap();
            assert!(warning.contains(want), "{pointer}: {warning}");
        }
    }

    #[test]
    fn reserved_port_in_the_app_is_a_warning() {
        let mut doc = fixture_json("deployment-pod.json");
        doc["request"]["object"]["spec"]["containers"][0]["ports"] =
            json!([{ "containerPort": 8080 }, { "containerPort": 15000 }]);
        let r = review(&serde_json::to_vec(&doc).unwrap(), &cfg()).unwrap();
        assert_eq!(r.outcome, Outcome::Injected);
        let warning = response_of(&r)["warnings"][0].as_str().unwrap().to_owned();
        assert!(warning.contains("15000"), "{warning}");
    }

    #[test]
    fn pod_label_uses_generate_name_before_the_pod_is_named() {
        let r = review(&fixture("deployment-pod.json"), &cfg()).unwrap();
        assert_eq!(r.pod, "demo/service-a-7d9f8c6b5d-*");
    }

    #[test]
    fn outcome_labels_are_the_metric_labels() {
        let labels: Vec<&str> = [
            Outcome::Injected,
            Outcome::Skipped,
            Outcome::OptedOut,
            Outcome::Error,
        ]
        .iter()
        .map(|o| o.label())
        .collect();
        assert_eq!(labels, ["injected", "skipped", "opted_out", "error"]);
    }
}
