//! Sidecar injection as a pure function: an `admission.k8s.io/v1` AdmissionReview in, the
//! AdmissionReview response out (with a base64 JSONPatch that adds the `trellis-sidecar`
//! container, its volumes and mounts). No I/O: [`super`] serves it over HTTPS, and
//! [`offline`] runs the same decision ([`inject_pod`]) over manifests for `trellis inject`.
//!
//! The sidecar is a native sidecar (an init container with `restartPolicy: Always` and a
//! startup probe on `/ready`) unless the control plane's `native_sidecar` is off or the pod
//! says `trellis.io/native-sidecar: "false"`; see [`SidecarForm`] for why.
//!
//! What is added, and why each annotation exists, is the contract of issue #7
//! (docs/kubernetes.md, "Automatic sidecar injection"):
//! - container `trellis-sidecar` running `trellis sidecar`, configured by `TRELLIS_*`
//!   variables, ports `trellis-mtls` 15443 and `trellis-admin` 15000, probes on the admin
//!   port, small requests and limits, and a locked-down securityContext;
//! - volume `trellis-token` (projected service-account token, audience `trellis`) mounted at
//!   `/var/run/secrets/trellis`, and with `trellis.io/policy-configmap` the volume
//!   `trellis-policy` mounted at `/etc/trellis/policy`;
//! - with `trellis.io/workload-api: "true"`, the `emptyDir` `trellis-spiffe` mounted at
//!   `/run/spiffe` in the sidecar (which serves the SPIFFE Workload API there) and in every
//!   app container (with `SPIFFE_ENDPOINT_SOCKET=unix:///run/spiffe/workload.sock`), and the
//!   sidecar's group added to the pod's `supplementalGroups` so the apps may open the 0660
//!   socket.
//! - in each app container, `HTTP_PROXY`/`http_proxy` (the sidecar's outbound listener) and
//!   `NO_PROXY`/`no_proxy` (localhost, the pod's IPs, the control plane's `no_proxy`, the pod's
//!   `trellis.io/no-proxy`; issue #25), unless the pod says `trellis.io/proxy-env: "false"` or
//!   the container sets one of them itself.
//! - `TRELLIS_DEFAULT_ROUTE` in the sidecar (a convention route, issue #25): the control
//!   plane's `sidecar_default_route`, or the pod's `trellis.io/default-route` (`"false"`: none).
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

mod container;
pub mod offline;

pub use container::{
    no_proxy_entry_ok, DefaultRouteCheck, InjectConfig, SidecarForm, ADMIN_PORT, DEFAULT_APP_PORT,
    INBOUND_PORT, NO_PROXY_ALWAYS, OUTBOUND_PORT, POD_IP_ENV, POLICY_DIR, POLICY_VOLUME,
    PROXY_ENV_NAMES, SIDECAR_CONTAINER, SIDECAR_UID, SPIFFE_DIR, SPIFFE_ENDPOINT_SOCKET,
    SPIFFE_VOLUME, STARTUP_FAILURE_THRESHOLD, STARTUP_PERIOD_SECONDS, TOKEN_AUDIENCE, TOKEN_DIR,
    TOKEN_EXPIRATION_SECONDS, TOKEN_FILE, TOKEN_VOLUME, WORKLOAD_API_SOCKET,
};
use container::{proxy_env, sidecar_container, PodSidecar};

/// Pod annotation: `"false"` opts the pod out of injection.
pub const ANNOTATION_INJECT: &str = "trellis.io/inject";
/// Pod annotation: the app's port on 127.0.0.1 (`TRELLIS_APP`).
pub const ANNOTATION_APP_PORT: &str = "trellis.io/app-port";
/// Pod annotation: upstreams, `--upstream` syntax, separated by whitespace (`TRELLIS_UPSTREAMS`).
pub const ANNOTATION_UPSTREAMS: &str = "trellis.io/upstreams";
/// Pod annotation: how the sidecar talks to the app, `http1` or `h2c` (`TRELLIS_APP_PROTOCOL`;
/// `h2c` for gRPC servers and other HTTP/2-only apps).
pub const ANNOTATION_APP_PROTOCOL: &str = "trellis.io/app-protocol";
/// Pod annotation: name of a ConfigMap in the pod's namespace holding the policy.
pub const ANNOTATION_POLICY_CONFIGMAP: &str = "trellis.io/policy-configmap";
/// Pod annotation: `"false"` injects an ordinary container instead of a native sidecar (for
/// clusters before Kubernetes 1.29); `"true"` asks for the native form where the control
/// plane's default is off.
pub const ANNOTATION_NATIVE_SIDECAR: &str = "trellis.io/native-sidecar";

/// Pod annotation: `"true"` serves the SPIFFE Workload API to the pod's app containers
/// (`SPIFFE_ENDPOINT_SOCKET`); absent or `"false"`, it is not served.
pub const ANNOTATION_WORKLOAD_API: &str = "trellis.io/workload-api";
/// Pod annotation: `"false"` leaves the app containers' environment alone: no `HTTP_PROXY`
/// or `NO_PROXY` (default `"true"`).
pub const ANNOTATION_PROXY_ENV: &str = "trellis.io/proxy-env";
/// Pod annotation: more `NO_PROXY` entries for the app containers, comma-separated, after the
/// control plane's `no_proxy`.
pub const ANNOTATION_NO_PROXY: &str = "trellis.io/no-proxy";

/// Pod annotation: the sidecar's convention route (`TRELLIS_DEFAULT_ROUTE`, the same
/// `hosts=…;…,address=…,identity=…[,max_peers=N]` syntax) instead of the control plane's
/// `sidecar_default_route`; [`DEFAULT_ROUTE_OFF`] gives the pod none.
pub const ANNOTATION_DEFAULT_ROUTE: &str = "trellis.io/default-route";
/// The [`ANNOTATION_DEFAULT_ROUTE`] value that turns the control plane's default route off:
/// `"false"`, like the other `trellis.io/*` switches, and not `off`, which YAML 1.1 readers
/// (kubectl, PyYAML) take for a boolean when a tool writes it unquoted.
pub const DEFAULT_ROUTE_OFF: &str = "false";

/// The syntax of a default route in an annotation or a control-plane setting (the sidecar's
/// `TRELLIS_DEFAULT_ROUTE`), for error messages.
pub const DEFAULT_ROUTE_SYNTAX: &str = "hosts=T1;T2,address=T,identity=T[,max_peers=N]";

/// The only AdmissionReview version served (the webhook configuration asks for it alone).
pub const API_VERSION: &str = "admission.k8s.io/v1";

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

/// What injection does to one pod or pod template outside an AdmissionReview
/// ([`inject_pod`]): the webhook's decision for a CREATE of that pod.
#[derive(Debug, Clone, PartialEq)]
pub enum PodInjection {
    /// The sidecar is added by `patch` (JSONPatch `add` operations, paths from the pod).
    Injected {
        /// The operations, exactly as the webhook would return them.
        patch: Vec<Value>,
        /// What the webhook would warn about.
        warnings: Vec<String>,
    },
    /// Left as it is: opted out, already injected, `hostNetwork`.
    Unchanged {
        /// [`Outcome::OptedOut`] or [`Outcome::Skipped`].
        outcome: Outcome,
        /// Why, in a few words.
        why: String,
        /// What the webhook would warn about.
        warnings: Vec<String>,
    },
    /// The webhook would refuse the pod, with this message.
    Refused(String),
}

/// The webhook's decision for a CREATE of `pod` in `namespace`, without the review around
/// it: `trellis inject` runs this over the pod templates of manifests.
pub fn inject_pod(pod: &Value, namespace: &str, cfg: &InjectConfig) -> PodInjection {
    let mut request = Map::new();
    request.insert("uid".into(), json!("offline"));
    request.insert(
        "kind".into(),
        json!({ "group": "", "version": "v1", "kind": "Pod" }),
    );
    request.insert("operation".into(), json!("CREATE"));
    request.insert("namespace".into(), json!(namespace));
    request.insert("object".into(), pod.clone());
    match decide(&request, cfg) {
        Decision::Inject { patch, warnings } => PodInjection::Injected { patch, warnings },
        Decision::Allow {
            outcome,
            why,
            warnings,
        } => PodInjection::Unchanged {
            outcome,
            why,
            warnings,
        },
        Decision::Deny(message) => PodInjection::Refused(message),
    }
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
    for name in [TOKEN_VOLUME, POLICY_VOLUME, SPIFFE_VOLUME] {
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
    let default_route = match annotation(ANNOTATION_DEFAULT_ROUTE) {
        None => cfg.default_route.clone(),
        Some(v) if v.eq_ignore_ascii_case(DEFAULT_ROUTE_OFF) => None,
        Some(v) => {
            if let Some(check) = cfg.check_default_route {
                if let Err(why) = check(v, &cfg.trust_domain) {
                    return Decision::Deny(format!(
                        "annotation {ANNOTATION_DEFAULT_ROUTE}: {why} (expected {DEFAULT_ROUTE_SYNTAX}, or \"{DEFAULT_ROUTE_OFF}\" for none)"
                    ));
                }
            }
            Some(v.to_owned())
        }
    };
    let app_protocol = match annotation(ANNOTATION_APP_PROTOCOL) {
        None => None,
        Some(v @ ("http1" | "h2c")) => Some(v),
        Some(v) => {
            return Decision::Deny(format!(
                "annotation {ANNOTATION_APP_PROTOCOL}: `{v}` must be \"http1\" (default) or \"h2c\" (prior-knowledge HTTP/2, for gRPC servers)"
            ))
        }
    };
    let form = match annotation(ANNOTATION_NATIVE_SIDECAR) {
        None if cfg.native_sidecar => SidecarForm::Native,
        None => SidecarForm::Container,
        Some(v) if v.eq_ignore_ascii_case("true") => SidecarForm::Native,
        Some(v) if v.eq_ignore_ascii_case("false") => SidecarForm::Container,
        Some(v) => {
            return Decision::Deny(format!(
                "annotation {ANNOTATION_NATIVE_SIDECAR}: `{v}` must be \"true\" or \"false\" (\"false\" injects an ordinary container, for Kubernetes before 1.29)"
            ))
        }
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

    let workload_api = match annotation(ANNOTATION_WORKLOAD_API) {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            return Decision::Deny(format!(
                "annotation {ANNOTATION_WORKLOAD_API}: `{v}` must be \"true\" (serve the SPIFFE Workload API to the app containers) or \"false\""
            ))
        }
    };
    let security_context = match spec.get("securityContext") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => Some(o),
        Some(_) => return Decision::Deny("spec.securityContext is not a map".into()),
    };
    let proxy = match annotation(ANNOTATION_PROXY_ENV) {
        None => true,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            return Decision::Deny(format!(
                "annotation {ANNOTATION_PROXY_ENV}: `{v}` must be \"true\" (default: HTTP_PROXY and NO_PROXY in the app containers) or \"false\""
            ))
        }
    };
    let mut no_proxy = cfg.no_proxy.clone();
    if let Some(v) = annotation(ANNOTATION_NO_PROXY) {
        for entry in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if !no_proxy_entry_ok(entry) {
                return Decision::Deny(format!(
                    "annotation {ANNOTATION_NO_PROXY}: `{entry}` is not a host, domain, address or CIDR (letters, digits and . - _ : / * [ ]; entries separated by commas)"
                ));
            }
            no_proxy.push(entry.to_owned());
        }
    }

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
        form,
        &PodSidecar {
            app_port,
            app_protocol,
            upstreams: upstreams.as_deref(),
            default_route: default_route.as_deref(),
            policy: policy_configmap.is_some(),
            workload_api,
        },
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
    let mut patch = Vec::new();
    if workload_api {
        // In memory: the directory holds one socket, and nothing of it should reach a disk.
        new_volumes.push(json!({ "name": SPIFFE_VOLUME, "emptyDir": { "medium": "Memory" } }));
        match workload_api_patch(containers, security_context) {
            Ok((ops, mut more)) => {
                patch.extend(ops);
                warnings.append(&mut more);
            }
            Err(why) => return Decision::Deny(why),
        }
    }
    // The app containers' operations above index into spec.containers as it is; the sidecar
    // container is added after them (appended, or an init container), so no index moves.
    patch.extend(match form {
        // First: init containers run in order, so every later one (a migration calling a
        // meshed service, say) already has the sidecar and its SVID.
        SidecarForm::Native => vec![match init_containers {
            Some(_) => json!({ "op": "add", "path": "/spec/initContainers/0", "value": container }),
            None => json!({ "op": "add", "path": "/spec/initContainers", "value": [container] }),
        }],
        SidecarForm::Container => append(containers.is_some(), "/spec/containers", vec![container]),
    });
    patch.extend(append(volumes.is_some(), "/spec/volumes", new_volumes));
    if proxy {
        // App containers only: init containers that run before the sidecar could not reach it.
        for (i, c) in containers.iter().flat_map(|v| v.iter()).enumerate() {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
            let env = match c.get("env") {
                None | Some(Value::Null) => None,
                Some(Value::Array(e)) => Some(e),
                Some(_) => {
                    return Decision::Deny(format!(
                        "spec.containers[{i}] (`{name}`): env is not a list"
                    ))
                }
            };
            let own: Vec<&str> = env
                .iter()
                .flat_map(|e| e.iter())
                .filter_map(|e| e.get("name").and_then(Value::as_str))
                .filter(|n| PROXY_ENV_NAMES.contains(n))
                .collect();
            if !own.is_empty() {
                warnings.push(format!(
                    "container `{name}` sets {} itself, so trellis added no HTTP_PROXY or NO_PROXY to it: it reaches the mesh only by calling http://127.0.0.1:{OUTBOUND_PORT}",
                    own.join(", ")
                ));
                continue;
            }
            // With the Workload API on, every app container has an env list by now (added
            // above if it had none): append to it, never replace it.
            patch.extend(append(
                env.is_some() || workload_api,
                &format!("/spec/containers/{i}/env"),
                proxy_env(&no_proxy),
            ));
        }
    }
    Decision::Inject { patch, warnings }
}

/// What `trellis.io/workload-api: "true"` adds besides the sidecar's own mount: in every app
/// container the socket's directory (read-only: connecting to a Unix socket needs no write
/// access to its filesystem) and `SPIFFE_ENDPOINT_SOCKET`; in the pod, the sidecar's group
/// as a supplementary group of every container, so apps running as any user may open the
/// socket (mode 0660, group of the sidecar or of the pod's `fsGroup`).
fn workload_api_patch(
    containers: Option<&Vec<Value>>,
    security_context: Option<&Map<String, Value>>,
) -> Result<(Vec<Value>, Vec<String>), String> {
    let mut ops = Vec::new();
    let mut warnings = Vec::new();
    for (i, c) in containers.into_iter().flatten().enumerate() {
        let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
        let base = format!("/spec/containers/{i}");
        let mounts = match c.get("volumeMounts") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(a),
            Some(_) => return Err(format!("container `{name}`: volumeMounts is not a list")),
        };
        if mounts
            .into_iter()
            .flatten()
            .any(|m| m.get("mountPath").and_then(Value::as_str) == Some(SPIFFE_DIR))
        {
            return Err(format!(
                "container `{name}` already mounts something at {SPIFFE_DIR}, where {ANNOTATION_WORKLOAD_API} puts the Workload API socket"
            ));
        }
        ops.extend(append(
            mounts.is_some(),
            &format!("{base}/volumeMounts"),
            vec![json!({ "name": SPIFFE_VOLUME, "mountPath": SPIFFE_DIR, "readOnly": true })],
        ));
        let envs = match c.get("env") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(a),
            Some(_) => return Err(format!("container `{name}`: env is not a list")),
        };
        if envs
            .into_iter()
            .flatten()
            .any(|e| e.get("name").and_then(Value::as_str) == Some("SPIFFE_ENDPOINT_SOCKET"))
        {
            // The app's own choice wins; say so, since it is probably a leftover.
            warnings.push(format!(
                "container `{name}` sets SPIFFE_ENDPOINT_SOCKET itself; it is kept (the sidecar serves {SPIFFE_ENDPOINT_SOCKET})"
            ));
        } else {
            ops.extend(append(
                envs.is_some(),
                &format!("{base}/env"),
                vec![json!({ "name": "SPIFFE_ENDPOINT_SOCKET", "value": SPIFFE_ENDPOINT_SOCKET })],
            ));
        }
    }
    match security_context {
        None => ops.push(json!({
            "op": "add",
            "path": "/spec/securityContext",
            "value": { "supplementalGroups": [SIDECAR_UID] },
        })),
        Some(sc) => match sc.get("supplementalGroups") {
            None | Some(Value::Null) => ops.push(json!({
                "op": "add",
                "path": "/spec/securityContext/supplementalGroups",
                "value": [SIDECAR_UID],
            })),
            Some(Value::Array(groups)) => {
                if !groups.iter().any(|g| g.as_u64() == Some(SIDECAR_UID)) {
                    ops.push(json!({
                        "op": "add",
                        "path": "/spec/securityContext/supplementalGroups/-",
                        "value": SIDECAR_UID,
                    }));
                }
            }
            Some(_) => return Err("spec.securityContext.supplementalGroups is not a list".into()),
        },
    }
    Ok((ops, warnings))
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
        native_sidecar: data.len().is_multiple_of(2),
        no_proxy: vec![".example.internal".into()],
        default_route: None,
        check_default_route: Some(|spec, _| {
            if spec.contains("address=") {
                Ok(())
            } else {
                Err("no address".into())
            }
        }),
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
mod tests;
