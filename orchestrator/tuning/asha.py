"""ASHA on the evaluations a trial has done, with rungs that survive ``--resume``.

Ray 2.60 neither saves nor restores a scheduler's state: ``TuneController.save_to_dir`` writes the trials, the
searcher and the callbacks (``_scheduler_alg`` is excluded from the runner state), and ``Tuner.restore`` unpickles
the scheduler as it was when the Tuner was created, so a resumed search starts with empty rungs and compares
its resumed trials against nothing. :class:`ResumableASHA` replays each restored trial's reported results
(its ``result.json`` in the experiment storage, read through Ray's storage filesystem, so object stores work too)
into its bracket when Tune adds the trial again; the decisions of that replay are discarded (they were taken
before the interruption).

The time attribute is ``evaluations`` (reported by the worker, derived from the training step), not Tune's
``training_iteration``, which restarts at 1 when a trial is restarted from its checkpoint.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

from ray.tune.schedulers import AsyncHyperBandScheduler

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
    """AsyncHyperBandScheduler whose rung records are rebuilt from the trials' reported history on resume."""

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket, replayed = self._trial_info[trial.trial_id], 0
        for result in reported_results(trial):
            if result.get(self._time_attr) is None or result.get(self._metric) is None:
                continue
            bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])
            replayed += 1
        if replayed:
            logger.info("ASHA: trial %s back on its rungs from %d reported results", trial.trial_id, replayed)

    def rung_records(self) -> list[dict[float, dict[str, float]]]:
        """Per bracket: {milestone: {trial id: recorded value (sign-adjusted for the mode)}}."""
        return [{milestone: dict(recorded) for milestone, recorded in b._rungs} for b in self._brackets]
