"""``tuning.ray_overhead``: the CPU this process tree takes, and the cores a real local Ray takes beside idle trials.

The factor's arithmetic is checked by hand in ``test_estimate.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.spec.space import load_space

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


def _cores_beside(code: str) -> float:
    """tree_cores over 2 s while a child process runs ``code``."""
    from orchestrator.tuning.ray_overhead import tree_cores

    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        return tree_cores(2.0)
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow  # two 2-second windows
def test_tree_cores_counts_a_spinning_child_and_not_a_sleeping_one():
    assert _cores_beside("while True: pass") > 0.5   # one core spinning (less only on a machine loaded at nice 0)
    assert _cores_beside("import time; time.sleep(30)") < 0.2   # a sleeping child and this sleeping process


@pytest.mark.ray  # a local Ray with two idle trials, ~1-2 min on 2 cores
def test_a_real_local_ray_beside_two_idle_trials_takes_some_but_not_all_cores(shared_data_dir, monkeypatch):
    """Both trials reach their loop, and what Ray's processes take is measurable (Ray is never free: the GCS,
    raylet, dashboard and each trial's actors poll) and below the machine's cores; Ray is stopped after."""
    import ray

    from orchestrator.tuning.ray_overhead import measure_ray_cores

    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    spec = load_space(SPACES / "smoke.yaml")
    if ray.is_initialized():
        ray.shutdown()
    measured = measure_ray_cores(spec, 2, window_s=5.0, report_every_s=1.0)
    assert measured["started"] == 2
    assert 0.005 < measured["ray_cores"] < (os.cpu_count() or 1)
    assert not ray.is_initialized()
