//! `k8s/`: what a schema cannot check. `tests/run.sh` validates every manifest with
//! `kubernetes-validate --strict`; this test reads the same YAML and checks that it follows the
//! project's rules and the issue #7 contract:
//!
//! - every file a kustomization names exists, and every manifest is named by a kustomization
//!   (so none escapes validation);
//! - every container is hardened (non-root 65532, read-only root, no privilege escalation, all
//!   capabilities dropped, RuntimeDefault seccomp) and has requests and limits;
//! - the control plane's flags are flags `trellis control --help` lists, with the contract's
//!   values, and its probes, CA volume (mode 0400), state volume and Service ports line up;
//! - the webhook configuration matches the contract (path /inject, Fail, 5 s, selectors);
//! - RBAC is exactly the issuer-discovery binding;
//! - the demo's annotations, Services and policies are consistent (the policies pass
//!   `trellis policy check` and decide as docs/kubernetes.md says).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use serde_json::Value;
use trellis_tests::{run_with_timeout, trellis_bin, workspace_root, COMMAND_TIMEOUT};

const IMAGE: &str = "ghcr.io/trellis-mesh/trellis:0.1.0";
const NONROOT: u64 = 65532;

fn k8s_dir() -> PathBuf {
    workspace_root().join("k8s")
}

/// Every directory under `k8s/` with a kustomization.yaml, except the observability files
/// (Prometheus rules and a Grafana dashboard, not Kubernetes objects).
fn kustomization_dirs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if dir.ends_with("observability") {
            return;
        }
        if dir.join("kustomization.yaml").is_file() {
            out.push(dir.to_path_buf());
        }
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect();
        entries.sort();
        for e in entries {
            walk(&e, out);
        }
    }
    let mut out = Vec::new();
    walk(&k8s_dir(), &mut out);
    out
}

/// Every `.yaml` file under `k8s/` (observability excluded).
fn yaml_files() -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, out: &mut BTreeSet<PathBuf>) {
        if dir.ends_with("observability") {
            return;
        }
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                out.insert(p);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&k8s_dir(), &mut out);
    out
}

/// The documents of a YAML file (`---` separated), comment-only documents skipped.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let v: Value = serde_yaml_ng::from_str(&current)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if !v.is_null() {
                docs.push(v);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs
}

fn kustomization(dir: &Path) -> Value {
    documents(&dir.join("kustomization.yaml")).remove(0)
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The objects of a kustomization's own resource files (not of other kustomizations it
/// includes).
fn objects_of(dir: &Path) -> Vec<Value> {
    strs(&kustomization(dir)["resources"])
        .into_iter()
        .map(|r| dir.join(r))
        .filter(|p| p.is_file())
        .flat_map(|p| documents(&p))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn kustomizations_name_files_that_exist_and_every_manifest_is_named() {
    let dirs = kustomization_dirs();
    for want in [
        "base",
        "overlays/cluster",
        "overlays/single-node",
        "examples/demo",
    ] {
        assert!(
            dirs.contains(&k8s_dir().join(want)),
            "k8s/{want}/kustomization.yaml is missing"
        );
    }
    let mut named = BTreeSet::new();
    for dir in &dirs {
        let k = kustomization(dir);
        assert_eq!(k["kind"], "Kustomization", "{}", dir.display());
        named.insert(dir.join("kustomization.yaml"));
        for r in strs(&k["resources"]) {
            let p = dir.join(r);
            if p.is_dir() {
                assert!(
                    p.join("kustomization.yaml").is_file(),
                    "{}: resource {r} is a directory without a kustomization.yaml",
                    dir.display()
                );
            } else {
                assert!(
                    p.is_file(),
                    "{}: resource {r} does not exist",
                    dir.display()
                );
                assert!(
                    !documents(&p).is_empty(),
                    "{}: resource {r} holds no object",
                    dir.display()
                );
                named.insert(p);
            }
        }
        for patch in k["patches"].as_array().into_iter().flatten() {
            let p = dir.join(patch["path"].as_str().unwrap());
            assert!(
                p.is_file(),
                "{}: patch {} does not exist",
                dir.display(),
                p.display()
            );
            named.insert(p);
        }
        for generator in ["configMapGenerator", "secretGenerator"] {
            for g in k[generator].as_array().into_iter().flatten() {
                for f in strs(&g["files"]) {
                    let file = f.rsplit_once('=').map_or(f, |(_, path)| path);
                    assert!(
                        dir.join(file).is_file(),
                        "{}: {generator} file {file} does not exist",
                        dir.display()
                    );
                }
            }
        }
    }
    let orphans: Vec<_> = yaml_files().difference(&named).cloned().collect();
    assert!(
        orphans.is_empty(),
        "not named by any kustomization (so never validated or applied): {orphans:?}"
    );
}

/// Every container of every Deployment in `dir`'s own files, with its pod spec.
fn containers(dir: &Path) -> Vec<(String, Value, Value)> {
    let mut out = Vec::new();
    for o in objects_of(dir) {
        if o["kind"] != "Deployment" {
            continue;
        }
        let pod = o["spec"]["template"]["spec"].clone();
        for list in ["initContainers", "containers"] {
            for c in pod[list].as_array().into_iter().flatten() {
                let name = format!(
                    "{}/{} container {}",
                    dir.display(),
                    o["metadata"]["name"].as_str().unwrap(),
                    c["name"].as_str().unwrap()
                );
                out.push((name, c.clone(), pod.clone()));
            }
        }
    }
    out
}

#[test]
fn every_container_is_hardened_and_has_resources() {
    let mut checked = 0;
    for dir in [k8s_dir().join("base"), k8s_dir().join("examples/demo")] {
        for (name, c, pod) in containers(&dir) {
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{name}: runAsNonRoot");
            assert_eq!(sc["runAsUser"], NONROOT, "{name}: runAsUser");
            assert_eq!(
                sc["readOnlyRootFilesystem"], true,
                "{name}: readOnlyRootFilesystem"
            );
            assert_eq!(
                sc["allowPrivilegeEscalation"], false,
                "{name}: allowPrivilegeEscalation"
            );
            assert_ne!(sc["privileged"], true, "{name}: privileged");
            assert_eq!(
                strs(&sc["capabilities"]["drop"]),
                ["ALL"],
                "{name}: capabilities.drop"
            );
            assert!(
                sc["capabilities"]["add"].is_null(),
                "{name}: adds capabilities"
            );
            let seccomp = if sc["seccompProfile"].is_null() {
                &pod["securityContext"]["seccompProfile"]
            } else {
                &sc["seccompProfile"]
            };
            assert_eq!(seccomp["type"], "RuntimeDefault", "{name}: seccompProfile");
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"], true,
                "{name}: pod runAsNonRoot"
            );
            assert_ne!(pod["hostNetwork"], true, "{name}: hostNetwork");
            for kind in ["requests", "limits"] {
                for res in ["cpu", "memory"] {
                    assert!(
                        !c["resources"][kind][res].is_null(),
                        "{name}: resources.{kind}.{res} missing"
                    );
                }
            }
            checked += 1;
        }
    }
    // The control plane, service-a's app and client, service-b's app.
    assert_eq!(checked, 4, "containers checked");
}

/// `trellis control --help`: the long flags and the `TRELLIS_*` variables it lists.
fn control_help() -> (BTreeSet<String>, BTreeSet<String>) {
    let mut cmd = Command::new(trellis_bin());
    cmd.args(["control", "--help"]);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT).unwrap();
    assert!(
        out.status.success(),
        "trellis control --help: {}",
        out.status
    );
    let help = String::from_utf8(out.stdout).unwrap();
    let flags = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(',').to_string())
        .collect();
    let envs = help
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap().trim().to_string())
        .collect();
    (flags, envs)
}

/// Flags the Deployment uses that `trellis control --help` need not list yet because another
/// change adds them. Empty: every flag the manifests use is in the binary.
const NOT_YET_IN_THE_BINARY: &[&str] = &[];

#[test]
fn control_plane_deployment_follows_the_contract() {
    let base = k8s_dir().join("base");
    let objects = objects_of(&base);
    let deploy = find(&objects, "Deployment", "trellis-control");
    assert_eq!(deploy["metadata"]["namespace"], "trellis-system");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "trellis-control");
    // Secret files are root-owned: fsGroup is what lets uid 65532 read the CA files.
    assert_eq!(pod["securityContext"]["fsGroup"], NONROOT);
    let c = &pod["containers"][0];
    assert_eq!(c["image"], IMAGE);

    // Flags: `control`, then --flag=value pairs that `trellis control --help` lists.
    let args = strs(&c["args"]);
    assert_eq!(args.first(), Some(&"control"), "args: {args:?}");
    let (flags, envs) = control_help();
    let mut values = BTreeMap::new();
    for arg in &args[1..] {
        let (flag, value) = arg
            .split_once('=')
            .unwrap_or_else(|| panic!("`{arg}`: write flags as --flag=value"));
        assert!(
            flags.contains(flag) || NOT_YET_IN_THE_BINARY.contains(&flag),
            "`{flag}` is not a `trellis control` flag; it has: {flags:?}"
        );
        values.insert(flag, value);
    }
    for (flag, want) in [
        ("--listen", "0.0.0.0:8443"),
        ("--admin", "0.0.0.0:9090"),
        ("--webhook-listen", "0.0.0.0:8444"),
        ("--state-dir", "/var/lib/trellis"),
        ("--ca-cert", "/etc/trellis/ca/intermediate.pem"),
        ("--ca-key", "/etc/trellis/ca/intermediate-key.pem"),
        ("--ca-bundle", "/etc/trellis/ca/bundle.pem"),
        (
            "--k8s-jwks-url",
            "https://kubernetes.default.svc/openid/v1/jwks",
        ),
        ("--k8s-audience", "trellis"),
        ("--k8s-issuer", "$(K8S_ISSUER)"),
        ("--trust-domain", "$(TRUST_DOMAIN)"),
        ("--sidecar-image", "$(SIDECAR_IMAGE)"),
    ] {
        assert_eq!(values.get(flag), Some(&want), "{flag}");
    }

    // Env: every $(NAME) an arg uses is defined; TRELLIS_* names are the binary's; the
    // database URL comes from the trellis-database Secret.
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    for arg in &args {
        if let Some((_, rest)) = arg.split_once("$(") {
            let name = rest.split(')').next().unwrap();
            assert!(env.contains_key(name), "`{arg}` uses $({name}), not in env");
        }
    }
    for name in env.keys().filter(|n| n.starts_with("TRELLIS_")) {
        assert!(
            envs.contains(*name),
            "env {name} is not a `trellis control` variable; it has: {envs:?}"
        );
    }
    let db = &env["TRELLIS_DATABASE"]["valueFrom"]["secretKeyRef"];
    assert_eq!(
        (&db["name"], &db["key"]),
        (&"trellis-database".into(), &"url".into())
    );
    assert_eq!(
        env["K8S_ISSUER"]["value"],
        "https://kubernetes.default.svc.cluster.local"
    );
    assert_eq!(env["TRUST_DOMAIN"]["value"], "example.org");
    assert_eq!(env["SIDECAR_IMAGE"]["value"], IMAGE);

    // `kubectl exec deploy/trellis-control -- trellis token create …` (and `ca rotate`) run
    // in this container with this environment: the socket the control plane serves is the
    // one they use, inside the state directory, and neither needs the database URL.
    let socket = env["TRELLIS_OPERATOR_SOCKET"]["value"].as_str().unwrap();
    assert_eq!(socket, "/var/lib/trellis/operator.sock");
    assert!(socket.starts_with(&format!("{}/", values["--state-dir"])));
    for sub in [&["token", "create"][..], &["ca", "rotate"][..]] {
        let mut cmd = Command::new(trellis_bin());
        cmd.args(sub).arg("--help");
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT).unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("TRELLIS_OPERATOR_SOCKET") && help.contains(socket),
            "trellis {sub:?} must read TRELLIS_OPERATOR_SOCKET and default to {socket}:\n{help}"
        );
        assert!(
            !help.contains("[env: TRELLIS_DATABASE"),
            "trellis {sub:?} must not pick the database URL up from the pod's environment"
        );
    }

    // Ports and probes on the admin port.
    let ports: BTreeMap<&str, &Value> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), &p["containerPort"]))
        .collect();
    assert_eq!(ports["sds"], 8443);
    assert_eq!(ports["webhook"], 8444);
    assert_eq!(ports["admin"], 9090);
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/ready"),
        ("startupProbe", "/healthz"),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "admin", "{probe}");
    }

    // Volumes: the CA Secret at 0400, read-only at /etc/trellis/ca; an emptyDir holding the
    // state directory (mounted at or above it).
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let mounts: BTreeMap<&str, &Value> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m))
        .collect();
    let ca = &volumes["ca"]["secret"];
    assert_eq!(ca["secretName"], "trellis-ca");
    assert_eq!(
        ca["defaultMode"], 0o400,
        "CA Secret defaultMode must be 0400"
    );
    assert_eq!(mounts["ca"]["mountPath"], "/etc/trellis/ca");
    assert_eq!(mounts["ca"]["readOnly"], true);
    assert!(volumes["state"]["emptyDir"].is_object());
    let state_mount = mounts["state"]["mountPath"].as_str().unwrap();
    assert!(
        Path::new("/var/lib/trellis").starts_with(state_mount),
        "the state emptyDir ({state_mount}) does not hold --state-dir"
    );

    // Service: sds 8443, webhook 443 → 8444, admin 9090, all selecting the pods.
    let svc = find(&objects, "Service", "trellis-control");
    let pod_labels = &deploy["spec"]["template"]["metadata"]["labels"];
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v, "Service selector {k}");
    }
    let svc_ports: BTreeMap<&str, (&Value, &Value)> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), (&p["port"], &p["targetPort"])))
        .collect();
    assert_eq!(svc_ports["sds"], (&8443.into(), &"sds".into()));
    assert_eq!(svc_ports["webhook"], (&443.into(), &"webhook".into()));
    assert_eq!(svc_ports["admin"], (&9090.into(), &"admin".into()));

    // PodDisruptionBudget.
    let pdb = find(&objects, "PodDisruptionBudget", "trellis-control");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v, "PDB selector {k}");
    }

    // The published trust bundle.
    let bundle = find(&objects, "ConfigMap", "trellis-bundle");
    assert_eq!(bundle["metadata"]["namespace"], "trellis-system");
    assert!(bundle["data"]["bundle.pem"].is_string());
}

#[test]
fn rbac_is_only_the_issuer_discovery_binding() {
    let objects = objects_of(&k8s_dir().join("base"));
    let rbac: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            o["apiVersion"]
                .as_str()
                .unwrap()
                .starts_with("rbac.authorization.k8s.io/")
        })
        .collect();
    assert_eq!(rbac.len(), 1, "RBAC objects: {rbac:?}");
    let crb = rbac[0];
    assert_eq!(crb["kind"], "ClusterRoleBinding");
    assert_eq!(crb["roleRef"]["kind"], "ClusterRole");
    assert_eq!(
        crb["roleRef"]["name"],
        "system:service-account-issuer-discovery"
    );
    let subjects = crb["subjects"].as_array().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(subjects[0]["name"], "trellis-control");
    assert_eq!(subjects[0]["namespace"], "trellis-system");
}

#[test]
fn network_policy_admits_sidecars_to_sds_and_the_api_server_to_the_webhook() {
    let objects = objects_of(&k8s_dir().join("base"));
    let np = find(&objects, "NetworkPolicy", "trellis-control");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "trellis-control"
    );
    let rules = np["spec"]["ingress"].as_array().unwrap();
    let rule_for = |port: u64| {
        rules
            .iter()
            .find(|r| {
                r["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["port"] == port)
            })
            .unwrap_or_else(|| panic!("no ingress rule for port {port}"))
    };
    let sds = rule_for(8443);
    assert!(
        sds["from"].as_array().unwrap().iter().any(|peer| {
            peer["namespaceSelector"]["matchLabels"]["trellis.io/inject"] == "enabled"
                && peer["podSelector"].is_null()
        }),
        "SDS is not open to injected namespaces: {sds}"
    );
    // The API server's address is cluster-specific: the webhook port is open (no `from`).
    assert!(rule_for(8444)["from"].is_null());
}

#[test]
fn webhook_configuration_follows_the_contract() {
    let objects = objects_of(&k8s_dir().join("base"));
    let mwc = find(
        &objects,
        "MutatingWebhookConfiguration",
        "trellis-sidecar-injector",
    );
    let hooks = mwc["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 2);
    for h in hooks {
        let name = h["name"].as_str().unwrap();
        assert!(name.split('.').count() >= 3, "{name}: not fully qualified");
        let svc = &h["clientConfig"]["service"];
        assert_eq!(svc["name"], "trellis-control", "{name}");
        assert_eq!(svc["namespace"], "trellis-system", "{name}");
        assert_eq!(svc["path"], "/inject", "{name}");
        assert_eq!(svc["port"], 443, "{name}");
        let ca_bundle = h["clientConfig"]["caBundle"].as_str().unwrap();
        assert!(
            base64::engine::general_purpose::STANDARD
                .decode(ca_bundle)
                .is_ok(),
            "{name}: caBundle is not base64"
        );
        assert_eq!(h["failurePolicy"], "Fail", "{name}");
        assert_eq!(h["timeoutSeconds"], 5, "{name}");
        assert_eq!(h["sideEffects"], "None", "{name}");
        assert_eq!(h["reinvocationPolicy"], "Never", "{name}");
        assert_eq!(strs(&h["admissionReviewVersions"]), ["v1"], "{name}");
        let rules = h["rules"].as_array().unwrap();
        assert_eq!(rules.len(), 1, "{name}");
        assert_eq!(strs(&rules[0]["operations"]), ["CREATE"], "{name}");
        assert_eq!(strs(&rules[0]["apiGroups"]), [""], "{name}");
        assert_eq!(strs(&rules[0]["apiVersions"]), ["v1"], "{name}");
        assert_eq!(strs(&rules[0]["resources"]), ["pods"], "{name}");
        // The control plane's namespace is never selected: it could not start otherwise.
        let excluded = h["namespaceSelector"]["matchExpressions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| {
                e["key"] == "kubernetes.io/metadata.name"
                    && e["operator"] == "NotIn"
                    && strs(&e["values"]).contains(&"trellis-system")
            });
        assert!(excluded, "{name}: trellis-system is not excluded");
    }
    // One entry per namespace label, one per pod label; disjoint.
    assert_eq!(
        hooks[0]["namespaceSelector"]["matchLabels"]["trellis.io/inject"],
        "enabled"
    );
    assert!(hooks[0]["objectSelector"].is_null());
    assert_eq!(
        hooks[1]["objectSelector"]["matchLabels"]["trellis.io/inject"],
        "enabled"
    );
    assert!(hooks[1]["namespaceSelector"]["matchExpressions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["key"] == "trellis.io/inject"
            && e["operator"] == "NotIn"
            && strs(&e["values"]) == ["enabled"]));
}

#[test]
fn overlays_patch_what_base_defines() {
    let base = objects_of(&k8s_dir().join("base"));
    let deploy = find(&base, "Deployment", "trellis-control");
    let base_env: BTreeSet<&str> = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for (overlay, patch) in [
        ("overlays/cluster", "control-plane.yaml"),
        ("overlays/single-node", "one-replica.yaml"),
    ] {
        let doc = documents(&k8s_dir().join(overlay).join(patch)).remove(0);
        assert_eq!(doc["kind"], "Deployment");
        assert_eq!(doc["metadata"]["name"], "trellis-control");
        let container = &doc["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["name"], "trellis-control", "{overlay}/{patch}");
        // A misspelt name would add a variable instead of changing (or deleting) one.
        for e in container["env"].as_array().unwrap() {
            let name = e["name"].as_str().unwrap();
            assert!(
                base_env.contains(name),
                "{overlay}/{patch}: env {name} is not in base"
            );
        }
    }
    // The cluster overlay's replacement writes the webhook's caBundle.
    let k = kustomization(&k8s_dir().join("overlays/cluster"));
    let target = &k["replacements"][0]["targets"][0];
    assert_eq!(target["select"]["name"], "trellis-sidecar-injector");
    assert_eq!(
        strs(&target["fieldPaths"]),
        ["webhooks.*.clientConfig.caBundle"]
    );
    let images = k["images"].as_array().unwrap();
    assert_eq!(images[0]["name"], IMAGE.split(':').next().unwrap());
}

/// Runs `trellis policy <args>`, returning stdout; it must succeed.
fn trellis_policy(args: &[&str], files: &[&Path]) -> String {
    let mut cmd = Command::new(trellis_bin());
    cmd.arg("policy").args(args).args(files);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "trellis policy {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn demo_is_consistent_and_its_policies_decide_as_documented() {
    let demo = k8s_dir().join("examples/demo");
    let objects = objects_of(&demo);
    let ns = find(&objects, "Namespace", "demo");
    assert_eq!(ns["metadata"]["labels"]["trellis.io/inject"], "enabled");

    let dir = tempfile::tempdir().unwrap();
    let mut policy_files = BTreeMap::new();
    for svc in ["service-a", "service-b"] {
        find(&objects, "ServiceAccount", svc);
        let deploy = find(&objects, "Deployment", svc);
        let pod = &deploy["spec"]["template"];
        assert_eq!(pod["spec"]["serviceAccountName"], svc);
        let ann = &pod["metadata"]["annotations"];
        assert_eq!(ann["trellis.io/app-port"], "8080", "{svc}");
        assert_ne!(ann["trellis.io/inject"], "false", "{svc}");

        // The policy ConfigMap the annotation names exists, and its files compile.
        let cm_name = ann["trellis.io/policy-configmap"].as_str().unwrap();
        let cm = find(&objects, "ConfigMap", cm_name);
        assert_eq!(cm["metadata"]["namespace"], "demo");
        let data = cm["data"].as_object().unwrap();
        assert!(!data.is_empty());
        let svc_dir = dir.path().join(svc);
        std::fs::create_dir(&svc_dir).unwrap();
        for (key, text) in data {
            // The sidecar reads the directory's *.yaml files.
            assert!(key.ends_with(".yaml"), "{cm_name}: key {key}");
            std::fs::write(svc_dir.join(key), text.as_str().unwrap()).unwrap();
        }
        trellis_policy(&["check"], &[&svc_dir]);
        policy_files.insert(svc, svc_dir);

        // Mesh traffic goes to the sidecar's mTLS port.
        let service = find(&objects, "Service", svc);
        let ports = service["spec"]["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0]["name"], "trellis-mtls");
        assert_eq!(ports[0]["port"], 15443);
        assert_eq!(ports[0]["targetPort"], 15443);
    }
    let a = find(&objects, "Deployment", "service-a");
    assert_eq!(
        a["spec"]["template"]["metadata"]["annotations"]["trellis.io/upstreams"],
        "name=service-b,address=service-b.demo.svc:15443,identity=spiffe://example.org/ns/demo/sa/service-b"
    );

    // service-b: service-a may GET /api/**, nothing else, and nobody else may.
    let b = policy_files["service-b"].as_path();
    for (from, method, path, want) in [
        (
            "spiffe://example.org/ns/demo/sa/service-a",
            "GET",
            "/api/hello",
            "ALLOW",
        ),
        (
            "spiffe://example.org/ns/demo/sa/service-a",
            "POST",
            "/api/hello",
            "DENY",
        ),
        (
            "spiffe://example.org/ns/demo/sa/service-a",
            "GET",
            "/admin",
            "DENY",
        ),
        (
            "spiffe://example.org/ns/demo/sa/other",
            "GET",
            "/api/hello",
            "DENY",
        ),
    ] {
        let out = trellis_policy(
            &[
                "explain", "--from", from, "--method", method, "--path", path,
            ],
            &[b],
        );
        assert!(
            out.starts_with(want),
            "service-b policy, {from} {method} {path}: want {want}, got:\n{out}"
        );
        eprintln!(
            "service-b policy: {method} {path} from {from}: {}",
            out.lines().next().unwrap()
        );
    }
}
