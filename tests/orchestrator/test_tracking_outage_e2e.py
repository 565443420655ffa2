"""A tracking-server outage in the middle of a search, end to end: a real ``mlflow server`` on 127.0.0.1 is
stopped for a minute while the smoke search's trials run, then restarted on the same store. The search must
finish, every metric Tune recorded must be in MLflow, and no run may be left RUNNING."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.orchestrator.e2e import free_port, start_mlflow_server, stop, subprocess_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


def test_search_survives_a_tracking_server_outage(tmp_path, shared_data_dir):
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port, "server1.log")
    search_log = (tmp_path / "search.log").open("w")
    search = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.search", "--space", str(SPACES / "smoke.yaml"), "--tracking-uri", uri],
        cwd=tmp_path, env=subprocess_env(shared_data_dir), stdout=search_log, stderr=subprocess.STDOUT,
        start_new_session=True)
    client = MlflowClient(uri)
    try:
        end = time.time() + 300
        while True:  # the outage starts once the first trial has its nested run
            assert time.time() < end and search.poll() is None, "no trial started"
            exp = client.get_experiment_by_name("malora-smoke")
            if exp and any("malora.trial_id" in r.data.tags for r in client.search_runs([exp.experiment_id])):
                break
            time.sleep(1)
        stop(server)
        time.sleep(60)  # a minute without a tracking server: trials report, finish, and the outbox buffers
        server = start_mlflow_server(tmp_path, port, "server2.log")
        rc = search.wait(timeout=900)
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
            search.wait()
        search_log.close()
        output = (tmp_path / "search.log").read_text()
        stop(server)  # (restarted below for the checks)
    assert rc == 0, output[-4000:]
    assert "MLflow unreachable" in output and "buffered writes flushed" in output, output[-4000:]

    server = start_mlflow_server(tmp_path, port, "server3.log")
    try:
        exp = client.get_experiment_by_name("malora-smoke")
        runs = client.search_runs([exp.experiment_id])
        assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        for run in children:  # every result Tune recorded (result.json) is in MLflow, at its step
            trial_id = run.data.tags["malora.trial_id"]
            results = [json.loads(line) for line in
                       (tmp_path / "ray_results" / "smoke" / f"trial_{trial_id}" / "result.json").read_text().splitlines()]
            for key in ("val/mean_acc", "train_loss", "evaluations"):
                expected = sorted({(r["step"], r[key]) for r in results if key in r})
                got = sorted((h.step, h.value) for h in client.get_metric_history(run.info.run_id, key))
                assert got == expected, (trial_id, key)
            assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} >= {
                "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
        assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "summary")} >= {"summary/summary.csv"}
    finally:
        stop(server)


CHILD = r"""
import sys, time
from types import SimpleNamespace
from orchestrator.report import outbox
from orchestrator.report.callback import MLflowSearchCallback
from orchestrator.spec.space import load_space

uri, exp_id, parent_id, journal, space = sys.argv[1:6]
outbox.bound_http_requests()
cb = MLflowSearchCallback(uri, exp_id, parent_id, "key", load_space(space), None, journal=journal)
trial = SimpleNamespace(trial_id="t1", config={"method": "lora", "lora.r": 4, "lora.lr": 0.001},
                        last_result=None, error_file=None)
cb.on_trial_start(0, [], trial)
for step, acc in ((2, 0.25), (4, 0.5)):
    trial.last_result = {"step": step, "total_steps": 4, "val/mean_acc": acc, "train_loss": 3.0 - step / 4,
                         "trainable_params": 1792}
    cb.on_trial_result(0, [], trial, dict(trial.last_result))
cb.on_trial_complete(0, [], trial)
print("queued", len(cb._outbox.pending), flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # two mlflow server starts, ~40 s; no Ray
def test_writes_queued_by_a_sigkilled_driver_are_replayed_by_resume(tmp_path, shared_data_dir):
    """A driver holding MLflow writes queued during an outage is SIGKILLed; its journal keeps them, and the resumed
    driver's callback replays them once the server is back: the run, its params, every metric at its step, its
    end, exactly once (a second replay adds nothing)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.report import outbox
    from orchestrator.report.callback import MLflowSearchCallback
    from orchestrator.spec.space import load_space

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port, "server1.log")
    client = MlflowClient(uri)
    exp_id = client.create_experiment("journal")
    parent_id = client.create_run(exp_id, tags={"malora.search_key": "key"}).info.run_id
    stop(server)
    journal = tmp_path / "storage" / "outbox.jsonl"
    child = subprocess.Popen([sys.executable, "-c", CHILD, uri, exp_id, parent_id, str(journal),
                              str(SPACES / "smoke.yaml")], cwd=tmp_path, env=subprocess_env(shared_data_dir),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = child.stdout.readline()
        while line and not line.startswith("queued"):
            line = child.stdout.readline()
        assert line.strip() == "queued 4", line  # the run, two results and the end: none could be written
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert [r["op"] for r in outbox.Journal(journal, replay=True).pending()] == ["start", "result", "result",
                                                                               "finish"]
    server = start_mlflow_server(tmp_path, port, "server2.log")
    try:
        spec = load_space(SPACES / "smoke.yaml")
        outbox.bound_http_requests()
        resumed = MLflowSearchCallback(uri, exp_id, parent_id, "key", spec, None, journal=journal, replay=True)
        assert resumed.flush(60.0) and resumed.skipped() == []
        assert MLflowSearchCallback(uri, exp_id, parent_id, "key", spec, None, journal=journal,
                                    replay=True).replay() == 0
        runs = [r for r in client.search_runs([exp_id]) if r.data.tags.get("mlflow.parentRunId") == parent_id]
        assert len(runs) == 1 and runs[0].data.tags["malora.trial_id"] == "t1"
        run = runs[0]
        assert run.info.status == "FINISHED" and run.data.params["hp.r"] == "4" and run.data.params["method"] == "lora"
        assert run.data.params["trainable_params"] == "1792"
        for key, expected in (("val/mean_acc", [(2, 0.25), (4, 0.5)]), ("train_loss", [(2, 2.5), (4, 2.0)])):
            assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) == expected
    finally:
        stop(server)
