"""The benchmark's gRPC helper on the client side, with stock `grpcio` (PyPI; no generated
code). The app is `tests/examples/grpc_bench_app.rs`.

    python grpc_client.py body FILE       # writes the h2load request body: one 5-byte-framed message
    python grpc_client.py check ADDR      # one bench.Echo/Unary call through ADDR; exit 0 if echoed
    python grpc_client.py served ADDR     # prints how many Unary calls the app has answered
"""

import struct
import sys

import grpc

MESSAGE = b"trellis-bench-grpc-" + bytes(range(45))  # 64 bytes


def call(addr, method, message):
    with grpc.insecure_channel(addr) as ch:
        return ch.unary_unary("/bench.Echo/" + method)(message, timeout=10)


def main():
    cmd, arg = sys.argv[1], sys.argv[2]
    if cmd == "body":
        # gRPC length-prefixed message: compressed flag (0), 4-byte big-endian length, bytes.
        with open(arg, "wb") as f:
            f.write(struct.pack(">BI", 0, len(MESSAGE)) + MESSAGE)
    elif cmd == "check":
        try:
            reply = call(arg, "Unary", MESSAGE)
        except grpc.RpcError as e:
            sys.exit(f"{e.code().name}: {e.details()}")
        if reply != MESSAGE:
            sys.exit(f"wrong reply: {reply[:80]!r}")
    elif cmd == "served":
        print(int(call(arg, "Served", b"")))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
