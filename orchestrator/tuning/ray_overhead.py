"""The cores Ray's own processes take while a search's trials run: measured, for the estimate.

Ray is not free on a small machine. While trials train, the raylet, GCS and dashboard, and per trial its Tune
driver, Train controller, report queue, placement-group cleaner, preemption watcher and dataset manager each wake
a few times a second. On the 2-core EPYC they took ~0.3 of a core together while two trials trained
(``benchmarks/README.md``, "Two trials at once"), so two one-thread trials shared 1.7 cores, and each trained
~1.2x slower than two bare processes do (``tuning.contention``, which has no Ray).

Measured as the CPU time of this process and every process it started (Ray's GCS, raylet, dashboard and their
workers: ``psutil``) over a window while ``c`` trials of the search's own shape sit in their training loop (a
Tune function trainable that fits a ``TorchTrainer`` with ``TuneReportCallback``, the space's resources and the
search's Ray settings). Their loop only sleeps and reports every few seconds, so the CPU counted is Ray's (``o``
cores); other jobs on the machine are not counted (they slow Ray's processes a little, not the sum much).
The estimate turns it into a factor on each run's time: the trials' share of what Ray leaves,

    f = max(1, c · n / (C - o))

with ``C`` the machine's logical CPUs and ``n`` the CPUs one trial computes on (threads x workers): 1 on a machine
with cores to spare. Real trials also print progress and report results, so ``o`` is a floor.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.spec.space import SearchSpec

logger = logging.getLogger(__name__)
START_TIMEOUT_S = 300   # the trials' Ray start on a loaded 2-core machine takes ~30 s; a hang fails the measurement


def tree_cpu_seconds() -> dict[int, float]:
    """pid -> user + system CPU seconds of this process and each of its descendants alive now."""
    import psutil

    out = {}
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.Error:   # ended between the listing and the read
            pass
    return out


def tree_cores(window_s: float) -> float:
    """Cores this process tree keeps busy on average over the next ``window_s`` seconds (a process started in the
    window counts from zero, one that ended in it is lost: a floor)."""
    t0, before = time.monotonic(), tree_cpu_seconds()
    time.sleep(window_s)
    after = tree_cpu_seconds()
    return sum(t - before.get(pid, 0.0) for pid, t in after.items()) / (time.monotonic() - t0)


def ray_factor(ray_cores: float, slots: int, trial_cpus: float, cpus: float) -> float:
    """``f = max(1, c · n / (C - o))`` (module docstring); Ray taking the whole machine leaves each trial 5 %."""
    free = max(cpus - ray_cores, 0.05 * slots * trial_cpus)
    return max(1.0, slots * trial_cpus / free)


def trial_cpus(spec: SearchSpec) -> float:
    """``n``: the CPUs one trial computes on, its torch threads on each of its workers."""
    res = spec.resources
    return max(1, int(round(res.cpus_per_worker))) * res.workers_per_trial


def _idle_loop(config: dict[str, Any]) -> None:
    """Train worker: mark that it runs, then sleep and report until the stop file appears (or ``max_s``)."""
    import ray.train

    folder = Path(config["dir"])
    (folder / f"started-{os.getpid()}").touch()
    deadline, i = time.monotonic() + config["max_s"], 0
    while not (folder / "stop").exists() and time.monotonic() < deadline:
        time.sleep(config["report_every_s"])
        i += 1
        ray.train.report({"reports": i})


def _idle_trial(config: dict[str, Any], spec: SearchSpec) -> None:
    """Tune function trainable shaped as ``training.driver.trial_driver``: one TorchTrainer of :func:`_idle_loop`."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = spec.resources
    TorchTrainer(
        _idle_loop, train_loop_config={k: config[k] for k in ("dir", "max_s", "report_every_s")},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers_per_trial,
            resources_per_worker={"CPU": max(0.01, res.cpus_per_worker - res.trial_driver_cpus)}),
        run_config=ray.train.RunConfig(name=f"idle-{os.getpid()}", storage_path=config["storage"],
                                       callbacks=[TuneReportCallback()]),
    ).fit()


def measure_ray_cores(spec: SearchSpec, slots: int, *, window_s: float = 20.0, report_every_s: float = 5.0
                      ) -> dict[str, Any]:
    """``{"ray_cores", "started"}``: the cores Ray's processes take while ``slots``
    idle trials of ``spec``'s shape run (module docstring), on a local Ray started here and stopped after.

    Raises RuntimeError when the trials do not all start within ``START_TIMEOUT_S``."""
    from orchestrator.cluster.runtime import init_ray, prepare_env

    prepare_env(None)
    import ray
    from ray import tune

    if ray.is_initialized():
        raise RuntimeError("measure_ray_cores starts its own local Ray; this process already runs one")
    with tempfile.TemporaryDirectory(prefix="malora-rayov-", ignore_cleanup_errors=True) as tmp:
        folder = Path(tmp)
        init_ray(None, temp_dir=str(folder / "ray"))
        config = {"dir": str(folder), "storage": str(folder / "storage"),
                  "max_s": START_TIMEOUT_S + window_s + 60, "report_every_s": report_every_s}
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_idle_trial, spec=spec), {"cpu": spec.resources.trial_driver_cpus}),
            param_space=config,
            tune_config=tune.TuneConfig(num_samples=slots, max_concurrent_trials=slots),
            run_config=tune.RunConfig(name="ray_overhead", storage_path=str(folder / "storage"), verbose=0))
        failure: list[BaseException] = []
        fit = threading.Thread(target=lambda: _run(tuner, failure), daemon=True)
        fit.start()
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while len(started := list(folder.glob("started-*"))) < slots:
                if failure or not fit.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"Ray overhead: {len(started)} of {slots} idle trials started within "
                                       f"{START_TIMEOUT_S} s" + (f" ({failure[0]!r})" if failure else ""))
                time.sleep(0.5)
            time.sleep(report_every_s)   # past the workers' start-up, into their steady loop
            cores = tree_cores(window_s)
        finally:
            (folder / "stop").touch()
            fit.join(timeout=120)
            ray.shutdown()
    logger.info("calibration: Ray's processes take %.2f cores while %d trials run", cores, slots)
    return {"ray_cores": cores, "started": len(started)}


def _run(tuner: Any, failure: list[BaseException]) -> None:
    try:
        tuner.fit()
    except BaseException as exc:  # noqa: BLE001 - reported by the waiting thread
        failure.append(exc)
