"""``python -m orchestrator.study`` end to end on a real local Ray, Optuna and a real MLflow SQLite store.

The smoke study runs the whole shape (search -> per-method choice on val -> seed replicates -> single-task
references -> zero-shot -> report); a second study is killed with SIGKILL mid-way and resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.orchestrator.e2e import mlflow_client, store_ready, subprocess_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
FIXED = {"lora": {"r": 4, "lr": 3.0e-3}, "malora": {"d": 16, "beta": 1.25, "lr": 3.0e-3}}


def _env(shared_data_dir: Path) -> dict[str, str]:
    return subprocess_env(shared_data_dir)


def _space(tmp_path: Path, experiment: str, **study) -> Path:
    raw = yaml.safe_load((SPACES / "smoke.yaml").read_text())
    raw["search"]["asha"] = {"enabled": False}  # every search trial completes: each method has a choice
    raw["tracking"]["experiment"] = experiment
    raw["study"] = {**raw.get("study", {}), "n_boot": 500, **study}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _client(tmp_path: Path):
    return mlflow_client(tmp_path)


def _study_runs(tmp_path: Path, experiment: str) -> tuple[object, list]:
    c = _client(tmp_path)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags.get("malora.role") == "study"]
    assert len(parents) == 1
    return parents[0], [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def test_smoke_study_reports_test_with_intervals_and_nested_runs(tmp_path, shared_data_dir):
    space = _space(tmp_path, "e2e-study", seeds=2)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.study", "--space", str(space), "--out", str(out)],
                          cwd=tmp_path, env=_env(shared_data_dir), capture_output=True, text=True, timeout=900)
    (tmp_path / "study.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    # the search trained with seed 0 (train.seed): the replicates use the next two seeds, and the plan says so
    assert res["model"] == "tiny-llama" and res["seeds"] == [1, 2]
    plan = json.loads((tmp_path / "ray_results" / "smoke-study" / "plan.json").read_text())
    assert plan["seeds"] == {"search": [0], "choice": [], "replicate": [1, 2]}
    assert set(res["split"]) == {"boolq", "arc_e"} and res["split"]["boolq"]["test"] == 8
    assert set(res["zero_shot"]) == {"boolq", "arc_e"} and set(res["single_task"]) >= {"boolq", "arc_e", "mean"}
    assert set(res["methods"]) == {"lora", "malora"}
    assert [(c["a"], c["b"]) for c in res["comparisons"]] == [("malora", "lora")]
    assert set(res["seesaw"]["malora"]) >= {"n_regressed_significant", "expected_by_noise"}

    parent, children = _study_runs(tmp_path, "e2e-study")
    c = _client(tmp_path)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "results")} >= {
        "results/results.json", "results/results.md", "results/results.csv", "results/accuracy_per_task.png",
        "results/delta_vs_single_task.png", "results/accuracy_vs_params.png"}
    roles = sorted(r.data.tags.get("malora.role") for r in children)
    assert roles == ["replicate"] * 4 + ["single_task"] * 4 + ["zero_shot"]
    assert all(r.info.status == "FINISHED" for r in children)
    # every per-seed cell equals the test accuracy its own MLflow run logged; the mean is their average, the CI
    # the t-interval of the two (t_0.975 with 1 df = 12.706, from tables), and Δ vs single-task the mean of the
    # per-seed differences to the single-task runs' logged accuracies
    def logged(role: str, key: str, **tags: str) -> dict[str, float]:
        return {r.data.tags["malora.seed"]: r.data.metrics[key] for r in children
                if r.data.tags.get("malora.role") == role and all(r.data.tags.get(k) == v for k, v in tags.items())}

    for m, entry in res["methods"].items():
        for task, cell in entry["per_task"].items():
            # the cells hold each task's primary metric (docs/cloze.md)
            mine = logged("replicate", f"test/primary/{task}", **{"malora.method": m})
            assert cell["per_seed"] == pytest.approx(mine) and sorted(mine) == ["1", "2"]
            a = [mine["1"], mine["2"]]
            half = 12.706204736 * abs(a[0] - a[1]) / 2  # sd of 2 values = |a0 - a1| / sqrt(2), over sqrt(2)
            assert cell["mean"] == pytest.approx(sum(a) / 2) and cell["n_seeds"] == 2
            assert cell["ci95"] == pytest.approx([max(0.0, sum(a) / 2 - half), min(1.0, sum(a) / 2 + half)])
            single = logged("single_task", f"test/primary/{task}", **{"malora.task": task})
            delta = cell["delta_vs_single_task"]
            assert delta["diff"] == pytest.approx((a[0] - single["1"] + a[1] - single["2"]) / 2)
            assert delta["seed_t"]["df"] == 1 and set(delta) >= {"bootstrap", "mdd80"}
        assert entry["trainable_params"] > 0 and 0 < entry["trainable_share"] < 1
    # every run recorded the items it was scored on: the pools of the report; the provenance is recorded
    for run in res["runs"]:
        tasks = [run["task"]] if run["role"] == "single_task" else ["boolq", "arc_e"]
        assert run["test_sha256"] == {t: res["split"][t]["test_sha256"] for t in tasks}
    prov = res["provenance"]
    assert {(r["formulation"], r["precision"]) for r in res["runs"]} == {(prov["formulation"], prov["precision"])}
    assert prov["wall_s"] > 0
    assert prov["model_config"]["hidden_size"] == 64 and prov["machine"]["cpu"]["logical_cpus"] >= 1
    assert prov["data_sha256"]["commonsense/boolq/test.json"] == hashlib.sha256(
        (shared_data_dir / "commonsense/boolq/test.json").read_bytes()).hexdigest()
    assert set(prov["packages"]) >= {"torch", "ray", "mlflow", "optuna", "scipy", "malora"}
    (c,) = res["comparisons"]
    assert set(c["seed_t"]) >= {"mean", "ci95", "p", "df"} and "n_boot" in c["bootstrap"]
    assert c["primary"] in ("seed+item", "seed") and (c["mdd80"] is None or c["mdd80"] >= 0) and "verdict" in c
    # the running time of every launch (one here), and every answer kept: the report again, without training
    assert res["meta"]["running_s"] > 0 and len(res["meta"]["launches"]) == 1
    assert res["answers"]["file"] == "answers.json.gz" and (out / "answers.json.gz").is_file()
    again = subprocess.run([sys.executable, "-m", "orchestrator.study", "--space", str(space), "--report-only",
                            "--results", str(out / "results.json"), "--out", str(tmp_path / "again")],
                           cwd=tmp_path, env=_env(shared_data_dir), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    redone = json.loads((tmp_path / "again" / "results.json").read_text())
    assert redone["comparisons"][0]["diff"] == pytest.approx(c["diff"])
    for m in res["methods"]:
        assert redone["methods"][m]["mean"] == res["methods"][m]["mean"]
        assert {t: v["per_seed"] for t, v in redone["methods"][m]["per_task"].items()} == {
            t: v["per_seed"] for t, v in res["methods"][m]["per_task"].items()}
    zero = next(r for r in children if r.data.tags.get("malora.role") == "zero_shot")
    assert zero.data.metrics["test/primary/boolq"] == pytest.approx(res["zero_shot"]["boolq"])
    assert "| malora − lora |" in proc.stdout and "Test accuracy (%)" in (out / "results.md").read_text()


def test_killed_study_resumes_without_rerunning_or_duplicating(tmp_path, shared_data_dir):
    space = _space(tmp_path, "e2e-study-resume", seeds=1, search=False, configs=FIXED)
    env = _env(shared_data_dir)
    log_path = tmp_path / "first.log"
    log = log_path.open("w")
    cmd = [sys.executable, "-m", "orchestrator.study", "--space", str(space)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def finished() -> list:
        if not store_ready(log_path):
            return []
        try:
            _, runs = _study_runs(tmp_path, "e2e-study-resume")
        except Exception:  # store or parent run not there yet
            return []
        return [r for r in runs if r.info.status == "FINISHED" and "malora.trial_id" in r.data.tags]

    try:
        deadline = time.monotonic() + 400
        while len(finished()) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, f"study exited ({proc.returncode}) early\n{log_path.read_text()[-6000:]}"
            time.sleep(1.0)
        assert len(finished()) >= 2, "timed out waiting for two study runs"
        done_before = {r.data.tags["malora.trial_id"]: r.info.start_time for r in finished()}
        time.sleep(3)  # > TUNE_GLOBAL_CHECKPOINT_S
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    again = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    (tmp_path / "second.log").write_text(again.stdout + again.stderr)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    parent, children = _study_runs(tmp_path, "e2e-study-resume")
    trials = [r for r in children if "malora.trial_id" in r.data.tags]
    ids = [r.data.tags["malora.trial_id"] for r in trials]
    assert len(trials) == 4 and len(set(ids)) == 4  # 2 methods x 1 seed + 2 single-task runs, none duplicated
    assert all(r.info.status == "FINISHED" for r in children) and parent.info.status == "FINISHED"
    for r in trials:  # finished before the kill: the same run, not redone
        if r.data.tags["malora.trial_id"] in done_before:
            assert r.info.start_time == done_before[r.data.tags["malora.trial_id"]]
    c = _client(tmp_path)
    for r in trials:
        steps = [h.step for h in c.get_metric_history(r.info.run_id, "test/mean_acc")]
        assert len(steps) == 1, steps
    res = json.loads((tmp_path / "ray_results" / "smoke-study" / "results" / "results.json").read_text())
    assert res["seeds"] == [0] and res["methods"]["lora"]["mean"]["method"] == "wilson"  # one seed: over items
    # the report names the launch that trained the runs, and the --resume that wrote it
    meta = res["meta"]
    assert meta["command"].endswith(str(space)) and meta["report_command"].endswith("--resume")
    assert meta["elapsed_s"] >= meta["wall_s"] > 0
    # the study clock: the killed launch and the resumed one, their running times summed (the killed one's to its
    # last heartbeat, every 30 s)
    assert len(meta["launches"]) == 2 and meta["elapsed_s"] >= meta["running_s"] >= meta["launches"][1]["running_s"]
    # the resume read the recorded plan (no seed from the search: replicates from train.seed) ...
    assert "study plan from" in again.stdout + again.stderr
    plan = json.loads((tmp_path / "ray_results" / "smoke-study" / "plan.json").read_text())
    assert plan["seeds"] == {"search": [], "choice": [], "replicate": [0]} and len(plan["runs"]) == 4
    # ... and refuses a space that is not the one that trained the runs, before anything starts
    raw = yaml.safe_load(space.read_text())
    raw["train"]["lr"] = 2.0e-3
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    changed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2 and "the space differs from the one that launched this study (changed: train;" \
        in changed.stderr, changed.stderr[-2000:]
