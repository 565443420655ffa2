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


def test_training_data_follow_the_formulation(spec):
    from orchestrator.models.loading import build_tiny_tokenizer
    from orchestrator.training.worker import build_training_data

    tok = build_tiny_tokenizer()
    for formulation, marker in (("cloze", "\nAnswer: "), ("label", "### Response:\nthe correct answer is")):
        s = dataclasses.replace(spec, data=dataclasses.replace(spec.data, formulation=formulation))
        encoded, _, _ = build_training_data(s, tok)
        texts = [tok.decode(e["input_ids"], skip_special_tokens=True) for e in encoded]  # (long prompts cut left)
        assert all(marker in t for t in texts), (formulation, texts[0][:80])
        assert all(("Answer format" in t) == (formulation == "label") for t in texts)
        responses = [tok.decode([i for i, lab in zip(e["input_ids"], e["labels"]) if lab != -100]) for e in encoded]
        labelled = sum(r.startswith("the correct answer is") for r in responses)
        assert labelled == (len(responses) if formulation == "label" else 0)


@pytest.mark.slow  # a tiny training, ~5 s
def test_a_trial_reports_acc_acc_norm_primary_and_chosen(spec):
    from orchestrator.training.worker import LocalSession, run_training

    config = {"method": "lora", "lora.r": 4, "lora.alpha_over_r": 2.0, "lora.lr": 1.0e-3}
    reports = run_training(spec, config, LocalSession(), reference={"boolq": 0.5, "arc_e": 0.5})
    last = reports[-1]
    assert last["val/primary/arc_e"] == last["val/acc_norm/arc_e"]  # ARC-E's primary in cloze
    assert last["val/primary/boolq"] == last["val/acc/boolq"]
    assert last["val/mean_acc"] == pytest.approx((last["val/primary/arc_e"] + last["val/primary/boolq"]) / 2)
    assert len(last["test_chosen/arc_e"]) == len(last["test_correct/arc_e"]) == 8
    assert all(0 <= c < 5 for c in last["test_chosen/arc_e"])


def test_a_study_over_a_reference_of_another_formulation_exits_2(spec, capsys):
    from orchestrator.tuning.study import run_study

    _store(spec, {"formulation": "label"})
    code = run_study(spec, address=None, tracking_uri=None, resume=False, from_search=None, out_dir=None,
                     command="test")
    assert code == 2
    assert "error: data.formulation: " in capsys.readouterr().err
