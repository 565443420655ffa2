"""End to end on a real local Ray and a real MLflow SQLite store: ``python -m orchestrator.search`` subprocesses.

Slow (each Train-inside-Tune trial costs ~20-30 s of Ray start-up here), so few trials and tiny models:
the smoke search with its MLflow runs; a failing trial next to a 2-worker DDP trial; a killed and resumed
multi-objective (TPE) search.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.orchestrator.e2e import mlflow_client, store_ready, subprocess_env, ui_run_names

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


def _env(shared_data_dir: Path) -> dict[str, str]:
    return subprocess_env(shared_data_dir)


def _space(tmp_path: Path, **changes) -> Path:
    """smoke.yaml with ``group.key`` overrides, written to tmp_path."""
    raw = yaml.safe_load((SPACES / "smoke.yaml").read_text())
    for dotted, value in changes.items():
        group, key = dotted.split("__")
        raw.setdefault(group, {})[key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _search(tmp_path: Path, space: Path, env: dict, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestrator.search", "--space", str(space), *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    (tmp_path / "search.log").write_text(proc.stdout + proc.stderr)
    return proc


def _client(tmp_path: Path):
    return mlflow_client(tmp_path)


def _runs(tmp_path: Path, experiment: str) -> tuple[object, list]:
    c = _client(tmp_path)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def test_smoke_search_logs_parent_and_nested_runs(tmp_path, shared_data_dir):
    proc = _search(tmp_path, SPACES / "smoke.yaml", _env(shared_data_dir), "--out", "report_out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the search report: in --out, in the storage and as the parent run's artifacts; the Optuna journals
    for folder in (tmp_path / "report_out", tmp_path / "ray_results" / "smoke" / "report"):
        assert len((folder / "trials.csv").read_text().splitlines()) == 3, folder
        assert (folder / "report.md").is_file() and (folder / "front.png").is_file()
    # the trials recorded their per-item val answers: the ties are paired on the same val items
    trials = json.loads((tmp_path / "report_out" / "trials.json").read_text())
    trials = trials["trials"] if isinstance(trials, dict) else trials
    assert trials and all(t["per_item_val"] for t in trials)
    journals = tmp_path / "ray_results" / "smoke" / "optuna"
    assert f"optuna-dashboard {journals / 'lora.journal'}" in proc.stdout and (journals / "malora.journal").is_file()
    assert "Best trial per method (chosen on val val/mean_acc" in proc.stdout and "Pareto front" in proc.stdout
    # the live table: our objective and best-so-far columns, the searched hyperparameters, the best-trial line
    assert "best val so far" in proc.stdout and "malora.beta" in proc.stdout and "Best so far: " in proc.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'} --host 127.0.0.1" in proc.stdout

    parent, children = _runs(tmp_path, "malora-smoke")
    c = _client(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.params["num_trials"] == "2"
    assert {"ref/val/acc/boolq", "ref/val/acc/arc_e", "ref/val/mean_acc", "ref/test/mean_acc"} <= set(parent.data.metrics)
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "summary")} >= {
        "summary/summary.csv", "summary/summary.md", "summary/pareto.png", "summary/pareto.json"}
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "report")} >= {
        "report/report.md", "report/trials.csv", "report/trials.json", "report/front.png", "report/report.json"}
    # the pools are recorded: sizes and fingerprints as params and in splits.json
    splits = json.loads(Path(c.download_artifacts(parent.info.run_id, "splits.json", str(tmp_path))).read_text())
    assert splits["boolq"]["val"] == 8 and splits["boolq"]["test"] == 8
    assert parent.data.params["split/boolq/test_sha256"] == splits["boolq"]["test_sha256"]
    assert len(children) == 2
    assert sorted(r.data.params["method"] for r in children) == ["lora", "malora"]
    for run in children:
        p, m = run.data.params, run.data.metrics
        assert run.info.status == "FINISHED"
        assert int(p["trainable_params"]) > 0 and int(p["total_params"]) > int(p["trainable_params"])
        assert 0 < float(p["trainable_share"]) < 1 and float(p["lr"]) > 0
        assert p["precision"] in ("bf16", "fp32") and p["precision_reason"].startswith("auto: ")  # issue 19
        assert {"val/acc/boolq", "val/acc/arc_e", "val/mean_acc", "train_loss", "tokens_per_s", "step_time_s",
                "peak_memory_mb", "seesaw/mean_delta", "delta/boolq"} <= set(m)
        assert m["val/mean_acc"] == pytest.approx((m["val/primary/boolq"] + m["val/primary/arc_e"]) / 2)
        steps = [h.step for h in c.get_metric_history(run.info.run_id, "val/mean_acc")]
        assert steps == sorted(set(steps)) and steps[0] == 2
        # test: once, after choosing (one trial per method: both are chosen), on the final adapter's 8 held-out
        # items per task; per item in eval/test_items.json
        assert [h.step for h in c.get_metric_history(run.info.run_id, "test/mean_acc")] == [4]
        assert run.data.tags["malora.test"] == "scored once, after choosing on val"
        local = c.download_artifacts(run.info.run_id, "eval/test_items.json", str(tmp_path / run.info.run_id))
        items = json.loads(Path(local).read_text())
        assert sorted(items) == ["arc_e", "boolq"] and all(len(v) == 8 and set(v) <= {0, 1} for v in items.values())
        assert m["test/acc/boolq"] == pytest.approx(sum(items["boolq"]) / 8)
        arts = {a.path for d in ("plots", "adapter") for a in c.list_artifacts(run.info.run_id, d)}
        assert {"plots/accuracy_vs_step.png", "adapter/adapter_config.json",
                "adapter/adapter_model.safetensors"} <= arts
        if p["method"] == "malora":
            assert p["adapter.d"] == "16" and p["adapter.r_bar"] == "4" and p["adapter.beta"] == "1.25"
            assert m["balance_loss"] > 0 and 0 < m["util_entropy/boolq"] <= 1
            assert sum(m[f"util/boolq/q_proj/e{i}"] for i in range(4)) == pytest.approx(1.0)
            assert "plots/expert_utilisation.png" in arts
        else:
            assert "adapter.d" not in p and "hp.top_k" not in p
    rows = (tmp_path / "ray_results" / "smoke" / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("trial_id,method,status")

    # the printed address opens the experiment's training runs in a real browser (MLflow 3's default view would
    # hide them behind a "Model training" toggle): the parent is listed, and expanding it lists both trials
    url = next(line.split("then open:", 1)[1].strip() for line in proc.stdout.splitlines() if "then open:" in line)
    names = ui_run_names(tmp_path, url, parent.info.run_name)
    assert names[0] == parent.info.run_name == "smoke"
    assert sorted(names[1:]) == sorted(r.info.run_name for r in children)

    # as if killed during the final summary (every trial done, the summary not written, the parent still
    # RUNNING): --resume reruns nothing, writes the summary and closes the parent
    summary_csv = tmp_path / "ray_results" / "smoke" / "summary.csv"
    summary_csv.unlink()
    c.update_run(parent.info.run_id, status="RUNNING")
    again = _search(tmp_path, SPACES / "smoke.yaml", _env(shared_data_dir), "--resume")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    parent2, children2 = _runs(tmp_path, "malora-smoke")
    assert parent2.info.run_id == parent.info.run_id and parent2.info.status == "FINISHED"
    assert sorted(r.info.run_id for r in children2) == sorted(r.info.run_id for r in children)
    for run in children2:  # the resumed search chose the same trials: their test scores are not logged twice
        assert [h.step for h in c.get_metric_history(run.info.run_id, "test/mean_acc")] == [4]
    assert summary_csv.is_file() and len(summary_csv.read_text().splitlines()) == 3

    # --report-only writes the report again from what the search stored (Tune's files, MLflow, its clock), no Ray:
    # the same trials, states, val and the chosen trials' test scores as the search's own report
    rebuilt = _search(tmp_path, SPACES / "smoke.yaml", _env(shared_data_dir), "--report-only", "--out", "rebuilt")
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:] + rebuilt.stderr[-3000:]
    keys = ("trial_id", "method", "state", "val/mean_acc", "test/mean_acc", "val_history", "trainable_params")
    pick = lambda folder: [{k: t.get(k) for k in keys}  # noqa: E731
                           for t in json.loads((tmp_path / folder / "trials.json").read_text())]
    assert pick("rebuilt") == pick("report_out") and all(t["test/mean_acc"] is not None for t in pick("rebuilt"))
    text = (tmp_path / "rebuilt" / "report.md").read_text()
    assert "over 2 launches" in text and "report written again by: `python -m orchestrator.search" in text
    assert "--report-only" not in text.split("report written again")[0]   # the command is the search's own


def test_failing_trial_is_failed_while_a_two_worker_ddp_trial_completes(tmp_path, shared_data_dir):
    space = _space(tmp_path, resources__workers_per_trial=2, debug__fail_method="malora", debug__fail_mode="nan",
                   debug__fail_at_step=1, search__asha={"enabled": False}, tracking__experiment="e2e-fail")
    proc = _search(tmp_path, space, _env(shared_data_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, children = _runs(tmp_path, "e2e-fail")
    by_method = {r.data.params["method"]: r for r in children}
    assert set(by_method) == {"lora", "malora"}
    failed, ok = by_method["malora"], by_method["lora"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["malora.failure_reason"].startswith("FloatingPointError: non-finite loss nan at step 1")
    assert ok.info.status == "FINISHED"
    m = ok.data.metrics
    assert ok.data.params["world_size"] == "2"
    assert m["tokens_rank/0"] > 0 and m["tokens_rank/1"] > 0  # both DDP ranks trained on their own shard
    assert m["ddp_param_divergence"] == pytest.approx(0.0, abs=1e-9)  # and their replicas stayed identical
    # Tune's view: one trial ERROR, one TERMINATED
    summary = (tmp_path / "ray_results" / "smoke" / "summary.csv").read_text()
    assert ",malora,ERROR," in summary and ",lora,TERMINATED," in summary


def test_a_worker_sigkilled_between_evaluations_resumes_from_its_saved_state(tmp_path, shared_data_dir, monkeypatch):
    """One trial, evaluated only at its last step (4), saving its training state after every step between; its
    Train worker SIGKILLs itself before step 3 when it started at step 0 (``debug.fail_mode: kill``). Only a
    retry that resumed from the state saved after step 2 gets past step 3: from step 0 it would be killed again
    and, with one retry, the trial would end in ERROR. Its final scores equal a run never killed."""
    from orchestrator.spec.space import load_space
    from orchestrator.training.worker import LocalSession, run_training

    raw = yaml.safe_load((SPACES / "smoke.yaml").read_text())
    raw["methods"] = {"lora": {"r": 4, "alpha_over_r": 2.0, "lr": 5.0e-3, "dropout": 0.3}}
    raw["search"].update(num_trials=1, points_to_evaluate=None, asha={"enabled": False})
    raw["eval"]["every_n_steps"] = 4
    raw["resources"].update(checkpoint_every_min=1.0e-9, max_failures=1)
    raw["debug"] = {"fail_method": "lora", "fail_mode": "kill", "fail_at_step": 3}
    raw["tracking"] = {"experiment": "e2e-kill"}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _search(tmp_path, space, _env(shared_data_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "killing this worker" in log and "retrying from its last checkpoint" in log
    summary = (tmp_path / "ray_results" / "smoke" / "summary.csv").read_text()
    assert ",lora,TERMINATED," in summary
    (run_dir,) = (tmp_path / "ray_results" / "smoke" / "train_runs").iterdir()
    assert (run_dir / "partial").is_dir() and not list((run_dir / "partial").iterdir())  # cleared at step 4
    _, (child,) = _runs(tmp_path, "e2e-kill")
    assert child.info.status == "FINISHED" and child.data.metrics["step"] == 4

    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    spec = load_space(space)
    config = {"method": "lora", "lora.r": 4, "lora.alpha_over_r": 2.0, "lora.lr": 5.0e-3, "lora.dropout": 0.3}
    never_killed = run_training(dataclasses.replace(spec, debug=dataclasses.replace(spec.debug, fail_method=None)),
                                config, LocalSession(), score_test=False)[-1]
    for key in ("val/mean_acc", "tokens_total"):
        assert child.data.metrics[key] == pytest.approx(never_killed[key], abs=1e-9), key
    assert child.data.metrics["train_loss"] == pytest.approx(never_killed["train_loss"], rel=1e-4)


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    """Poll `predicate` each second; fail with the driver's log tail if it exits first or time runs out."""
    def tail() -> str:
        return "\n" + log.read_text(errors="replace")[-6000:] if log is not None and log.is_file() else ""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"search exited ({proc.returncode}) before {what}{tail()}")
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}{tail()}")


def test_killed_search_resumes_without_rerunning_or_duplicating(tmp_path, shared_data_dir):
    space = _space(tmp_path, resources__max_concurrent_trials=1, search__asha={"enabled": False},
                   search__sampler="tpe", search__objectives={"val/mean_acc": "max", "trainable_params": "min"},
                   tracking__experiment="e2e-resume")
    env = _env(shared_data_dir)
    log_path = tmp_path / "first.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.search", "--space", str(space)], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def finished_runs() -> list:
        if not store_ready(log_path):
            return []
        try:
            exp = _client(tmp_path).get_experiment_by_name("e2e-resume")
            runs = _client(tmp_path).search_runs([exp.experiment_id]) if exp else []
        except Exception:  # store still being created
            return []
        return [r for r in runs if r.info.status == "FINISHED" and "malora.trial_id" in r.data.tags]

    try:
        _wait_for(lambda: len(finished_runs()) == 1, 240, "the first trial to finish", proc, log_path)
        first = finished_runs()[0].data.tags["malora.trial_id"]
        result_file = tmp_path / "ray_results" / "smoke" / f"trial_{first}" / "result.json"
        time.sleep(6)  # > TUNE_GLOBAL_CHECKPOINT_S: the experiment state records the finished trial
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
        log.close()
    n_results = len(result_file.read_text().splitlines())
    train_dir = tmp_path / "ray_results" / "smoke" / "train_runs" / f"train-{first}"
    ckpts_before = sorted(p.name for p in train_dir.glob("checkpoint_*"))

    proc2 = _search(tmp_path, space, env, "--resume")
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    assert "resuming search" in proc2.stderr
    parent, children = _runs(tmp_path, "e2e-resume")
    trial_ids = [r.data.tags["malora.trial_id"] for r in children]
    assert len(children) == 2 and len(set(trial_ids)) == 2  # one nested run per trial, none duplicated
    assert all(r.info.status == "FINISHED" for r in children) and parent.info.status == "FINISHED"
    c = _client(tmp_path)
    for run in children:
        steps = [h.step for h in c.get_metric_history(run.info.run_id, "val/mean_acc")]
        assert steps == [2, 4], (run.data.tags["malora.trial_id"], steps)
    # the finished trial was not run again: same Tune results, no new Train checkpoints
    assert len(result_file.read_text().splitlines()) == n_results
    assert sorted(p.name for p in train_dir.glob("checkpoint_*")) == ckpts_before
    rows = json.loads((tmp_path / "ray_results" / "smoke" / "pareto.json").read_text())
    assert rows and all(r["trial_id"] in trial_ids for r in rows)
    # the per-method Optuna journals survived the kill: each study holds its method's one completed trial
    import optuna

    from orchestrator.tuning.searcher import journal_storage

    for method in ("lora", "malora"):
        study = optuna.load_study(study_name=f"smoke.{method}",
                                  storage=journal_storage(tmp_path / "ray_results" / "smoke" / "optuna" /
                                                          f"{method}.journal"))
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(done) == 1 and len(done[0].values) == 2, (method, study.trials)


def test_asha_keeps_its_rungs_across_a_sigkill_and_resume(tmp_path, shared_data_dir):
    """ASHA on (time unit: evaluations), one trial at a time, objective trainable_params (min), so the ASHA
    decision is known in advance: the LoRA r=8 trial has more parameters than the r=4 one and must stop at its
    first evaluation (rung 1, reduction factor 2). The driver is SIGKILLed once the r=4 trial is finished and
    before the r=8 one has reported; after --resume only a scheduler whose rungs were rebuilt from r=4's history
    can stop r=8 (Ray restores ASHA with empty rungs, which would let it run to the end)."""
    space = _space(tmp_path, resources__max_concurrent_trials=1, search__objectives={"trainable_params": "min"},
                   search__asha={"enabled": True, "grace_period": 1, "reduction_factor": 2},
                   search__points_to_evaluate=[{"method": "lora", "r": 4}, {"method": "lora", "r": 8}],
                   tracking__experiment="e2e-asha-resume")
    raw = yaml.safe_load(space.read_text())
    raw["methods"].pop("malora")  # two LoRA trials: each method's study gets num_trials / methods of them
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = _env(shared_data_dir)
    log_path = tmp_path / "first.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.search", "--space", str(space)], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def trial_runs() -> list:
        if not store_ready(log_path):
            return []
        try:
            exp = _client(tmp_path).get_experiment_by_name("e2e-asha-resume")
            runs = _client(tmp_path).search_runs([exp.experiment_id]) if exp else []
        except Exception:  # store still being created
            return []
        return [r for r in runs if "malora.trial_id" in r.data.tags]

    try:
        _wait_for(lambda: any(r.info.status == "FINISHED" for r in trial_runs()), 240, "the r=4 trial to finish",
                  proc, log_path)
        time.sleep(4)  # > TUNE_GLOBAL_CHECKPOINT_S: the experiment state records the finished trial
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    # a run the kill caught between its creation and its params has no hp.r yet; the resume must complete it
    before = {r.data.params.get("hp.r"): r for r in trial_runs()}
    assert before["4"].info.status == "FINISHED"
    # the r=8 trial had not reached its first rung: the decision below is taken by the resumed scheduler
    assert "8" not in before or "val/mean_acc" not in before["8"].data.metrics, "r=8 reported before the kill"

    proc2 = _search(tmp_path, space, env, "--resume")
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    assert "resuming search" in proc2.stderr
    parent, children = _runs(tmp_path, "e2e-asha-resume")
    by_r = {r.data.params["hp.r"]: r for r in children}
    assert sorted(by_r) == ["4", "8"] and parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in children)
    c = _client(tmp_path)
    small, big = by_r["4"], by_r["8"]
    assert int(big.data.params["trainable_params"]) > int(small.data.params["trainable_params"])

    def history(run, key: str) -> list[tuple[int, float]]:
        return [(h.step, h.value) for h in c.get_metric_history(run.info.run_id, key)]
    assert [s for s, _ in history(small, "val/mean_acc")] == [2, 4]
    assert history(small, "evaluations") == [(2, 1.0), (4, 2.0)]  # ceil(step / every_n_steps)
    assert history(big, "evaluations") == [(2, 1.0)]  # stopped at rung 1 by the rebuilt ASHA
    assert big.data.tags["malora.early_stopped"] == "True" and small.data.tags["malora.early_stopped"] == "False"
    summary = (tmp_path / "ray_results" / "smoke" / "summary.csv").read_text()
    big_id = big.data.tags["malora.trial_id"]
    assert f"{big_id},lora,STOPPED," in summary, summary
