"""MLflow for a search: one parent run per search, one nested run per trial, logged from the Tune driver (the
trials' runs by ``report.callback``).

The driver (the process running ``orchestrator.search``) is the only writer, through a Tune ``Callback``: a SQLite
store then never sees concurrent writers, and nothing in the Train workers needs MLflow credentials.

Resume without duplicates: the parent run is tagged ``malora.search_key`` (= ``<storage_path>/<name>``) and each
nested run ``malora.trial_id``; a resumed search finds both by tag, and results at steps already logged are
skipped, so a finished trial keeps exactly one run and a restarted one continues its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)
SEARCH_KEY, TRIAL_KEY, PARENT = "malora.search_key", "malora.trial_id", "mlflow.parentRunId"
TUNE_KEYS = {"time_this_iter_s", "time_total_s", "timestamp", "training_iteration", "iterations_since_restore",
             "time_since_restore", "pid", "done", "checkpoint_path"}
PARAM_METRICS = ("trainable_params", "total_params", "trainable_share", "train_examples", "dropped_too_long",
                 "total_steps", "world_size",
                 "precision", "precision_reason", "eval_precision", "eval_precision_reason")  # issue 19


def resolve_tracking_uri(cli_uri: str | None, spec_uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the YAML's tracking.tracking_uri, else local SQLite."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store (local only)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def runs_url(uri: str, exp_id: str) -> str:
    """The UI address that lists an experiment's training runs directly.

    MLflow 3 opens an experiment on its GenAI overview, where our runs are hidden behind a "Model training"
    toggle; ``workflowType=machine_learning`` selects the runs view (the ``mlflow.experimentKind`` tag alone does
    not, in MLflow 3.17). A local store is served by :func:`ui_command` on 127.0.0.1:5000.
    """
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp_id}?workflowType=machine_learning"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _sqlite_path(uri: str) -> Path:
    """The database file of a ``sqlite:///`` URI (relative to the working directory unless absolute)."""
    return Path(uri[len("sqlite:///"):])


def _new_sqlite_store(uri: str) -> None:
    """Create a SQLite store that does not exist yet in a private file and link it into place, tables made.

    MLflow creates a new SQLite store's tables from whichever process opens it first, and two processes doing
    so at once (an ``mlflow ui`` or a script started beside the search) can fail or leave the store half
    migrated for good. Linked complete (``os.link`` never replaces a file), no other process ever sees it
    half made; if another created the file first, theirs is used.
    """
    db = _sqlite_path(uri)
    if db.exists() or not db.parent.is_dir():
        return
    tmp = db.with_name(f".{db.name}.new-{os.getpid()}")
    try:
        client(f"sqlite:///{tmp}").search_experiments(max_results=1)  # runs the migrations
        os.link(tmp, db)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def ensure_experiment(uri: str, name: str, attempts: int = 5) -> str:
    """Experiment id; a new one on a SQLite store keeps its artifacts in mlartifacts/<name> beside the DB file.

    Beside the DB, not under the working directory: a Ray job runs in a temporary copy of the project that is
    deleted with the job, and MLflow's own default for SQLite is relative to the current directory. This is
    the command's first access to its store: on SQLite it creates the store (:func:`_new_sqlite_store`), and
    where another process created the file and is still making its tables, it retries once that one is done
    (the errors vary with the moment: missing columns or indexes, a migration mismatch).
    """
    sqlite = uri.startswith("sqlite:///")
    if sqlite:
        _new_sqlite_store(uri)
    for _ in range(attempts - 1 if sqlite else 0):
        try:
            return _get_or_create_experiment(uri, name)
        except Exception as exc:  # noqa: BLE001 - SQLite only, and re-raised by the last attempt below
            logger.warning("MLflow store %s not ready, perhaps being set up by another process (%s: %s); "
                           "retrying", uri, type(exc).__name__, str(exc).splitlines()[0][:200])
            time.sleep(2.0)
    return _get_or_create_experiment(uri, name)


def _get_or_create_experiment(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        db = _sqlite_path(uri)
        location = ((db if db.is_absolute() else Path.cwd() / db).parent / "mlartifacts" / name).as_uri()
    return c.create_experiment(name, artifact_location=location)


def find_runs(uri: str, exp_id: str, **tags: str) -> list:
    filt = " and ".join(f"tags.`{k.replace('__', '.')}` = '{v}'" for k, v in tags.items())
    return client(uri).search_runs([exp_id], filter_string=filt, max_results=1000)


def parent_run(uri: str, exp_id: str, search_key: str, run_name: str, reuse: bool,
               role: str = "search") -> tuple[str, bool]:
    """(run id, reused?) of the search's (or study's) parent run: found by tag when resuming, else created."""
    if reuse:
        runs = [r for r in find_runs(uri, exp_id, malora__search_key=search_key) if PARENT not in r.data.tags]
        if runs:
            run_id = runs[0].info.run_id
            client(uri).update_run(run_id, status="RUNNING")
            return run_id, True
    run = client(uri).create_run(exp_id, run_name=run_name, tags={SEARCH_KEY: search_key, "malora.role": role})
    return run.info.run_id, False


def log_dict(uri: str, run_id: str, *, params: dict | None = None, metrics: dict | None = None,
             tags: dict | None = None, step: int = 0) -> None:
    """Batch-log; params already logged with the same value (resume) are fine, different ones are reported."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    c, now = client(uri), int(time.time() * 1000)
    # params before metrics: a resumed search decides from the logged `step` history what is still to log, so
    # a kill between the two calls must leave the params logged, never a step without them
    ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    for i in range(0, len(ps), 100):
        try:
            c.log_batch(run_id, params=ps[i:i + 100])
        except MlflowException as exc:  # resumed run: changed values cannot be overwritten
            logger.warning("MLflow params not logged (%s)", str(exc).splitlines()[0])
    ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if _is_number(v)]
    for i in range(0, len(ms), 1000):
        c.log_batch(run_id, metrics=ms[i:i + 1000])
    if tags:
        c.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


@contextlib.contextmanager
def closed_on_failure(uri: str, run_id: str) -> Iterator[None]:
    """Mark ``run_id`` KILLED on Ctrl-C and FAILED (with the reason as a tag) on any exception, then re-raise."""
    try:
        yield
    except KeyboardInterrupt:
        client(uri).set_terminated(run_id, "KILLED")
        raise
    except Exception as exc:
        log_dict(uri, run_id, tags={"malora.failure_reason": failure_reason(str(exc))})
        client(uri).set_terminated(run_id, "FAILED")
        raise


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def failure_reason(text: str) -> str:
    """The innermost ``SomeError: message`` line of a (Ray-wrapped) traceback, or the last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    pattern = re.compile(r"^([\w.]+(Error|Exception|Interrupt|Exit)):\s*(.*)")
    hits = [ln for ln in lines if pattern.match(ln) and not re.match(
        r"^(ray\.[\w.]+|TrainingFailedError|WorkerGroupError|RayTaskError[\w()]*)[:(]", ln)]
    return (hits[-1] if hits else (lines[-1] if lines else "unknown error"))[:1000]


def log_chosen_test(uri: str, exp_id: str, parent_id: str, trial_id: str, metrics: dict[str, Any], step: int) -> None:
    """A chosen search trial's test scores (``tuning.chosen``) on its nested run, tagged as scored after choosing,
    with the per-item hits as ``eval/test_items.json``."""
    runs = [r for r in find_runs(uri, exp_id, malora__trial_id=trial_id) if r.data.tags.get(PARENT) == parent_id]
    if not runs:
        logger.error("trial %s: no MLflow run to log its test scores to", trial_id)
        return
    run_id = runs[0].info.run_id
    if "test/mean_acc" in runs[0].data.metrics:  # a resumed search chose the same trial again: logged once
        return
    log_dict(uri, run_id, metrics={k: v for k, v in metrics.items() if k.startswith("test/")}, step=step,
             tags={"malora.test": "scored once, after choosing on val"})
    with tempfile.TemporaryDirectory() as tmp:
        log_test_items(uri, run_id, metrics, Path(tmp))


# per-item results of the final adapter on its held-out items, in pool order: any cell can be re-checked
PER_ITEM_FILES = (("test_correct/", "test_items.json"), ("test_chosen/", "test_chosen.json"),
                  ("test_gold/", "test_gold.json"), ("test_loglik/", "test_loglik.json"))


def log_test_items(uri: str, run_id: str, result: dict[str, Any], tmp: Path) -> None:
    """``eval/test_items.json`` (1/0 per item), ``eval/test_chosen.json`` (chosen option per item) and, where
    recorded, ``eval/test_gold.json`` and ``eval/test_loglik.json`` (every option's log-likelihood) from a
    result's ``test_correct/<task>``, ``test_chosen/<task>``, ... lists, written through ``tmp``."""
    for prefix, file in PER_ITEM_FILES:
        per_item = {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}
        if per_item:
            (tmp / file).write_text(json.dumps(per_item))
            client(uri).log_artifact(run_id, str(tmp / file), "eval")


def finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)



def zero_shot_run(uri: str, exp_id: str, parent_id: str, key: str, spec: Any, reference: dict) -> str:
    """The study's nested run of the base model (no adapter): its val and test accuracy; created once."""
    existing = [r for r in find_runs(uri, exp_id, malora__role="zero_shot", malora__search_key=key)
                if r.data.tags.get(PARENT) == parent_id]
    if existing:
        return existing[0].info.run_id
    run = client(uri).create_run(exp_id, run_name="zero-shot", tags={
        PARENT: parent_id, SEARCH_KEY: key, "malora.role": "zero_shot", "malora.method": "none"})
    metrics = {}
    for pool in ("val", "test"):
        acc = reference.get(pool) or {}  # each task's primary metric
        scores = reference.get(f"{pool}_scores") or {t: {"acc": a} for t, a in acc.items()}
        metrics.update({f"{pool}/{k}/{t}": v for t, s in scores.items() for k, v in s.items() if v is not None})
        values = [a for a in acc.values() if finite(a)]
        if values:
            metrics[f"{pool}/mean_acc"] = sum(values) / len(values)
    log_dict(uri, run.info.run_id, params={"method": "none", "model": spec.model.name, "role": "zero_shot",
                                           "formulation": spec.data.formulation},
             metrics=metrics)
    client(uri).set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
