#!/usr/bin/env bash
# Regenerates the link orders of both binaries (crates/trellis/build.rs lays their code out in
# them, so that what runs shares few pages and an idle process reads in less of its executable;
# docs/benchmarks.md, "Idle RSS: code layout"):
# - crates/trellis/sidecar-code-order.txt, the functions a sidecar runs, for `trellis-sidecar`;
# - crates/trellis/control-code-order.txt, those a control plane runs, for `trellis`.
#
#   bash tests/bench/code-order.sh      # needs valgrind, python3 and what tests/bench/run.sh needs
#
# Profiles, with callgrind (every function that runs, not a sample), (1) the benchmark's
# sidecar pair through a `--quick --only trellis` run of tests/bench/run.sh: startup with file
# identities, HTTP/1.1 and h2c load, full handshakes, a burst of idle connections, the admin
# endpoints; (2) `trellis demo --once`: SVIDs over SDS with a key made in the sidecar, policy,
# HTTP/1.1 and h2c calls; (3) `trellis control` under the `sds_load` example: start-up, 300
# join-token sidecars served over their own TLS connections, a rotation wave, a clean stop.
# Then writes each list, most-run first. Run it after changes that move much of the code (a
# dependency upgrade, a new request path) and commit the lists; a stale list only costs memory
# (names the build no longer has are skipped).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ORDER="$REPO/crates/trellis/sidecar-code-order.txt"
CONTROL_ORDER="$REPO/crates/trellis/control-code-order.txt"
BIN_DIR="$REPO/target/release"

command -v valgrind >/dev/null || { echo "error: valgrind not found (apt-get install valgrind)" >&2; exit 1; }
cd "$REPO"
cargo build --release --locked -p trellis --bins
# Separately: built in one invocation with the binaries, the example's dev-dependencies would
# change the features of crates the binaries share, so their symbols (which the lists name)
# would differ from those of a plain `cargo build -p trellis`.
cargo build --release --locked -p trellis-control --example sds_load
PROFILES="$(mktemp -d "${TMPDIR:-/tmp}/trellis-code-order.XXXXXX")"
trap 'rm -rf "$PROFILES"' EXIT
CALLGRIND="valgrind --tool=callgrind --trace-children=yes --demangle=no --dump-instr=no --callgrind-out-file="

echo "==> profiling the benchmark's sidecar pair (a few minutes: callgrind runs code ~50x slower)" >&2
BENCH_TRELLIS_WRAP="${CALLGRIND}$PROFILES/callgrind.%p" BENCH_QUIET_WAIT=0 BENCH_TIMEOUT=1800 TRELLIS_BIN="$BIN_DIR/trellis" \
    bash "$HERE/run.sh" --quick --only trellis --no-build --out "$PROFILES/results.md" >/dev/null
echo "==> profiling trellis demo --once" >&2
${CALLGRIND}"$PROFILES/callgrind.demo" "$BIN_DIR/trellis" demo --once >/dev/null 2>"$PROFILES/demo.err" || {
    tail -n 20 "$PROFILES/demo.err" >&2
    exit 1
}
echo "==> profiling trellis control under sds_load (a minute and a half)" >&2
# sds_load stops the control plane with SIGTERM, so callgrind writes its profile.
cat >"$PROFILES/control.sh" <<EOF
#!/bin/sh
exec ${CALLGRIND}"$PROFILES/control.callgrind" "$BIN_DIR/trellis" "\$@"
EOF
chmod +x "$PROFILES/control.sh"
(ulimit -n 4096 && "$BIN_DIR/examples/sds_load" --streams 300 --per-connection 1 --sources 1 \
    --rotate-every 60s --trellis-bin "$PROFILES/control.sh" >"$PROFILES/load.out" 2>&1) || {
    tail -n 20 "$PROFILES/load.out" >&2
    exit 1
}
python3 "$HERE/code_order.py" --binary "$BIN_DIR/trellis-sidecar" "$PROFILES"/callgrind.* >"$ORDER.new"
python3 "$HERE/code_order.py" --binary "$BIN_DIR/trellis" "$PROFILES/control.callgrind" >"$CONTROL_ORDER.new"
mv "$ORDER.new" "$ORDER"
mv "$CONTROL_ORDER.new" "$CONTROL_ORDER"
echo "==> wrote $ORDER and $CONTROL_ORDER; rebuild (cargo build --release -p trellis) to lay the code out in their order" >&2
