"""The Tune side of one trial: a Tune function trainable that builds and fits one Ray Train ``TorchTrainer``.

Its Train workers run :func:`orchestrator.training.worker.train_worker`; their reports reach Tune through
``TuneReportCallback`` (Ray >= 2.52 Train V2).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from orchestrator.spec.space import SearchSpec
from orchestrator.training.worker import train_worker

logger = logging.getLogger(__name__)


def trial_driver(config: dict[str, Any], spec: SearchSpec, reference: dict[str, float] | None = None,
                 score_test: bool = True) -> None:
    """Tune function trainable: build and fit one TorchTrainer; its reports reach Tune via TuneReportCallback.

    ``score_test``: score the test pool at the last step (study runs); a search's trials do not (val only)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    res = spec.resources
    worker = {"CPU": max(0.01, res.cpus_per_worker - res.trial_driver_cpus)}
    if res.gpus_per_worker:
        worker["GPU"] = res.gpus_per_worker
    def fit() -> None:
        # Train's own retries are off: Train V2 retries every worker-group error, also those that will recur
        TorchTrainer(
            train_worker,
            train_loop_config={"spec": spec, "trial": dict(config), "trial_id": trial_id, "reference": reference,
                               "score_test": score_test},
            scaling_config=ray.train.ScalingConfig(num_workers=res.workers_per_trial,
                                                   use_gpu=res.gpus_per_worker > 0, resources_per_worker=worker),
            run_config=ray.train.RunConfig(
                name=f"train-{trial_id}", storage_path=train_storage(spec), callbacks=[TuneReportCallback()],
                failure_config=ray.train.FailureConfig(max_failures=0),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
        ).fit()

    fit_with_retries(fit, res.max_failures, trial_id)
    _drain_report_queue()


#: Failures that recur on a retry (a diverged loss, a bad configuration, bad data): never retried.
RECURRING = (FloatingPointError, ValueError, TypeError, KeyError, NotImplementedError)


def recurring_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (a Train error, its per-rank worker failures, their causes) is one a retry would repeat."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RECURRING):
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values(),
                 getattr(e, "controller_failure", None)]
    return False


def fit_with_retries(fit: Callable[[], None], max_failures: int, trial_id: str = "") -> None:
    """Call ``fit`` up to ``1 + max_failures`` times; a new fit of the same Train run resumes from its last
    checkpoint. Recurring failures (:func:`recurring_failure`) are raised at once, not retried."""
    for attempt in range(max_failures + 1):
        try:
            return fit()
        except Exception as exc:
            if attempt == max_failures or recurring_failure(exc):
                raise
            logger.warning("trial %s: attempt %d of %d failed (%s); retrying from its last checkpoint", trial_id,
                           attempt + 1, max_failures + 1, str(exc).strip().splitlines()[-1][:300])


def _drain_report_queue(timeout_s: float = 60.0, settle_s: float = 1.0) -> None:
    """Wait until Tune has taken the last forwarded report before this function returns.

    Ray 2.60 race (seen as a search that hangs forever): TuneReportCallback hands reports to the trial's main thread
    through a one-slot queue; the main thread re-reports each one into the session's one-slot result queue. If this
    function returns while the last report is still in flight, Tune's own final "done" result fills the result
    queue first and the main thread blocks forever putting that report behind it. Returning only once the hand-off
    queue is empty, plus a moment for the main thread to finish its re-report, closes the window.
    """
    from ray.train._internal.session import get_session

    session = get_session()
    queue = getattr(session, "_inter_actor_queue", None) if session is not None else None
    if queue is None:
        return
    deadline = time.monotonic() + timeout_s
    while not queue.empty() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(settle_s)


def train_storage(spec: SearchSpec) -> str:
    """Where the trials' Train runs (and their adapter checkpoints) live: <storage>/<name>/train_runs."""
    return os.path.join(spec.storage_path, spec.name, "train_runs")
