"""The study report's zero-shot comparison and provenance, on synthetic 0/1 test matrices."""

import dataclasses
import json
import math

import numpy as np
from scipy import stats
import pytest

from orchestrator.report import study_report
from orchestrator.spec.space import load_space

TASKS = ("piqa", "boolq")


def _spec(tmp_path):
    spec = load_space("search_spaces/intra_domain_cpu.yaml")
    methods = tuple(m for m in spec.methods if m.kind in ("lora", "molora"))
    study = dataclasses.replace(spec.study, n_boot=2000, single_task=False)
    return dataclasses.replace(spec, methods=methods, study=study, storage_path=str(tmp_path))


def _runs(method: str, correct: dict[str, np.ndarray], role: str = "replicate") -> list[dict]:
    """One finished run per row of each task's (S, I) matrix, recording the test items it scored (``_split``)."""
    seeds = next(iter(correct.values())).shape[0]
    task = next(iter(correct)) if role == "single_task" else None
    return [{"run": {"role": role, "method": method, "seed": s, "task": task},
             "metrics": {"trainable_params": 10, "trainable_share": 0.01, "test/mean_acc": 0.0, "precision": "fp32",
                         **{f"test_correct/{t}": correct[t][s].tolist() for t in correct},
                         **{f"test_sha256/{t}": f"sha-{t}" for t in correct}}}
            for s in range(seeds)]


def _split(n: int) -> dict:
    return {t: {"train": 1, "val": 1, "test": n, "test_sha256": f"sha-{t}", "test_majority": 0.6} for t in TASKS}


def test_zero_shot_delta_and_learning_verdict(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    zero = {t: (rng.random(n) < 0.30).astype(int) for t in TASKS}
    # lora: the zero-shot answers with 30 % of the items flipped to right (a real gain); molora: zero-shot itself
    lora = {t: np.stack([np.maximum(zero[t], rng.random(n) < 0.3) for _ in range(3)]) for t in TASKS}
    molora = {t: np.stack([zero[t]] * 3) for t in TASKS}
    spec = _spec(tmp_path)
    splits = _split(n)
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


# ------------------------------------------------------------------------------------------ by hand
# 2 tasks x 4 items x 3 seeds; rows are seeds. Per-seed accuracies in the comments.
LORA = {"piqa": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]),       # .75 .50 1.0
        "boolq": np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])}      # .25 .50 .75
MOLORA = {"piqa": np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]),     # .25 .50 0
          "boolq": np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])}    # .50 0 .25
SINGLE = {"piqa": np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]),     # .50 .75 .25
          "boolq": np.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]])}    # 0 .25 .50
T_975_DF2 = 4.302652729911275
LAMBDA_80_DF2 = 5.653489266  # noncentrality of 80 % power, two-sided 5 %, 2 df (nct; 1e-9)


def _power(delta: float, se: float, df: float) -> float:
    """Power of the two-sided 5 % t-test at true difference ``delta`` (scipy's noncentral t)."""
    crit = stats.t.ppf(0.975, df)
    return stats.nct.sf(crit, df, delta / se) + stats.nct.cdf(-crit, df, delta / se)


def _t_df2(d: list[float]) -> tuple[float, float, float]:
    """(mean, se, two-sided p) of a 3-value t-test, with the 2-df closed form P(|T| > t) = 1 - t / sqrt(2 + t^2)."""
    mean = sum(d) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 2 / 3)
    t = abs(mean) / se
    return mean, se, 1 - t / math.sqrt(2 + t * t)


def _hand_study(tmp_path, *, change=None):
    spec = dataclasses.replace(_spec(tmp_path), study=dataclasses.replace(_spec(tmp_path).study, single_task=True,
                                                                          n_boot=500))
    done = _runs("lora", LORA) + _runs("molora", MOLORA) + [
        r for t in TASKS for r in _runs("lora", {t: SINGLE[t]}, role="single_task")]
    if change:
        change(done)
    configs = {"lora": {"method": "lora"}, "molora": {"method": "molora"}}
    return study_report.build_results(spec, configs, done, None, _split(4), wall_s=2.0, command="cmd",
                                      provenance_record={"model_sha256": "m", "data_sha256": {"f": "d"}})


def test_build_results_with_single_task_references_by_hand(tmp_path):
    res = _hand_study(tmp_path)
    lora = res["methods"]["lora"]
    assert lora["per_task"]["piqa"]["per_seed"] == {"0": 0.75, "1": 0.5, "2": 1.0}
    assert lora["per_task"]["piqa"]["mean"] == pytest.approx(0.75)
    # mean over tasks per seed: .5 .5 .875 -> .625; its t-interval with 2 df
    per_seed = [0.5, 0.5, 0.875]
    mean, se, _ = _t_df2(per_seed)
    assert lora["mean"]["mean"] == pytest.approx(mean)
    assert lora["mean"]["ci95"] == pytest.approx([max(0, mean - T_975_DF2 * se), min(1, mean + T_975_DF2 * se)])
    # the single-task rows: piqa .50 .75 .25, boolq 0 .25 .50; their mean over tasks .25 .5 .375
    assert res["single_task"]["piqa"]["mean"] == pytest.approx(0.5)
    assert res["single_task"]["mean"]["mean"] == pytest.approx((0.25 + 0.5 + 0.375) / 3)
    # lora - single-task on piqa per seed: .25 -.25 .75; on boolq .25 .25 .25 (no spread: exact)
    d_piqa = lora["per_task"]["piqa"]["delta_vs_single_task"]
    m, s, p = _t_df2([0.25, -0.25, 0.75])
    assert (d_piqa["diff"], d_piqa["seed_t"]["p"], d_piqa["seed_t"]["df"]) == pytest.approx((m, p, 2))
    assert d_piqa["seed_t"]["ci95"] == pytest.approx([m - T_975_DF2 * s, m + T_975_DF2 * s])
    # the primary test (seeds and items random) is never narrower than the per-seed t; its MDD has 80 % power
    assert d_piqa["primary"] == "seed+item" and d_piqa["se"] >= s - 1e-12
    assert _power(d_piqa["mdd80"], d_piqa["se"], d_piqa["df"]) == pytest.approx(0.80, abs=2e-3)
    d_boolq = lora["per_task"]["boolq"]["delta_vs_single_task"]
    # .25 at every seed: no p-value from the per-seed t (undetermined, never "p = 0")
    assert (d_boolq["diff"], *d_boolq["seed_t"]["ci95"]) == pytest.approx((0.25, .25, .25))
    assert d_boolq["seed_t"]["p"] is None and d_boolq["seed_t"]["determined"] is False
    # the per-task family of a method: Benjamini-Hochberg over its two tasks (m = 2, by hand)
    p_sorted = sorted([d_piqa["p"], d_boolq["p"]])
    bh = {p_sorted[0]: min(2 * p_sorted[0], p_sorted[1]), p_sorted[1]: p_sorted[1]}
    assert d_piqa["p_bh"] == pytest.approx(bh[d_piqa["p"]]) and d_boolq["p_bh"] == pytest.approx(bh[d_boolq["p"]])
    # lora - molora: per-seed differences of the task means .125 .25 .75
    (c,) = res["comparisons"]
    m, s, p = _t_df2([0.125, 0.25, 0.75])
    assert (c["a"], c["b"]) == ("molora", "lora")                       # the default pair: molora - lora = -d
    assert c["seed_t"]["mean"] == pytest.approx(-m) and c["seed_t"]["p"] == pytest.approx(p)
    assert c["seed_t"]["df"] == 2 and _power(c["mdd80"], c["se"], c["df"]) == pytest.approx(0.80, abs=2e-3)
    assert c["bootstrap"]["diff"] == pytest.approx(-m) and c["bootstrap"]["n_boot"] == 500
    assert c["p_holm"] == pytest.approx(c["p"])                         # a family of one comparison
    assert c["tost"]["margin"] == 0.008 and c["verdict"].startswith("not distinguishable (MDD")
    # seesaw of molora vs single-task: piqa -.25 at every seed, on different items; boolq .5 -.25 -.25 (mean 0).
    # A task is flagged when the one-sided p of its primary test (scipy here) is below Phi(-2)
    ss = res["seesaw"]["molora"]
    deltas = res["methods"]["molora"]["per_task"]
    flagged = sorted(t for t, e in deltas.items() if stats.t.cdf(e["delta_vs_single_task"]["diff"] /
                     e["delta_vs_single_task"]["se"], e["delta_vs_single_task"]["df"]) < 0.022750131948179195)
    assert ss["regressed"] == flagged and ss["expected_by_noise"] == pytest.approx(2 * 0.022750131948179195)
    assert set(ss["p_one_sided_bh"]) == {"piqa", "boolq"} and set(ss["regressed_bh"]) <= set(flagged)
    # what the runs recorded, and the provenance with the runs' common formulation and precision
    assert res["runs"][0]["test_sha256"] == {"piqa": "sha-piqa", "boolq": "sha-boolq"}
    assert res["runs"][-1] == {"role": "single_task", "method": "lora", "seed": 2, "task": "boolq",
                               "test_sha256": {"boolq": "sha-boolq"}, "formulation": "cloze", "precision": "fp32"}
    prov = res["provenance"]
    assert prov == {"model_sha256": "m", "data_sha256": {"f": "d"}, "precision": "fp32", "formulation": "cloze",
                    "wall_s": 2.0}
    text = study_report.markdown(res)
    assert f"| {100 * c['mdd80']:.2f} |" in text and "MDD 80 %" in text and "p Holm" in text
    assert "| lora | 10 (1.00 %) |" in text  # trainable count and share of the model


def test_the_report_refuses_runs_scored_on_other_items_or_precisions(tmp_path):
    def other_items(done):
        done[4]["metrics"]["test_sha256/boolq"] = "sha-other"

    with pytest.raises(study_report.ReportError, match="replicate molora seed 1 was scored on other test "
                                                       "items of boolq"):
        _hand_study(tmp_path, change=other_items)

    def unrecorded(done):
        del done[-1]["metrics"]["test_sha256/boolq"]

    with pytest.raises(study_report.ReportError, match="single_task boolq seed 2 recorded no test_sha256 for boolq"):
        _hand_study(tmp_path, change=unrecorded)

    def bf16(done):
        done[0]["metrics"]["precision"] = "bf16"

    with pytest.raises(study_report.ReportError, match="different precisions: bf16, fp32"):
        _hand_study(tmp_path, change=bf16)

    def label(done):
        done[0]["metrics"]["formulation"] = "label"

    with pytest.raises(study_report.ReportError, match="different formulations: cloze, label"):
        _hand_study(tmp_path, change=label)


def test_single_task_references_at_fewer_seeds_pair_the_methods_runs_at_those_seeds(tmp_path):
    """References at the first 2 of 3 seeds (study.single_task_seeds): lora − single-task on piqa pairs seeds 0, 1
    only (.25, −.25 by hand), the seed-0/1 rows of lora; the table's seeds stay all three and the text says so."""
    def two_seed_references(done):
        done[:] = [r for r in done if r["run"]["role"] != "single_task" or r["run"]["seed"] < 2]

    res = _hand_study(tmp_path, change=two_seed_references)
    assert res["single_task_seeds"] == [0, 1] and res["seeds"] == [0, 1, 2]
    assert res["single_task"]["piqa"]["mean"] == pytest.approx((0.5 + 0.75) / 2)
    d = res["methods"]["lora"]["per_task"]["piqa"]["delta_vs_single_task"]
    assert d["diff"] == pytest.approx(0.0) and d["seed_t"]["df"] == 1   # (.25 − .25) / 2, one df from two seeds
    assert d["seed_t"]["ci95"][1] == pytest.approx(stats.t.ppf(0.975, 1) * 0.25)  # SE of (.25, −.25): .25
    assert res["methods"]["lora"]["per_task"]["piqa"]["mean"] == pytest.approx(0.75)  # the method keeps 3 seeds
    # the mean Δ over tasks pairs the same rows: lora seeds 0, 1 minus the references' (piqa .25 −.25, boolq .25 .25)
    assert res["methods"]["lora"]["delta_vs_single_task"]["diff"] == pytest.approx((0.25 + 0.0) / 2)
    assert "single-task references trained at 2 of these seeds [0, 1]" in study_report.markdown(res)

    def mismatched(done):
        done[:] = [r for r in done if not (r["run"]["role"] == "single_task" and r["run"]["seed"] == 2
                                           and r["run"]["task"] == "piqa")]

    with pytest.raises(study_report.ReportError, match=r"different seeds: piqa \[0, 1\]; boolq \[0, 1, 2\]"):
        _hand_study(tmp_path, change=mismatched)


def test_the_named_secondary_leaves_its_tasks_out_of_every_statistic(tmp_path):
    """study.secondary_without [boolq]: the secondary is piqa alone here, so every number is checked against piqa's
    matrices by hand (numpy, scipy's one-sample t); boolq's share of the gain from the per-task gains."""
    rng = np.random.default_rng(1)
    n = 300
    zero = {t: (rng.random(n) < 0.3).astype(int) for t in TASKS}
    lora = {t: np.stack([np.maximum(zero[t], rng.random(n) < (0.1 if t == "piqa" else 0.5)) for _ in range(3)])
            for t in TASKS}
    molora = {t: np.stack([np.maximum(zero[t], rng.random(n) < 0.2) for _ in range(3)]) for t in TASKS}
    spec = _spec(tmp_path)
    spec = dataclasses.replace(spec, study=dataclasses.replace(spec.study, secondary_without=("boolq",)))
    res = study_report.build_results(
        spec, {"lora": {"method": "lora"}, "molora": {"method": "molora"}}, _runs("lora", lora) +
        _runs("molora", molora), {"test_correct": {t: zero[t].tolist() for t in TASKS}}, _split(n),
        wall_s=1.0, command="cmd")
    sec = res["secondary"]
    assert sec["without"] == ["boolq"] and sec["tasks"] == ["piqa"]
    assert sec["zero_shot_mean"] == pytest.approx(zero["piqa"].mean())
    e = sec["methods"]["lora"]
    assert e["mean"]["mean"] == pytest.approx(lora["piqa"].mean())
    assert e["delta_vs_zero_shot"]["diff"] == pytest.approx(lora["piqa"].mean() - zero["piqa"].mean())
    gains = {t: lora[t].mean() - zero[t].mean() for t in TASKS}
    assert e["share_of_gain"]["boolq"] == pytest.approx(gains["boolq"] / 2 / np.mean(list(gains.values())))
    assert 0.5 < e["share_of_gain"]["boolq"] < 1  # boolq gained 5x piqa here
    (c,) = sec["comparisons"]
    per_seed = molora["piqa"].mean(1) - lora["piqa"].mean(1)
    assert (c["a"], c["b"]) == ("molora", "lora") and c["diff"] == pytest.approx(per_seed.mean())
    assert c["seed_t"]["p"] == pytest.approx(stats.ttest_1samp(per_seed, 0.0).pvalue)
    assert c["p_holm"] == pytest.approx(c["p"]) and c["verdict"]
    # the primary is untouched: still over both tasks
    assert res["methods"]["lora"]["mean"]["mean"] == pytest.approx(np.mean([lora[t].mean() for t in TASKS]))
    text = study_report.markdown(res)
    assert "Named secondary (study.secondary_without): the mean over piqa, without boolq" in text
    assert f"| zero-shot | {100 * zero['piqa'].mean():.1f} | 0 | - |" in text
    assert f"| molora − lora | {100 * c['diff']:+.2f} |" in text.split("Named secondary")[1]
