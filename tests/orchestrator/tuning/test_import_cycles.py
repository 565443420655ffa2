"""No two modules of ``orchestrator/tuning``, ``orchestrator/report`` or ``orchestrator/training`` import each
other, directly or around a longer circle (imports inside functions count: a lazy import hides a circle, it does
not remove it). Issue 29: ``tuning.searcher`` and ``tuning.tuner`` did (the sampler now lives with the searcher),
and ``training.diagnostics`` and ``training.eval_window`` (``eager_scoring`` now lives with the trial)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[3] / "orchestrator"
FOLDERS = ("tuning", "report", "training")


def module_graph(package: Path) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (``from a.b import c`` counts a.b, and a.b.c if a module)."""
    mods = {".".join(p.relative_to(package.parent).with_suffix("").parts): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps |= {m for m in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if m in mods}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
        graph[name] = deps - {name}
    return graph


def circles(graph: dict[str, set[str]], within: set[str]) -> list[list[str]]:
    """Each circle among ``within``, as the path that closes it (depth-first search; a circle once per start)."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node] & within):
            if nxt in path:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for start in sorted(within):
        if start not in done:
            visit(start, [start])
    return found


def test_tuning_and_report_modules_import_no_circle():
    graph = module_graph(PACKAGE)
    mine = {m for m in graph if m.split(".")[1] in FOLDERS}
    assert circles(graph, mine) == []


def test_the_circle_check_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph, set(graph)) == [["a", "b", "c", "a"]]
