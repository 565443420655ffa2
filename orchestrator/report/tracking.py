"""MLflow for a search: one parent run per search, one nested run per trial, logged from the Tune driver.

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

from ray.tune import Callback

from orchestrator.cluster import storage
from orchestrator.report import plots
from orchestrator.report.outbox import Outbox, is_outage

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


class MLflowSearchCallback(Callback):
    """Tune callback that mirrors trials into nested MLflow runs (params, per-eval metrics, plots, adapter)."""

    def __init__(self, uri: str, exp_id: str, parent_id: str, search_key: str, spec: Any,
                 reference: dict[str, float] | None):
        self.uri, self.exp_id, self.parent_id, self.search_key = uri, exp_id, parent_id, search_key
        self.spec, self.reference = spec, reference
        self._runs: dict[str, tuple[str, int]] = {}  # trial id -> (run id, last logged step)
        self._outbox = Outbox()  # every write goes through it: an MLflow outage never blocks or aborts trials

    def __getstate__(self) -> dict:  # Tune pickles the run config; keep no live state
        return {**self.__dict__, "_runs": {}, "_outbox": Outbox()}

    # --------------------------------------------------------------------------------------------- runs
    def run_for(self, trial: Any) -> str:
        """The trial's nested run: found by its trial-id tag (a resumed search) or created. Creating a run and
        logging its params are two MLflow calls, so a driver killed between them leaves a run without params;
        the resumed search logs the ones missing (logging an identical value again is allowed)."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id][0]
        existing = [r for r in find_runs(self.uri, self.exp_id, malora__trial_id=trial.trial_id)
                    if r.data.tags.get(PARENT) == self.parent_id]
        if existing:
            run_id = existing[0].info.run_id
            missing = {k: v for k, v in self._trial_params(trial).items() if k not in existing[0].data.params}
            if missing:
                log_dict(self.uri, run_id, params=missing)
            hist = client(self.uri).get_metric_history(run_id, "step")
            self._runs[trial.trial_id] = (run_id, int(max((m.value for m in hist), default=0)))
            client(self.uri).update_run(run_id, status="RUNNING")
            return run_id
        method, _, run_name, tags, _ = self.trial_view(trial)
        run = client(self.uri).create_run(self.exp_id, run_name=run_name, tags={
            PARENT: self.parent_id, TRIAL_KEY: trial.trial_id, SEARCH_KEY: self.search_key, "malora.method": method,
            **tags})
        log_dict(self.uri, run.info.run_id, params=self._trial_params(trial))
        self._runs[trial.trial_id] = (run.info.run_id, 0)
        return run.info.run_id

    def _trial_params(self, trial: Any) -> dict[str, Any]:
        """Everything a trial's run records as params before its first result: method, hp.*, adapter.*, the
        training settings and the view's extras."""
        from orchestrator.spec.hparams import adapter_config

        method, hp, _, _, extra = self.trial_view(trial)
        params: dict[str, Any] = {"method": method, **{f"hp.{k}": v for k, v in hp.items()}}
        try:
            params.update({f"adapter.{k}": v for k, v in adapter_config(method, hp).to_dict().items()})
        except (ValueError, TypeError):  # per-layer MoSLD lists need the model's layer count; logged by hp.*
            pass
        t = self.spec.train
        params.update({"lr": hp.get("lr", t.lr), "weight_decay": hp.get("weight_decay", t.weight_decay),
                       "warmup_ratio": hp.get("warmup_ratio", t.warmup_ratio), "model": self.spec.model.name,
                       "batch_size": t.batch_size, "grad_accum": t.grad_accum, "max_steps": t.max_steps,
                       "epochs": t.epochs, "schedule": t.schedule, "seed": t.seed,
                       "workers": self.spec.resources.workers_per_trial, **extra})
        return params

    def trial_view(self, trial: Any) -> tuple[str, dict, str, dict, dict]:
        """(method, hyperparameters, run name, extra tags, extra params) of a trial: a search trial's config is
        the Optuna proposal itself."""
        from orchestrator.spec.hparams import trial_hparams

        method, hp = trial_hparams(self.spec.methods, trial.config)
        return method, hp, f"{method}-{trial.trial_id}", {}, {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._outbox.put(f"the run of trial {trial.trial_id}", lambda: self.run_for(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        result = dict(result)
        self._outbox.put(f"step {result.get('step')} of trial {trial.trial_id}",
                         lambda: self._log_result(trial, result))

    def _log_result(self, trial: Any, result: dict) -> None:
        run_id = self.run_for(trial)
        step = int(result.get("step", 0))
        last = self._runs[trial.trial_id][1]
        if step <= last:  # already logged before an interruption
            return
        metrics = {k: v for k, v in result.items() if k not in TUNE_KEYS and k not in PARAM_METRICS}
        params = {k: result[k] for k in PARAM_METRICS if k in result} if last == 0 else None
        log_dict(self.uri, run_id, params=params, metrics=metrics, step=step)
        self._runs[trial.trial_id] = (run_id, step)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        stopped = bool(last.get("step")) and last.get("step", 0) < last.get("total_steps", 0)
        self._outbox.put(f"the end of trial {trial.trial_id}",
                         lambda: self._finish(trial, "FINISHED", {"malora.early_stopped": stopped}))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = ""
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text(errors="replace")
        tags = {"malora.failure_reason": failure_reason(text) if text else "unknown"}
        self._outbox.put(f"the failure of trial {trial.trial_id}", lambda: self._finish(trial, "FAILED", tags))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Wait (up to $MALORA_MLFLOW_FLUSH_S, default 900 s) for writes buffered during an outage to land."""
        if not self.flush(float(os.environ.get("MALORA_MLFLOW_FLUSH_S", "900"))):
            logger.error("MLflow still unreachable: %d writes not logged (runs stay RUNNING)",
                         len(self._outbox.pending))

    def flush(self, deadline_s: float | None = None) -> bool:
        """Flush the buffered writes (waiting up to ``deadline_s`` for the store); True when none is left."""
        return self._outbox.flush(deadline_s)

    def close_open_runs(self, status: str, deadline_s: float = 60.0) -> None:
        """When the search aborts: flush, then end every nested run still open with ``status``."""
        for trial_id, (run_id, _) in list(self._runs.items()):
            self._outbox.put(f"closing the run of trial {trial_id}",
                             lambda run_id=run_id: client(self.uri).set_terminated(run_id, status))
        self._runs.clear()
        self.flush(deadline_s)

    def _finish(self, trial: Any, status: str, tags: dict) -> None:
        run_id = self.run_for(trial)
        try:
            self._artifacts(trial, run_id)
        except Exception as exc:  # a plot must never take the search down; an outage retries the whole end
            if is_outage(exc):
                raise
            logger.exception("artifacts of trial %s not logged", trial.trial_id)
        log_dict(self.uri, run_id, tags=tags)
        client(self.uri).set_terminated(run_id, status)
        self._runs.pop(trial.trial_id, None)

    def _artifacts(self, trial: Any, run_id: str) -> None:
        c = client(self.uri)
        latest = c.get_run(run_id).data.metrics
        with tempfile.TemporaryDirectory() as tmp:
            history = {k[len("val/acc/"):]: [(m.step, m.value) for m in c.get_metric_history(run_id, k)]
                       for k in latest if k.startswith("val/acc/")}
            if history:
                history["mean_acc"] = [(m.step, m.value) for m in c.get_metric_history(run_id, "val/mean_acc")]
                plots.accuracy_plot(history, self.reference, Path(tmp) / "accuracy_vs_step.png",
                                    f"{trial.trial_id}: per-task validation accuracy")
            last = trial.last_result or {}
            per_item = {k[len("test_correct/"):]: v for k, v in last.items() if k.startswith("test_correct/")}
            if per_item:  # the held-out items of the final adapter, 1/0 in pool order: any cell can be re-checked
                (Path(tmp) / "test_items.json").write_text(json.dumps(per_item))
                c.log_artifact(run_id, str(Path(tmp) / "test_items.json"), "eval")
            util: dict[str, dict[str, list[float]]] = {}
            for key in sorted(latest, key=lambda k: (k.rsplit("/e", 1)[0], int(k.rsplit("/e", 1)[-1]))
                              if k.startswith("util/") else ("", 0)):
                if key.startswith("util/"):
                    _, task, group, _e = key.split("/")
                    util.setdefault(group, {}).setdefault(task, []).append(latest[key])
            plots.utilisation_heatmap(util, Path(tmp) / "expert_utilisation.png",
                                      f"{trial.trial_id}: token share per expert (last evaluation)")
            for png in Path(tmp).glob("*.png"):
                c.log_artifact(run_id, str(png), "plots")
        ckpt = (trial.last_result or {}).get("checkpoint_path")
        if ckpt:  # a path on the storage's file system: downloaded first when the storage is a URI
            with storage.local_copy(storage.join(ckpt, "adapter"), root=self.spec.storage_path) as adapter:
                if adapter is not None:
                    c.log_artifacts(run_id, str(adapter), "adapter")


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
        acc = reference.get(pool) or {}
        metrics.update({f"{pool}/acc/{t}": a for t, a in acc.items()})
        values = [a for a in acc.values() if finite(a)]
        if values:
            metrics[f"{pool}/mean_acc"] = sum(values) / len(values)
    log_dict(uri, run.info.run_id, params={"method": "none", "model": spec.model.name, "role": "zero_shot"},
             metrics=metrics)
    client(uri).set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


class MLflowStudyCallback(MLflowSearchCallback):
    """The same nested runs for a study's trials, whose config is ``{"run": {role, method, seed, task, config}}``
    (``orchestrator.tuning.study``): one run per (method, seed) and per single-task reference."""

    def trial_view(self, trial: Any) -> tuple[str, dict, str, dict, dict]:
        from orchestrator.spec.hparams import trial_hparams

        run = trial.config["run"]
        method, hp = trial_hparams(self.spec.methods, run["config"])
        what = run["task"] if run["role"] == "single_task" else method
        tags = {"malora.role": run["role"], "malora.seed": str(run["seed"]), "malora.task": run.get("task") or ""}
        extra = {"seed": run["seed"], "role": run["role"], "tasks": run.get("task") or "all",
                 "max_steps": run.get("max_steps")}
        return method, hp, f"{run['role']}-{what}-s{run['seed']}", tags, extra
