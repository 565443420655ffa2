"""ASHA on the evaluations a trial has done, with rungs that survive ``--resume``.

Ray 2.60 neither saves nor restores a scheduler's state: ``TuneController.save_to_dir`` writes the trials, the
searcher and the callbacks (``_scheduler_alg`` is excluded from the runner state), and ``Tuner.restore`` unpickles
the scheduler as it was when the Tuner was created, so a resumed search starts with empty rungs and compares
its resumed trials against nothing. :class:`ResumableASHA` replays each restored trial's reported results
(its ``result.json`` in the experiment storage, read through Ray's storage filesystem, so object stores work too)
into its bracket when Tune adds the trial again; the decisions of that replay are discarded (they were taken
before the interruption). Tune rewrites the ``result.json`` of a trial it restarts, so a trial interrupted twice
keeps only its last launch's lines there; its results also carry ``val/mean_acc`` after every evaluation so far
(``evaluation.metrics.HISTORY_KEY``, from the trial's checkpoint), which the replay reads too.

The time attribute is ``evaluations`` (reported by the worker, derived from the training step), not Tune's
``training_iteration``, which restarts at 1 when a trial is restarted from its checkpoint.

Rungs are kept per adapter method (the trial config's ``method``): a trial is compared only with trials of its own
method, as each method has its own Optuna study and trial quota (``tuning.searcher``) and the estimate counts
ASHA per method (``tuning.search_estimate.stop_evaluations``). With one set of rungs for all, a method whose val
accuracy is lower after the first evaluation loses its trials at the first rung to the other methods' (the search
of record's MoLoRA paper setting did, to LoRA's 0.477 with 0.467), and the report is left with nothing per method
to compare.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

from ray.tune.schedulers import AsyncHyperBandScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from orchestrator.evaluation.metrics import mean_acc_history

logger = logging.getLogger(__name__)
TIME_ATTR = "evaluations"


def reported_results(trial: Any) -> Iterator[dict[str, Any]]:
    """The results a trial reported before (its ``result.json`` lines, in order); none for a new trial."""
    storage = getattr(trial, "storage", None)
    if storage is None or not getattr(storage, "trial_dir_name", None):  # a new trial: no folder yet
        return
    path = f"{trial.path}/result.json"
    try:
        with storage.storage_filesystem.open_input_stream(path) as f:
            text = f.readall().decode()
    except (FileNotFoundError, OSError):
        return
    for line in text.splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue


class ResumableASHA(AsyncHyperBandScheduler):
    """AsyncHyperBandScheduler with one set of rungs per value of the trial config's ``group_key`` (the method), whose
    rung records are rebuilt from the trials' reported history on resume (module docstring)."""

    def __init__(self, *, time_attr: str, metric: str | None = None, mode: str | None = None, max_t: int = 100,
                 grace_period: int = 1, reduction_factor: float = 4, stop_last_trials: bool = True,
                 group_key: str = "method"):
        super().__init__(time_attr=time_attr, metric=metric, mode=mode, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor, brackets=1, stop_last_trials=stop_last_trials)
        self._bracket_shape = (grace_period, max_t, reduction_factor, stop_last_trials)  # plain values: picklable
        self._group_key = group_key
        self._groups: dict[str, _Bracket] = {}

    def group_of(self, trial: Any) -> str:
        """The rung group of ``trial``: its config's ``group_key`` value ("" without one)."""
        return str((getattr(trial, "config", None) or {}).get(self._group_key, ""))

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)   # checks metric and mode
        group = self.group_of(trial)
        if group not in self._groups:
            grace, max_t, rf, stop_last = self._bracket_shape
            self._groups[group] = _Bracket(grace, max_t, rf, 0, stop_last_trials=stop_last)
        self._trial_info[trial.trial_id] = self._groups[group]
        bracket, replayed = self._groups[group], 0
        for time, value in self.replayed_values(list(reported_results(trial))):
            bracket.on_result(trial, time, self._metric_op * value)
            replayed += 1
        if replayed:
            logger.info("ASHA: trial %s back on its rungs from %d reported results", trial.trial_id, replayed)

    def replayed_values(self, results: list[dict[str, Any]]) -> list[tuple[float, float]]:
        """(time, metric value) pairs to replay from a trial's reported ``results``, in time order. For the time
        ``evaluations`` and the metric ``val/mean_acc`` that includes the evaluations a restart of the trial
        dropped from its ``result.json``: each result carries their values (``evaluation.metrics.HISTORY_KEY``)."""
        if self._time_attr == TIME_ATTR and self._metric == "val/mean_acc":
            return [(float(e), v) for e, v in mean_acc_history(results).items()]
        return [(r[self._time_attr], r[self._metric]) for r in results
                if r.get(self._time_attr) is not None and r.get(self._metric) is not None]

    def rung_records(self) -> dict[str, dict[float, dict[str, float]]]:
        """Per group: {milestone: {trial id: recorded value (sign-adjusted for the mode)}}."""
        return {g: {milestone: dict(recorded) for milestone, recorded in b._rungs} for g, b in self._groups.items()}

    def debug_string(self) -> str:
        return "Using AsyncHyperBand per " + self._group_key + ": " + "; ".join(
            f"{g or '-'}: {b.debug_str()}" for g, b in self._groups.items())
