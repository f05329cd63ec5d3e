"""WebSocket echo round-trip latency for the benchmark, on stock `websockets` (PyPI).

    python ws_rtt.py server               # echo server; prints "listening 127.0.0.1:PORT"
    python ws_rtt.py client ADDR N        # N sequential round trips of a 64-byte text message

The client connects to ADDR (the app itself, or a sidecar's upstream port), sends a message,
waits for its echo, and repeats N times after 200 untimed warm-up round trips; it prints
`key=value` lines: n, p50_us, p90_us, p99_us, mean_us, and errors (1 if the connection failed
or an echo differed).
"""

import asyncio
import sys
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

MESSAGE = "trellis-bench-websocket-" + "x" * 40  # 64 bytes


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def run_server():
    async with serve(echo, "127.0.0.1", 0, compression=None) as server:
        print(f"listening 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()


async def run_client(addr, n):
    samples = []
    async with connect(f"ws://{addr}/rtt", compression=None, open_timeout=10) as ws:
        for i in range(200 + n):
            t0 = time.perf_counter_ns()
            await ws.send(MESSAGE)
            reply = await asyncio.wait_for(ws.recv(), 10)
            t1 = time.perf_counter_ns()
            if reply != MESSAGE:
                raise RuntimeError(f"echo {i} differs: {reply[:40]!r}")
            if i >= 200:
                samples.append((t1 - t0) / 1000)
    samples.sort()

    def q(p):
        return samples[min(len(samples) - 1, int(len(samples) * p))]

    print(f"n={len(samples)}")
    for name, p in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
        print(f"{name}_us={q(p):.1f}")
    print(f"mean_us={sum(samples) / len(samples):.1f}")
    print("errors=0")


def main():
    if sys.argv[1] == "server":
        asyncio.run(run_server())
    else:
        try:
            asyncio.run(run_client(sys.argv[2], int(sys.argv[3])))
        except Exception as e:  # noqa: BLE001 - reported in the benchmark's raw numbers
            print("errors=1")
            print(f"error={e!r}"[:200])


if __name__ == "__main__":
    main()
