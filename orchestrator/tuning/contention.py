"""How much slower one trial trains while every trial slot of the machine is busy: measured, for the estimate.

``tuning.calibrate`` times one trial alone. Tune runs ``c = max_concurrent_trials`` trials at once, and on a
machine whose cores share memory bandwidth, caches or a physical core (a 2-vCPU cloud machine: two SmolLM2 trials
at once each trained at about 0.6 of the rate one trial reached alone), a run takes longer than its time alone. The
slowdown

    k = r_1 / mean_i r_c,i

(``r_1`` real training tokens/s of one trial alone, ``r_c,i`` of trial ``i`` of ``c`` started together) is measured
with the calibration's own training steps in ``c`` spawned processes that wait on one barrier before their timed
steps, after one such process alone (the same code both times: process start, threads and allocator alike). The
estimate multiplies each run's time by ``k`` when ``c > 1`` (``tuning.estimate``): a run that ends while the other
slots idle runs faster than that, so the estimate errs long. A slot on a GPU of its own shares no cores: ``k = 1``,
not measured.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import statistics
import time
from collections.abc import Callable
from typing import Any

from orchestrator.spec.space import SearchSpec

logger = logging.getLogger(__name__)
CHILD_TIMEOUT_S = 1800  # one process's model build, warm-up and timed steps; a hung child fails the calibration


def train_rate(spec: SearchSpec, trial: Any, encoded: list, steps: int, device: Any,
               before_timing: Callable[[], Any] | None = None) -> tuple[float, float, float]:
    """(real tokens/s over ``steps`` timed optimizer steps, seconds of the warm-up step, mean seconds of a timed
    step) of ``trial`` on the length-grouped stream of ``encoded``; ``before_timing`` runs between the warm-up
    and the timed steps (a barrier)."""
    from orchestrator.training import worker

    optim = worker.build_optimisation(trial, spec, steps + 1)
    loss = worker.training_loss(trial.model)
    stream = worker.resume_stream(encoded, spec, worker.LocalSession(), trial.tokenizer, 0)
    warm = worker.new_window(device)
    worker.train_step(loss, trial, optim, stream, spec, 1, 0, warm, device)  # warm-up (and compilation)
    if before_timing is not None:
        before_timing()
    window = worker.new_window(device)
    for step in range(1, steps + 1):
        worker.train_step(loss, trial, optim, stream, spec, 1, step, window, device)
    return window["tokens"] / window["time"], warm["time"], window["time"] / steps


def _child(spec: SearchSpec, data_spec: SearchSpec, config: dict[str, Any], steps: int, barrier: Any,
           out: Any) -> None:
    """One spawned trial: build it as a run does (its data from ``data_spec``), then :func:`train_rate` behind
    ``barrier``; puts its rate."""
    import torch

    from orchestrator.training import worker

    device = torch.device("cpu")
    trial = worker.build_trial_model(spec, config, device)   # sets the trial's threads
    encoded, _, _ = worker.build_training_data(data_spec, trial.tokenizer)
    out.put(train_rate(spec, trial, encoded, steps, device, before_timing=barrier.wait)[0])


def concurrent_rates(spec: SearchSpec, config: dict[str, Any], steps: int, n: int,
                     data_spec: SearchSpec | None = None) -> list[float]:
    """Real training tokens/s of each of ``n`` trials of ``config`` started together in spawned processes, trained
    on the stream of ``data_spec`` (default ``spec``; the calibration passes its shortened data)."""
    ctx = mp.get_context("spawn")   # a fresh interpreter per trial, as Ray's workers are; no forked torch state
    barrier, out = ctx.Barrier(n, timeout=CHILD_TIMEOUT_S), ctx.Queue()
    args = (spec, data_spec or spec, config, steps, barrier, out)
    procs = [ctx.Process(target=_child, args=args, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    rates, deadline = [], time.monotonic() + CHILD_TIMEOUT_S
    try:
        while len(rates) < n:
            try:
                rates.append(out.get(timeout=5))
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"calibration: a concurrent trial process failed (exit codes {failed}) or "
                                       f"ran past {CHILD_TIMEOUT_S} s; its log is above. Fix: the same run alone "
                                       "(--dry-run with max_concurrent_trials: 1) shows the cause")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return rates


def slowdown(alone: float, together: list[float]) -> float:
    """``k = r_1 / mean(r_c)`` (module docstring); never below 1 (timing noise on an idle many-core machine)."""
    return max(1.0, alone / statistics.fmean(together))


def measure_slowdown(spec: SearchSpec, config: dict[str, Any], *, steps: int, slots: int,
                     data_spec: SearchSpec | None = None) -> dict[str, Any]:
    """``{"slots", "slowdown", "alone", "together"}`` for ``slots`` trials of ``config`` at once on this machine's
    CPUs (``slowdown`` 1.0, nothing measured, for one slot or a GPU per slot); data as :func:`concurrent_rates`."""
    if slots <= 1 or spec.resources.gpus_per_worker > 0:
        return {"slots": slots, "slowdown": 1.0, "alone": None, "together": None}
    (alone,) = concurrent_rates(spec, config, steps, 1, data_spec)
    together = concurrent_rates(spec, config, steps, slots, data_spec)
    k = slowdown(alone, together)
    logger.info("calibration: one trial alone %.0f tokens/s, %d at once %s tokens/s each: slowdown %.2f", alone,
                slots, [round(r) for r in together], k)
    return {"slots": slots, "slowdown": k, "alone": alone, "together": together}
