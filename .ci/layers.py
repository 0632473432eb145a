#!/usr/bin/env python3
"""Checks the layering of src/: no import circle among modules, and no module over 700 lines
unless its first lines give a reason ("size:" in a //! line). With --sizes-warn, oversized
modules are listed but do not fail the check (while the layout issue splits them). Modules are files (src/a.rs is
`a`, src/h1/io.rs is `h1::io`, a folder's mod.rs is the folder); an edge A -> B is any
`crate::B` path in A (use lines and inline paths), and `super::x` inside a folder. Exits 1
with the circles and oversized files listed."""
import os, re, sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
MAX_LINES = 700

def modules():
    mods = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel == ["lib"]:
                continue
            mods["::".join(rel)] = path
    return mods

def edges(mods):
    names = sorted(mods, key=len, reverse=True)
    out = {m: set() for m in mods}
    for m, path in mods.items():
        text = open(path, encoding="utf-8").read()
        text = re.sub(r"#\[cfg\(test\)\]\s*mod tests \{.*", "", text, flags=re.S)  # tests may look anywhere
        parent = m.rsplit("::", 1)[0] if "::" in m else ""
        refs = re.findall(r"crate::((?:\w+::)*\w+)", text)
        refs += [(parent + "::" if parent else "") + r for r in re.findall(r"super::((?:\w+::)*\w+)", text)]
        # `use crate::a::{b, c}` names a's children too
        for group in re.findall(r"crate::((?:\w+::)*)\{([^}]*)\}", text):
            base, items = group
            for it in items.split(","):
                it = it.strip().split(" ")[0].split("::")[0]
                if it and it != "self":
                    refs.append(base + it)
        for r in refs:
            for n in names:
                if (r == n or r.startswith(n + "::")) and n != m and not m.startswith(n + "::") and not n.startswith(m + "::"):
                    out[m].add(n)
                    break
    return out

def cycles(g):
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return sccs

def main():
    mods = modules()
    g = edges(mods)
    bad = False
    for comp in cycles(g):
        bad = True
        print("import circle: " + ", ".join(comp))
        for a in comp:
            for b in sorted(g[a] & set(comp)):
                print(f"    {a} -> {b}")
    warn_only = "--sizes-warn" in sys.argv
    for m, path in sorted(mods.items()):
        lines = open(path, encoding="utf-8").read().split("\n")
        if len(lines) > MAX_LINES and not any(l.startswith("//!") and "size:" in l for l in lines[:40]):
            bad = bad or not warn_only
            print(f"{os.path.relpath(path, os.path.dirname(ROOT))}: {len(lines)} lines (over {MAX_LINES}, no 'size:' reason in its header)")
    if bad:
        sys.exit(1)
    print(f"layers: {len(mods)} modules, no import circle")

main()
