#!/usr/bin/env bash
# Many sidecars over several control-plane replicas on one PostgreSQL, on this machine.
#
#   tests/bench/scale_replicas.sh [--sidecars N] [--replicas R] [--rotate-every D]
#                                 [--sources-per-replica S] [--arrival staggered|together]
#                                 [--ping D] [--out FILE]
#
# Starts a throwaway PostgreSQL cluster, then R `sds_load` processes at once; each starts one
# `trellis control --database postgres://…` (a replica: the CA, tokens and issuance records are
# shared through the database) and holds N/R simulated sidecars on it, one TLS connection and
# one SDS stream each, until a rotation wave has reached every one. Their `fleet:` lines are
# added up: time to serve all, how long the rotation wave took to reach all, each replica's
# RSS and CPU, PostgreSQL's CPU.
#
# --arrival staggered (the default): replica i's sidecars connect once replica i-1's hold their
# first SVIDs, as a fleet rolls out. --arrival together: all at once, as after every replica
# restarted. Each replica's sidecars share --sources-per-replica join tokens (16), one per
# loopback source address; a token's streams must all arrive within 30 s of its redemption, and
# with 2 sources a replica had 16,667 streams opening at once, answered the simulated sidecars'
# PINGs too late and lost them (docs/benchmarks.md, "100,000 sidecars over six replicas").
# --ping: each simulated sidecar's HTTP/2 PING interval (20 s, as a Trellis sidecar's SDS
# client; 0s for none, as an Envoy without connection_keepalive).
#
# Why several processes: one process may hold `ulimit -Hn` descriptors, and a replica (and the
# load that drives it) holds one per sidecar. Where the limit allows, one replica is the
# measurement issue #19 asks for: `sds_load --streams 100000 --per-connection 1 --sources 8`
# (tests/bench/SCALE.md). This script is the fleet view: what R replicas on one machine carry.
#
# Needs: `cargo build --release --locked -p trellis -p trellis-control --bins --example sds_load`
# (or set TRELLIS_BIN / SDS_LOAD_BIN), PostgreSQL's server binaries (Debian: postgresql).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

sidecars=100000
replicas=6
rotate_every=10m
sources_per_replica=16
arrival=staggered
ping=20s
out=""
usage() {
    sed -n '4,6p' "$0" | sed 's/^# *//'
}
while [[ $# -gt 0 ]]; do
    case "$1" in
    --sidecars) sidecars="$2"; shift 2 ;;
    --replicas) replicas="$2"; shift 2 ;;
    --rotate-every) rotate_every="$2"; shift 2 ;;
    --sources-per-replica) sources_per_replica="$2"; shift 2 ;;
    --arrival) arrival="$2"; shift 2 ;;
    --ping) ping="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "scale_replicas.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ "$arrival" == staggered || "$arrival" == together ]] ||
    { echo "scale_replicas.sh: --arrival is staggered or together, not '$arrival'" >&2; exit 2; }
for n in "$sidecars" "$replicas" "$sources_per_replica"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "scale_replicas.sh: '$n' is not a positive number" >&2; exit 2; }
done

trellis_bin="${TRELLIS_BIN:-$PWD/target/release/trellis}"
sds_load_bin="${SDS_LOAD_BIN:-$PWD/target/release/examples/sds_load}"
for bin in "$trellis_bin" "$sds_load_bin"; do
    [[ -x "$bin" ]] || {
        echo "scale_replicas.sh: $bin is missing: cargo build --release --locked -p trellis -p trellis-control --bins --example sds_load" >&2
        exit 1
    }
done
pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[[ -x "$pg_bin/initdb" ]] || { echo "scale_replicas.sh: PostgreSQL's server is not installed (apt-get install postgresql)" >&2; exit 1; }

share=$(((sidecars + replicas - 1) / replicas))
if ((replicas * sources_per_replica > 254 * 254)); then
    echo "scale_replicas.sh: $replicas replicas × $sources_per_replica sources need more than the $((254 * 254)) source addresses of 127.1.0.0/16: use fewer sources per replica" >&2
    exit 2
fi
if (((share + sources_per_replica - 1) / sources_per_replica > 28000)); then
    echo "scale_replicas.sh: $share sidecars over $sources_per_replica source addresses is more than the ~28,000 ephemeral ports one address has: use more --sources-per-replica" >&2
    exit 2
fi
if ((sidecars - share * (replicas - 1) < 1)); then
    echo "scale_replicas.sh: $sidecars sidecars cannot be split over $replicas replicas (the last would get none): use fewer replicas" >&2
    exit 2
fi
# Each replica and each load process holds one descriptor per sidecar of its share, plus its
# own (database, log, listeners, runtime): refuse a share that cannot fit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
limit="$(ulimit -n)"
if [[ "$limit" != unlimited ]] && ((share + 512 > limit)); then
    if ((limit <= 1024)); then
        echo "scale_replicas.sh: the open-file limit is $limit; raise it (ulimit -n)" >&2
    else
        echo "scale_replicas.sh: $share sidecars per replica need ~$((share + 512)) open files per process; the limit is $limit: use --replicas $(((sidecars + limit - 513) / (limit - 512))) or more" >&2
    fi
    exit 1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/trellis-scale.XXXXXX")"
pids=()
as_postgres() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    # sds_load's control plane is its child and outlives a TERM sent to sds_load alone.
    for pid in "${pids[@]}"; do
        pkill -TERM -P "$pid" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    as_postgres "$pg_bin/pg_ctl" -D "$work/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$work/pg"
}
trap cleanup EXIT
trap 'exit 130' INT TERM # so that the EXIT trap runs on a signal too

# --- PostgreSQL: durable commits as in production (fsync on); the control plane itself turns
# synchronous_commit off on its issuance-record connection only.
mkdir -p "$work/pg"
chmod 711 "$work" # the postgres user must reach its own directory inside
pg_password="$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
pg_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
(umask 077 && printf '%s\n' "$pg_password" >"$work/pg/pwfile")
if [[ $(id -u) -eq 0 ]]; then chown -R postgres:postgres "$work/pg"; fi
as_postgres "$pg_bin/initdb" -D "$work/pg/data" -U trellis --pwfile="$work/pg/pwfile" \
    --auth=scram-sha-256 -E UTF8 >"$work/pg/initdb.log"
as_postgres "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/server.log" -w -t 120 \
    -o "-p $pg_port -k $work/pg -c listen_addresses=127.0.0.1" start >/dev/null ||
    { cat "$work/pg/server.log" >&2; exit 1; }
PGPASSWORD="$pg_password" "$pg_bin/psql" -X -q -h 127.0.0.1 -p "$pg_port" -U trellis -d postgres \
    -c 'CREATE DATABASE trellis' >/dev/null
url="postgres://trellis:$pg_password@127.0.0.1:$pg_port/trellis"
postgres_cpu() {
    # The server's CPU in clock ticks: the postmaster's own and its reaped
    # children's (backends end with the replicas that opened them), plus its live children's.
    local main total pid
    main="$(head -n 1 "$work/pg/data/postmaster.pid")"
    total="$(awk '{sub(/.*\) /, ""); print $12 + $13 + $14 + $15}' "/proc/$main/stat")"
    for pid in $(pgrep -P "$main" || true); do
        total=$((total + $(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

echo "# $sidecars sidecars over $replicas replicas ($share each, $sources_per_replica source addresses each, arriving $arrival), rotate every $rotate_every; PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$pg_port; work dir $work"
# The first replica creates the schema and the embedded CA; the others start once it has,
# as a Deployment's pods would find them (staggered: once the one before has served all).
pg_cpu0="$(postgres_cpu)"
for ((i = 0; i < replicas; i++)); do
    n=$share
    ((i == replicas - 1)) && n=$((sidecars - share * (replicas - 1)))
    "$sds_load_bin" --streams "$n" --per-connection 1 --sources "$sources_per_replica" \
        --first-source $((i * sources_per_replica)) --rotate-every "$rotate_every" \
        --ping "$ping" --database "$url" --trellis-bin "$trellis_bin" >"$work/load-$i.log" 2>&1 &
    pids+=($!)
    if ((i == 0)) || [[ "$arrival" == staggered ]]; then
        ready='idle RSS'
        [[ "$arrival" == staggered ]] && ready='all served their first SVID'
        until grep -q "$ready" "$work/load-$i.log" 2>/dev/null; do
            if ! kill -0 "${pids[$i]}" 2>/dev/null; then
                echo "replica $i's load ended before it was ready:" >&2
                tail -n 20 "$work/load-$i.log" >&2
                exit 1
            fi
            sleep 0.2
        done
    fi
done
failed=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "replica $i's load failed:" >&2
        tail -n 20 "$work/load-$i.log" >&2
        failed=1
    fi
done
pids=()
pg_cpu1="$(postgres_cpu)"
((failed == 0)) || exit 1

report="$(python3 - "$work" "$replicas" "$sidecars" "$((pg_cpu1 - pg_cpu0))" "$(getconf CLK_TCK)" <<'EOF'
import sys, pathlib
work, replicas, sidecars = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
pg_cpu = int(sys.argv[4]) / int(sys.argv[5])
rows = []
for i in range(replicas):
    line = next(l for l in (work / f"load-{i}.log").read_text().splitlines() if l.startswith("fleet: "))
    rows.append({k: float(v) for k, v in (kv.split("=") for kv in line[len("fleet: "):].split())})
t0 = min(r["connecting_at"] for r in rows)
mib = lambda kib: kib / 1024
# A replica that starts on a database with a long log reads it all first and holds that
# memory until its connections arrive: the fresh replica's idle is the baseline for all.
base = min(r["rss_idle_kib"] for r in rows)
print(f"| replica | sidecars | RSS idle / connected / served / after the wave (MiB) | KiB per sidecar above a fresh replica's idle ({mib(base):.1f} MiB), after the wave | CPU connect / serve / wave (s) |")
print(f"|--:|--:|--:|--:|--:|")
for i, r in enumerate(rows):
    per = (r["rss_wave_kib"] - base) / r["connections"]
    print(f"| {i} | {int(r['connections']):,} | {mib(r['rss_idle_kib']):.0f} / {mib(r['rss_connected_kib']):.0f} / {mib(r['rss_served_kib']):.0f} / {mib(r['rss_wave_kib']):.0f} | {per:.1f} | {r['cpu_connect_s']:.1f} / {r['cpu_serve_s']:.1f} / {r['cpu_wave_s']:.1f} |")
n = sum(r["connections"] for r in rows)
assert int(n) == sidecars, (n, sidecars)
rss = sum(r["rss_wave_kib"] for r in rows)
idle = base * len(rows)
print()
print(f"- sidecars: {int(n):,} over {replicas} replicas, one TLS connection and one SDS stream each")
print(f"- all connected: {max(r['start_at'] for r in rows) - t0:.1f} s after the first connection; "
      f"all holding their first SVID: {max(r['served_at'] for r in rows) - t0:.1f} s after it "
      f"({max(r['served_at'] for r in rows) - min(r['start_at'] for r in rows):.1f} s after the first stream opened)")
first, last = min(r["wave_first_at"] for r in rows), max(r["wave_last_at"] for r in rows)
print(f"- rotation wave: reached every sidecar within {last - first:.1f} s (first push {first - t0:.1f} s, last {last - t0:.1f} s after the first connection)")
print(f"- replicas' RSS after the wave: {mib(rss):.0f} MiB in all, {mib(idle):.0f} MiB of it a fresh replica's idle each; "
      f"{(rss - idle) / n:.1f} KiB per sidecar above idle")
cpu = lambda k: sum(r[k] for r in rows)
print(f"- replicas' CPU: {cpu('cpu_connect_s'):.1f} s for the connections, {cpu('cpu_serve_s'):.1f} s to serve the first SVIDs, {cpu('cpu_wave_s'):.1f} s for the wave; PostgreSQL {pg_cpu:.1f} s in all")
EOF
)"
echo "$report"
[[ -z "$out" ]] || printf '%s\n' "$report" >"$out"
