#!/usr/bin/env python3
"""Writes the link order of a binary's code from callgrind profiles of it at work.

usage: code_order.py --binary target/release/trellis-sidecar cg.out... > crates/trellis/sidecar-code-order.txt
       code_order.py --check crates/trellis/sidecar-code-order.txt --binary target/release/trellis-sidecar
       (the same for target/release/trellis and crates/trellis/control-code-order.txt, from a
       control plane's profile)

Every function the profiles saw run, as its (mangled) symbol name, most instructions first, kept
only when the binary defines it (libc's functions are not ours to place). rust-lld places these
functions first and together (`--symbol-ordering-file`, crates/trellis/build.rs), so what a
sidecar (or a control plane) runs fills few pages and the rest of the code is never read in; see
docs/benchmarks.md ("Idle RSS: code layout") and tests/bench/code-order.sh, which makes the profiles.
"""
import argparse
import collections
import re
import subprocess
import sys

NAME = re.compile(r"\((\d+)\)(?: (.*))?")


def self_costs(path, costs):
    """Adds each function's own instructions (Ir) in one callgrind file to `costs`."""
    names = {}  # callgrind's "(id) name" compression: a name is spelt once per file
    current = None
    after_calls = False
    with open(path, errors="replace") as f:
        for line in f:
            key, sep, rest = line.rstrip("\n").partition("=")
            if sep and key in ("fn", "cfn"):
                m = NAME.fullmatch(rest)
                if m and m.group(2) is not None:
                    names[m.group(1)] = m.group(2)
                name = names.get(m.group(1), rest) if m else rest
                costs[name] += 0  # a callee that ran counts even with no cost of its own here
                if key == "fn":
                    current = name
                continue
            if sep:  # fl=, fi=, ob=, calls=, ... : not a cost line
                after_calls = key == "calls"
                continue
            if after_calls:  # the line after calls= is the call's inclusive cost
                after_calls = False
                continue
            parts = line.split()
            if current and len(parts) >= 2 and parts[1].isdigit():
                costs[current] += int(parts[1])


def defined_functions(binary):
    """The function symbols the binary defines (local ones included)."""
    out = subprocess.run(["nm", "--defined-only", binary], check=True, capture_output=True, text=True)
    return {p[2] for p in (l.split() for l in out.stdout.splitlines()) if len(p) == 3 and p[1] in "tTwW"}


def check(order_file, binary):
    """Exits non-zero unless the binary's code starts with the listed functions, packed.

    Prints how many listed names the build still has: a low share means the list is stale
    (dependencies moved on) and tests/bench/code-order.sh should be run again.
    """
    out = subprocess.run(["nm", "-S", "--defined-only", binary], check=True, capture_output=True, text=True)
    where = {}
    for p in (l.split() for l in out.stdout.splitlines()):
        if len(p) == 4 and p[2] in "tTwW":
            where.setdefault(p[3], (int(p[0], 16), int(p[1], 16)))
    listed = [l.strip() for l in open(order_file) if l.strip()]
    found = [where[n] for n in listed if n in where]
    share = len(found) / max(len(listed), 1)
    print(f"{len(found)} of {len(listed)} listed functions are in {binary} ({share:.0%})")
    if share < 0.8:
        print("warning: the list is stale; run tests/bench/code-order.sh and commit the list")
    if not found:
        sys.exit("error: no listed function is in the binary")
    start = min(a for a, _ in found)
    packed = sum(size for _, size in found)
    # Packed: nearly all listed functions sit within their own total size (plus alignment and
    # the few whole assembly sections that come along) of the first one.
    inside = sum(1 for a, _ in found if a < start + packed * 1.25 + 65536)
    print(f"{inside} of them lie in the first {packed * 1.25 / 2**20 + 0.0625:.1f} MiB of code")
    if inside < 0.95 * len(found):
        sys.exit("error: the functions are not laid out in the list's order: was the build linked "
                 "without --symbol-ordering-file (crates/trellis/build.rs)?")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True, help="the binary the profiles ran")
    parser.add_argument("--check", metavar="ORDER", help="check the binary's layout against this list")
    parser.add_argument("profiles", nargs="*", help="callgrind.out files")
    args = parser.parse_args()
    if args.check:
        check(args.check, args.binary)
        return
    if not args.profiles:
        parser.error("give callgrind.out files, or --check ORDER")
    costs = collections.Counter()
    for path in args.profiles:
        self_costs(path, costs)
    ours = defined_functions(args.binary)
    kept = [name for name, _ in costs.most_common() if name in ours]
    if not kept:
        sys.exit("no profiled function is defined in the binary: profiles of another build?")
    print(f"# {len(kept)} functions; regenerate with tests/bench/code-order.sh", file=sys.stderr)
    sys.stdout.write("".join(f"{name}\n" for name in kept))


if __name__ == "__main__":
    main()
