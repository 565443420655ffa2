"""The final report of a trial names the test items its scores belong to: ``test_sha256/<task>`` equals a
from-scratch sha256 over the sorted item keys of that task's test pool."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from orchestrator.spec.space import load_space
from orchestrator.data.suites import load_pools
from orchestrator.training import worker

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


def test_the_final_report_records_the_test_items_it_scored(shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    smoke = load_space(SPACES / "smoke.yaml")
    spec = dataclasses.replace(smoke, train=dataclasses.replace(smoke.train, max_steps=1))
    config = {"method": "lora", "lora.r": 4, "lora.alpha_over_r": 2.0, "lora.lr": 1.0e-3}
    final = worker.run_training(spec, config, worker.LocalSession())[-1]
    pools = load_pools(spec)
    for task, items in pools.test.items():
        keys = sorted(hashlib.sha256(f"{e.prompt}\x1f{e.target}".encode()).hexdigest()[:16] for e in items)
        assert final[f"test_sha256/{task}"] == hashlib.sha256("\n".join(keys).encode()).hexdigest()
        assert len(final[f"test_correct/{task}"]) == len(items)
    assert final["formulation"] == spec.data.formulation
