#!/usr/bin/env python3
"""Turns the raw `key=value` numbers written by tests/bench/run.sh into the Markdown report.

    python3 tests/bench/report.py RAW.txt OUT.md

Prints the report to stdout and writes it to OUT.md. Standard library only.
"""
import sys

PATHS = [("direct", "direct"), ("trellis", "Trellis pair"), ("trellis_auto", "Trellis pair, workers auto"),
         ("envoy", "Envoy pair"), ("nginx", "nginx pair"), ("nginx_auto", "nginx pair, workers auto"),
         ("haproxy", "HAProxy pair")]
PROXIES = ["trellis", "trellis_auto", "envoy", "nginx", "nginx_auto", "haproxy"]
# Paths measured for throughput and latency only (no RSS, handshake or burst of their own).
LOAD_ONLY = {"trellis_auto"}
# The pairs Trellis is compared with; the targets are judged against the best of them.
PEERS = [("envoy", "Envoy"), ("nginx", "nginx"), ("nginx_auto", "nginx auto"), ("haproxy", "HAProxy")]


def load_raw(path):
    """Reads the raw file; `round=N` lines start a new round. Returns (meta, [round dicts])."""
    meta, rounds = {}, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" not in line:
                continue
            k, v = line.split("=", 1)
            if k == "round":
                rounds.append({})
            elif k.startswith("meta.") or not rounds:
                meta[k] = v
            else:
                rounds[-1][k] = v
    return meta, rounds


def fnum(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def merge(meta, rounds):
    """One dict: per path and load point, the round with the highest req/s (background load on a
    shared machine only ever lowers throughput); handshakes likewise; idle RSS from the first
    good round, loaded RSS the highest seen."""
    d = dict(meta)
    d["meta.rounds"] = str(len(rounds))
    scens = sorted({k.split(".", 1)[0] for r in rounds for k in r})
    for scen in scens:
        good = [r for r in rounds if r.get(f"{scen}.status") == "ok"]
        if not good:
            last = [r for r in rounds if f"{scen}.status" in r]
            for r in last[-1:]:
                d.update({k: v for k, v in r.items() if k.startswith(scen + ".")})
            continue
        first = good[0]
        # Path-level facts (status, checks, threads, idle RSS) from the first good round.
        for k, v in first.items():
            if k.startswith(scen + ".") and k.count(".") == 1 or k.startswith(scen + ".check."):
                d[k] = v
        loads = sorted({k.split(".")[1] for r in good for k in r if k.startswith(scen + ".") and k.count(".") >= 2}
                       - {"check", "hs", "hspq", "hsx", "profile"})
        for load in loads:
            best = max(good, key=lambda r: fnum(r.get(f"{scen}.{load}.rps")) or -1)
            d.update({k: v for k, v in best.items() if k.startswith(f"{scen}.{load}.")})
            d[f"{scen}.{load}.round"] = str(rounds.index(best) + 1)
        for kind in ("hs", "hspq", "hsx"):   # s_time; handshake_load pq-preferred, classical
            best = max(good, key=lambda r: (fnum(r.get(f"{scen}.{kind}.count")) or 0)
                       / (fnum(r.get(f"{scen}.{kind}.wall_s")) or 1))
            d.update({k: v for k, v in best.items() if k.startswith(f"{scen}.{kind}.")})
        for side in ("a", "b"):
            vals = [fnum(r.get(f"{scen}.loaded_rss_{side}_kib")) for r in good]
            vals = [v for v in vals if v is not None]
            if vals:
                d[f"{scen}.loaded_rss_{side}_kib"] = str(int(max(vals)))
        for r in good:
            d.update({k: v for k, v in r.items() if k.startswith(f"{scen}.profile")})
        # Other rounds' path-level keys that the first good round lacks (e.g. threads_after).
        for r in good[1:]:
            for k, v in r.items():
                if k.startswith(scen + ".") and k.count(".") == 1:
                    d.setdefault(k, v)
    return d


class Report:
    def __init__(self, raw):
        self.r = raw
        self.clk = float(raw.get("meta.clk_tck", "100"))
        self.lat_loads = [f"wrk{c}" for c in raw.get("meta.latency_conns", "").split()]
        self.tput_loads = [f"wrk{c}" for c in raw.get("meta.conns", "16 64").split()]
        self.loads = self.lat_loads + self.tput_loads + ["h2"]

    # --- raw access -----------------------------------------------------------------------
    def num(self, key):
        v = self.r.get(key)
        if v is None or v == "":
            return None
        try:
            return float(v)
        except ValueError:
            return None

    def status(self, scen):
        return self.r.get(f"{scen}.status", "not run")

    def ok(self, scen):
        return self.status(scen) == "ok"

    def measured(self, scen, load):
        return self.ok(scen) and self.num(f"{scen}.{load}.rps") is not None

    # --- derived --------------------------------------------------------------------------
    def rps(self, scen, load):
        return self.num(f"{scen}.{load}.rps") if self.measured(scen, load) else None

    def lat(self, scen, load, q):
        return self.num(f"{scen}.{load}.{q}_us") if self.measured(scen, load) else None

    def added_p99(self, scen, load):
        p, d = self.lat(scen, load, "p99"), self.lat("direct", load, "p99")
        return None if p is None or d is None else p - d

    def cpu_us(self, scen, load, side):
        if scen == "direct" or not self.measured(scen, load):
            return None
        t, n = self.num(f"{scen}.{load}.cpu_{side}_ticks"), self.num(f"{scen}.{load}.requests")
        if t is None or not n:
            return None
        return t / self.clk / n * 1e6

    def cpu_pair(self, scen, load):
        a, b = self.cpu_us(scen, load, "a"), self.cpu_us(scen, load, "b")
        return None if a is None or b is None else a + b

    def foreign(self, scen, load):
        """CPU used by processes outside the benchmark during the run, in % of one core."""
        k = f"{scen}.{load}."
        busy, wall = self.num(k + "sys_busy_ticks"), self.num(k + "wall_s")
        if busy is None or not wall:
            return None
        ours = sum(self.num(k + x) or 0 for x in ("cpu_a_ticks", "cpu_b_ticks", "cpu_backend_ticks", "cpu_loadgen_ticks"))
        return max(0.0, (busy - ours) / self.clk / wall * 100)

    def rss(self, scen, which):
        v = self.num(f"{scen}.{which}_kib")
        return None if v is None or v == 0 or not self.ok(scen) else v / 1024

    def best_peer(self, load):
        """(scen, name) of the peer pair with the highest req/s at `load`, or None."""
        got = [(self.rps(s, load), s, n) for s, n in PEERS if self.rps(s, load) is not None]
        return max(got)[1:] if got else None

    def lowest_p99_peer(self, load):
        """(scen, name) of the peer pair with the lowest added p99 at `load`, or None."""
        got = [(self.added_p99(s, load), s, n) for s, n in PEERS if self.added_p99(s, load) is not None]
        return min(got)[1:] if got else None

    def hs(self, scen, kind="hs"):
        """Full handshakes per second: `hs` by openssl s_time, `hspq` / `hsx` by handshake_load
        offering X25519MLKEM768 first / X25519 only."""
        if not self.ok(scen):
            return None
        n, w = self.num(f"{scen}.{kind}.count"), self.num(f"{scen}.{kind}.wall_s")
        return None if not n or not w else n / w

    def hs_cpu_ms(self, scen, kind="hs"):
        if not self.ok(scen):
            return None
        n, t = self.num(f"{scen}.{kind}.count"), self.num(f"{scen}.{kind}.cpu_b_ticks")
        return None if not n or t is None else t / self.clk / n * 1e3

    # --- formatting -----------------------------------------------------------------------
    @staticmethod
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    @staticmethod
    def x(v):
        return "n/a" if v is None else f"{v:.2f}×"

    def ratio(self, v, t):
        """this ÷ Trellis, for the (×…) next to absolute numbers."""
        if v is None or t is None or t <= 0 or v < 0 or not self.ok("trellis"):
            return ""
        return f" ({v / t:.2f}×)"

    def load_name(self, load):
        if load == "h2":
            return f"h2load {self.r.get('meta.h2', '')}".strip()
        return f"wrk {load[3:]} conn"

    def cell_missing(self, scen):
        st = self.status(scen)
        return "SKIP" if st == "skip" else "FAIL" if st == "fail" else "not run"

    # --- sections -------------------------------------------------------------------------
    def header(self):
        r = self.r
        out = [
            "# Trellis benchmark results",
            "",
            f"{r.get('meta.date', '')} · {r.get('meta.cpu', '')} · {r.get('meta.kernel', '')}",
            "",
            f"- {self.rounds_note()}",
            f"- Load: wrk ({r.get('meta.wrk', '')}, `-t {r.get('meta.wrk_threads', '')}`, HTTP/1.1 keep-alive) and "
            f"{r.get('meta.h2load', 'h2load')} (h2c, `{r.get('meta.h2', '')}`); {r.get('meta.duration', '')} s per point "
            f"after a {r.get('meta.warmup', '')} s warm-up; one path at a time; the backend is one nginx worker "
            "answering a fixed `200 ok`.",
            f"- Certificates: {r.get('meta.ca', '')}; ECDSA P-256; TLS 1.3 only on every mTLS hop.",
            f"- Trellis: {r.get('meta.trellis', '')}; " + self.trellis_threads(),
            *([] if self.status("trellis_auto") == "not run" else [
                f"- Trellis, workers auto: the same binaries with `--worker-threads {r.get('trellis_auto.workers', '?')}` "
                f"(one thread-per-core worker per CPU, as nginx auto and HAProxy run); no RSS, handshake or burst "
                f"figures of its own. "
                + (r.get('trellis_auto.threads', '') if self.ok("trellis_auto") else
                   f"{self.cell_missing('trellis_auto')}: {r.get('trellis_auto.reason', '')}")]),
            f"- Envoy: {r.get('meta.envoy', '')}; `--concurrency 1`. "
            f"{r.get('envoy.threads', '')}",
            f"- nginx: {r.get('meta.nginx', '')}; `worker_processes 1`. {r.get('nginx.threads', '')}",
            f"- nginx auto: the same nginx, `worker_processes auto`. {r.get('nginx_auto.threads', '')}",
            f"- HAProxy: `nbthread` unset (its default, one thread per CPU). {r.get('haproxy.threads', '')}",
            f"- {r.get('meta.openssl', '')}; handshakes: `openssl s_time -new -tls1_3` for {r.get('meta.stime', '')} s "
            "against each B (inbound) listener.",
            "",
        ]
        return out

    def rounds_note(self):
        n = int(self.num("meta.rounds") or 0)
        if n <= 1:
            return "One round: every path measured once."
        return (f"{n} rounds (every path measured once per round, one path at a time, alternating order); each "
                "load point shows the round with the highest req/s, since background load only lowers it.")

    def trellis_threads(self):
        r = self.r
        if not self.ok("trellis"):
            reason = r.get("trellis.reason")
            return self.cell_missing("trellis") + (f": {reason}" if reason else "")
        return (f"threads after start: {r.get('trellis.threads', '?')}; after the load runs: "
                f"{r.get('trellis.threads_after', '?')}. (`trellis` is the main thread, which carries all traffic when "
                "the sidecar honours TRELLIS_WORKER_THREADS=1 with a current-thread runtime; with N > 1, "
                "`trellis-worker-I` threads are the other N - 1 thread-per-core workers; `tokio-rt-worker` threads "
                "are blocking-pool threads, which exit when idle.)")

    def main_table(self):
        out = [
            "## Throughput, latency, CPU",
            "",
            "Absolute numbers; `(×N)` is this path's value ÷ the Trellis pair's. *Added p99* is the path's p99 minus the "
            "direct p99 at the same load. CPU is user+system time of each proxy process (all threads; nginx: master + "
            "worker) during the run ÷ requests served. *Other load* is CPU used by processes outside the benchmark "
            "during the run (noise), in % of one core.",
            "",
            "| path | load | req/s | p50 ms | p99 ms | added p99 ms | CPU µs/req A | CPU µs/req B | errors | other load |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for load in self.loads:
            for scen, name in PATHS:
                lname = self.load_name(load)
                if not self.ok(scen):
                    out.append(f"| {name} | {lname} | {self.cell_missing(scen)} | | | | | | | |")
                    continue
                if not self.measured(scen, load):
                    why = self.r.get(f"{scen}.{load}.na") or "not measured"
                    out.append(f"| {name} | {lname} | n/a ({why}) | | | | | | | |")
                    continue
                rps = self.rps(scen, load)
                p50, p99 = self.lat(scen, load, "p50"), self.lat(scen, load, "p99")
                add = self.added_p99(scen, load) if scen != "direct" else None
                ca, cb = self.cpu_us(scen, load, "a"), self.cpu_us(scen, load, "b")
                tr = lambda fn: fn("trellis")  # noqa: E731
                errors = int(self.num(f"{scen}.{load}.errors") or 0)
                fo = self.foreign(scen, load)
                out.append(
                    "| {} | {} | {:,.0f}{} | {} | {}{} | {}{} | {}{} | {}{} | {} | {} |".format(
                        name, lname, rps, self.ratio(rps, tr(lambda s: self.rps(s, load))),
                        self.f(p50 and p50 / 1000, ".3f"),
                        self.f(p99 and p99 / 1000, ".3f"), self.ratio(p99, tr(lambda s: self.lat(s, load, "p99"))),
                        "—" if scen == "direct" else self.f(add and add / 1000, ".3f"),
                        self.ratio(add, tr(lambda s: self.added_p99(s, load))) if scen != "direct" else "",
                        "—" if scen == "direct" else self.f(ca, ".1f"),
                        self.ratio(ca, tr(lambda s: self.cpu_us(s, load, "a"))) if scen != "direct" else "",
                        "—" if scen == "direct" else self.f(cb, ".1f"),
                        self.ratio(cb, tr(lambda s: self.cpu_us(s, load, "b"))) if scen != "direct" else "",
                        errors, self.f(fo, ".0f") + "%" if fo is not None else "n/a",
                    )
                )
        out.append("")
        return out

    def mem_table(self):
        out = [
            "## Memory and mTLS handshakes",
            "",
            "VmRSS of each proxy (nginx: master + worker). *Idle*: after start and a few check requests, before load; "
            "*loaded*: the highest value sampled (every 0.25 s) during all load runs. Handshakes: full TLS 1.3 mTLS "
            "handshakes per second by one `openssl s_time -new` client against B (the client's own work limits this "
            "number; B's CPU per handshake is the server-side cost). `(×N)` is ÷ the Trellis pair.",
            "",
            "| path | idle RSS A MiB | idle RSS B MiB | loaded RSS A MiB | loaded RSS B MiB | handshakes/s | B CPU ms/handshake | B without client cert | B with A's SVID |",
            "|---|--:|--:|--:|--:|--:|--:|---|---|",
        ]
        for scen, name in PATHS[1:]:
            if scen in LOAD_ONLY:
                continue
            if not self.ok(scen):
                out.append(f"| {name} | {self.cell_missing(scen)} | | | | | | | |")
                continue
            cells = []
            for which in ("idle_rss_a", "idle_rss_b", "loaded_rss_a", "loaded_rss_b"):
                v = self.rss(scen, which)
                cells.append(self.f(v, ".1f") + self.ratio(v, self.rss("trellis", which)))
            h, hc = self.hs(scen), self.hs_cpu_ms(scen)
            hs_err = self.r.get(f"{scen}.hs.error")
            cells.append(self.f(h, ",.0f") + self.ratio(h, self.hs("trellis")) + (f" ⚠ {hs_err}" if hs_err else ""))
            cells.append(self.f(hc, ".2f") + self.ratio(hc, self.hs_cpu_ms("trellis")))
            cells.append(self.r.get(f"{scen}.check.no_client_cert", "?"))
            cells.append(self.r.get(f"{scen}.check.client_cert_a", "?"))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
        return out + self.pq_handshakes() + self.burst()

    def pq_handshakes(self):
        """Full handshakes with the key exchange a sidecar offers, which s_time (OpenSSL 3.0) cannot."""
        rows = [(scen, name) for scen, name in PATHS[1:] if self.ok(scen)
                and any(self.r.get(f"{scen}.{k}.{f}") for k in ("hspq", "hsx") for f in ("count", "error"))]
        if not rows:
            return []
        out = ["**Post-quantum handshakes**: the same measurement with `handshake_load` "
               "(crates/trellis-identity/examples), a rustls client that offers what a Trellis sidecar offers "
               "(X25519MLKEM768 first, then X25519 and P-256), same client certificate, no resumption, reading "
               "until the server closes (so a refused certificate is an error); *group* is the one B chose. The "
               "last column is the same client offering X25519 only: the like-for-like baseline (this client "
               "and `s_time` do not cost a server the same). `(×N)` is ÷ the Trellis pair.", "",
               "| path | group | handshakes/s | B CPU ms/handshake | B CPU ms/handshake, X25519 |",
               "|---|---|--:|--:|--:|"]
        for scen, name in rows:
            cells = [self.r.get(f"{scen}.hspq.group", "?")]
            for kind in ("hspq", "hsx"):
                err = self.r.get(f"{scen}.{kind}.error")
                h, hc = self.hs(scen, kind), self.hs_cpu_ms(scen, kind)
                if kind == "hspq":
                    cells.append(self.f(h, ",.0f") + self.ratio(h, self.hs("trellis", kind)))
                cells.append(self.f(hc, ".2f") + self.ratio(hc, self.hs_cpu_ms("trellis", kind))
                             + (f" ⚠ {err}" if err else ""))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
        return out

    def burst(self):
        """Memory comes back: the idle-connection burst into Trellis sidecar B (conn_burst.py)."""
        r = self.r
        n = self.num("trellis.burst_opened")
        if not n:
            return []
        kib = lambda k: self.num(f"trellis.burst_{k}")  # noqa: E731
        idle, peak, after = kib("rss_idle"), kib("rss_peak"), kib("rss_after")
        # "Close to idle": allocator metadata and caches for a burst of thousands of
        # connections stay; the connections' memory must not.
        ok = after is not None and idle is not None and after <= idle * 1.25
        return [
            f"**Burst** ({int(n):,} idle mTLS HTTP/2 connections opened into Trellis sidecar B in "
            f"{r.get('trellis.burst_open_s', '?')} s, held, then all closed): RSS {idle / 1024:.1f} MiB before, "
            f"{peak / 1024:.1f} MiB held ({int(self.num('trellis.burst_per_conn_bytes') or 0):,} bytes per connection), "
            f"{after / 1024:.1f} MiB {r.get('trellis.burst_settle_s', '?')} s after they closed "
            f"({'PASS' if ok else 'MISS'}: target at most 1.25× idle); file descriptors "
            f"{r.get('trellis.burst_fds_idle', '?')} → {r.get('trellis.burst_fds_peak', '?')} → {r.get('trellis.burst_fds_after', '?')}.",
            "",
        ]

    def ratio_table(self):
        """Trellis's standing against each pair, per load: the table in docs/benchmarks.md."""
        out = [
            "## Ratios (the table in docs/benchmarks.md)",
            "",
            "Trellis pair vs the others at the same load. Throughput: Trellis ÷ other (higher is better for Trellis). "
            "Added p99, CPU per request (A+B) and RSS: other ÷ Trellis (higher is better for Trellis).",
            "",
            "| load | vs | throughput | added p99 | CPU/request (A+B) |",
            "|---|---|--:|--:|--:|",
        ]
        trellis_ok = self.ok("trellis")
        if not trellis_ok:
            # The workers-auto rows below still stand on their own.
            out.append(f"| all | — | {self.cell_missing('trellis')}: {self.r.get('trellis.reason', '')} | | |")

        def div(a, b):
            return None if a is None or b is None or b <= 0 else a / b

        for load in self.loads:
            best = self.best_peer(load)
            peers = list(PEERS) + ([(best[0], f"**best peer** ({best[1]})")] if best else [])
            for scen, name in peers if trellis_ok else ():
                if not self.measured(scen, load) or not self.measured("trellis", load):
                    out.append(f"| {self.load_name(load)} | {name} | n/a | n/a | n/a |")
                    continue
                t = div(self.rps("trellis", load), self.rps(scen, load))
                a = div(self.added_p99(scen, load), self.added_p99("trellis", load))
                c = div(self.cpu_pair(scen, load), self.cpu_pair("trellis", load))
                out.append(f"| {self.load_name(load)} | {name} | {self.x(t)} | {self.x(a)} | {self.x(c)} |")
            # Like for like with the multi-worker peers: Trellis with one worker per CPU.
            if best and self.measured("trellis_auto", load) and self.measured(best[0], load):
                t = div(self.rps("trellis_auto", load), self.rps(best[0], load))
                a = div(self.added_p99(best[0], load), self.added_p99("trellis_auto", load))
                c = div(self.cpu_pair(best[0], load), self.cpu_pair("trellis_auto", load))
                out.append(f"| {self.load_name(load)} | best peer ({best[1]}), Trellis workers auto | "
                           f"{self.x(t)} | {self.x(a)} | {self.x(c)} |")
        if not trellis_ok:
            return out + [""]
        rs = []
        for scen, name in PEERS:
            parts = []
            for which in ("idle_rss_a", "idle_rss_b", "loaded_rss_a", "loaded_rss_b"):
                v = div(self.rss(scen, which), self.rss("trellis", which))
                parts.append(self.x(v))
            hs = div(self.hs("trellis"), self.hs(scen))
            rs.append(f"| {name} | {' | '.join(parts)} | {self.x(hs)} |")
        out += ["", "| vs | idle RSS A | idle RSS B | loaded RSS A | loaded RSS B | handshakes/s (Trellis ÷ other) |",
                "|---|--:|--:|--:|--:|--:|"] + rs + [""]
        return out

    def targets(self):
        wrk = self.lat_loads + self.tput_loads
        out = ["## Trellis vs targets", "", "| target | " + " | ".join(self.load_name(l) for l in wrk)
               + " | verdict |", "|---|" + "--:|" * len(wrk) + "---|"]
        limit = self.num("meta.noise_limit") or 25

        def noisy(scens, loads):
            return [f"{dict(PATHS)[s]} {self.load_name(l)}" for s in scens for l in loads
                    if (self.foreign(s, l) or 0) > limit]

        def row(name, cells, oks, scens=("trellis",), loads=(), info=False):
            verdict = "n/a" if any(o is None for o in oks) else ("PASS" if all(oks) else "MISS")
            if info and verdict != "n/a":
                verdict = "info"
            bad = noisy(scens, loads)
            if bad and verdict != "n/a":
                verdict += " ⚠ noisy: " + ", ".join(bad)
            out.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")

        def vs_best_peer(scen):
            """Cells, verdicts and judged paths of `scen`'s throughput ≥ 1.5× the best peer. The best
            peer can differ per load point: each cell names the one it was judged against."""
            cells, oks, judged = [], [], {scen}
            for l in wrk:
                if l not in self.tput_loads:
                    cells.append("— (latency point)"); continue
                best, t = self.best_peer(l), self.rps(scen, l)
                if t is None or best is None:
                    cells.append("n/a"); oks.append(None); continue
                judged.add(best[0])
                x = t / self.rps(best[0], l)
                ok = x >= 1.5
                cells.append(f"{x:.2f}× {best[1]}" + ("" if ok else f" (short by {(1 - x / 1.5) * 100:.0f}%)"))
                oks.append(ok)
            return cells, oks, tuple(judged)

        n, one_n = self.r.get("trellis_auto.workers", "N"), self.r.get("meta.trellis_threads_requested", "1")
        auto_info = f"throughput ≥ 1.5× the best peer pair, Trellis with {n} workers (information)"
        if not self.ok("trellis"):
            out.append(f"| all | " + " | ".join("—" for _ in wrk)
                       + f" | not measured ({self.cell_missing('trellis')}: {self.r.get('trellis.reason', '')}) |")
            if self.ok("trellis_auto"):  # measured on its own: still worth its row
                cells, oks, judged = vs_best_peer("trellis_auto")
                row(auto_info, cells, oks, judged, self.tput_loads, info=True)
            return out + [""]
        cells, oks, judged = vs_best_peer("trellis")
        row("throughput ≥ 1.5× the best peer pair", cells, oks, judged, self.tput_loads)
        scaling = f"{n} workers not slower than {one_n} (scales with cores)"
        if self.status("trellis_auto") in ("fail", "skip"):
            why = f"{self.cell_missing('trellis_auto')}: {self.r.get('trellis_auto.reason', '')}"
            row(scaling, ["n/a" if l in self.tput_loads else "— (latency point)" for l in wrk[:-1]] + [f"n/a ({why})"],
                [None])
        elif self.ok("trellis_auto") and int(fnum(n) or 0) <= int(fnum(one_n) or 0):
            row("more workers not slower than fewer (scales with cores)",
                [f"n/a (both paths ran {n} worker{'s' if n != '1' else ''})"] + [""] * (len(wrk) - 1), [None])
        elif self.ok("trellis_auto"):
            # Issue #19: with more workers the pair must not be slower than with one.
            cells, oks = [], []
            for l in wrk:
                if l not in self.tput_loads:
                    cells.append("— (latency point)"); continue
                one, many = self.rps("trellis", l), self.rps("trellis_auto", l)
                if one is None or many is None or one == 0:
                    cells.append("n/a"); oks.append(None); continue
                ok = many >= one
                cells.append(f"{many:,.0f} vs {one:,.0f} req/s ({many / one:.2f}×)")
                oks.append(ok)
            row(scaling, cells, oks, ("trellis", "trellis_auto"), self.tput_loads)
            cells, oks, judged = vs_best_peer("trellis_auto")
            row(auto_info, cells, oks, judged, self.tput_loads, info=True)
        for scen, label, want in (("envoy", "Envoy", 3.0),):
            cells, oks = [], []
            for l in wrk:
                if l not in self.tput_loads:
                    cells.append("— (latency point)"); continue
                t, o = self.rps("trellis", l), self.rps(scen, l)
                if t is None or o is None or o == 0:
                    cells.append("n/a"); oks.append(None); continue
                x = t / o
                ok = x >= want
                cells.append(f"{x:.2f}×" + ("" if ok else f" (short by {(1 - x / want) * 100:.0f}%)"))
                oks.append(ok)
            row(f"throughput ≥ {want:g}× {label}", cells, oks, ("trellis", scen), self.tput_loads)
        cells, oks, judged = [], [], {"trellis"}
        for l in wrk:
            low, t = self.lowest_p99_peer(l), self.added_p99("trellis", l)
            if t is None or low is None:
                cells.append("n/a"); oks.append(None); continue
            judged.add(low[0])
            o = self.added_p99(low[0], l)
            ok = t < o
            cells.append(f"{t / 1000:.3f} vs {o / 1000:.3f} ms ({low[1]})" + ("" if ok else f" (over by {(t - o) / 1000:.3f} ms)"))
            oks.append(ok)
        row("added p99 the lowest of all pairs", cells, oks, tuple(judged), wrk)
        for scen, label in (("nginx", "nginx"), ("envoy", "Envoy")):
            cells, oks = [], []
            for l in wrk:
                t, o = self.added_p99("trellis", l), self.added_p99(scen, l)
                if t is None or o is None:
                    cells.append("n/a"); oks.append(None); continue
                ok = t < o
                cells.append(f"{t / 1000:.3f} vs {o / 1000:.3f} ms" + ("" if ok else f" (over by {(t - o) / 1000:.3f} ms)"))
                oks.append(ok)
            # The same direct p99 is subtracted from both sides, so only these two paths' noise matters.
            row(f"added p99 below {label}'s", cells, oks, ("trellis", scen), wrk)
        cells, oks = [], []
        for l in wrk:
            if l not in self.tput_loads:
                a, b = self.cpu_us("trellis", l, "a"), self.cpu_us("trellis", l, "b")
                cells.append("—" if a is None or b is None else f"(A {a:.1f}, B {b:.1f} µs, not judged)"); continue
            a, b = self.cpu_us("trellis", l, "a"), self.cpu_us("trellis", l, "b")
            if a is None or b is None:
                cells.append("n/a"); oks.append(None); continue
            ok = a <= 15 and b <= 15
            worst = max(a, b)
            cells.append(f"A {a:.1f}, B {b:.1f} µs" + ("" if ok else f" ({worst / 15:.2f}× the limit)"))
            oks.append(ok)
        row("CPU ≤ 15 µs/request per sidecar", cells, oks, ("trellis",), self.tput_loads)
        a, b = self.rss("trellis", "idle_rss_a"), self.rss("trellis", "idle_rss_b")
        if a is None or b is None:
            row("idle RSS ≤ 10 MiB per sidecar", ["n/a"] + [""] * (len(wrk) - 1), [None])
        else:
            ok = a <= 10 and b <= 10
            row("idle RSS ≤ 10 MiB per sidecar",
                [f"A {a:.1f}, B {b:.1f} MiB" + ("" if ok else f" ({max(a, b) / 10:.2f}× the limit)")] + ["(same)"] * (len(wrk) - 1),
                [ok])
        pq = self.hs_cpu_ms("trellis", "hspq")
        group = self.r.get("trellis.hspq.group", "?")
        if pq is None:
            err = self.r.get("trellis.hspq.error")
            row("full mTLS handshake ≤ 0.30 ms server CPU, with its key exchange",
                [f"n/a ({err})" if err else "n/a"] + [""] * (len(wrk) - 1), [None])
        else:
            ok = pq <= 0.30 and group == "X25519MLKEM768"
            why = [] if pq <= 0.30 else [f"{pq / 0.30:.2f}× the limit"]
            if group != "X25519MLKEM768":
                why.append("group not X25519MLKEM768")
            row("full mTLS handshake ≤ 0.30 ms server CPU, with its key exchange",
                [f"B {pq:.2f} ms ({group})" + (f" ({'; '.join(why)})" if why else "")]
                + ["(same)"] * (len(wrk) - 1), [ok])
        out += ["", "Targets are judged on the wrk runs (HTTP/1.1 keep-alive from the app): throughput and CPU at the "
                "saturating connection counts, added p99 at every wrk point (the 1-connection point is the unsaturated "
                "latency); the handshake on `handshake_load`'s post-quantum run (OpenSSL 3.0's s_time offers X25519 only); h2load rows above are for information. One run on a shared 2-core machine: check *other load* "
                "before reading small differences.", ""]
        return out

    def notes(self):
        out = []
        for scen, name in PATHS:
            st = self.status(scen)
            if st not in ("ok", "not run"):
                out.append(f"- {name}: {st.upper()} — {self.r.get(f'{scen}.reason', '')}")
            for load in self.loads:
                rc = self.r.get(f"{scen}.{load}.rc")
                errs = self.num(f"{scen}.{load}.errors")
                if rc not in (None, "0"):
                    out.append(f"- {name} {self.load_name(load)}: load generator exited with {rc}")
                if errs:
                    out.append(f"- {name} {self.load_name(load)}: {int(errs)} failed requests (non-2xx or socket errors)")
                att = int(self.num(f"{scen}.{load}.attempts") or 1)
                if att > 1:
                    out.append(f"- {name} {self.load_name(load)}: measured {att} times because other processes were "
                               "busy; the quietest attempt is shown")
                fo = self.foreign(scen, load)
                if fo is not None and fo > 25:
                    out.append(f"- {name} {self.load_name(load)}: other processes used {fo:.0f}% of a core during the run; treat it as noisy")
        return (["## Notes", ""] + out + [""]) if out else []

    def profile(self):
        r = self.r
        if "trellis.profile" in r:
            return ["## Profile (Trellis)", "", r["trellis.profile"], ""]
        if not any(k.startswith("trellis.profile.") for k in r):
            return []
        out = ["## Where the Trellis sidecars spend CPU (perf, wrk 16 conn, separate run)", "",
               "Sampled with `perf record -F 999 -g -p PID` for 5 s during a separate 8 s wrk run; self time by "
               "binary/library and the hottest symbols. Not a measurement run.", ""]
        for side in ("a", "b"):
            dso = r.get(f"trellis.profile.dso_{side}", "")
            per = r.get(f"trellis.profile.per_request_{side}")
            out.append(f"**Sidecar {side.upper()}** — by binary: " + ", ".join(x.replace(" ", " ") for x in dso.split(";") if x)
                       + (f"; {per} (`perf stat`, same window)" if per else ""))
            out.append("")
            top = [x.split("~", 1) for x in r.get(f"trellis.profile.top_{side}", "").split("|") if "~" in x]
            if top:
                out += ["| self | symbol |", "|--:|---|"] + [f"| {pct} | `{sym.strip()}` |" for pct, sym in top]
            out.append("")
        return out

    # --- gRPC and WebSocket points (tests/bench/protocols.sh) --------------------------------
    GRPC_PATHS = [("grpc_direct", "direct"), ("grpc_trellis", "Trellis pair"), ("grpc_envoy", "Envoy pair")]
    WS_PATHS = [("ws_direct", "direct"), ("ws_trellis", "Trellis pair")]

    def protocols(self):
        r = self.r
        if not any(self.status(s) != "not run" for s, _ in self.GRPC_PATHS + self.WS_PATHS):
            return []
        out = ["## gRPC unary and WebSocket round trips", ""]
        if any(self.status(s) != "not run" for s, _ in self.GRPC_PATHS):
            out += [
                f"gRPC unary calls into a tonic app (one current-thread runtime): {r.get('meta.grpc', '')}; Trellis B "
                "speaks h2c to the app (`app_protocol: h2c`), Envoy B has an HTTP/2 app cluster. Before each point one "
                "`grpcio` call through the path must echo its message. *App answered* counts the calls the app "
                "served during the point (warm-up included), which must be at least the calls h2load counted: h2load "
                "judges a call by its HTTP status only. `(×N)` is ÷ the Trellis pair.",
                "",
                "| path | calls/s | p50 ms | p99 ms | CPU µs/call A | CPU µs/call B | calls | app answered | errors | other load |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
            ]
            for scen, name in self.GRPC_PATHS:
                if not self.measured(scen, "unary"):
                    why = self.r.get(f"{scen}.reason", "")
                    out.append(f"| {name} | {self.cell_missing(scen) if not self.ok(scen) else 'n/a'}"
                               + (f": {why}" if why else "") + " | | | | | | | | |")
                    continue
                rps = self.rps(scen, "unary")
                p50, p99 = self.lat(scen, "unary", "p50"), self.lat(scen, "unary", "p99")
                ca, cb = self.cpu_us(scen, "unary", "a"), self.cpu_us(scen, "unary", "b")
                calls, served = self.num(f"{scen}.unary.requests"), self.num(f"{scen}.unary.app_served")
                short = calls is not None and served is not None and served < calls
                fo = self.foreign(scen, "unary")
                direct = scen == "grpc_direct"
                out.append("| {} | {:,.0f}{} | {} | {}{} | {} | {} | {} | {}{} | {} | {} |".format(
                    name, rps, self.ratio_to(rps, self.rps("grpc_trellis", "unary")),
                    self.f(p50 and p50 / 1000, ".3f"), self.f(p99 and p99 / 1000, ".3f"),
                    self.ratio_to(p99, self.lat("grpc_trellis", "unary", "p99")),
                    "—" if direct else self.f(ca, ".1f") + self.ratio_to(ca, self.cpu_us("grpc_trellis", "unary", "a")),
                    "—" if direct else self.f(cb, ".1f") + self.ratio_to(cb, self.cpu_us("grpc_trellis", "unary", "b")),
                    self.f(calls, ",.0f"), self.f(served, ",.0f"), " ⚠ fewer than h2load counted" if short else "",
                    int(self.num(f"{scen}.unary.errors") or 0), self.f(fo, ".0f") + "%" if fo is not None else "n/a"))
            out.append("")
        if any(self.status(s) != "not run" for s, _ in self.WS_PATHS):
            out += [
                f"WebSocket echo round trips: {r.get('meta.ws', '')}. *Added* is the Trellis pair's figure minus the "
                "direct one; CPU is each sidecar's user+system time during the round trips ÷ round trips.",
                "",
                "| path | round trips | p50 µs | p90 µs | p99 µs | mean µs | added p50 µs | added p99 µs | CPU µs/round trip A | CPU µs/round trip B |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
            ]
            for scen, name in self.WS_PATHS:
                if not self.ok(scen):
                    why = self.r.get(f"{scen}.reason", "")
                    out.append(f"| {name} | {self.cell_missing(scen)}" + (f": {why}" if why else "") + " | | | | | | | | |")
                    continue
                q = lambda s, k: self.num(f"{s}.rtt.{k}") if self.ok(s) else None  # noqa: E731
                n = q(scen, "n")
                added = lambda k: (None if scen == "ws_direct" or q(scen, k) is None or q("ws_direct", k) is None  # noqa: E731
                                   else q(scen, k) - q("ws_direct", k))
                cpu = lambda side: (None if scen == "ws_direct" or not n or q(scen, f"cpu_{side}_ticks") is None  # noqa: E731
                                    else q(scen, f"cpu_{side}_ticks") / self.clk / n * 1e6)
                out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    name, self.f(n, ",.0f"), self.f(q(scen, "p50_us"), ".0f"), self.f(q(scen, "p90_us"), ".0f"),
                    self.f(q(scen, "p99_us"), ".0f"), self.f(q(scen, "mean_us"), ".0f"),
                    "—" if scen == "ws_direct" else self.f(added("p50_us"), ".0f"),
                    "—" if scen == "ws_direct" else self.f(added("p99_us"), ".0f"),
                    "—" if scen == "ws_direct" else self.f(cpu("a"), ".1f"),
                    "—" if scen == "ws_direct" else self.f(cpu("b"), ".1f")))
            out.append("")
        return out

    @staticmethod
    def ratio_to(v, t):
        """this ÷ the reference, for the (×…) next to absolute numbers."""
        return "" if v is None or t is None or t <= 0 or v < 0 else f" ({v / t:.2f}×)"

    def render(self):
        return "\n".join(self.header() + self.main_table() + self.mem_table() + self.ratio_table() + self.targets()
                          + self.protocols() + self.profile() + self.notes())


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: report.py RAW.txt OUT.md")
    text = Report(merge(*load_raw(sys.argv[1]))).render()
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
