"""The study report's zero-shot comparison and provenance, on synthetic 0/1 test matrices."""

import dataclasses
import json

import numpy as np

from orchestrator.report import study_report
from orchestrator.spec.space import load_space

TASKS = ("piqa", "boolq")


def _spec(tmp_path):
    spec = load_space("search_spaces/intra_domain_cpu.yaml")
    methods = tuple(m for m in spec.methods if m.kind in ("lora", "molora"))
    study = dataclasses.replace(spec.study, n_boot=2000, single_task=False)
    return dataclasses.replace(spec, methods=methods, study=study, storage_path=str(tmp_path))


def _runs(method: str, correct: dict[str, np.ndarray]) -> list[dict]:
    """One finished replicate per row of each task's (S, I) matrix."""
    seeds = next(iter(correct.values())).shape[0]
    return [{"run": {"role": "replicate", "method": method, "seed": s, "task": None},
             "metrics": {"trainable_params": 10, "trainable_share": 0.01, "test/mean_acc": 0.0,
                         **{f"test_correct/{t}": correct[t][s].tolist() for t in correct}}}
            for s in range(seeds)]


def test_zero_shot_delta_and_learning_verdict(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    zero = {t: (rng.random(n) < 0.30).astype(int) for t in TASKS}
    # lora: the zero-shot answers with 30 % of the items flipped to right (a real gain); molora: zero-shot itself
    lora = {t: np.stack([np.maximum(zero[t], rng.random(n) < 0.3) for _ in range(3)]) for t in TASKS}
    molora = {t: np.stack([zero[t]] * 3) for t in TASKS}
    spec = _spec(tmp_path)
    splits = {t: {"train": 1, "val": 1, "test": n, "test_sha256": "x", "test_majority": 0.6} for t in TASKS}
    configs = {"lora": {"method": "lora"}, "molora": {"method": "molora"}}
    reference = {"test_correct": {t: zero[t].tolist() for t in TASKS}}
    res = study_report.build_results(spec, configs, _runs("lora", lora) + _runs("molora", molora), reference,
                                     splits, wall_s=1.0, command="cmd")
    expected = np.mean([lora[t].mean() - zero[t].mean() for t in TASKS])  # paired: same items
    d = res["methods"]["lora"]["delta_vs_zero_shot"]
    assert abs(d["diff"] - expected) < 1e-12 and d["ci95"][0] > 0 and d["p"] < 0.01
    assert res["methods"]["lora"]["above_zero_shot_ci"] is True
    assert res["methods"]["molora"]["delta_vs_zero_shot"]["diff"] == 0.0
    assert res["methods"]["molora"]["above_zero_shot_ci"] is False
    text = study_report.markdown(res)
    assert "learning visible" in text and "lora" in text.split("learning visible")[1].split(";")[0]
    assert "not: molora" in text
    assert res["majority_label"] == {"piqa": 0.6, "boolq": 0.6}
    assert "| majority label (constant answer) | 0 | 60.0 | 60.0 | 60.0 |" in text


def test_majority_share_is_the_constant_answer_accuracy():
    from orchestrator.data.schema import Example
    from orchestrator.evaluation.accuracy import majority_share

    def ex(i):
        return Example(prompt="q", target="t", choices=("a", "b", "c"), answer_index=i, gold="x",
                       labels=("answer1", "answer2", "answer3"), question="q")

    items = [ex(0), ex(2), ex(2), ex(1), ex(2)]
    assert majority_share(items) == 3 / 5                              # always answering option 3
    assert majority_share([]) is None
    free = Example(prompt="q", target="18", choices=None, answer_index=None, gold="18", labels=None, question="q")
    assert majority_share([free]) is None


def test_start_record_survives_resume_and_names_the_first_launch(tmp_path):
    spec = _spec(tmp_path)
    first = study_report.start_record(spec, "python -m orchestrator.study --space a.yaml", resume=False)
    again = study_report.start_record(spec, "python -m orchestrator.study --space a.yaml --resume", resume=True)
    assert again == first
    stored = json.loads((tmp_path / spec.name / "study_start.json").read_text())
    assert stored["command"].endswith("a.yaml") and len(stored["commit"]) == 40
    meta = study_report.provenance("python -m orchestrator.study --space a.yaml --resume", 5.0, again)
    assert meta["command"] == first["command"] and meta["report_command"].endswith("--resume")
    assert meta["elapsed_s"] >= 0 and meta["wall_s"] == 5.0
    # a new study (no --resume) starts a new record
    fresh = study_report.start_record(spec, "other", resume=False)
    assert fresh["command"] == "other"
