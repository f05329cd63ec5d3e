#!/usr/bin/env bash
# One Trellis pair measurement from a kept harness work dir, for interleaved before/after runs:
#
#   bash tests/bench/run.sh --only trellis --keep       # prints "work dir kept ...: DIR"
#   bash tests/bench/pair.sh DIR BIN [CONNS 16] [SECONDS 8] [THREADS 1]
#
# Starts the work dir's backend nginx and its Trellis sidecars B and A (configs
# DIR/trellis_{b,a}.r1/sidecar.yaml, rendered by run.sh) with BIN (`trellis` or
# `trellis-sidecar`) and TRELLIS_WORKER_THREADS=THREADS, warms up for 2 s, runs `wrk -t2 -cCONNS`
# (`-t1` at one connection) through A for SECONDS, and prints one line: req/s, p50, and each
# sidecar's CPU per request (utime+stime from /proc). Everything is stopped on exit. Run it
# alternately with two binaries (A, B, A, B, …): this machine's speed drifts by ±15% within an
# hour (docs/benchmarks.md).
set -euo pipefail
DIR="${1:?work dir kept by run.sh --keep}"; BIN="${2:?trellis or trellis-sidecar binary}"
CONNS="${3:-16}"; SECONDS_="${4:-8}"; THREADS="${5:-1}"
WRK_THREADS=$((CONNS < 2 ? 1 : 2))   # wrk needs at least one connection per thread
SUB=sidecar; "$BIN" sidecar --help >/dev/null 2>&1 || SUB=   # `trellis-sidecar` takes no subcommand
yaml() { sed -n "s/^$2: *\"\{0,1\}\([0-9.:]*\)\"\{0,1\}.*/\1/p" "$DIR/$1/sidecar.yaml" | head -n1; }
A_ADMIN="$(yaml trellis_a.r1 admin)"; B_ADMIN="$(yaml trellis_b.r1 admin)"
A_LISTEN="$(grep -o 'listen: "127.0.0.1:[0-9]*", address' "$DIR/trellis_a.r1/sidecar.yaml" | grep -o '127.0.0.1:[0-9]*')"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null' EXIT
nginx -p "$DIR/backend" -e "$DIR/backend/error.log" -c "$DIR/backend/nginx.conf" \
    -g "daemon off; pid $DIR/backend/nginx.pid;" >/dev/null 2>&1 & PIDS+=($!)
for side in b a; do
    TRELLIS_WORKER_THREADS="$THREADS" "$BIN" $SUB --config "$DIR/trellis_$side.r1/sidecar.yaml" \
        >/dev/null 2>"$DIR/pair-$side.err" &
    PIDS+=($!)
done
B=${PIDS[1]}; A=${PIDS[2]}
for _ in $(seq 50); do
    curl -fs -o /dev/null "http://$A_ADMIN/ready" && curl -fs -o /dev/null "http://$B_ADMIN/ready" && break
    sleep 0.2
done
wrk -t"$WRK_THREADS" -c"$CONNS" -d2 "http://$A_LISTEN/" >/dev/null
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
a0=$(cpu "$A"); b0=$(cpu "$B")
out="$(wrk -t"$WRK_THREADS" -c"$CONNS" -d"$SECONDS_" "http://$A_LISTEN/")"
a1=$(cpu "$A"); b1=$(cpu "$B")
n=$(awk '/requests in/ {print $1}' <<<"$out"); hz=$(getconf CLK_TCK)
us() { awk -v d="$1" -v n="$n" -v hz="$hz" 'BEGIN {printf "%.1f", d * 1e6 / hz / n}'; }
echo "$(basename "$BIN") threads=$THREADS conns=$CONNS req/s=$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "p50=$(awk '/Latency/ {print $2}' <<<"$out") A=$(us $((a1 - a0)))us B=$(us $((b1 - b0)))us"
