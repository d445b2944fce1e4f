#!/usr/bin/env python3
"""Prints wsgate's module graph: for each module in src/, the modules it names as
`crate::NAME` outside its tests, in dependency order (a module after everything it
uses), then any import circles. Exits 1 if there is a circle.

    python3 scripts/module-graph.py [SRC]
"""
import os
import re
import sys

src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "src")
modules = sorted(f[:-3] for f in os.listdir(src) if f.endswith(".rs") and f not in ("lib.rs", "main.rs"))


def code(path):
    text = open(path, encoding="utf-8").read()
    # Tests sit in a trailing `#[cfg(test)] mod tests`; they may use anything.
    cut = re.search(r"^#\[cfg\(test\)\]\s*\nmod tests", text, re.M)
    text = text[: cut.start()] if cut else text
    # Comments and docs mention modules without depending on them.
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


deps = {}
for m in modules:
    text = code(os.path.join(src, m + ".rs"))
    names = set(re.findall(r"\bcrate::(\w+)", text))
    for group in re.findall(r"\bcrate::\{([^}]*)\}", text, re.S):
        names.update(re.findall(r"(?:^|[\s,{])(\w+)", group))
    deps[m] = sorted(n for n in names if n in modules and n != m)

# Depth: leaves 0, others one more than their deepest dependency (circles stop at the
# modules already on the path).
depth = {}


def level(m, path=()):
    if m in depth:
        return depth[m]
    below = [level(d, path + (m,)) for d in deps[m] if d not in path]
    depth[m] = 1 + max(below) if below else 0
    return depth[m]


for m in modules:
    level(m)
for m in sorted(modules, key=lambda m: (depth[m], m)):
    print(f"{depth[m]:2} {m:10} -> {', '.join(deps[m]) or '(nothing)'}")

# Circles: strongly connected components of two or more modules.
index, low, stack, on, circles = {}, {}, [], set(), []


def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in deps[v]:
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
        if len(comp) > 1:
            circles.append(sorted(comp))


for m in modules:
    if m not in index:
        visit(m)
for c in circles:
    print("circle:", " <-> ".join(c), file=sys.stderr)
print(f"{len(modules)} modules, {sum(len(d) for d in deps.values())} edges, {len(circles)} circles")
sys.exit(1 if circles else 0)
