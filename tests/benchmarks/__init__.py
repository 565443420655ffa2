"""Tests of the benchmark scripts (benchmarks/*.py and the probes in benchmarks/probes/), loaded by path:
benchmarks/ is not a package."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str) -> ModuleType:
    """benchmarks/<name>.py (``name`` may be ``probes/<probe>``) as a module; benchmarks/ goes on sys.path for the
    scripts' imports of the harness and of each other."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(Path(name).name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
