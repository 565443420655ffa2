"""The search's MLflow callback against a real SQLite MLflow store: what a driver killed between two MLflow calls
leaves behind is completed by the resumed search, never duplicated."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.report import tracking
from orchestrator.report.callback import MLflowSearchCallback
from orchestrator.spec.space import load_space

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


@pytest.fixture()
def store(tmp_path, shared_data_dir, monkeypatch):
    """(uri, experiment id, parent run id, smoke spec) of a fresh SQLite store."""
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    spec = load_space(SPACES / "smoke.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = tracking.ensure_experiment(uri, "tracking-unit")
    parent = tracking.client(uri).create_run(exp_id, run_name="parent")
    return uri, exp_id, parent.info.run_id, spec


def _callback(uri, exp_id, parent_id, spec):
    return MLflowSearchCallback(uri, exp_id, parent_id, "key", spec, reference=None)


TRIAL = SimpleNamespace(trial_id="t0001", config={"method": "lora", "lora.r": 8, "lora.lr": 2.5e-3})


def test_run_created_but_killed_before_its_params_gets_them_on_resume(store):
    uri, exp_id, parent_id, spec = store
    # what the first driver left: create_run went through, the params call did not
    orphan = tracking.client(uri).create_run(exp_id, run_name="lora-t0001", tags={
        tracking.PARENT: parent_id, tracking.TRIAL_KEY: TRIAL.trial_id, tracking.SEARCH_KEY: "key"})
    assert tracking.client(uri).get_run(orphan.info.run_id).data.params == {}

    run_id = _callback(uri, exp_id, parent_id, spec).run_for(TRIAL)
    assert run_id == orphan.info.run_id  # the same run, not a second one
    params = tracking.client(uri).get_run(run_id).data.params
    assert params["method"] == "lora" and params["hp.r"] == "8" and params["lr"] == "0.0025"
    assert params["max_steps"] == str(spec.train.max_steps) and params["batch_size"] == str(spec.train.batch_size)
    runs = tracking.find_runs(uri, exp_id, malora__trial_id=TRIAL.trial_id)
    assert [r.info.run_id for r in runs] == [run_id]


def test_a_fresh_run_and_its_resumed_lookup_record_the_same_params(store):
    uri, exp_id, parent_id, spec = store
    first = _callback(uri, exp_id, parent_id, spec).run_for(TRIAL)
    logged = tracking.client(uri).get_run(first).data.params
    again = _callback(uri, exp_id, parent_id, spec).run_for(TRIAL)  # a resumed driver: no live state
    assert again == first and tracking.client(uri).get_run(again).data.params == logged
    assert logged["hp.r"] == "8" and logged["hp.lr"] == "0.0025" and logged["workers"] == "1"


def test_first_result_logs_params_before_its_step(store, monkeypatch):
    """A kill after the first result's params but before its metrics must leave `step` unlogged, so the resumed
    driver logs that result again; the reverse order would lose the result-time params for good."""
    uri, exp_id, parent_id, spec = store
    cb = _callback(uri, exp_id, parent_id, spec)
    run_id = cb.run_for(TRIAL)
    calls = []
    real = tracking.client(uri)

    class Recording:
        def log_batch(self, rid, metrics=(), params=(), tags=()):
            calls.append(("params" if params else "metrics" if metrics else "tags"))
            return real.log_batch(rid, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(tracking, "client", lambda _uri: Recording())
    cb._log_result(TRIAL, {"step": 2, "trainable_params": 1792, "val/mean_acc": 0.5})
    assert calls == ["params", "metrics"]
    run = real.get_run(run_id)
    assert run.data.params["trainable_params"] == "1792" and run.data.metrics["val/mean_acc"] == 0.5


def test_a_new_sqlite_store_appears_complete_and_in_place(tmp_path):
    """The store is made in a private file and linked into place: nothing else is left beside it, and the file
    another process first sees already has every table of the current schema (the experiment lives in it)."""
    import sqlite3

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = tracking.ensure_experiment(uri, "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        tables = {name for (name,) in db.execute("select name from sqlite_master where type = 'table'")}
        (name, location), = db.execute("select name, artifact_location from experiments where experiment_id = ?",
                                       (exp_id,))
    assert {"alembic_version", "experiments", "runs", "metrics", "params", "tags"} <= tables
    assert not any(t.startswith("_alembic_tmp") for t in tables)
    assert name == "fresh" and location == (tmp_path / "mlartifacts" / "fresh").as_uri()
    assert tracking.ensure_experiment(uri, "fresh") == exp_id  # found again, not created twice


def test_first_access_retries_a_sqlite_store_another_process_is_setting_up(tmp_path, monkeypatch):
    real, failures = tracking._get_or_create_experiment, []
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)

    def flaky(uri, name):
        if len(failures) < 2:  # what a concurrent migration raises, e.g. "table ... already exists"
            failures.append(name)
            raise RuntimeError("table _alembic_tmp_experiments already exists")
        return real(uri, name)

    monkeypatch.setattr(tracking, "_get_or_create_experiment", flaky)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = tracking.ensure_experiment(uri, "busy")
    assert failures == ["busy", "busy"] and tracking.client(uri).get_experiment(exp_id).name == "busy"
    failures.clear()
    with pytest.raises(RuntimeError, match="already exists"):  # a server store is never retried
        tracking.ensure_experiment("http://127.0.0.1:9", "busy")
    assert failures == ["busy"]
