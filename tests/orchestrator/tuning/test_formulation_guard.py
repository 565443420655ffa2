"""One formulation per comparison: the reference cache refuses another formulation before a search starts; the
metrics' means are of each task's primary metric."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from orchestrator.evaluation import metrics
from orchestrator.spec.space import load_space
from orchestrator.tuning.reference import FormulationMismatch, check_formulation
from orchestrator.tuning.run import preflight


@pytest.fixture
def spec(shared_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    spec = load_space("search_spaces/smoke.yaml")
    return dataclasses.replace(spec, storage_path=str(tmp_path))


def _store(spec, key: dict) -> None:
    folder = Path(spec.storage_path) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reference.json").write_text(json.dumps({"key": key, "accuracy": {"val": {}, "test": {}}}))


def test_a_reference_of_another_formulation_is_refused(spec):
    assert spec.data.formulation == "cloze" and check_formulation(spec) is None
    _store(spec, {"formulation": "label"})
    with pytest.raises(FormulationMismatch, match="scored in the label formulation, but data.formulation is 'cloze'"):
        check_formulation(spec)
    problem = preflight(spec)
    assert problem.startswith("data.formulation: ") and "comparison across formulations is refused" in problem
    _store(spec, {"options": "label"})  # a cache of earlier versions: options label = the label formulation
    with pytest.raises(FormulationMismatch):
        check_formulation(spec)
    _store(spec, {"options": "text"})  # options text = cloze: no refusal (the key differs, so it is recomputed)
    assert check_formulation(spec)["key"] == {"options": "text"}
    label = dataclasses.replace(spec, data=dataclasses.replace(spec.data, formulation="label"))
    with pytest.raises(FormulationMismatch, match="data.formulation: cloze to continue the stored one"):
        check_formulation(label)


def test_means_are_of_the_primary_metric():
    scores = {"arc_e": {"acc": 0.5, "acc_norm": 0.7, "primary": 0.7},
              "boolq": {"acc": 0.6, "acc_norm": 0.4, "primary": 0.6}}
    acc = {t: s["primary"] for t, s in scores.items()}
    m = metrics.eval_metrics(acc, {}, None, [], scores=scores)
    assert m["val/mean_acc"] == pytest.approx(0.65) and m["val/acc/arc_e"] == 0.5
    assert m["val/acc_norm/arc_e"] == 0.7 and m["val/primary/boolq"] == 0.6
    t = metrics.test_metrics(scores, {"arc_e": {"correct": [1, 0], "chosen": [2, 3]}})
    assert t["test/mean_acc"] == pytest.approx(0.65) and t["test/acc/boolq"] == 0.6
    assert t["test_correct/arc_e"] == [1, 0] and t["test_chosen/arc_e"] == [2, 3]
