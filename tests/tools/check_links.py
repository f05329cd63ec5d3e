#!/usr/bin/env python3
"""Checks that every relative link in the given Markdown files resolves.

    python3 tests/tools/check_links.py README.md docs/*.md

A relative link is a Markdown link or image (`[text](target)`, `![alt](target)`, or a
reference definition `[label]: target`) whose target has no scheme (`https:`, `mailto:`, ...).
Its path, relative to the file, must exist; a `#fragment` must name a heading of the target
file (or of this file, for `#fragment` alone), with the anchors GitHub makes: lowercase,
punctuation dropped except `-` and `_`, spaces as `-`, `-1`, `-2`, ... for repeated headings.
Links in fenced code blocks and inline code are not links. Prints one `file:line` per broken
link; exit status 1 when there is any.
"""

import os
import re
import sys

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
FENCE = re.compile(r"^\s{0,3}(```+|~~~+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def lines_outside_code(text):
    """(line number, line) for every line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            marker = m.group(1)
            if fence is None:
                fence = marker[0] * len(marker)
                continue
            if marker.startswith(fence):
                fence = None
                continue
        if fence is None:
            yield number, line


def slug(heading):
    """GitHub's anchor for a heading's text."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


ANCHORS = {}


EXPLICIT_ANCHOR = re.compile(r'<a\s+id="([^"]+)"')


def anchors(path):
    """Every heading anchor of a Markdown file (cached)."""
    if path not in ANCHORS:
        found, seen = set(), {}
        with open(path, encoding="utf-8") as f:
            for _, line in lines_outside_code(f.read()):
                # Explicit anchors (`<a id="x"></a>`), which GitHub renders as link targets.
                found.update(EXPLICIT_ANCHOR.findall(line))
                m = HEADING.match(line)
                if not m:
                    continue
                base = slug(m.group(2))
                n = seen.get(base, 0)
                seen[base] = n + 1
                found.add(base if n == 0 else f"{base}-{n}")
        ANCHORS[path] = found
    return ANCHORS[path]


def check(md):
    broken = []
    with open(md, encoding="utf-8") as f:
        text = f.read()
    base = os.path.dirname(md)
    for number, line in lines_outside_code(text):
        code_free = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)
        targets = [m.group(1) for m in LINK.finditer(code_free)]
        m = REFDEF.match(code_free)
        if m:
            targets.append(m.group(1))
        for target in targets:
            if SCHEME.match(target) or target.startswith("//"):
                continue
            path, _, fragment = target.partition("#")
            resolved = os.path.normpath(os.path.join(base, path)) if path else md
            if not os.path.exists(resolved):
                broken.append(f"{md}:{number}: {target}: {resolved} does not exist")
                continue
            if fragment and resolved.endswith(".md"):
                if fragment.lower() not in anchors(resolved):
                    broken.append(
                        f"{md}:{number}: {target}: no heading #{fragment} in {resolved}"
                    )
    return broken


def main(argv):
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    broken, count = [], 0
    for md in argv:
        problems = check(md)
        broken.extend(problems)
        count += 1
    for b in broken:
        print(b)
    if broken:
        print(f"{len(broken)} broken relative link(s) in {count} file(s)", file=sys.stderr)
        return 1
    print(f"relative links resolve in {count} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
