"""No import circle among router/ modules, lazy (function-level) imports included: a module that needs
another at run time depends on it as much as one importing it at the top.

One circle is known and left for a change of its own (issue 17): `cli` imports `demo` and `supervisor`
lazily, and they import `run_async` / `serve` / `setup_logging` back from `cli`. The fix: move those three
(and `JsonLogFormatter`) to a module of their own (`router/serving.py`) that all three import. This test
fails on any new circle, and once the known one is gone (then empty KNOWN)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KNOWN = [{"router.cli", "router.demo", "router.supervisor"}]


def router_modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "router").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> router modules it imports (resolved to the deepest module: `from router.x import y`
    names router.x.y when that is a module, else router.x). Names are the folder's (`router.x`),
    before and after scripts/rename_imports.py (which leaves this file alone)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                name = name.removeprefix("kvroute.")  # after scripts/rename_imports.py
                target = resolve(name) if name.split(".")[0] == "router" else None
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_circle_detection_works() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_new_import_circle_among_router_modules() -> None:
    modules = router_modules()
    assert "router.cli" in modules and "router.discovery.sync" in modules
    found = sorted(circles(import_graph(modules)), key=sorted)
    assert found == KNOWN, f"import circles among router/ modules: {found} (known: {KNOWN})"
