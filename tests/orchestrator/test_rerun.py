"""orchestrator.rerun: one study cell trained again gives the recorded per-item test answers (fp32, tiny model);
bad input ends with one error line and exit 2 before anything trains."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from orchestrator import rerun
from orchestrator.spec.space import load_space
from orchestrator.training import worker
from orchestrator.tuning.study import REPLICATE, fixed_configs, run_spec

SPACE = """\
name: rerun_check
model: {name: tiny-llama}
data: {tasks: [boolq, arc_e], data_dir: DATA, train_limit: 16, split_seed: 0, val_limit: 4, test_limit: 6,
       max_length: 96, formulation: cloze}
train: {max_steps: 2, batch_size: 4, lr: 1.0e-3, precision: fp32, seed: 0}
eval: {every_n_steps: 2, batch_size: 8}
methods:
  lora: {r: 4, alpha_over_r: 2.0}
search: {match_budget: false}
study: {seeds: 2, search: false, single_task: false, zero_shot: false}
"""


@pytest.fixture
def study(tmp_path, shared_data_dir):
    """A space, the study's record of its lora seed-1 replicate (results.json and the trial under storage)."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.replace("DATA", str(shared_data_dir)))
    spec = load_space(space)
    config = fixed_configs(spec)["lora"]
    run = {"role": REPLICATE, "method": "lora", "seed": 1, "task": None, "config": config}
    final = worker.run_training(run_spec(spec, run), config, worker.LocalSession())[-1]
    acc = {t: sum(final[f"test_correct/{t}"]) / len(final[f"test_correct/{t}"]) for t in ("boolq", "arc_e")}
    results = {"meta": {"command": f"python -m orchestrator.study --space {space}"},
               "methods": {"lora": {"config": {"r": 4, "alpha_over_r": 2.0},
                                    "per_task": {t: {"per_seed": {"1": a}} for t, a in acc.items()}}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    trial = tmp_path / "storage" / "rerun_check-study" / "trial_x_00001"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps({"run": {k: v for k, v in run.items() if k != "config"}}))
    (trial / "result.json").write_text(json.dumps({k: v for k, v in final.items() if k.startswith("test_")}) + "\n")
    return path, tmp_path / "storage", acc


def test_a_rerun_reproduces_the_recorded_cell_item_by_item(study, tmp_path, capsys):
    path, storage, acc = study
    out = tmp_path / "rerun.json"
    assert rerun.main(["--results", str(path), "--method", "lora", "--seed", "1", "--storage-path", str(storage),
                       "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    rows = written["tasks"]
    for task, a in acc.items():
        assert rows[task]["recorded"] == a and rows[task]["rerun"] == pytest.approx(a, abs=0)
        assert rows[task]["items_changed"] == 0 and rows[task]["n_items"] == 6
    printed = capsys.readouterr().out
    assert "| boolq |" in printed
    # the code and machine the figure came from: this checkout's HEAD, read by git here
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                          text=True).stdout.strip()
    assert written["commit"] == head and f"rerun at commit {head}" in printed
    assert written["machine"]["cpu"] and written["wall_s"] > 0


def test_compare_counts_changed_items_and_the_difference():
    rows = rerun.compare({"a": 0.5}, {"a": [1, 1, 0, 0]}, {"a": [1, 0, 1, 0]})
    assert rows["a"] == {"recorded": 0.5, "rerun": 0.5, "diff": 0.0, "n_items": 4, "items_changed": 2}
    assert "items_changed" not in rerun.compare({"a": 0.25}, {"a": [1, 0, 0, 0]}, None)["a"]


@pytest.mark.parametrize("args, message", [
    (["--method", "molora", "--seed", "1"], "--method 'molora': not in results.json (methods: lora)"),
    (["--method", "lora", "--seed", "7"], "--seed 7: lora has no replicate with that seed"),
])
def test_a_cell_not_in_the_results_is_refused(study, args, message, capsys):
    path, _, _ = study
    assert rerun.main(["--results", str(path), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_results_file_and_a_changed_configuration_are_refused(study, tmp_path, capsys):
    assert rerun.main(["--results", str(tmp_path / "nope.json"), "--method", "lora", "--seed", "1"]) == 2
    assert "no such file" in capsys.readouterr().err
    path, _, _ = study
    results = json.loads(path.read_text())
    results["methods"]["lora"]["config"]["r"] = 8
    path.write_text(json.dumps(results))
    assert rerun.main(["--results", str(path), "--method", "lora", "--seed", "1"]) == 2
    assert "differs from results.json's in ['r']" in capsys.readouterr().err


def test_while_a_study_runs_the_trial_under_storage_is_the_record(study, tmp_path, capsys):
    path, storage, acc = study
    space = tmp_path / "space.yaml"
    out = tmp_path / "rerun.json"
    assert rerun.main(["--space", str(space), "--storage-path", str(storage), "--method", "lora", "--seed", "1",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["tasks"]
    assert {t: r["recorded"] for t, r in rows.items()} == acc
    assert all(r["items_changed"] == 0 for r in rows.values())
    assert rerun.main(["--space", str(space), "--storage-path", str(storage), "--method", "lora", "--seed", "0"]) == 2
    assert "no finished replicate lora seed 0 of rerun_check" in capsys.readouterr().err
    assert rerun.main(["--method", "lora", "--seed", "1"]) == 2
    assert "nothing to compare with" in capsys.readouterr().err
