"""benchmarks/: the scripts import the shared harness and the scripts above them, never each other in a circle, and
no measured script at the top depends on a probe in benchmarks/probes/."""

import ast
from pathlib import Path

from tests.benchmarks import BENCHMARKS


def local_imports() -> dict[str, set[str]]:
    """script -> the benchmark modules it imports (by module name; probes as ``probes/<name>``)."""
    scripts = {p.stem: p for p in BENCHMARKS.glob("*.py")}
    scripts.update({f"probes/{p.stem}": p for p in (BENCHMARKS / "probes").glob("*.py")})
    by_module = {Path(key).name: key for key in scripts}
    graph = {}
    for key, path in scripts.items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        graph[key] = {by_module[n] for n in names if n in by_module and by_module[n] != key}
    return graph


def test_benchmark_imports_form_no_circle_and_point_away_from_the_probes():
    graph = local_imports()
    done, path = set(), []

    def visit(node: str) -> None:                                  # depth-first: a node met again on the path = circle
        assert node not in path, f"import circle: {' -> '.join(path[path.index(node):] + [node])}"
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert "_harness" in graph and "probes/compile_probe" in graph
    for key, deps in graph.items():
        if not key.startswith("probes/"):
            assert not {d for d in deps if d.startswith("probes/")}, key
    assert graph["_harness"] <= {"adapter_speed"}                 # the harness stands below every script but one
