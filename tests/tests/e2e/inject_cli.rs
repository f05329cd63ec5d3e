//! `trellis inject -f FILE|-`: the webhook's injection over a multi-document manifest with
//! every injected kind, kinds that pass through, opt-outs and a never-injected namespace;
//! idempotence; the fallback form; the app containers' proxy environment (`--no-proxy`,
//! `trellis.io/no-proxy`, `trellis.io/proxy-env: "false"`); the sidecar's convention route
//! (`--sidecar-default-route`, `trellis.io/default-route`); and the output validated strictly
//! against the Kubernetes 1.30 schemas and the newest ones `kubernetes-validate` ships.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context as _};
use serde_json::Value;
use trellis_tests::{kubernetes_validate_or_skip, run_with_timeout, trellis_bin, COMMAND_TIMEOUT};

/// One object of every kind `trellis inject` handles, plus ones it must leave alone.
const MANIFESTS: &str = r#"# A comment: dropped, the objects kept.
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    trellis.io/inject: enabled
---
apiVersion: v1
kind: Pod
metadata:
  name: debug
  namespace: shop
spec:
  containers:
    - name: app
      image: busybox:1.36
      command: ["sleep", "3600"]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      annotations:
        trellis.io/app-port: "8080"
        # YAML 1.1 booleans as strings: kubectl must still read strings in the output.
        example.com/buffering: "on"
    spec:
      serviceAccountName: web
      containers:
        - name: web
          image: nginx:1.27
          env: [{name: VERBOSE, value: "yes"}]
          ports:
            - containerPort: 8080
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
  namespace: shop
spec:
  serviceName: db
  selector:
    matchLabels: {app: db}
  template:
    metadata:
      labels: {app: db}
    spec:
      containers:
        - name: db
          image: postgres:16
          ports:
            - containerPort: 5432
      volumes:
        - name: scratch
          emptyDir: {}
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: agent
  namespace: shop
spec:
  selector:
    matchLabels: {app: agent}
  template:
    metadata:
      labels: {app: agent}
    spec:
      containers:
        - name: agent
          image: busybox:1.36
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: legacy
spec:
  selector:
    matchLabels: {app: legacy}
  template:
    metadata:
      labels: {app: legacy}
    spec:
      containers:
        - name: legacy
          image: busybox:1.36
---
apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
  namespace: shop
spec:
  backoffLimit: 2
  template:
    spec:
      restartPolicy: Never
      initContainers:
        - name: wait
          image: busybox:1.36
          command: ["true"]
      containers:
        - name: migrate
          image: busybox:1.36
          command: ["true"]
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: report
  namespace: shop
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers:
            - name: report
              image: busybox:1.36
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: opted-out-on-the-pod
  namespace: shop
spec:
  selector:
    matchLabels: {app: a}
  template:
    metadata:
      labels: {app: a}
      annotations:
        trellis.io/inject: "false"
    spec:
      containers:
        - name: a
          image: busybox:1.36
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: opted-out-on-the-workload
  namespace: shop
  annotations:
    trellis.io/inject: "false"
spec:
  selector:
    matchLabels: {app: b}
  template:
    metadata:
      labels: {app: b}
    spec:
      containers:
        - name: b
          image: busybox:1.36
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns-like
  namespace: kube-system
spec:
  selector:
    matchLabels: {app: c}
  template:
    metadata:
      labels: {app: c}
    spec:
      containers:
        - name: c
          image: busybox:1.36
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: {app: web}
  ports:
    - name: mtls
      port: 15443
      targetPort: 15443
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: shop
data:
  replicas: "2"
  enabled: "true"
"#;

/// Where each injected kind keeps its pod spec.
fn pod_spec(doc: &Value) -> Option<&Value> {
    match doc["kind"].as_str()? {
        "Pod" => Some(&doc["spec"]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(&doc["spec"]["template"]["spec"])
        }
        "CronJob" => Some(&doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
        _ => None,
    }
}

/// The documents of a `---`-separated YAML stream, as JSON.
fn documents(text: &str) -> Vec<Value> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let v: Value = serde_yaml_ng::from_str(&current).unwrap();
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

fn name(doc: &Value) -> String {
    format!(
        "{} {}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// A trust bundle from `trellis ca init`, in `dir`.
fn bundle(dir: &Path) -> anyhow::Result<PathBuf> {
    let out = dir.join("ca");
    let mut cmd = Command::new(trellis_bin());
    cmd.args(["ca", "init", "--trust-domain", "example.org", "--out"])
        .arg(&out);
    let done = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    ensure!(
        done.status.success(),
        "ca init: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    Ok(out.join("bundle.pem"))
}

/// `trellis inject` with `args`; (stdout, stderr), failing unless it exits 0.
fn inject(args: &[&str]) -> anyhow::Result<(String, String)> {
    let mut cmd = Command::new(trellis_bin());
    cmd.arg("inject").args(args);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    ensure!(out.status.success(), "trellis inject {args:?}: {stderr}");
    Ok((stdout, stderr))
}

/// The variables injection adds to app containers.
const PROXY_ENV: [&str; 5] = [
    "TRELLIS_POD_IPS",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// `spec` without the proxy variables of its app containers (an `env` left empty removed).
fn strip_proxy_env(spec: &Value) -> Value {
    let mut spec = spec.clone();
    for c in spec["containers"].as_array_mut().into_iter().flatten() {
        let c = c.as_object_mut().unwrap();
        if let Some(env) = c.get_mut("env").and_then(Value::as_array_mut) {
            env.retain(|e| !PROXY_ENV.contains(&e["name"].as_str().unwrap_or("")));
            if env.is_empty() {
                c.remove("env");
            }
        }
    }
    spec
}

/// A container's proxy variables by name (`TRELLIS_POD_IPS`: its fieldPath).
fn proxy_vars(container: &Value) -> std::collections::BTreeMap<String, String> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| PROXY_ENV.contains(&e["name"].as_str().unwrap_or("")))
        .map(|e| {
            let v = e["value"]
                .as_str()
                .or_else(|| e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
                .unwrap_or("?");
            (e["name"].as_str().unwrap().to_owned(), v.to_owned())
        })
        .collect()
}

fn sidecars_in(spec: &Value, list: &str) -> Vec<Value> {
    spec[list]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter(|c| c["name"] == "trellis-sidecar")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// `kubernetes-validate --strict` for Kubernetes 1.30 and the newest version it ships.
fn validate_strictly(test: &str, file: &Path) -> anyhow::Result<()> {
    let Some(bin) = kubernetes_validate_or_skip(test) else {
        return Ok(());
    };
    let python = bin.with_file_name("python");
    let mut cmd = Command::new(&python);
    cmd.args([
        "-c",
        "from kubernetes_validate.utils import latest_version; print(latest_version())",
    ]);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let latest = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    for version in ["1.30.0", latest.as_str()] {
        let mut cmd = Command::new(&bin);
        cmd.args(["--strict", "-k", version]).arg(file);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "kubernetes-validate --strict -k {version} {}:\n{}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("kubernetes-validate --strict -k {version}: ok");
    }
    Ok(())
}

#[test]
fn injects_every_workload_kind_and_passes_everything_else_through() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bundle = bundle(dir.path())?;
    let input = dir.path().join("in.yaml");
    std::fs::write(&input, MANIFESTS)?;
    let common = [
        "--trust-domain",
        "example.org",
        "--bundle",
        bundle.to_str().unwrap(),
    ];
    let (out, stderr) = inject(&[&["-f", input.to_str().unwrap()][..], &common].concat())?;
    println!("{stderr}");
    let before = documents(MANIFESTS);
    let after = documents(&out);
    ensure!(
        before.len() == after.len(),
        "{} documents in, {} out",
        before.len(),
        after.len()
    );
    let bundle_pem = std::fs::read_to_string(&bundle)?;

    let injected = [
        "Pod debug",
        "Deployment web",
        "StatefulSet db",
        "DaemonSet agent",
        "ReplicaSet legacy",
        "Job migrate",
        "CronJob report",
    ];
    for (b, a) in before.iter().zip(&after) {
        let who = name(b);
        ensure!(name(a) == who, "order kept: {who} became {}", name(a));
        if !injected.contains(&who.as_str()) {
            ensure!(a == b, "{who} must pass through unchanged:\n{a:#}");
            continue;
        }
        let (spec_b, spec_a) = (pod_spec(b).unwrap(), pod_spec(a).unwrap());
        // The default form: the native sidecar, first of the init containers.
        let native = sidecars_in(spec_a, "initContainers");
        ensure!(native.len() == 1, "{who}: {spec_a:#}");
        ensure!(
            spec_a["initContainers"][0]["name"] == "trellis-sidecar",
            "{who}: first"
        );
        ensure!(sidecars_in(spec_a, "containers").is_empty(), "{who}");
        let s = &native[0];
        assert_eq!(s["restartPolicy"], "Always", "{who}");
        assert_eq!(s["startupProbe"]["httpGet"]["path"], "/ready", "{who}");
        assert_eq!(s["image"], "ghcr.io/trellis-mesh/trellis:0.1.0", "{who}");
        let env = |k: &str| {
            s["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == k)
                .map(|e| e["value"].as_str().unwrap().to_owned())
        };
        assert_eq!(
            env("TRELLIS_CONTROL_BUNDLE_PEM").as_deref(),
            Some(bundle_pem.as_str())
        );
        assert_eq!(
            env("TRELLIS_CONTROL_PLANE").as_deref(),
            Some("trellis-control.trellis-system.svc:8443"),
            "the webhook's default"
        );
        ensure!(
            strip_proxy_env(spec_a)["containers"] == spec_b["containers"],
            "{who}: app containers kept but for the proxy environment"
        );
        for app in spec_a["containers"].as_array().unwrap() {
            let vars = proxy_vars(app);
            ensure!(
                vars.get("HTTP_PROXY").map(String::as_str) == Some("http://127.0.0.1:15001")
                    && vars.get("NO_PROXY").map(String::as_str)
                        == Some("localhost,127.0.0.1,::1,$(TRELLIS_POD_IPS)")
                    && vars.get("TRELLIS_POD_IPS").map(String::as_str) == Some("status.podIPs")
                    && !app.to_string().contains("HTTPS_PROXY"),
                "{who}: proxy environment {vars:?}"
            );
        }
        let volumes: Vec<&str> = spec_a["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        ensure!(
            volumes.last() == Some(&"trellis-token"),
            "{who}: {volumes:?}"
        );
    }
    // The app port annotation is read as the webhook reads it.
    let web = &after[2];
    let web_env = &pod_spec(web).unwrap()["initContainers"][0]["env"];
    ensure!(
        web_env.to_string().contains("127.0.0.1:8080"),
        "TRELLIS_APP from trellis.io/app-port: {web_env}"
    );
    // The existing init container runs after the sidecar is ready.
    assert_eq!(
        pod_spec(&after[6]).unwrap()["initContainers"][1]["name"],
        "wait"
    );
    for why in [
        "Deployment shop/opted-out-on-the-pod: unchanged (trellis.io/inject: false)",
        "Deployment shop/opted-out-on-the-workload: unchanged (trellis.io/inject: false)",
        "Deployment kube-system/coredns-like: unchanged (namespace kube-system is never injected",
        "ReplicaSet default/legacy: injected",
    ] {
        ensure!(stderr.contains(why), "stderr lacks {why:?}:\n{stderr}");
    }

    // Injecting twice equals injecting once, and stdin works like a file.
    let once = dir.path().join("once.yaml");
    std::fs::write(&once, &out)?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#""$0" inject -f - --trust-domain example.org --bundle "$1" < "$2""#)
        .arg(trellis_bin())
        .arg(&bundle)
        .arg(&once);
    let twice = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    ensure!(
        twice.status.success(),
        "{}",
        String::from_utf8_lossy(&twice.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&twice.stdout) == out,
        "injecting twice differs from injecting once"
    );
    ensure!(
        String::from_utf8_lossy(&twice.stderr)
            .contains("Deployment shop/web: unchanged (already injected)"),
        "{}",
        String::from_utf8_lossy(&twice.stderr)
    );
    validate_strictly("inject_cli::injects_every_workload_kind", &once)?;

    // The fallback form, from the same flag the control plane takes.
    let (fallback, _) = inject(
        &[
            &["-f", input.to_str().unwrap(), "--native-sidecar", "false"][..],
            &common,
        ]
        .concat(),
    )?;
    for (b, a) in before.iter().zip(documents(&fallback)) {
        let who = name(b);
        if let (true, Some(spec)) = (injected.contains(&who.as_str()), pod_spec(&a)) {
            ensure!(sidecars_in(spec, "initContainers").is_empty(), "{who}");
            let c = sidecars_in(spec, "containers");
            ensure!(
                c.len() == 1 && c[0].get("restartPolicy").is_none(),
                "{who}: {spec:#}"
            );
        }
    }
    let fallback_file = dir.path().join("fallback.yaml");
    std::fs::write(&fallback_file, &fallback)?;
    validate_strictly("inject_cli::fallback", &fallback_file)?;
    Ok(())
}

#[test]
fn a_pod_the_webhook_would_refuse_is_an_error_naming_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bundle = bundle(dir.path())?;
    let input = dir.path().join("bad.yaml");
    std::fs::write(
        &input,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fine}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  template:\n    metadata:\n      annotations: {trellis.io/native-sidecar: maybe}\n\
         \x20   spec:\n      containers: [{name: web, image: nginx}]\n",
    )?;
    let mut cmd = Command::new(trellis_bin());
    cmd.args(["inject", "-f"])
        .arg(&input)
        .args(["--trust-domain", "example.org", "--bundle"])
        .arg(&bundle);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(1), "{stderr}");
    for want in [
        "document 2",
        "Deployment shop/web",
        "trellis.io/native-sidecar",
        "`maybe`",
    ] {
        ensure!(stderr.contains(want), "{want:?} missing: {stderr}");
    }
    ensure!(out.stdout.is_empty(), "nothing printed on failure");
    // No bundle: the flag is named.
    let mut cmd = Command::new(trellis_bin());
    cmd.args(["inject", "-f"]).arg(&input).args([
        "--trust-domain",
        "example.org",
        "--bundle",
        "/nonexistent/bundle.pem",
    ]);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("--bundle /nonexistent/bundle.pem"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn workload_api_annotation_reaches_the_app_containers_of_a_template() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bundle = bundle(dir.path())?;
    let input = dir.path().join("in.yaml");
    std::fs::write(
        &input,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata:\n      labels: {app: web}\n      annotations: {trellis.io/workload-api: \"true\"}\n\
         \x20   spec:\n      containers:\n      - {name: web, image: nginx}\n      - {name: worker, image: busybox, env: [{name: A, value: \"1\"}]}\n",
    )?;
    let (out, _) = inject(&[
        "-f",
        input.to_str().unwrap(),
        "--trust-domain",
        "example.org",
        "--bundle",
        bundle.to_str().unwrap(),
    ])?;
    let docs = documents(&out);
    let spec = pod_spec(&docs[0]).context("pod spec")?;
    for app in spec["containers"].as_array().unwrap() {
        let envs = app["env"].to_string();
        ensure!(
            envs.contains("\"SPIFFE_ENDPOINT_SOCKET\"")
                && envs.contains("unix:///run/spiffe/workload.sock"),
            "{}: {envs}",
            app["name"]
        );
        ensure!(
            app["volumeMounts"].to_string().contains("trellis-spiffe"),
            "{app}"
        );
    }
    ensure!(
        spec["containers"][1]["env"][0]["name"] == "A",
        "existing env kept"
    );
    let sidecar = &sidecars_in(spec, "initContainers")[0];
    ensure!(
        sidecar["env"]
            .to_string()
            .contains("TRELLIS_WORKLOAD_API_SOCKET"),
        "{sidecar}"
    );
    ensure!(
        spec["securityContext"]["supplementalGroups"] == serde_json::json!([65532]),
        "{spec}"
    );
    ensure!(
        spec["volumes"].to_string().contains("\"emptyDir\""),
        "{spec}"
    );
    let file = dir.path().join("out.yaml");
    std::fs::write(&file, &out)?;
    validate_strictly(
        "workload_api_annotation_reaches_the_app_containers_of_a_template",
        &file,
    )
}

/// Three Deployments for the proxy environment: one adding a `NO_PROXY` entry, one opted
/// out, one whose first container sets its own proxy.
const PROXY_MANIFESTS: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {trellis.io/no-proxy: "db.internal, 192.168.0.0/16"}
    spec:
      containers:
        - name: web
          image: nginx:1.27
          env: [{name: MODE, value: prod}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: legacy, namespace: shop}
spec:
  selector: {matchLabels: {app: legacy}}
  template:
    metadata:
      labels: {app: legacy}
      annotations: {trellis.io/proxy-env: "false"}
    spec:
      containers: [{name: legacy, image: busybox:1.36}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: own-proxy, namespace: shop}
spec:
  selector: {matchLabels: {app: own}}
  template:
    metadata:
      labels: {app: own}
    spec:
      containers:
        - name: own
          image: busybox:1.36
          env: [{name: HTTP_PROXY, value: "http://proxy.corp:3128"}]
        - name: helper
          image: busybox:1.36
"#;

#[test]
fn proxy_env_follows_the_flag_the_annotations_and_the_opt_out() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bundle = bundle(dir.path())?;
    let input = dir.path().join("proxy.yaml");
    std::fs::write(&input, PROXY_MANIFESTS)?;
    let (out, stderr) = inject(&[
        "-f",
        input.to_str().unwrap(),
        "--trust-domain",
        "example.org",
        "--bundle",
        bundle.to_str().unwrap(),
        "--no-proxy",
        ".corp.example,10.0.0.0/8",
    ])?;
    let before = documents(PROXY_MANIFESTS);
    let after = documents(&out);
    let base = "localhost,127.0.0.1,::1,$(TRELLIS_POD_IPS),.corp.example,10.0.0.0/8";

    // The flag's list, then the pod's annotation; the app's own variable stays first.
    let web = &pod_spec(&after[0]).unwrap()["containers"][0];
    let vars = proxy_vars(web);
    let want = format!("{base},db.internal,192.168.0.0/16");
    ensure!(
        vars.get("NO_PROXY") == Some(&want)
            && vars.get("no_proxy") == Some(&want)
            && vars.get("http_proxy").map(String::as_str) == Some("http://127.0.0.1:15001"),
        "web: {vars:?}"
    );
    ensure!(web["env"][0]["name"] == "MODE", "web: {web}");

    // Opted out: the app container exactly as written (the sidecar is still injected).
    let legacy = pod_spec(&after[1]).unwrap();
    ensure!(
        legacy["containers"] == pod_spec(&before[1]).unwrap()["containers"]
            && sidecars_in(legacy, "initContainers").len() == 1,
        "legacy: {legacy:#}"
    );

    // A container with its own HTTP_PROXY keeps it, with a warning; its neighbour gets ours.
    let own = pod_spec(&after[2]).unwrap();
    ensure!(
        own["containers"][0] == pod_spec(&before[2]).unwrap()["containers"][0],
        "own: {own:#}"
    );
    ensure!(
        proxy_vars(&own["containers"][1]).get("NO_PROXY") == Some(&base.to_owned()),
        "helper: {own:#}"
    );
    ensure!(
        stderr.contains("`own` sets HTTP_PROXY itself"),
        "no warning about the container's own proxy: {stderr}"
    );
    let file = dir.path().join("proxy-out.yaml");
    std::fs::write(&file, &out)?;
    validate_strictly("inject_cli::proxy_env", &file)?;

    // A bad entry in the flag is refused naming the setting.
    let mut cmd = Command::new(trellis_bin());
    cmd.args(["inject", "-f"])
        .arg(&input)
        .args(["--trust-domain", "example.org", "--bundle"])
        .arg(&bundle)
        .args(["--no-proxy", "ok.example,$(SECRET)"]);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("no_proxy") && stderr.contains("$(SECRET)"),
        "{stderr}"
    );
    Ok(())
}

/// The convention route of issue #25, in `TRELLIS_DEFAULT_ROUTE` syntax.
const ROUTE: &str = "hosts={service}.{namespace}.svc.cluster.local;{service}.{namespace}.svc;{service}.{namespace},address={service}.{namespace}.svc.cluster.local:15443,identity=spiffe://{trust_domain}/ns/{namespace}/sa/{service}";

/// Three Deployments for the default route: the control plane's, the pod's own, none.
const ROUTE_MANIFESTS: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers: [{name: web, image: nginx:1.27}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: mesh, namespace: shop}
spec:
  selector: {matchLabels: {app: mesh}}
  template:
    metadata:
      labels: {app: mesh}
      annotations:
        trellis.io/default-route: "hosts={service}.mesh,address={service}.mesh:15443,identity=spiffe://{trust_domain}/svc/{service}"
    spec:
      containers: [{name: mesh, image: nginx:1.27}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: direct, namespace: shop}
spec:
  selector: {matchLabels: {app: direct}}
  template:
    metadata:
      labels: {app: direct}
      annotations: {trellis.io/default-route: "false"}
    spec:
      containers: [{name: direct, image: nginx:1.27}]
"#;

/// The injected sidecar's `TRELLIS_DEFAULT_ROUTE`, if any.
fn sidecar_route(doc: &Value) -> Option<String> {
    let spec = pod_spec(doc)?;
    let sidecar = sidecars_in(spec, "initContainers").pop()?;
    sidecar["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == "TRELLIS_DEFAULT_ROUTE")
        .and_then(|e| e["value"].as_str())
        .map(str::to_owned)
}

#[test]
fn default_route_follows_the_flag_and_the_annotations() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bundle = bundle(dir.path())?;
    let input = dir.path().join("route.yaml");
    std::fs::write(&input, ROUTE_MANIFESTS)?;
    let common = [
        "-f",
        input.to_str().unwrap(),
        "--trust-domain",
        "example.org",
        "--bundle",
        bundle.to_str().unwrap(),
    ];
    let (out, _) = inject(&[&common[..], &["--sidecar-default-route", ROUTE]].concat())?;
    let after = documents(&out);
    ensure!(after.len() == 3, "{out}");
    ensure!(
        sidecar_route(&after[0]).as_deref() == Some(ROUTE),
        "web: {:#}",
        after[0]
    );
    ensure!(
        sidecar_route(&after[1]).as_deref()
            == Some("hosts={service}.mesh,address={service}.mesh:15443,identity=spiffe://{trust_domain}/svc/{service}"),
        "mesh: {:#}",
        after[1]
    );
    ensure!(sidecar_route(&after[2]).is_none(), "direct: {:#}", after[2]);
    // Only the sidecar gets it.
    ensure!(
        out.matches("TRELLIS_DEFAULT_ROUTE").count() == 2,
        "one per routed sidecar: {out}"
    );
    let file = dir.path().join("route-out.yaml");
    std::fs::write(&file, &out)?;
    validate_strictly("inject_cli::default_route", &file)?;

    // Injecting the output again changes nothing.
    let (again, _) = inject(&[
        "-f",
        file.to_str().unwrap(),
        "--trust-domain",
        "example.org",
        "--bundle",
        bundle.to_str().unwrap(),
        "--sidecar-default-route",
        ROUTE,
    ])?;
    ensure!(
        documents(&again) == after,
        "re-injection changed the output"
    );

    // From the config file, as `trellis control` reads it; none without it.
    let config = dir.path().join("control.yaml");
    std::fs::write(&config, format!("sidecar_default_route: \"{ROUTE}\"\n"))?;
    let (out, _) = inject(&[&common[..], &["--config", config.to_str().unwrap()]].concat())?;
    ensure!(
        sidecar_route(&documents(&out)[0]).as_deref() == Some(ROUTE),
        "{out}"
    );
    let (out, _) = inject(&common)?;
    ensure!(sidecar_route(&documents(&out)[0]).is_none(), "{out}");

    // A route the sidecar would refuse is refused here, naming the setting or the annotation.
    for (extra, manifest, want) in [
        (
            "hosts={service},address={service}:15443,identity=spiffe://other.org/{service}",
            ROUTE_MANIFESTS.to_owned(),
            ["sidecar_default_route", "not in trust domain `example.org`"],
        ),
        (
            ROUTE,
            ROUTE_MANIFESTS.replace("{service}.mesh:15443", "{service}.mesh"),
            ["trellis.io/default-route", "literal port"],
        ),
        (
            ROUTE,
            ROUTE_MANIFESTS.replace("\"false\"", "\"no\""),
            ["trellis.io/default-route", "\"false\" for none"],
        ),
    ] {
        std::fs::write(&input, manifest)?;
        let mut cmd = Command::new(trellis_bin());
        cmd.arg("inject")
            .args(common)
            .args(["--sidecar-default-route", extra]);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && want.iter().all(|w| stderr.contains(w)),
            "{want:?}: {stderr}"
        );
    }
    Ok(())
}
