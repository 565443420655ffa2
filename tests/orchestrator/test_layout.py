"""The package layout keeps its arrows pointing down (README "Layout"): checked on every import statement.

A module in folder X may import only the folders ALLOWED[X] (and X itself); nothing below the commands imports
a command module; the package root holds only command modules. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "orchestrator"
COMMANDS = {"search", "study", "rerun", "evaluate", "submit", "k8s"}
ALLOWED = {
    "data": set(),
    "spec": {"data", "models"},  # models: the precision rules (which base dtype can compute which precision)
    "models": {"data"},
    "cluster": set(),
    "evaluation": {"data", "models"},
    "report": {"spec", "evaluation", "data", "cluster"},
    "training": {"spec", "data", "models", "evaluation"},
    "tuning": {"spec", "data", "models", "evaluation", "training", "report", "cluster"},
}


def orchestrator_imports(path: Path) -> list[tuple[int, list[str]]]:
    """(line, dotted parts after 'orchestrator') of every import of an orchestrator module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from orchestrator import x" imports the submodule x
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "orchestrator" else [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[1:]) for n in names if n.split(".")[0] == "orchestrator"]
    return found


def violations(package: Path) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        folder = rel.parts[0] if len(rel.parts) > 1 else None
        if folder is None and rel.stem not in COMMANDS | {"__init__"}:
            problems.append(f"{rel}: only command modules live in the package root")
        for line, parts in orchestrator_imports(path):
            target = parts[0] if parts else ""
            if target in COMMANDS:
                problems.append(f"{rel}:{line} imports the command module orchestrator.{target}")
            elif folder is not None and target != folder and target not in ALLOWED[folder]:
                problems.append(f"{rel}:{line} ({folder}/) imports orchestrator.{target} (allowed: "
                                f"{sorted(ALLOWED[folder]) or 'nothing'})")
    return problems


def test_folders_are_the_documented_ones():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(ALLOWED)


def test_every_arrow_points_down():
    assert violations(PACKAGE) == []


def test_the_checker_catches_an_upward_import(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("")
    (tmp_path / "data" / "bad.py").write_text("def f():\n    from orchestrator.training import worker\n")
    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "uses_cli.py").write_text("from orchestrator import search\n")
    (tmp_path / "helpers.py").write_text("")
    found = violations(tmp_path)
    assert any("data/bad.py:2 (data/) imports orchestrator.training" in v for v in found)
    assert any("imports the command module orchestrator.search" in v for v in found)
    assert any("helpers.py: only command modules" in v for v in found)
    assert len(found) == 3


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_readme_layout_names_every_folder(folder):
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    assert f"`orchestrator/{folder}/`" in layout
