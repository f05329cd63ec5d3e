//! The injector against fixture pods and hand-made reviews: what is added, what is refused, and
//! that every patch applies.

use super::*;
use std::path::PathBuf;

const BUNDLE: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

/// The ordinary-container form (`native_sidecar: false`), which most tests below check; the
/// native form's tests use [`native_cfg`].
fn cfg() -> InjectConfig {
    InjectConfig {
        trust_domain: "example.org".into(),
        image: "ghcr.io/trellis-mesh/trellis:0.1.0".into(),
        control_plane: "trellis-control.trellis-system.svc:8443".into(),
        bundle_pem: BUNDLE.into(),
        native_sidecar: false,
        no_proxy: Vec::new(),
        default_route: None,
        check_default_route: Some(check_route),
    }
}

/// Stands in for the sidecar's parser (`trellis_sidecar::config::check_default_route`, which
/// this crate cannot import; the binary's tests run the real one): the `hosts=`, `address=`
/// and `identity=` keys, and the trust domain handed over.
fn check_route(spec: &str, trust_domain: &str) -> Result<(), String> {
    if trust_domain != "example.org" {
        return Err(format!("wrong trust domain `{trust_domain}`"));
    }
    for key in ["hosts=", "address=", "identity="] {
        if !spec.contains(key) {
            return Err(format!("`{key}` is required"));
        }
    }
    Ok(())
}

/// The default: native sidecars.
fn native_cfg() -> InjectConfig {
    InjectConfig {
        native_sidecar: true,
        ..cfg()
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

/// `pod` without the proxy environment injection adds to app containers (an `env` left
/// empty is removed), to compare the rest with the pod before.
fn without_proxy_env(pod: &Value) -> Value {
    let mut pod = pod.clone();
    for c in pod["spec"]["containers"].as_array_mut().unwrap() {
        let c = c.as_object_mut().unwrap();
        if let Some(env) = c.get_mut("env").and_then(Value::as_array_mut) {
            env.retain(|e| !PROXY_ENV_NAMES.contains(&e["name"].as_str().unwrap()));
            if env.is_empty() {
                c.remove("env");
            }
        }
    }
    pod
}

/// The proxy variables of an app container, by name; `TRELLIS_POD_IPS` as its fieldRef.
fn proxy_env_of(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| PROXY_ENV_NAMES.contains(&e["name"].as_str().unwrap()))
        .map(|e| {
            let value = e["value"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| e["valueFrom"]["fieldRef"]["fieldPath"].to_string());
            (e["name"].as_str().unwrap().to_owned(), value)
        })
        .collect()
}

/// Every variable of a container by name; one set from a field as its `fieldPath`.
fn env_of(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let value = e["value"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| e["valueFrom"]["fieldRef"]["fieldPath"].to_string());
            (e["name"].as_str().unwrap().to_owned(), value)
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
    // The app container is untouched but for the proxy environment, and still first.
    assert_eq!(
        without_proxy_env(&after)["spec"]["containers"][0],
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
    // The app containers' proxy environment: appended to the first's env, the second's added.
    let env_ops = ["/spec/containers/0/env/-"; 5];
    assert_eq!(
        paths,
        [
            &["/spec/containers/-", "/spec/volumes/-"][..],
            &env_ops,
            &["/spec/containers/1/env"]
        ]
        .concat()
    );
    assert!(ops.iter().all(|o| o["op"] == "add"));

    let before_containers = before["spec"]["containers"].as_array().unwrap();
    let stripped = without_proxy_env(&after);
    let after_containers = stripped["spec"]["containers"].as_array().unwrap();
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

/// The deployment fixture's pod as a controller of `owner_kind` would create it: a Job's pod
/// has `restartPolicy: Never` (or OnFailure) and a Job owner; a CronJob's pod is owned by the
/// Job the CronJob created.
fn review_of_owned_pod(owner_kind: &str, restart_policy: &str) -> Value {
    let mut doc = fixture_json("deployment-pod.json");
    let pod = &mut doc["request"]["object"];
    let api = if owner_kind == "ReplicaSet" {
        "apps/v1"
    } else {
        "batch/v1"
    };
    pod["metadata"]["ownerReferences"][0]["apiVersion"] = json!(api);
    pod["metadata"]["ownerReferences"][0]["kind"] = json!(owner_kind);
    pod["spec"]["restartPolicy"] = json!(restart_policy);
    doc
}

fn init_sidecar(pod: &Value) -> &Value {
    let inits = pod["spec"]["initContainers"]
        .as_array()
        .expect("initContainers");
    assert_eq!(
        inits[0]["name"], SIDECAR_CONTAINER,
        "the sidecar comes first"
    );
    &inits[0]
}

/// The native form: first init container, `restartPolicy: Always`, a startup probe on
/// `/ready`, the same container otherwise; no app container added.
fn assert_native(before: &Value, after: &Value) {
    let s = init_sidecar(after);
    assert_eq!(s["restartPolicy"], "Always");
    assert_eq!(
        s["startupProbe"],
        json!({
            "httpGet": { "path": "/ready", "port": 15000, "scheme": "HTTP" },
            "periodSeconds": 1,
            "timeoutSeconds": 2,
            "failureThreshold": 120,
        })
    );
    assert_eq!(s["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(s["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(s["args"], json!(["sidecar"]));
    assert_eq!(
        without_proxy_env(after)["spec"]["containers"],
        before["spec"]["containers"],
        "app containers untouched but for the proxy environment, no sidecar among them"
    );
    assert_eq!(
        after["spec"]["restartPolicy"],
        before["spec"]["restartPolicy"]
    );
    // Apart from the two form-specific fields, the same container as the fallback form.
    let mut plain = s.clone();
    let plain = plain.as_object_mut().unwrap();
    plain.remove("restartPolicy");
    plain.remove("startupProbe");
    let mut as_fallback = before.clone();
    set_at(
        &mut as_fallback,
        "/metadata/annotations",
        json!({ "trellis.io/native-sidecar": "false" }),
    );
    let r = review(
        &serde_json::to_vec(&json!({
            "apiVersion": API_VERSION, "kind": "AdmissionReview",
            "request": { "uid": "u", "kind": { "group": "", "version": "v1", "kind": "Pod" },
                         "operation": "CREATE", "namespace": "demo", "object": as_fallback }
        }))
        .unwrap(),
        &native_cfg(),
    )
    .unwrap();
    let fallback = apply(before, &response_of(&r));
    assert_eq!(&Value::Object(plain.clone()), sidecar(&fallback));
}

#[test]
fn native_sidecar_for_a_deployment_pod() {
    let doc = review_of_owned_pod("ReplicaSet", "Always");
    let r = review(&serde_json::to_vec(&doc).unwrap(), &native_cfg()).unwrap();
    assert_eq!(r.outcome, Outcome::Injected, "{}", r.detail);
    let paths: Vec<&str> = r
        .patch
        .iter()
        .map(|o| o["path"].as_str().unwrap())
        .collect();
    // No initContainers yet: the array is added whole (then the app's proxy environment).
    assert_eq!(
        paths,
        [
            "/spec/initContainers",
            "/spec/volumes",
            "/spec/containers/0/env"
        ]
    );
    let before = &doc["request"]["object"];
    let after = apply(before, &response_of(&r));
    assert_native(before, &after);
    assert_eq!(after["spec"]["initContainers"].as_array().unwrap().len(), 1);
}

#[test]
fn native_sidecar_for_a_job_pod_lets_the_job_complete() {
    let doc = review_of_owned_pod("Job", "Never");
    let r = review(&serde_json::to_vec(&doc).unwrap(), &native_cfg()).unwrap();
    assert_eq!(r.outcome, Outcome::Injected, "{}", r.detail);
    let before = &doc["request"]["object"];
    let after = apply(before, &response_of(&r));
    assert_native(before, &after);
    // The only regular container is the job's: when it exits the pod completes.
    assert_eq!(after["spec"]["containers"].as_array().unwrap().len(), 1);
    assert_eq!(after["spec"]["restartPolicy"], "Never");
}

#[test]
fn native_sidecar_for_a_cronjob_pod_goes_before_existing_init_containers() {
    let mut doc = review_of_owned_pod("Job", "OnFailure");
    doc["request"]["object"]["metadata"]["labels"] =
        json!({ "batch.kubernetes.io/job-name": "report-29012345" });
    doc["request"]["object"]["spec"]["initContainers"] =
        json!([{ "name": "migrate", "image": "busybox:1.36", "command": ["true"] }]);
    let r = review(&serde_json::to_vec(&doc).unwrap(), &native_cfg()).unwrap();
    assert_eq!(r.outcome, Outcome::Injected, "{}", r.detail);
    assert_eq!(r.patch[0]["path"], "/spec/initContainers/0");
    let before = &doc["request"]["object"];
    let after = apply(before, &response_of(&r));
    assert_native(before, &after);
    let inits = after["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits.len(), 2);
    assert_eq!(
        inits[1]["name"], "migrate",
        "the app's init container runs after the sidecar is ready"
    );
    // Idempotent in this form too.
    let again = review(&review_of_pod("deployment-pod.json", &after), &native_cfg()).unwrap();
    assert_eq!(again.outcome, Outcome::Skipped);
    assert_eq!(again.detail, "already injected");
}

#[test]
fn native_sidecar_false_annotation_keeps_the_ordinary_container() {
    let mut doc = review_of_owned_pod("ReplicaSet", "Always");
    doc["request"]["object"]["metadata"]["annotations"] =
        json!({ "trellis.io/native-sidecar": "false" });
    let r = review(&serde_json::to_vec(&doc).unwrap(), &native_cfg()).unwrap();
    assert_eq!(r.outcome, Outcome::Injected, "{}", r.detail);
    let before = &doc["request"]["object"];
    let after = apply(before, &response_of(&r));
    assert!(after["spec"].get("initContainers").is_none());
    let s = sidecar(&after);
    assert!(
        s.get("restartPolicy").is_none() && s.get("startupProbe").is_none(),
        "{s}"
    );
    assert_eq!(after["spec"]["containers"].as_array().unwrap().len(), 2);
}

#[test]
fn native_sidecar_setting_off_is_the_fallback_and_the_annotation_can_ask_for_native() {
    let doc = review_of_owned_pod("ReplicaSet", "Always");
    let r = review(&serde_json::to_vec(&doc).unwrap(), &cfg()).unwrap();
    let after = apply(&doc["request"]["object"], &response_of(&r));
    assert!(after["spec"].get("initContainers").is_none());
    assert_eq!(sidecar(&after)["name"], SIDECAR_CONTAINER);

    let mut doc = doc;
    doc["request"]["object"]["metadata"]["annotations"] =
        json!({ "trellis.io/native-sidecar": "true" });
    let r = review(&serde_json::to_vec(&doc).unwrap(), &cfg()).unwrap();
    let before = &doc["request"]["object"];
    assert_native(before, &apply(before, &response_of(&r)));
}

#[test]
fn native_sidecar_annotation_must_be_true_or_false() {
    let mut doc = review_of_owned_pod("ReplicaSet", "Always");
    doc["request"]["object"]["metadata"]["annotations"] =
        json!({ "trellis.io/native-sidecar": "yes" });
    let r = review(&serde_json::to_vec(&doc).unwrap(), &native_cfg()).unwrap();
    assert_eq!(r.outcome, Outcome::Error);
    let message = response_of(&r)["status"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("trellis.io/native-sidecar") && message.contains("1.29"),
        "{message}"
    );
}

#[test]
fn app_protocol_annotation_sets_the_sidecar_env_and_refuses_other_values() {
    let mut doc = review_of_owned_pod("ReplicaSet", "Always");
    doc["request"]["object"]["metadata"]["annotations"] =
        json!({ "trellis.io/app-protocol": "h2c" });
    let r = review(&serde_json::to_vec(&doc).unwrap(), &cfg()).unwrap();
    assert_eq!(r.outcome, Outcome::Injected, "{}", r.detail);
    let after = apply(&doc["request"]["object"], &response_of(&r));
    let env = sidecar(&after)["env"].as_array().unwrap().clone();
    assert!(
        env.iter()
            .any(|e| e["name"] == "TRELLIS_APP_PROTOCOL" && e["value"] == "h2c"),
        "{env:?}"
    );
    // Without the annotation the sidecar's own default (http1) applies: no variable.
    let plain = review_of_owned_pod("ReplicaSet", "Always");
    let r = review(&serde_json::to_vec(&plain).unwrap(), &cfg()).unwrap();
    let after = apply(&plain["request"]["object"], &response_of(&r));
    assert!(!sidecar(&after)["env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "TRELLIS_APP_PROTOCOL"));

    doc["request"]["object"]["metadata"]["annotations"] =
        json!({ "trellis.io/app-protocol": "grpc" });
    let r = review(&serde_json::to_vec(&doc).unwrap(), &cfg()).unwrap();
    assert_eq!(r.outcome, Outcome::Error);
    let message = response_of(&r)["status"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("trellis.io/app-protocol") && message.contains("h2c"),
        "{message}"
    );
}

/// `name`'s review with `annotations` added to the pod (and `edit` applied to it), injected.
fn inject_with(name: &str, annotations: Value, edit: impl Fn(&mut Value)) -> (Value, Review) {
    let mut doc = fixture_json(name);
    let pod = &mut doc["request"]["object"];
    set_at(pod, "/metadata/annotations", annotations);
    edit(pod);
    let pod = pod.clone();
    let review = review(&serde_json::to_vec(&doc).unwrap(), &native_cfg()).unwrap();
    (pod, review)
}

#[test]
fn workload_api_annotation_shares_the_socket_with_every_app_container() {
    let (pod, review) = inject_with(
        "deployment-pod.json",
        json!({ ANNOTATION_WORKLOAD_API: "true" }),
        |_| {},
    );
    assert_eq!(review.outcome, Outcome::Injected, "{}", review.detail);
    let after = apply(&pod, &response_of(&review));
    let s = init_sidecar(&after);
    assert_eq!(
        env_value(s, "TRELLIS_WORKLOAD_API_SOCKET").as_deref(),
        Some("/run/spiffe/workload.sock")
    );
    assert!(
        s["volumeMounts"]
            .as_array()
            .unwrap()
            .contains(&json!({ "name": SPIFFE_VOLUME, "mountPath": "/run/spiffe" })),
        "{}",
        s["volumeMounts"]
    );
    for app in after["spec"]["containers"].as_array().unwrap() {
        assert_eq!(
            env_value(app, "SPIFFE_ENDPOINT_SOCKET").as_deref(),
            Some("unix:///run/spiffe/workload.sock"),
            "{}",
            app["name"]
        );
        // The proxy environment is appended to the same list, never replacing it.
        assert_eq!(
            env_value(app, "HTTP_PROXY").as_deref(),
            Some("http://127.0.0.1:15001"),
            "{}",
            app["name"]
        );
        assert!(app["volumeMounts"].as_array().unwrap().contains(
            &json!({ "name": SPIFFE_VOLUME, "mountPath": "/run/spiffe", "readOnly": true })
        ));
    }
    let volumes = after["spec"]["volumes"].as_array().unwrap();
    assert!(volumes.contains(&json!({ "name": SPIFFE_VOLUME, "emptyDir": { "medium": "Memory" } })));
    // The sidecar's group joins every container, so apps of any uid may open the 0660 socket.
    assert_eq!(
        after["spec"]["securityContext"]["supplementalGroups"],
        json!([SIDECAR_UID])
    );
}

#[test]
fn without_the_workload_api_annotation_nothing_of_it_is_added() {
    for annotations in [json!({}), json!({ ANNOTATION_WORKLOAD_API: "false" })] {
        let (pod, review) = inject_with("deployment-pod.json", annotations, |_| {});
        let after = apply(&pod, &response_of(&review));
        assert_eq!(
            env_value(init_sidecar(&after), "TRELLIS_WORKLOAD_API_SOCKET"),
            None
        );
        for app in after["spec"]["containers"].as_array().unwrap() {
            assert_eq!(
                app.get("env")
                    .and_then(|_| env_value(app, "SPIFFE_ENDPOINT_SOCKET")),
                None
            );
        }
        assert_eq!(
            after["spec"]["securityContext"],
            pod["spec"]["securityContext"]
        );
    }
}

#[test]
fn workload_api_keeps_existing_env_mounts_and_groups() {
    let (pod, review) = inject_with(
        "deployment-pod.json",
        json!({ ANNOTATION_WORKLOAD_API: "true" }),
        |pod| {
            set_at(
                pod,
                "/spec/securityContext",
                json!({ "runAsNonRoot": true, "supplementalGroups": [1000] }),
            );
            set_at(
                pod,
                "/spec/containers/0/env",
                json!([{ "name": "A", "value": "1" }]),
            );
            set_at(
                pod,
                "/spec/containers/0/volumeMounts",
                json!([{ "name": "data", "mountPath": "/data" }]),
            );
        },
    );
    assert_eq!(review.outcome, Outcome::Injected, "{}", review.detail);
    let after = apply(&pod, &response_of(&review));
    let app = &after["spec"]["containers"][0];
    assert_eq!(env_value(app, "A").as_deref(), Some("1"));
    assert!(env_value(app, "SPIFFE_ENDPOINT_SOCKET").is_some());
    assert_eq!(app["volumeMounts"][0]["name"], "data");
    assert_eq!(after["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        after["spec"]["securityContext"]["supplementalGroups"],
        json!([1000, SIDECAR_UID])
    );

    // An app that sets SPIFFE_ENDPOINT_SOCKET itself keeps it, with a warning.
    let (pod, review) = inject_with(
        "deployment-pod.json",
        json!({ ANNOTATION_WORKLOAD_API: "true" }),
        |pod| {
            set_at(
                pod,
                "/spec/containers/0/env",
                json!([{ "name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///spire/agent.sock" }]),
            )
        },
    );
    let response = response_of(&review);
    let after = apply(&pod, &response);
    assert_eq!(
        env_value(&after["spec"]["containers"][0], "SPIFFE_ENDPOINT_SOCKET").as_deref(),
        Some("unix:///spire/agent.sock")
    );
    assert!(
        response["warnings"]
            .to_string()
            .contains("SPIFFE_ENDPOINT_SOCKET"),
        "{response}"
    );
}

#[test]
fn bad_workload_api_annotation_and_clashing_mount_are_refused() {
    let (_, review) = inject_with(
        "deployment-pod.json",
        json!({ ANNOTATION_WORKLOAD_API: "yes" }),
        |_| {},
    );
    assert_eq!(review.outcome, Outcome::Error);
    assert!(
        review.detail.contains(ANNOTATION_WORKLOAD_API) && review.detail.contains("\"true\""),
        "{}",
        review.detail
    );
    let (_, review) = inject_with(
        "deployment-pod.json",
        json!({ ANNOTATION_WORKLOAD_API: "true" }),
        |pod| {
            set_at(
                pod,
                "/spec/containers/0/volumeMounts",
                json!([{ "name": "x", "mountPath": "/run/spiffe" }]),
            )
        },
    );
    assert_eq!(review.outcome, Outcome::Error);
    assert!(review.detail.contains("/run/spiffe"), "{}", review.detail);
}

const NO_PROXY_BASE: &str = "localhost,127.0.0.1,::1,$(TRELLIS_POD_IPS)";

fn want_proxy_env(no_proxy: &str) -> Vec<(String, String)> {
    [
        ("TRELLIS_POD_IPS", "\"status.podIPs\""),
        ("HTTP_PROXY", "http://127.0.0.1:15001"),
        ("http_proxy", "http://127.0.0.1:15001"),
        ("NO_PROXY", no_proxy),
        ("no_proxy", no_proxy),
    ]
    .iter()
    .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
    .collect()
}

#[test]
fn app_containers_get_http_proxy_and_no_proxy_after_their_own_env() {
    for config in [cfg(), native_cfg()] {
        let doc = fixture_json("pod-with-volumes-and-ports.json");
        let r = review(&fixture("pod-with-volumes-and-ports.json"), &config).unwrap();
        let after = apply(&doc["request"]["object"], &response_of(&r));
        let containers = after["spec"]["containers"].as_array().unwrap();
        for app in containers.iter().filter(|c| c["name"] != SIDECAR_CONTAINER) {
            assert_eq!(proxy_env_of(app), want_proxy_env(NO_PROXY_BASE), "{app}");
        }
        // The app's own variable stays first: `$(TRELLIS_POD_IPS)` only needs its own to precede.
        assert_eq!(containers[0]["env"][0]["name"], "DATA_DIR");
        // Plain http:// only: no HTTPS_PROXY anywhere, and the sidecar itself gets none.
        assert!(!after.to_string().contains("HTTPS_PROXY"));
        let s = if config.native_sidecar {
            init_sidecar(&after)
        } else {
            sidecar(&after)
        };
        assert!(proxy_env_of(s).is_empty(), "{s}");
        // Init containers run before (or beside) the sidecar's start: left alone.
        assert!(!after["spec"]["initContainers"]
            .to_string()
            .contains("HTTP_PROXY"));
    }
}

#[test]
fn no_proxy_takes_the_control_plane_list_then_the_annotation() {
    let config = InjectConfig {
        no_proxy: vec![".corp.example".into(), "10.0.0.0/8".into()],
        ..cfg()
    };
    let mut doc = fixture_json("deployment-pod.json");
    doc["request"]["object"]["metadata"]["annotations"] =
        json!({ "trellis.io/no-proxy": " db.internal , .corp.example,[fd00::1]" });
    let r = review(&serde_json::to_vec(&doc).unwrap(), &config).unwrap();
    assert_eq!(r.outcome, Outcome::Injected, "{}", r.detail);
    let after = apply(&doc["request"]["object"], &response_of(&r));
    assert_eq!(
        proxy_env_of(&after["spec"]["containers"][0]),
        want_proxy_env(&format!(
            "{NO_PROXY_BASE},.corp.example,10.0.0.0/8,db.internal,[fd00::1]"
        ))
    );

    for bad in ["$(SECRET)", "a b", "evil;rm"] {
        doc["request"]["object"]["metadata"]["annotations"] =
            json!({ "trellis.io/no-proxy": format!("ok.example,{bad}") });
        let r = review(&serde_json::to_vec(&doc).unwrap(), &config).unwrap();
        assert_eq!(r.outcome, Outcome::Error, "{bad}");
        let message = response_of(&r)["status"]["message"].to_string();
        assert!(
            message.contains("trellis.io/no-proxy") && message.contains(bad),
            "{message}"
        );
    }
}

#[test]
fn proxy_env_opt_out_and_a_container_with_its_own_proxy_are_left_alone() {
    let mut doc = fixture_json("pod-with-volumes-and-ports.json");
    doc["request"]["object"]["metadata"]["annotations"] =
        json!({ "trellis.io/proxy-env": "false" });
    let (pod, r) = {
        let r = review(&serde_json::to_vec(&doc).unwrap(), &cfg()).unwrap();
        (doc["request"]["object"].clone(), r)
    };
    assert_eq!(r.outcome, Outcome::Injected, "{}", r.detail);
    let after = apply(&pod, &response_of(&r));
    let containers = after["spec"]["containers"].as_array().unwrap();
    assert_eq!(
        &containers[..2],
        &pod["spec"]["containers"].as_array().unwrap()[..],
        "opted out: app containers untouched"
    );

    doc["request"]["object"]["metadata"]["annotations"] = json!({ "trellis.io/proxy-env": "off" });
    let r = review(&serde_json::to_vec(&doc).unwrap(), &cfg()).unwrap();
    assert_eq!(r.outcome, Outcome::Error);
    let message = response_of(&r)["status"]["message"].to_string();
    assert!(
        message.contains("trellis.io/proxy-env") && message.contains("off"),
        "{message}"
    );

    // A container that sets its own proxy keeps it; the other still gets the sidecar's.
    doc["request"]["object"]["metadata"]["annotations"] = json!({});
    doc["request"]["object"]["spec"]["containers"][0]["env"] =
        json!([{ "name": "http_proxy", "value": "http://proxy.corp:3128" }]);
    let r = review(&serde_json::to_vec(&doc).unwrap(), &cfg()).unwrap();
    let response = response_of(&r);
    let after = apply(&doc["request"]["object"], &response);
    assert_eq!(
        after["spec"]["containers"][0],
        doc["request"]["object"]["spec"]["containers"][0]
    );
    assert_eq!(
        proxy_env_of(&after["spec"]["containers"][1]),
        want_proxy_env(NO_PROXY_BASE)
    );
    let warnings = response["warnings"].to_string();
    assert!(
        warnings.contains("`server` sets http_proxy itself"),
        "{warnings}"
    );
}

const ROUTE: &str = "hosts={service}.{namespace}.svc.cluster.local;{service}.{namespace},address={service}.{namespace}.svc.cluster.local:15443,identity=spiffe://{trust_domain}/ns/{namespace}/sa/{service}";

/// The sidecar's `TRELLIS_DEFAULT_ROUTE` after injecting `doc` with `config`, or `None`.
fn default_route_of(doc: &Value, config: &InjectConfig) -> Option<String> {
    let r = review(&serde_json::to_vec(doc).unwrap(), config).unwrap();
    assert_eq!(r.outcome, Outcome::Injected, "{}", r.detail);
    let after = apply(&doc["request"]["object"], &response_of(&r));
    let s = if config.native_sidecar {
        init_sidecar(&after)
    } else {
        sidecar(&after)
    };
    let env = env_of(s);
    let routes: Vec<&String> = env
        .iter()
        .filter(|(n, _)| n == "TRELLIS_DEFAULT_ROUTE")
        .map(|(_, v)| v)
        .collect();
    assert!(routes.len() <= 1, "{env:?}");
    // Only the sidecar gets it: the apps reach it through HTTP_PROXY.
    for app in after["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] != SIDECAR_CONTAINER)
    {
        assert!(!app.to_string().contains("TRELLIS_DEFAULT_ROUTE"), "{app}");
    }
    routes.first().map(|r| (*r).clone())
}

#[test]
fn sidecar_gets_the_control_plane_default_route_unless_the_pod_overrides_or_turns_it_off() {
    let mut doc = fixture_json("deployment-pod.json");
    for base in [cfg(), native_cfg()] {
        doc["request"]["object"]["metadata"]["annotations"] = json!({});
        assert_eq!(default_route_of(&doc, &base), None, "none by default");
        let config = InjectConfig {
            default_route: Some(ROUTE.into()),
            ..base
        };
        assert_eq!(default_route_of(&doc, &config).as_deref(), Some(ROUTE));

        let own = "hosts={service}.mesh,address={service}.mesh:15443,identity=spiffe://{trust_domain}/{service}";
        doc["request"]["object"]["metadata"]["annotations"] =
            json!({ "trellis.io/default-route": format!(" {own} ") });
        assert_eq!(default_route_of(&doc, &config).as_deref(), Some(own));
        // The pod's own route also works where the control plane sets none.
        let none = InjectConfig {
            default_route: None,
            ..config.clone()
        };
        assert_eq!(default_route_of(&doc, &none).as_deref(), Some(own));

        for off in ["false", "FALSE"] {
            doc["request"]["object"]["metadata"]["annotations"] =
                json!({ "trellis.io/default-route": off });
            assert_eq!(default_route_of(&doc, &config), None, "{off}");
        }
    }
}

#[test]
fn a_bad_default_route_annotation_is_refused_naming_it() {
    let config = InjectConfig {
        default_route: Some(ROUTE.into()),
        ..cfg()
    };
    let mut doc = fixture_json("deployment-pod.json");
    for (bad, why) in [
        (
            "hosts={service},identity=spiffe://x/y",
            "`address=` is required",
        ),
        ("off", "`hosts=` is required"),
        ("", "`hosts=` is required"),
    ] {
        doc["request"]["object"]["metadata"]["annotations"] =
            json!({ "trellis.io/default-route": bad });
        let r = review(&serde_json::to_vec(&doc).unwrap(), &config).unwrap();
        assert_eq!(r.outcome, Outcome::Error, "{bad}");
        let response = response_of(&r);
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("annotation trellis.io/default-route")
                && message.contains(why)
                && message.contains("\"false\" for none"),
            "{message}"
        );
    }
    // Without a check (none was given), the value is passed on for the sidecar to judge.
    let unchecked = InjectConfig {
        check_default_route: None,
        ..config
    };
    doc["request"]["object"]["metadata"]["annotations"] =
        json!({ "trellis.io/default-route": "hosts={service}" });
    assert_eq!(
        default_route_of(&doc, &unchecked).as_deref(),
        Some("hosts={service}")
    );
}

#[test]
fn reinjecting_a_pod_with_a_default_route_changes_nothing() {
    let config = InjectConfig {
        default_route: Some(ROUTE.into()),
        ..native_cfg()
    };
    let mut doc = fixture_json("deployment-pod.json");
    let r = review(&serde_json::to_vec(&doc).unwrap(), &config).unwrap();
    assert_eq!(r.outcome, Outcome::Injected, "{}", r.detail);
    let after = apply(&doc["request"]["object"], &response_of(&r));
    doc["request"]["object"] = after;
    let again = review(&serde_json::to_vec(&doc).unwrap(), &config).unwrap();
    assert_eq!(again.outcome, Outcome::Skipped, "{}", again.detail);
    assert!(again.patch.is_empty());
    assert!(response_of(&again).get("patch").is_none());
}
