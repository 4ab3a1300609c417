"Issue 13: the package's import graph flows one way (no cycle, counting imports inside functions too)."
import ast
from pathlib import Path
import fashion_json_encoder

PKG = Path(fashion_json_encoder.__file__).parent


def import_graph() -> dict:
    "module -> the package modules it imports, at module level or inside functions."
    mods = {".".join(p.relative_to(PKG).with_suffix("").parts): p for p in PKG.rglob("*.py")
            if p.name not in ("__init__.py", "_modidx.py")}
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = m.split(".")[:-node.level] if node.level else []
                name = ".".join(base + [node.module or ""]).strip(".")
                if not node.level:
                    if not name.startswith("fashion_json_encoder"): continue
                    name = name.removeprefix("fashion_json_encoder").strip(".")
                for a in node.names:
                    t = f"{name}.{a.name}".strip(".")
                    t = t if t in mods else name
                    if t in mods and t != m: graph[m].add(t)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    t = a.name.removeprefix("fashion_json_encoder.")
                    if t in mods and t != m: graph[m].add(t)
    return graph


def cycles(graph: dict) -> list:
    "Strongly connected groups of more than one module (Tarjan)."
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
        for w in graph[v]:
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    for v in graph:
        if v not in index: visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    g = import_graph()
    assert {"system", "search", "prepare", "checkpoints", "calibration"} <= set(g)   # the graph was read
    assert "system" in g["cli"] and "checkpoints" in g["search"]
    assert cycles(g) == []


def test_nothing_below_the_facade_imports_it():
    g = import_graph()
    assert sorted(m for m, deps in g.items() if "system" in deps) == ["cli"]   # only the command line sits above it
    assert "app" not in g["search"] and "system" not in g["app"]
