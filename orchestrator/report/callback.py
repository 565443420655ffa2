"""The Tune callback that mirrors a search's (or study's) trials into nested MLflow runs, through the outbox.

The driver (the process running ``orchestrator.search``) is the only writer: a SQLite store then never sees
concurrent writers, and nothing in the Train workers needs MLflow credentials. Every write goes through an
:class:`orchestrator.report.outbox.Outbox` (an outage never blocks or aborts trials) whose journal keeps the queued
writes on disk, so ``--resume`` replays what a killed driver had not yet logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator.cluster import storage
from orchestrator.evaluation.diagnostics_record import diagnostics_of
from orchestrator.report import diagnostic_plots, plots
from orchestrator.report.outbox import Journal, Outbox, is_outage
from orchestrator.report.tracking import (PARAM_METRICS, PARENT, SEARCH_KEY, TRIAL_KEY, TUNE_KEYS, _sqlite_path,
                                          client, failure_reason, find_runs, log_dict, log_test_items)

logger = logging.getLogger(__name__)


def journal_path(storage_path: str, name: str, uri: str) -> Path:
    """Where the outbox journal of search (or study) ``name`` lives: in its folder when the storage is local, else
    beside a SQLite store, else under ~/.cache/malora/outbox (append + fsync needs a local file)."""
    if not storage.is_uri(storage_path):
        return Path(storage_path) / name / "mlflow_outbox.jsonl"
    if uri.startswith("sqlite:///"):
        db = _sqlite_path(uri)
        return db.parent / f"{db.name}.outbox" / f"{name}.jsonl"
    key = re.sub(r"[^\w.-]+", "_", f"{storage_path}/{name}")[-150:]
    return Path.home() / ".cache" / "malora" / "outbox" / f"{key}.jsonl"


@dataclasses.dataclass
class JournalTrial:
    """A trial as a journal line recorded it (what the callback's writes read of a Tune ``Trial``)."""

    trial_id: str
    config: dict
    last_result: dict | None = None
    error_file: str | None = None


def _trial_record(trial: Any, last: bool = False) -> dict[str, Any]:
    return {"trial_id": trial.trial_id, "config": trial.config, "last_result": trial.last_result if last else None}


class MLflowSearchCallback(Callback):
    """Tune callback that mirrors trials into nested MLflow runs (params, per-eval metrics, plots, adapter).

    ``journal``: a file where every queued write is also recorded (``report.outbox.Journal``); with ``replay``
    (``--resume``) the writes a killed driver left queued there are replayed first, in order."""

    def __init__(self, uri: str, exp_id: str, parent_id: str, search_key: str, spec: Any,
                 reference: dict[str, float] | None, journal: str | Path | None = None, replay: bool = False):
        self.uri, self.exp_id, self.parent_id, self.search_key = uri, exp_id, parent_id, search_key
        self.spec, self.reference = spec, reference
        self._runs: dict[str, tuple[str, int]] = {}  # trial id -> (run id, last logged step)
        # every write goes through it: an MLflow outage never blocks or aborts trials
        self._outbox = Outbox(probe=lambda: client(uri).search_experiments(max_results=1),
                              journal=Journal(journal, replay=replay) if journal else None)
        if journal and replay:
            self.replay()

    def replay(self) -> int:
        """Queue again the journalled writes that had neither landed nor been skipped; returns how many."""
        pending = self._outbox.journal.pending()
        for rec in pending:
            trial = JournalTrial(**rec["trial"]) if "trial" in rec else None
            self._outbox.put(rec["what"], self._write_of(rec, trial), seq=rec["seq"])
        if pending:
            logger.warning("MLflow: %d writes queued by an earlier run of this search replayed from %s", len(pending),
                           self._outbox.journal.path)
        return len(pending)

    def _write_of(self, rec: dict[str, Any], trial: Any):
        op = rec["op"]
        if op == "start":
            return lambda: self.run_for(trial)
        if op == "result":
            return lambda: self._log_result(trial, rec["result"])
        if op == "finish":
            return lambda: self._finish(trial, rec["status"], rec["tags"])
        if op == "close":
            return lambda: client(self.uri).set_terminated(rec["run_id"], rec["status"])
        raise ValueError(f"outbox journal {self._outbox.journal.path}: unknown op {op!r} in line {rec['seq']}")

    def skipped(self) -> list[tuple[str, str]]:
        """(what, error) of every write given up (refused, or failing again while the store answered)."""
        return list(self._outbox.skipped)

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
                       "epochs": t.epochs, "schedule": t.schedule, "seed": t.seed, "compile": t.compile,
                       "formulation": self.spec.data.formulation,
                       "workers": self.spec.resources.workers_per_trial, **extra})
        return params

    def trial_view(self, trial: Any) -> tuple[str, dict, str, dict, dict]:
        """(method, hyperparameters, run name, extra tags, extra params) of a trial: a search trial's config is
        the Optuna proposal itself."""
        from orchestrator.spec.hparams import trial_hparams

        method, hp = trial_hparams(self.spec.methods, trial.config)
        return method, hp, f"{method}-{trial.trial_id}", {}, {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._outbox.put(f"the run of trial {trial.trial_id}", lambda: self.run_for(trial),
                         {"op": "start", "trial": _trial_record(trial)})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        result = dict(result)
        self._outbox.put(f"step {result.get('step')} of trial {trial.trial_id}",
                         lambda: self._log_result(trial, result),
                         {"op": "result", "trial": _trial_record(trial), "result": result})

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
        tags = {"malora.early_stopped": stopped}
        self._outbox.put(f"the end of trial {trial.trial_id}", lambda: self._finish(trial, "FINISHED", tags),
                         {"op": "finish", "trial": _trial_record(trial, last=True), "status": "FINISHED",
                          "tags": tags})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = ""
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text(errors="replace")
        tags = {"malora.failure_reason": failure_reason(text) if text else "unknown"}
        self._outbox.put(f"the failure of trial {trial.trial_id}", lambda: self._finish(trial, "FAILED", tags),
                         {"op": "finish", "trial": _trial_record(trial, last=True), "status": "FAILED", "tags": tags})

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Wait (up to $MALORA_MLFLOW_FLUSH_S, default 900 s) for writes buffered during an outage to land."""
        if not self.flush(float(os.environ.get("MALORA_MLFLOW_FLUSH_S", "900"))):
            logger.error("MLflow still unreachable: %d writes not logged (runs stay RUNNING; kept in the outbox "
                         "journal, replayed by --resume)", len(self._outbox.pending))
        for what, error in self._outbox.skipped:
            logger.error("MLflow write skipped: %s (%s)", what, error)

    def flush(self, deadline_s: float | None = None) -> bool:
        """Flush the buffered writes (waiting up to ``deadline_s`` for the store); True when none is left."""
        return self._outbox.flush(deadline_s)

    def close_open_runs(self, status: str, deadline_s: float = 60.0) -> None:
        """When the search aborts: flush, then end every nested run still open with ``status``."""
        for trial_id, (run_id, _) in list(self._runs.items()):
            self._outbox.put(f"closing the run of trial {trial_id}",
                             lambda run_id=run_id: client(self.uri).set_terminated(run_id, status),
                             {"op": "close", "run_id": run_id, "status": status})
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
            # each task's primary metric, as the reference lines and val/mean_acc (docs/cloze.md)
            history = {k[len("val/primary/"):]: [(m.step, m.value) for m in c.get_metric_history(run_id, k)]
                       for k in latest if k.startswith("val/primary/")}
            if history:
                history["mean_acc"] = [(m.step, m.value) for m in c.get_metric_history(run_id, "val/mean_acc")]
                plots.accuracy_plot(history, self.reference, Path(tmp) / "accuracy_vs_step.png",
                                    f"{trial.trial_id}: per-task validation accuracy (primary metric)")
            log_test_items(self.uri, run_id, trial.last_result or {}, Path(tmp))
            util: dict[str, dict[str, list[float]]] = {}
            for key in sorted(latest, key=lambda k: (k.rsplit("/e", 1)[0], int(k.rsplit("/e", 1)[-1]))
                              if k.startswith("util/") else ("", 0)):
                if key.startswith("util/"):
                    _, task, group, _e = key.split("/")
                    util.setdefault(group, {}).setdefault(task, []).append(latest[key])
            plots.utilisation_heatmap(util, Path(tmp) / "expert_utilisation.png",
                                      f"{trial.trial_id}: token share per expert (last evaluation)")
            self._diagnostics(trial, run_id, Path(tmp))
            for png in Path(tmp).glob("*.png"):
                c.log_artifact(run_id, str(png), "plots")
        ckpt = (trial.last_result or {}).get("checkpoint_path")
        if ckpt:  # a path on the storage's file system: downloaded first when the storage is a URI
            with storage.local_copy(storage.join(ckpt, "adapter"), root=self.spec.storage_path) as adapter:
                if adapter is not None:
                    c.log_artifacts(run_id, str(adapter), "adapter")


    def _diagnostics(self, trial: Any, run_id: str, tmp: Path) -> None:
        """The final evaluation's seesaw diagnostics (``evaluation.diagnostics_record``): its figures (written into
        ``tmp``, logged with the other plots), the probe's item keys as ``eval/grad_probe.json`` and, per parameter
        group, the most negative task pair as the tag ``malora.most_negative/<group>`` (``a~b: -0.31``)."""
        record = diagnostics_of(trial.last_result)
        if not record:
            return
        diagnostic_plots.diagnostics_plots(record, tmp, trial.trial_id)
        conflict = record.get("grad_conflict") or {}
        if conflict.get("probe"):
            (tmp / "grad_probe.json").write_text(json.dumps(conflict["probe"]))
            client(self.uri).log_artifact(run_id, str(tmp / "grad_probe.json"), "eval")
        tags = {f"malora.most_negative/{group}": f"{'~'.join(m['pair'])}: {m['value']:+.3f}"
                for group, m in (conflict.get("most_negative") or {}).items() if m.get("pair")}
        if tags:
            log_dict(self.uri, run_id, tags=tags)


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
