# Sourced by tests/bench/run.sh: the gRPC unary and WebSocket round-trip points (issue #15).
# Functions only; they use run.sh's helpers (start_trellis, start_envoy, measure, rec, …).
#
#   grpc  h2load (gRPC body) ─▶ tonic app                                         (grpc_direct)
#         h2load ─▶ Trellis A ══ mTLS h2 ══▶ Trellis B (app_protocol h2c) ─h2c─▶ tonic app (grpc_trellis)
#         h2load ─▶ Envoy A   ══ mTLS h2 ══▶ Envoy B (HTTP/2 app cluster) ─h2c─▶ tonic app (grpc_envoy)
#   ws    websockets client ─▶ websockets echo app                                (ws_direct)
#         websockets client ─▶ Trellis A ══ mTLS h2 ══▶ Trellis B ─http/1.1─▶ echo app (ws_trellis)

GRPCIO_VERSION="1.85.4"       # same pins as tests/run.sh
WEBSOCKETS_VERSION="17.4"
GRPC_METHOD="/bench.Echo/Unary"
GRPC_APP_BIN="${BENCH_GRPC_APP:-${CARGO_TARGET_DIR:-$REPO/target}/release/examples/grpc_bench_app}"
GRPC_BODY=""
VENV_PY=""
PROTOCOL_DIRS="grpc_app grpc_direct grpc_trellis grpc_trellis_a grpc_trellis_b grpc_envoy grpc_envoy_a grpc_envoy_b ws_app ws_direct ws_trellis ws_trellis_a ws_trellis_b"

protocol_tools() {    # the release gRPC app, and grpcio + websockets in .venv (as tests/run.sh pins them)
    wanted grpc || wanted ws || return 0
    VENV_PY="$VENV/bin/python"
    if ! "$VENV_PY" -c "import grpc, websockets, sys; sys.exit(grpc.__version__ != '$GRPCIO_VERSION' or websockets.__version__ != '$WEBSOCKETS_VERSION')" >/dev/null 2>&1; then
        if ((INSTALL)); then
            say "installing grpcio==$GRPCIO_VERSION websockets==$WEBSOCKETS_VERSION into $VENV (as tests/run.sh does)"
            if ! "$VENV_PY" -c 'import sys' >/dev/null 2>&1; then
                python3 -m venv "$VENV" || { apt_install python3-venv; python3 -m venv "$VENV"; }
            fi
            timeout 600 "$VENV_PY" -m pip install --quiet --disable-pip-version-check \
                "grpcio==$GRPCIO_VERSION" "websockets==$WEBSOCKETS_VERSION" || true
        fi
        "$VENV_PY" -c "import grpc, websockets" >/dev/null 2>&1 || VENV_PY=""
    fi
    if wanted grpc && ((BUILD)); then
        say "cargo build --release -p trellis-tests --example grpc_bench_app"
        if ! (cd "$REPO" && timeout 1800 cargo build --release -p trellis-tests --example grpc_bench_app \
            2>"$WORK/cargo-build-grpc-app.log"); then
            warn "building the gRPC bench app failed (tail of the log below)"
            tail -n 15 "$WORK/cargo-build-grpc-app.log" >&2 || true
        fi
    fi
    GRPC_BODY="$WORK/grpc-body.bin"
    if [[ -n "$VENV_PY" ]]; then "$VENV_PY" "$HERE/grpc_client.py" body "$GRPC_BODY"; fi
}

start_listening_app() {  # start_listening_app NAME CMD…: a process that prints "listening ADDR" → APP_PID, APP_PORT
    local name="$1" dir="$WORK/$1" line="" i
    shift
    mkdir -p "$dir"
    "$@" >"$dir/stdout.log" 2>"$dir/stderr.log" &
    APP_PID=$!
    STARTED+=("$APP_PID")
    for ((i = 0; i < 100; i++)); do
        line="$(grep -m1 '^listening ' "$dir/stdout.log" 2>/dev/null || true)"
        if [[ -n "$line" ]] || ! kill -0 "$APP_PID" 2>/dev/null; then break; fi
        sleep 0.1
    done
    [[ -n "$line" ]] || { tail -n 5 "$dir/stderr.log" >&2; return 1; }
    APP_PORT="${line##*:}"
}

protocol_skip() {     # protocol_skip REASON SCEN…
    local reason="$1" scen
    shift
    echo "SKIP: $* ($reason)" >&2
    for scen in "$@"; do
        rec "$scen.status" skip
        rec "$scen.reason" "$reason"
    done
}

grpc_served() { "$VENV_PY" "$HERE/grpc_client.py" served "127.0.0.1:$1" 2>/dev/null || echo 0; }

grpc_point() {        # grpc_point SCEN ADDR: one grpcio call through the path, then the h2load point
    local scen="$1" addr="$2" why s0 s1
    RETRY_SPENT=0
    if ! why="$(timeout 30 "$VENV_PY" "$HERE/grpc_client.py" check "$addr" 2>&1)"; then
        warn "$scen: a grpcio call through $addr failed: $why"
        rec "$scen.status" fail
        rec "$scen.reason" "a grpcio call through the path failed: $(tail -n1 <<<"$why" | cut -c1-160)"
        FAILED=1
        return 1
    fi
    rec "$scen.status" ok
    s0="$(grpc_served "${V[APP_PORT]}")"
    measure "$scen" unary grpc "$H2_CONNS" "http://$addr$GRPC_METHOD"
    s1="$(grpc_served "${V[APP_PORT]}")"
    # Warm-up and re-runs included: at least the requests h2load counted must have reached the app.
    rec "$scen.unary.app_served" "$((s1 - s0))"
}

path_grpc() {         # gRPC unary calls: direct, through the Trellis pair and the Envoy pair
    local k saved=("${BACKEND_PIDS[@]}")
    rec meta.grpc "h2load -c $H2_CONNS -m $H2_STREAMS -t $WRK_THREADS, POST $GRPC_METHOD with a 64-byte message (69-byte gRPC frame)"
    if [[ -z "$VENV_PY" || ! -x "$GRPC_APP_BIN" ]]; then
        protocol_skip "needs $GRPC_APP_BIN and grpcio in $VENV" grpc_direct grpc_trellis grpc_envoy
        return 0
    fi
    say "== grpc: h2load gRPC unary calls into a tonic app"
    if ! start_listening_app grpc_app "$GRPC_APP_BIN"; then
        protocol_skip "the gRPC app did not start" grpc_direct grpc_trellis grpc_envoy
        return 0
    fi
    V[APP_PORT]="$APP_PORT"
    V[APP_PROTOCOL]=h2c
    BACKEND_PIDS=("$APP_PID")
    A_PIDS=(); B_PIDS=()
    grpc_point grpc_direct "127.0.0.1:$APP_PORT" || true

    if ((TRELLIS_SIDECAR_OK)); then
        for k in A_PORT A_INBOUND_PORT A_SHARED_PORT A_ADMIN_PORT B_PORT B_SHARED_PORT B_ADMIN_PORT; do new_port "$k"; done
        PID_grpc_trellis_a=""; PID_grpc_trellis_b=""
        if start_trellis grpc_trellis_b "$CONF/trellis-b-app.yaml" "${V[B_ADMIN_PORT]}" &&
            start_trellis grpc_trellis_a "$CONF/trellis-a.yaml" "${V[A_ADMIN_PORT]}"; then
            A_PIDS=("$PID_grpc_trellis_a"); B_PIDS=("$PID_grpc_trellis_b")
            grpc_point grpc_trellis "127.0.0.1:${V[A_PORT]}" || true
        else
            rec grpc_trellis.status fail
            rec grpc_trellis.reason "sidecars did not become ready (see $WORK/grpc_trellis_[ab])"
            FAILED=1
        fi
        stop_pair "$PID_grpc_trellis_a" "$PID_grpc_trellis_b"
    else
        protocol_skip "trellis sidecar not available" grpc_trellis
    fi

    if [[ -n "${ENVOY_BIN:-}" ]]; then
        for k in A_PORT A_ADMIN_PORT B_PORT B_ADMIN_PORT; do new_port "$k"; done
        PID_grpc_envoy_a=""; PID_grpc_envoy_b=""
        if start_envoy grpc_envoy_b "$CONF/envoy-b-grpc.yaml" "${V[B_ADMIN_PORT]}" &&
            start_envoy grpc_envoy_a "$CONF/envoy-a.yaml" "${V[A_ADMIN_PORT]}"; then
            A_PIDS=("$PID_grpc_envoy_a"); B_PIDS=("$PID_grpc_envoy_b")
            grpc_point grpc_envoy "127.0.0.1:${V[A_PORT]}" || true
        else
            rec grpc_envoy.status fail
            rec grpc_envoy.reason "Envoy did not start (see $WORK/grpc_envoy_[ab])"
            FAILED=1
        fi
        stop_pair "$PID_grpc_envoy_a" "$PID_grpc_envoy_b"
    else
        protocol_skip "Envoy ${ENVOY_VERSION_PREFIX}x not found" grpc_envoy
    fi
    stop_pid "$APP_PID"
    A_PIDS=(); B_PIDS=()
    BACKEND_PIDS=("${saved[@]}")
}

ws_point() {          # ws_point SCEN ADDR: WS_ROUNDTRIPS sequential echo round trips through ADDR
    local scen="$1" addr="$2" dir="$WORK/$1" a0 b0 a1 b1 k v
    mkdir -p "$dir"
    wait_quiet
    say "$scen: $WS_ROUNDTRIPS sequential WebSocket round trips through 127.0.0.1:${addr##*:}"
    a0=$(cpu_ticks "${A_PIDS[@]}"); b0=$(cpu_ticks "${B_PIDS[@]}")
    timeout 300 "$VENV_PY" "$HERE/ws_rtt.py" client "$addr" "$WS_ROUNDTRIPS" >"$dir/out.txt" 2>&1 || true
    a1=$(cpu_ticks "${A_PIDS[@]}"); b1=$(cpu_ticks "${B_PIDS[@]}")
    if ! grep -qx 'errors=0' "$dir/out.txt"; then
        warn "$scen: $(grep -m1 '^error=' "$dir/out.txt" || tail -n1 "$dir/out.txt")"
        rec "$scen.status" fail
        rec "$scen.reason" "$(grep -m1 '^error=' "$dir/out.txt" | cut -c7-160)"
        FAILED=1
        return 1
    fi
    rec "$scen.status" ok
    while IFS='=' read -r k v; do
        if [[ "$k" =~ ^(n|p50_us|p90_us|p99_us|mean_us)$ ]]; then rec "$scen.rtt.$k" "$v"; fi
    done <"$dir/out.txt"
    rec "$scen.rtt.cpu_a_ticks" "$((a1 - a0))"
    rec "$scen.rtt.cpu_b_ticks" "$((b1 - b0))"
}

path_ws() {           # WebSocket echo round trips: direct and through the Trellis pair
    local k
    rec meta.ws "$WS_ROUNDTRIPS sequential round trips of a 64-byte text message on one connection (after 200 untimed), Python websockets $WEBSOCKETS_VERSION client and server"
    if [[ -z "$VENV_PY" ]]; then
        protocol_skip "needs websockets in $VENV" ws_direct ws_trellis
        return 0
    fi
    say "== ws: WebSocket echo round trips"
    if ! start_listening_app ws_app "$VENV_PY" "$HERE/ws_rtt.py" server; then
        protocol_skip "the WebSocket app did not start" ws_direct ws_trellis
        return 0
    fi
    V[APP_PORT]="$APP_PORT"
    V[APP_PROTOCOL]=http1
    A_PIDS=(); B_PIDS=()
    ws_point ws_direct "127.0.0.1:$APP_PORT" || true
    if ((TRELLIS_SIDECAR_OK)); then
        for k in A_PORT A_INBOUND_PORT A_SHARED_PORT A_ADMIN_PORT B_PORT B_SHARED_PORT B_ADMIN_PORT; do new_port "$k"; done
        PID_ws_trellis_a=""; PID_ws_trellis_b=""
        if start_trellis ws_trellis_b "$CONF/trellis-b-app.yaml" "${V[B_ADMIN_PORT]}" &&
            start_trellis ws_trellis_a "$CONF/trellis-a.yaml" "${V[A_ADMIN_PORT]}"; then
            A_PIDS=("$PID_ws_trellis_a"); B_PIDS=("$PID_ws_trellis_b")
            ws_point ws_trellis "127.0.0.1:${V[A_PORT]}" || true
        else
            rec ws_trellis.status fail
            rec ws_trellis.reason "sidecars did not become ready (see $WORK/ws_trellis_[ab])"
            FAILED=1
        fi
        stop_pair "$PID_ws_trellis_a" "$PID_ws_trellis_b"
    else
        protocol_skip "trellis sidecar not available" ws_trellis
    fi
    stop_pid "$APP_PID"
    A_PIDS=(); B_PIDS=()
}
