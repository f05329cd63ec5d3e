#!/usr/bin/env python3
"""Memory under a burst of idle inbound mTLS connections, and whether it comes back.

    python3 tests/bench/conn_burst.py --pid PID --port PORT --cert CHAIN --key KEY --ca BUNDLE
                                      [--conns 2000] [--alpn h2] [--settle 20]

Opens --conns mTLS connections to 127.0.0.1:PORT (the process PID listens there), completes
each handshake and, with `--alpn h2`, sends the HTTP/2 preface and an empty SETTINGS frame
(what a peer sidecar's pooled connection looks like before its first request), holds them all,
then closes them all and watches the process's VmRSS come down for up to --settle seconds.
Prints `key=value` lines (KiB): rss_idle, rss_peak, rss_after (the last sample), settle_s (the
time until RSS was within 1 MiB of rss_after), per_conn_bytes, opened. Standard library only.
"""
import argparse
import resource
import socket
import ssl
import sys
import time

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def rss_kib(pid):
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    try:
        import os
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--alpn", default="h2")
    ap.add_argument("--settle", type=float, default=20.0)
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, a.conns + 256)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(a.cert, a.key)
    ctx.load_verify_locations(a.ca)
    # The server's SVID carries a URI SAN only: chain verification, no host-name check.
    ctx.check_hostname = False
    if a.alpn:
        ctx.set_alpn_protocols([a.alpn])

    time.sleep(1.0)
    idle = rss_kib(a.pid)
    fd0 = fds(a.pid)
    held = []
    t0 = time.monotonic()
    for _ in range(a.conns):
        try:
            raw = socket.create_connection(("127.0.0.1", a.port), timeout=10)
            tls = ctx.wrap_socket(raw)
            if a.alpn == "h2":
                tls.sendall(H2_PREFACE)
            held.append(tls)
        except OSError as e:
            print(f"error={type(e).__name__}: {e}", file=sys.stderr)
            break
    open_s = time.monotonic() - t0
    time.sleep(1.0)
    peak = rss_kib(a.pid)
    fd1 = fds(a.pid)
    for s in held:
        try:
            s.close()
        except OSError:
            pass
    closed_at = time.monotonic()
    samples = []
    while time.monotonic() - closed_at < a.settle:
        time.sleep(0.5)
        samples.append((time.monotonic() - closed_at, rss_kib(a.pid)))
    after = samples[-1][1] if samples else rss_kib(a.pid)
    settle = next((t for t, v in samples if v <= after + 1024), a.settle)
    n = len(held)
    print(f"opened={n}")
    print(f"open_s={open_s:.1f}")
    print(f"rss_idle={idle}")
    print(f"rss_peak={peak}")
    print(f"rss_after={after}")
    print(f"settle_s={settle:.1f}")
    print(f"per_conn_bytes={(peak - idle) * 1024 // n if n else 0}")
    print(f"fds_idle={fd0}")
    print(f"fds_peak={fd1}")
    print(f"fds_after={fds(a.pid)}")
    return 0 if n == a.conns else 1


if __name__ == "__main__":
    sys.exit(main())
