"""The search report from a synthetic trial table (no Ray): the table, ties by the paired difference on the same
val items (and the independent-binomial fallback), the seesaw's rank correlations, importances, the files."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from orchestrator.report import search_report
from orchestrator.spec.space import load_space

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"
N = 20


def items(ones: list[int]) -> list[int]:
    """N answers: 1 at the given positions."""
    return [1 if i in ones else 0 for i in range(N)]


def malora(tid, arc, boolq, hp, status="TERMINATED", evaluations=3):
    return {"trial_id": tid, "method": "malora", "status": status, "hparams": hp, "evaluations": evaluations,
            "val/primary/arc_e": sum(arc) / N, "val/primary/boolq": sum(boolq) / N,
            "val/mean_acc": (sum(arc) + sum(boolq)) / (2 * N), "val_correct/arc_e": arc, "val_correct/boolq": boolq,
            "trainable_params": 1000 * hp["r"], "trainable_share": 0.01 * hp["r"], "tokens_per_s": 900.0,
            "precision": "fp32", "step": 50 * evaluations, "routing/mi": 0.1 * hp["r"],
            "val_history": {e: (sum(arc) + sum(boolq)) / (2 * N) - 0.01 * (evaluations - e) for e in (1, evaluations)}}


def lora(tid, arc, boolq, r, lr):
    return {"trial_id": tid, "method": "lora", "status": "TERMINATED", "hparams": {"r": r, "lr": lr},
            "evaluations": 3, "val/primary/arc_e": arc, "val/primary/boolq": boolq,
            "val/mean_acc": (arc + boolq) / 2, "trainable_params": 500 * r, "trainable_share": 0.005 * r,
            "tokens_per_s": 1200.0, "precision": "fp32", "step": 150,
            "val_history": {1: (arc + boolq) / 2 - 0.05, 3: (arc + boolq) / 2}}


M1 = malora("m1", items(range(16)), items(range(14)), {"r": 8, "lam": 0.5, "beta": 1.25, "top_k": 2, "lr": 1e-3})
M2 = malora("m2", items(range(2, 16)), items([*range(14), 19]),
            {"r": 8, "lam": 0.75, "beta": 1.0, "top_k": 1, "lr": 5e-4})
M3 = malora("m3", items(range(8)), items(range(6)), {"r": 4, "lam": 0.25, "beta": 2.0, "top_k": 2, "lr": 3e-3})
M4 = malora("m4", items(range(18)), items(range(10)), {"r": 16, "lam": 1.0, "beta": 0.5, "top_k": 2, "lr": 2e-3},
            status="STOPPED", evaluations=1)
ROWS = [M1, M2, M3, M4, lora("l1", 0.60, 0.65, 64, 1e-3), lora("l2", 0.55, 0.62, 32, 5e-4),
        lora("l3", 0.30, 0.35, 128, 3e-3),
        {"trial_id": "e1", "method": "lora", "status": "ERROR", "hparams": {"r": 32, "lr": 1e-3},
         "val/mean_acc": math.nan, "trainable_params": math.nan, "trainable_share": math.nan, "error": "boom"}]


def paired_by_hand(a, b):
    d, var = [], 0.0
    for t in ("arc_e", "boolq"):
        x = [i - j for i, j in zip(a[f"val_correct/{t}"], b[f"val_correct/{t}"])]
        d.append(sum(x) / N)
        var += statistics.variance(x) / N
    return sum(d) / 2, math.sqrt(var) / 2


def test_ties_use_the_paired_difference_on_the_same_items_and_say_when_they_cannot():
    tie = search_report.ties(ROWS, {"arc_e": N, "boolq": N})
    m = tie["malora"]
    assert m["best"] == "m1" and m["paired"] is True  # m4 scores higher but ASHA stopped it: not eligible
    got = {o["trial_id"]: o for o in m["others"]}
    for tid, row, expect_tie in (("m2", M2, True), ("m3", M3, False)):
        d, se = paired_by_hand(M1, row)
        assert got[tid]["diff"] == pytest.approx(d) and got[tid]["se"] == pytest.approx(se)
        assert got[tid]["tie"] is expect_tie and (abs(d) <= 1.96 * se) is expect_tie
    assert m["ties"] == ["m2"] and m["verdict"].startswith("tie: 1 other")
    # lora records no per-item answers: two independent binomials, p(1-p)/I per trial and task
    lo = {o["trial_id"]: o for o in tie["lora"]["others"]}
    se_l2 = math.sqrt((0.6 * 0.4 + 0.55 * 0.45) / N + (0.65 * 0.35 + 0.62 * 0.38) / N) / 2
    assert tie["lora"]["paired"] is False and lo["l2"]["se"] == pytest.approx(se_l2)
    assert lo["l2"]["tie"] and not lo["l3"]["tie"]


def spearman_by_hand(x, y):
    rank = lambda v: {val: i for i, val in enumerate(sorted(v))}  # noqa: E731 (distinct values)
    rx, ry = rank(x), rank(y)
    n = len(x)
    return 1 - 6 * sum((rx[a] - ry[b]) ** 2 for a, b in zip(x, y)) / (n * (n * n - 1))


def test_seesaw_rank_correlation_and_slopes_over_the_scored_trials():
    saw = search_report.seesaw(ROWS)
    scored = [r for r in ROWS if r["status"] != "ERROR"]
    arc = [r["val/primary/arc_e"] for r in scored]
    boolq = [r["val/primary/boolq"] for r in scored]
    assert saw["tasks"] == ["arc_e", "boolq"] and saw["trials"] == 7
    assert saw["spearman"][0][1] == pytest.approx(spearman_by_hand(arc, boolq))
    assert saw["spearman"][0][0] == pytest.approx(1.0)
    mean = [(a + b) / 2 for a, b in zip(arc, boolq)]
    mx, ma = statistics.fmean(mean), statistics.fmean(arc)
    slope = sum((x - mx) * (y - ma) for x, y in zip(mean, arc)) / sum((x - mx) ** 2 for x in mean)
    assert saw["slopes"]["arc_e"] == pytest.approx(slope)


def test_report_files_from_a_synthetic_trial_table(tmp_path):
    spec = load_space(SPACES / "intra_domain_cpu_search.yaml")
    prov = {"command": "python -m orchestrator.search --space x.yaml", "commit": "abc", "dirty": False,
            "machine": {"cpu": {"model": "AMD EPYC", "flags": ["avx2", "fma"], "logical_cpus": 2}, "gpus": [],
                        "os": "Linux", "torch": "2.13"},
            "precision": ["fp32"], "eval_precision": ["fp32"], "wall_s": 12.0}
    files = search_report.write_report(spec, ROWS, {"m1", "l1"}, tmp_path, provenance=prov,
                                       n_items={"arc_e": N, "boolq": N}, milestones=[1], max_t=3)
    names = {f.name for f in files}
    assert names >= {"trials.csv", "trials.json", "front.png", "slice_malora.png", "slice_lora.png",
                     "contour_malora.png", "malora_d_beta.png", "seesaw.png", "report.json", "report.md"}
    table = {r["trial_id"]: r for r in json.loads((tmp_path / "trials.json").read_text())}
    assert len(list(csv.DictReader((tmp_path / "trials.csv").open()))) == len(ROWS) == len(table)
    # MALoRA's d = lam r N and r_bar = (2 - lam) r, N = 8
    assert (table["m3"]["hp/d"], table["m3"]["hp/r_bar"]) == (8, 7)
    assert (table["m1"]["hp/d"], table["m1"]["hp/r_bar"]) == (32, 12)
    assert table["m4"]["asha_rung"] == 1 and table["m1"]["asha_rung"] == 3 and table["m4"]["state"] == "STOPPED"
    assert table["m1"]["per_item_val"] and not table["l1"]["per_item_val"]
    assert table["m1"]["routing/mi"] == pytest.approx(0.8) and table["m1"]["val/arc_e"] == 0.8
    report = json.loads((tmp_path / "report.json").read_text())
    # three MALoRA and three LoRA trials ran the whole budget (3 evaluations): importances compare them there
    assert report["budgets"] == {"lora": 3, "molora": None, "malora": 3, "mosld": None}
    assert "over 3 trials at 3 evaluation(s)" in report["importances"]["malora"]["caveat"]
    assert set(report["importances"]["malora"]["values"]) == {"r", "lam", "beta", "top_k", "lr"}
    assert report["importances"]["molora"]["values"] == {}  # no trial of it in this table
    md = (tmp_path / "report.md").read_text()
    assert "| malora | m1 |" in md and "tie: 1 other" in md and "--from-search" in md
    assert "accuracies only (independent binomials" in md and "`abc`" in md and "I(task; expert)" in md
    assert "- machine: AMD EPYC (2 logical CPUs; avx2), no GPU, torch 2.13" in md and "wall time: 12 s (0.2 min) of running time" in md


def test_importances_compare_trials_at_the_largest_budget_three_of_them_reached():
    rows = [{"val_history": {1: 0.5, 3: 0.6}}, {"val_history": {1: 0.4}}, {"val_history": {1: 0.45}},
            {"val_history": {1: 0.55, 3: 0.5}}, {"val_history": {}}]
    assert search_report.common_budget(rows, [1, 3]) == 1  # only two reached 3 evaluations
    assert search_report.common_budget(rows[:1], [1, 3]) is None
    spec = load_space(SPACES / "intra_domain_cpu_search.yaml")
    at_one = [{**r, "trial_id": str(i), "method": "lora", "status": "STOPPED", "hparams": {"r": 32, "lr": 1e-3}}
              for i, r in enumerate(rows)]
    study = search_report.method_study(spec, "lora", at_one, budget=1)
    assert sorted(t.value for t in study.trials) == [0.4, 0.45, 0.5, 0.55]


def test_the_wall_time_line_sums_the_launches_and_says_when_no_clock_was_kept():
    wall = search_report._wall
    two = {"wall_s": 5400.0, "elapsed_s": 9000.0,
           "launches": [{"start": 0, "running_s": 3600.0, "command": "a"}, {"start": 7200, "running_s": 1800.0,
                                                                            "command": "a --resume"}]}
    assert wall(two) == ("5400 s (90.0 min) of running time over 2 launches (60.0, 30.0 min), 150.0 min from the "
                         "first launch to the last")
    assert wall({"wall_s": 12.0}) == "12 s (0.2 min) of running time"        # a report from before the clock
    assert wall({"wall_s": 0.0, "launches": []}).startswith("not recorded")  # rebuilt, no clock on the storage
    commits = search_report._launch_commits
    assert commits({"commit": "b" * 40, "launches": [{"commit": "a" * 40, "dirty": False},
                                                      {"commit": "b" * 40, "dirty": True}]}) == (
        "; the launches ran 1: `aaaaaaa`, 2: `bbbbbbb`+ (+: uncommitted changes)")
    assert commits({"commit": "b" * 40, "launches": [{"commit": "b" * 40}]}) == "" == commits(two)


def test_the_critical_rank_correlation_matches_the_permutation_distribution_of_spearmans_rho():
    """rho_critical(n) against brute force: over every permutation of 7 ranks, the share with |rho| above it is
    at most 5 % and just below it more (the t approximation is close at small n)."""
    import itertools

    from scipy import stats

    n = 7
    crit = search_report.rho_critical(n)
    rhos = [stats.spearmanr(range(n), p).statistic for p in itertools.permutations(range(n))]
    beyond = sum(abs(r) > crit + 1e-12 for r in rhos) / len(rhos)
    assert 0.02 < beyond <= 0.06
    assert search_report.rho_critical(13) == pytest.approx(0.553, abs=0.002)   # t(0.975, 11) = 2.201
