#!/usr/bin/env python3
# Copied from the project's shared tools (../shared/tools/coupling.py) so that CI on a clean clone runs it.
"""Cross-module private access and import cycles in a package (static, from the source).

A private access is `expr._name` (expr not self/cls/super()) or `from .m import _name`, where `_name`
is defined privately in another module of the package and not in the accessing module.
An import edge counts wherever the import statement sits (inside functions too).
Prints counts; exit 0 when both are zero."""
import ast
import os
import sys

root = sys.argv[1]
pkg = os.path.basename(os.path.normpath(root))
mods = {}
packages = set()
for dp, _, fs in os.walk(root):
    for f in fs:
        if f.endswith(".py") and "migrations" not in dp:
            p = os.path.join(dp, f)
            rel = os.path.relpath(p, os.path.dirname(os.path.normpath(root)))[:-3].replace(os.sep, ".")
            if rel.endswith(".__init__"):
                rel = rel[:-9]
                packages.add(rel)
            mods[rel] = ast.parse(open(p).read(), p)


def private(n):
    return n.startswith("_") and not (n.startswith("__") and n.endswith("__"))


defined = {}
for m, t in mods.items():
    names = set()
    for node in ast.walk(t):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and private(node.name):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and private(node.id):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and private(node.attr):
            names.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            pass
    for node in ast.walk(t):
        if isinstance(node, ast.ClassDef):
            for b in node.body:
                if isinstance(b, ast.Assign):
                    for tg in b.targets:
                        if isinstance(tg, ast.Tuple):
                            continue
                if isinstance(b, ast.Assign) and isinstance(b.value, (ast.Tuple, ast.List)):
                    for tg in b.targets:
                        if isinstance(tg, ast.Name) and tg.id == "__slots__":
                            for e in b.value.elts:
                                if isinstance(e, ast.Constant) and isinstance(e.value, str) and private(e.value):
                                    names.add(e.value)
    defined[m] = names


def resolve(m, node):
    if node.level == 0:
        return node.module or ""
    base = m.split(".")
    parts = base[: len(base) - node.level + (1 if m in packages else 0)]
    return ".".join(parts + ([node.module] if node.module else []))


cross = []
edges = set()
for m, t in mods.items():
    for node in ast.walk(t):
        if isinstance(node, ast.Attribute) and private(node.attr):
            v = node.value
            if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                continue
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                continue
            if node.attr in defined[m]:
                continue
            owners = [o for o, ns in defined.items() if o != m and node.attr in ns]
            if owners:
                cross.append(f"{m}:{node.lineno} .{node.attr} (defined in {', '.join(sorted(owners))})")
        elif isinstance(node, ast.ImportFrom):
            tgt = resolve(m, node)
            if tgt.startswith(pkg):
                for a in node.names:
                    sub = f"{tgt}.{a.name}"
                    edges.add((m, sub if sub in mods else tgt))
                    if private(a.name) and not (sub in mods):
                        cross.append(f"{m}:{node.lineno} import {a.name} from {tgt}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(pkg + ".") and a.name in mods:
                    edges.add((m, a.name))

# cycles among modules (ignore edges into the package __init__, which re-exports)
graph = {}
for a, b in edges:
    if a != b and b in mods and b != pkg:
        graph.setdefault(a, set()).add(b)
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]


def strong(v):
    index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
    for w in graph.get(v, ()):
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
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
for v in list(graph):
    if v not in index:
        strong(v)
for c in cross[:25]:
    print("private:", c)
for c in sccs:
    print("cycle:", " <-> ".join(c))
print(f"cross-module private accesses {len(cross)}, import cycles {len(sccs)}")
sys.exit(0 if not cross and not sccs else 1)
