"""The study's seesaw section and the trial's diagnostic artifacts, from diagnostics records with known values:
seed means and sample sds computed by hand, the most conflicting partner, and what a finished trial's MLflow run
holds (figures, the probe's item keys, the most negative pair as a tag)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.evaluation.diagnostics_record import diagnostics_record
from orchestrator.report import tracking
from orchestrator.report.callback import MLflowSearchCallback
from orchestrator.report.seesaw_report import history_of, seesaw_over_training_plot, seesaw_section
from orchestrator.spec.space import load_space

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"
TASKS = ["a", "b", "c"]


def record(ab: float, ac: float, bc: float, mi: float, order=TASKS) -> str:
    """A diagnostics record with the given pairwise cosines ("all" group) and I(task; expert) = mi everywhere."""
    value = {frozenset("ab"): ab, frozenset("ac"): ac, frozenset("bc"): bc}
    cos = [[1.0 if s == t else value[frozenset(s + t)] for t in order] for s in order]
    share = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    routing = {"mi": mi, "mi_norm": mi / math.log2(3), "max_share": 0.5, "mi_by_layer": {"model.layers.0.q": mi},
               "mi_by_group": {"attn_early": mi}, "mi_norm_by_group": {"attn_early": mi / math.log2(3)},
               "most": {"layer": "model.layers.0.q", "mi": mi, "share": share},
               "least": {"layer": "model.layers.0.q", "mi": mi, "share": share}}
    conflict = {"tasks": list(order), "cos": {"all": cos, "shared_S_A/attn_early": cos},
                "most_negative": {"all": {"pair": ["a", "c"], "value": ac}}, "mean": {"all": (ab + ac + bc) / 3},
                "probe": {"seed": 0, "keys": {t: [f"{t}1", f"{t}2"] for t in order}}}
    return diagnostics_record(list(order), routing, conflict)


def test_section_averages_seeds_and_names_the_most_conflicting_partner(tmp_path):
    runs = [{"run": {"role": "replicate", "method": "malora", "seed": 0}, "metrics": {"diagnostics": record(
                0.2, -0.4, 0.1, 0.3)}},
            # seed 1 lists its tasks in another order: the matrix is re-indexed, not mixed up
            {"method": "malora", "seed": 1, "diagnostics": record(0.4, -0.2, 0.3, 0.5, order=["c", "a", "b"])},
            {"run": {"role": "single_task", "method": "lora", "seed": 0, "task": "a"}, "metrics": {}}]
    deltas = {"malora": {"a": -0.02, "b": 0.01, "c": -0.03}}
    results, text, figures = seesaw_section(runs, deltas, tmp_path)
    m = results["methods"]["malora"]
    assert m["seeds"] == 2 and list(results["methods"]) == ["malora"]
    ac = m["grad_cos"]["all"]
    assert ac["mean"][0][2] == pytest.approx(-0.3) and ac["sd"][0][2] == pytest.approx(math.sqrt(0.02))
    assert ac["mean"][0][1] == pytest.approx(0.3) and ac["mean"][1][2] == pytest.approx(0.2)
    assert m["routing_mi"]["mean"] == pytest.approx(0.4) and m["routing_mi"]["sd"] == pytest.approx(math.sqrt(0.02))
    assert m["routing_mi_by_group"]["attn_early"]["mean"] == pytest.approx(0.4)
    table = {r["task"]: r for r in m["conflict_table"]}
    assert table["a"]["partner"] == "c" and table["a"]["cos"] == pytest.approx(-0.3)
    assert table["b"]["partner"] == "c" and table["b"]["cos"] == pytest.approx(0.2)
    assert table["c"]["partner"] == "a" and table["c"]["delta"] == -0.03
    # Δ (-2, +1, -3 points) against the partner cosines (-0.3, 0.2, -0.3): ranks (2, 3, 1) and (1.5, 3, 1.5),
    # rho = 1.5 / sqrt(2 * 1.5)
    assert results["delta_vs_partner_cos_spearman"] == {"rho": pytest.approx(0.866, abs=1e-3), "n": 3}
    assert "| a | -2.0 | c | -0.30 ± 0.14 |" in text
    assert [p.name for p in figures] == ["seesaw_grad_cos.png", "seesaw_routing_mi.png"]
    assert all(p.stat().st_size > 0 for p in figures)
    json.dumps(results)
    assert seesaw_section([runs[2]], deltas, tmp_path) == ({}, "", [])


def test_seesaw_over_training_draws_every_task(tmp_path):
    reports = [{"step": 4, "val/primary/a": 0.5, "val/primary/b": 0.6, "val/mean_acc": 0.55},
               {"step": 2, "val/primary/a": 0.4, "val/primary/b": float("nan")}]
    history = history_of(reports)
    assert history == {"a": [(2, 0.4), (4, 0.5)], "b": [(4, 0.6)]}
    path = seesaw_over_training_plot({"malora": {0: history, 1: history}, "lora": {0: history}},
                                     {"a": [0.45, 0.55], "b": 0.6}, tmp_path / "seesaw_over_training.png")
    assert path.stat().st_size > 0
    assert seesaw_over_training_plot({}, {}, tmp_path / "none.png") is None


def test_a_finished_trial_logs_its_diagnostic_figures_probe_and_most_negative_pair(tmp_path, shared_data_dir,
                                                                                   monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    spec = load_space(SPACES / "smoke.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = tracking.ensure_experiment(uri, "seesaw-unit")
    parent = tracking.client(uri).create_run(exp_id, run_name="parent").info.run_id
    callback = MLflowSearchCallback(uri, exp_id, parent, "key", spec, reference=None)
    trial = SimpleNamespace(trial_id="t1", config={"method": "lora", "lora.r": 4, "lora.lr": 1.0e-3},
                            last_result={"step": 4, "total_steps": 4, "diagnostics": record(0.2, -0.4, 0.1, 0.3)})
    callback._finish(trial, "FINISHED", {})
    run = tracking.find_runs(uri, exp_id, malora__trial_id="t1")[0]
    c = tracking.client(uri)
    plots = {Path(a.path).name for a in c.list_artifacts(run.info.run_id, "plots")}
    assert {"grad_conflict.png", "routing_mi_by_layer.png", "routing_extremes.png"} <= plots
    probe = json.loads(Path(c.download_artifacts(run.info.run_id, "eval/grad_probe.json", str(tmp_path))).read_text())
    assert probe == {"seed": 0, "keys": {t: [f"{t}1", f"{t}2"] for t in TASKS}}
    assert run.data.tags["malora.most_negative/all"] == "a~c: -0.400"
