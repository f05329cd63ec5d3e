//! The container injection adds, and the names, paths and ports it uses: `trellis-sidecar`
//! running `trellis sidecar` configured by `TRELLIS_*` variables, probes on the admin port,
//! small requests and limits, and a locked-down securityContext.
//!
//! Two forms ([`SidecarForm`]):
//! - **native** (the default; Kubernetes 1.29 and later): an init container with
//!   `restartPolicy: Always` and a `startupProbe` on `/ready`. Kubernetes documents the
//!   order ("Sidecar containers"): "the kubelet ... starts the next init container ... after
//!   the startupProbe of the sidecar succeeds", app containers start after every init
//!   container, and on termination "sidecar containers are terminated ... after the main
//!   containers have stopped". So the app starts only once the first SVID is installed, a
//!   Job's pod completes when its app exits, and the sidecar drains after the app.
//! - **container** (`trellis.io/native-sidecar: "false"`, or `native_sidecar: false` on the
//!   control plane, for clusters before 1.29 where an init container cannot keep running):
//!   an ordinary container appended to `spec.containers`.

use serde_json::{json, Value};

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
/// The `emptyDir` that carries the SPIFFE Workload API socket from the sidecar to the app
/// containers (`trellis.io/workload-api: "true"`).
pub const SPIFFE_VOLUME: &str = "trellis-spiffe";
/// Where [`SPIFFE_VOLUME`] is mounted, in the sidecar and in every app container.
pub const SPIFFE_DIR: &str = "/run/spiffe";
/// The socket the sidecar serves (`TRELLIS_WORKLOAD_API_SOCKET`).
pub const WORKLOAD_API_SOCKET: &str = "/run/spiffe/workload.sock";
/// What app containers get as `SPIFFE_ENDPOINT_SOCKET`, the variable every SPIFFE library reads.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "unix:///run/spiffe/workload.sock";
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

/// How long a native sidecar may take to install its first SVID before the kubelet restarts
/// it: `STARTUP_PERIOD_SECONDS` × `STARTUP_FAILURE_THRESHOLD` (2 minutes). The app waits that
/// long at most; a control plane that is down longer leaves the pod restarting the sidecar,
/// visibly, rather than starting an app that cannot call anyone.
pub const STARTUP_FAILURE_THRESHOLD: u32 = 120;
/// The startup probe's period: the app starts within a second of the first SVID.
pub const STARTUP_PERIOD_SECONDS: u32 = 1;

/// Where the sidecar goes in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarForm {
    /// First of `spec.initContainers`, `restartPolicy: Always`, with a `startupProbe`.
    Native,
    /// Last of `spec.containers`.
    Container,
}

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
    /// The native-sidecar form unless a pod's `trellis.io/native-sidecar` says otherwise
    /// (`native_sidecar`, `--native-sidecar`).
    pub native_sidecar: bool,
    /// What every app container's `NO_PROXY` lists besides localhost and the pod's own
    /// addresses (`no_proxy`, `--no-proxy`); a pod's `trellis.io/no-proxy` adds to it.
    pub no_proxy: Vec<String>,
    /// The sidecar's `TRELLIS_DEFAULT_ROUTE` unless a pod's `trellis.io/default-route` says
    /// otherwise (`sidecar_default_route`, `--sidecar-default-route`); `None`: no convention
    /// route.
    pub default_route: Option<String>,
    /// Checks a pod's `trellis.io/default-route`; `None`: passed on unchecked (the sidecar
    /// refuses a bad one when it starts).
    pub check_default_route: Option<DefaultRouteCheck>,
}

/// Checks a `TRELLIS_DEFAULT_ROUTE` value for a sidecar of the trust domain (second argument)
/// exactly as `trellis sidecar` will parse it; `Err` says what is wrong. The parser belongs to
/// trellis-sidecar, which this crate does not import, so the binary passes it in
/// (`trellis_sidecar::config::check_default_route`).
pub type DefaultRouteCheck = fn(spec: &str, trust_domain: &str) -> Result<(), String>;

/// The app-container variable holding the pod's addresses, which `NO_PROXY` names as
/// `$(TRELLIS_POD_IPS)` (the kubelet expands references to variables defined before). It is
/// the downward API's `status.podIPs`, which Kubernetes documents as "a comma separated list
/// that corresponds to the Pod's IPv4 and IPv6 addresses" ("Validate IPv4/IPv6 dual-stack"):
/// one address on a single-stack pod (the same as `status.podIP`), both on a dual-stack one,
/// and already in `NO_PROXY`'s comma-separated form.
pub const POD_IP_ENV: &str = "TRELLIS_POD_IPS";
/// What `NO_PROXY` always starts with: loopback by name and address, and the pod itself.
pub const NO_PROXY_ALWAYS: [&str; 4] = ["localhost", "127.0.0.1", "::1", "$(TRELLIS_POD_IPS)"];
/// The variables injection sets in app containers; a container that sets any of them itself
/// keeps its own environment.
pub const PROXY_ENV_NAMES: [&str; 5] = [
    POD_IP_ENV,
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// True for one `NO_PROXY` entry: a host, domain (`.svc`), address, CIDR, `host:port`, `[v6]`
/// or `*`. Nothing else, so an entry cannot split the list (`,`) or reference a variable (`$`).
pub fn no_proxy_entry_ok(entry: &str) -> bool {
    !entry.is_empty()
        && entry.len() <= 253
        && entry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:/*[]".contains(&b))
}

/// The proxy variables for an app container, in order (`$(TRELLIS_POD_IPS)` needs its
/// variable defined first), with `no_proxy` after the fixed entries. `HTTP_PROXY` is the
/// sidecar's shared outbound listener, so an app calling `http://b/…` reaches the mesh
/// unchanged. There is no `HTTPS_PROXY`: an app's own TLS would travel inside the mTLS (the
/// sidecar refuses `CONNECT`); such an app calls the plain `http://` name instead.
pub(super) fn proxy_env(no_proxy: &[String]) -> Vec<Value> {
    let proxy = format!("http://127.0.0.1:{OUTBOUND_PORT}");
    let list = NO_PROXY_ALWAYS
        .iter()
        .map(|e| (*e).to_owned())
        .chain(no_proxy.iter().cloned())
        .fold(Vec::<String>::new(), |mut seen, e| {
            if !seen.contains(&e) {
                seen.push(e);
            }
            seen
        })
        .join(",");
    vec![
        json!({ "name": POD_IP_ENV, "valueFrom": { "fieldRef": { "fieldPath": "status.podIPs" } } }),
        env("HTTP_PROXY", proxy.as_str()),
        env("http_proxy", proxy),
        env("NO_PROXY", list.as_str()),
        env("no_proxy", list),
    ]
}

fn env(name: &str, value: impl Into<String>) -> Value {
    json!({ "name": name, "value": value.into() })
}

/// What one pod's annotations decide about its sidecar.
#[derive(Debug, Clone, Copy)]
pub(super) struct PodSidecar<'a> {
    /// `TRELLIS_APP`'s port.
    pub app_port: u16,
    /// `TRELLIS_APP_PROTOCOL`, when not the default.
    pub app_protocol: Option<&'a str>,
    /// `TRELLIS_UPSTREAMS`.
    pub upstreams: Option<&'a str>,
    /// `TRELLIS_DEFAULT_ROUTE`.
    pub default_route: Option<&'a str>,
    /// The policy ConfigMap is mounted (`TRELLIS_POLICY`).
    pub policy: bool,
    /// The Workload API socket is served (`TRELLIS_WORKLOAD_API_SOCKET`).
    pub workload_api: bool,
}

/// The `trellis-sidecar` container, in `form`.
pub(super) fn sidecar_container(
    cfg: &InjectConfig,
    form: SidecarForm,
    pod: &PodSidecar<'_>,
) -> Value {
    let PodSidecar {
        app_port,
        app_protocol,
        upstreams,
        default_route,
        policy,
        workload_api,
    } = *pod;
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
    if let Some(p) = app_protocol {
        envs.push(env("TRELLIS_APP_PROTOCOL", p));
    }
    if let Some(u) = upstreams {
        envs.push(env("TRELLIS_UPSTREAMS", u));
    }
    if let Some(r) = default_route {
        envs.push(env("TRELLIS_DEFAULT_ROUTE", r));
    }
    if policy {
        envs.push(env("TRELLIS_POLICY", POLICY_DIR));
    }
    if workload_api {
        envs.push(env("TRELLIS_WORKLOAD_API_SOCKET", WORKLOAD_API_SOCKET));
    }
    let mut mounts =
        vec![json!({ "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true })];
    if policy {
        mounts.push(json!({ "name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": true }));
    }
    if workload_api {
        // Writable: the sidecar creates (and on exit removes) the socket here.
        mounts.push(json!({ "name": SPIFFE_VOLUME, "mountPath": SPIFFE_DIR }));
    }
    let probe = |path: &str, period: u32| {
        json!({
            "httpGet": { "path": path, "port": ADMIN_PORT, "scheme": "HTTP" },
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        })
    };
    let mut container = json!({
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
    });
    if form == SidecarForm::Native {
        if let Some(c) = container.as_object_mut() {
            // What makes an init container a sidecar: it keeps running beside the app.
            c.insert("restartPolicy".into(), json!("Always"));
            // Ready means the first SVID and bundle are installed; until then the kubelet
            // starts neither the next init container nor the app.
            c.insert(
                "startupProbe".into(),
                json!({
                    "httpGet": { "path": "/ready", "port": ADMIN_PORT, "scheme": "HTTP" },
                    "periodSeconds": STARTUP_PERIOD_SECONDS,
                    "timeoutSeconds": 2,
                    "failureThreshold": STARTUP_FAILURE_THRESHOLD,
                }),
            );
        }
    }
    container
}
