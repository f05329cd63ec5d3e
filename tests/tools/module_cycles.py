#!/usr/bin/env python3
"""Reports import cycles between the modules of Rust crates.

    python3 tests/tools/module_cycles.py crates/*          # every crate
    python3 tests/tools/module_cycles.py --depth 1 crates/trellis-control
    python3 tests/tools/module_cycles.py --edges crates/trellis-control

A module is a file (`src/ca.rs` is `ca`, `src/attest/mod.rs` is `attest`, `src/attest/join.rs`
is `attest::join`); `--depth N` folds modules into their first N path segments. Module `a`
depends on `b` when code in `a` names `b` (or an item in it): `crate::b::…`, `super::…`,
`self::…`, or a child module by its bare name, in a `use` or anywhere in the code. Test code
does not count: `#[cfg(test)]` modules (inline or in their own file) are skipped. A cycle is a
strongly connected set of two or more modules; each is printed with one `file:line` per edge
so the reference that closes it can be found. Exit status 1 when any crate has a cycle.

It reads source text (comments and string literals removed), not the compiler's view, so a
macro that expands to a path is not seen; good enough to keep a layering honest.
"""

import argparse
import os
import re
import sys
from collections import defaultdict

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_code(text):
    """Source with comments and the contents of string and char literals blanked (newlines
    kept, so line numbers survive)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            i = j
            continue
        if text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
            continue
        m = re.match(r'b?r(#*)"', text[i:i + 10])
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append('""' + "".join("\n" for ch in text[i:j] if ch == "\n"))
            i = j
            continue
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append('""' + "".join("\n" for ch in text[i:j] if ch == "\n"))
            i = j
            continue
        if c == "'":
            # A char literal ('a', '\n', '\u{..}'), not a lifetime ('a).
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", text[i:i + 12])
            if m:
                out.append("' '")
                i += m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def matching_brace(code, open_at):
    depth = 0
    for j in range(open_at, len(code)):
        if code[j] == "{":
            depth += 1
        elif code[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return len(code) - 1


CFG_TEST = re.compile(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")
MOD_DECL = re.compile(r"((?:#\s*\[[^\]]*\]\s*)*)(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*([;{])")


def blank(code, start, end):
    return code[:start] + "".join(ch if ch == "\n" else " " for ch in code[start:end]) + code[end:]


class Module:
    def __init__(self, path, file, code, is_dir_owner):
        self.path = path  # tuple of segments from the crate root
        self.file = file
        self.code = code
        self.is_dir_owner = is_dir_owner  # lib.rs, main.rs, mod.rs: children live beside it
        self.children = []


def load_crate(crate_dir):
    src = os.path.join(crate_dir, "src")
    roots = [f for f in ("lib.rs", "main.rs") if os.path.exists(os.path.join(src, f))]
    modules = {}

    def load(path, file, is_dir_owner):
        with open(file, encoding="utf-8") as fh:
            code = strip_code(fh.read())
        # Test modules do not count: drop `#[cfg(test)] mod x { … }` bodies and `mod x;` files.
        skip_files = set()
        for m in list(MOD_DECL.finditer(code)):
            attrs, name, kind = m.group(1), m.group(2), m.group(3)
            if CFG_TEST.search(attrs or ""):
                if kind == "{":
                    code = blank(code, m.start(), matching_brace(code, m.end() - 1) + 1)
                else:
                    skip_files.add(name)
        mod = Module(path, file, code, is_dir_owner)
        modules[path] = mod
        base = os.path.dirname(file) if is_dir_owner else os.path.splitext(file)[0]
        for m in MOD_DECL.finditer(code):
            name, kind = m.group(2), m.group(3)
            if kind != ";" or name in skip_files:
                continue
            flat, nested = os.path.join(base, name + ".rs"), os.path.join(base, name, "mod.rs")
            child = path + (name,)
            mod.children.append(name)
            if os.path.exists(flat):
                load(child, flat, False)
            elif os.path.exists(nested):
                load(child, nested, True)

    for root in roots:
        load((), os.path.join(src, root), True)
    return modules


PATH_RE = re.compile(r"(?<![A-Za-z0-9_:])((?:crate|super|self|" + IDENT + r")(?:\s*::\s*(?:" + IDENT + r"|\{))+)")


def use_paths(code, start):
    """Expands a `use` tree starting at `start` (just after `use`) into full paths."""
    end = code.find(";", start)
    tree = re.sub(r"\s+", "", code[start:end])
    out = []

    def expand(prefix, t):
        depth, parts, cur = 0, [], ""
        for ch in t:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        for p in parts:
            if not p:
                continue
            brace = p.find("{")
            if brace >= 0 and p.endswith("}"):
                expand(prefix + p[:brace], p[brace + 1:-1])
            else:
                out.append(prefix + p.split(" as ")[0])

    expand("", tree.replace("as", " as ") if False else tree)
    return out


def references(mod, modules):
    """(target module path, line) for each module `mod` names."""
    code = mod.code
    found = []

    def resolve(segments):
        head, rest = segments[0], segments[1:]
        if head == "crate":
            base = ()
        elif head == "self":
            base = mod.path
        elif head == "super":
            base = mod.path[:-1]
            while rest and rest[0] == "super":
                base, rest = base[:-1], rest[1:]
        elif head in mod.children:
            base, rest = mod.path + (head,), rest
            return longest(base, rest)
        else:
            return None
        return longest(base, rest)

    def longest(base, rest):
        target = base
        for seg in rest:
            if target + (seg,) in modules:
                target = target + (seg,)
            else:
                break
        return target if target in modules else None

    def line_of(pos):
        return code.count("\n", 0, pos) + 1

    for m in re.finditer(r"\buse\s+", code):
        for p in use_paths(code, m.end()):
            segs = [s for s in p.split("::") if s and s != "*"]
            if segs:
                t = resolve(segs)
                if t is not None:
                    found.append((t, line_of(m.start())))
    for m in PATH_RE.finditer(code):
        before = code[max(0, m.start() - 40):m.start()]
        if re.search(r"\buse\s+[^;]*$", before):
            continue  # inside a `use`, handled above
        segs = [s.strip() for s in m.group(1).split("::")]
        segs = [s for s in segs if s and s != "{"]
        if segs:
            t = resolve(segs)
            if t is not None:
                found.append((t, line_of(m.start())))
    return found


def fold(path, depth):
    return path if depth is None else path[:depth]


def name(path):
    return "::".join(path) or "(crate root)"


def tarjan(nodes, edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def analyse(crate_dir, depth, show_edges):
    modules = load_crate(crate_dir)
    crate = os.path.basename(os.path.normpath(crate_dir))
    edges = defaultdict(set)
    evidence = {}
    for mod in modules.values():
        src = fold(mod.path, depth)
        for target, line in references(mod, modules):
            dst = fold(target, depth)
            if dst == src or dst == ():
                continue
            if src == () and dst[:1] in [(c,) for c in modules[()].children]:
                # The crate root declaring and re-exporting its modules is not a dependency.
                pass
            # The crate root only declares modules and re-exports: never part of a cycle.
            if src == ():
                continue
            edges[src].add(dst)
            evidence.setdefault((src, dst), f"{os.path.relpath(mod.file)}:{line}")
    nodes = {fold(p, depth) for p in modules}
    cycles = [c for c in tarjan(nodes, edges) if len(c) > 1]
    print(f"{crate}: {len(nodes)} modules, {sum(len(v) for v in edges.values())} edges, "
          f"{len(cycles)} cycle(s)")
    if show_edges:
        for src in sorted(edges):
            print(f"  {name(src)} -> {', '.join(name(d) for d in sorted(edges[src]))}")
    for comp in cycles:
        members = set(comp)
        print(f"  cycle: {' , '.join(name(m) for m in comp)}")
        for src in comp:
            for dst in sorted(edges[src] & members):
                print(f"    {name(src)} -> {name(dst)}  ({evidence[(src, dst)]})")
    return len(cycles)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("crates", nargs="+", help="crate directories (holding src/)")
    ap.add_argument("--depth", type=int, default=None,
                    help="fold modules to their first N path segments")
    ap.add_argument("--edges", action="store_true", help="print every module's dependencies")
    args = ap.parse_args()
    total = 0
    for c in args.crates:
        if os.path.isdir(os.path.join(c, "src")):
            total += analyse(c, args.depth, args.edges)
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
