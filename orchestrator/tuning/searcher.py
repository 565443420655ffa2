"""Equal tuning effort: one Optuna study per method, each with the same quota of trials.

With the method as a TPE categorical, the sampler gives more trials to whichever method looks good early, so the
"best" of a method tuned 20 times is compared with the "best" of one tuned 4 times. :class:`PerMethodSearch`
holds one Ray ``OptunaSearch`` per method (its own space, sampler and seed) and hands trial ``k`` to the method
with the fewest trials so far (ties in the space's order), until each has ``num_trials / methods``.

Trials stopped early by ASHA are told to their study as PRUNED, not COMPLETE: Ray's ``OptunaSearch`` tells
COMPLETE with whatever the last result held (a part-budget score), and TPE would then model a 2-evaluation score
as if the configuration had trained fully. Single-objective TPE still sees the pruned trial's intermediate values
(Ray reports them per result); multi-objective studies get no intermediate values (Optuna has none for them).

Each method's study lives in an Optuna journal file (``<storage>/<name>/optuna/<method>.journal``, beside the Tune
state; :func:`journal_dir`), so ``optuna-dashboard`` opens it while the search runs and ``--resume`` keeps it: Ray
pickles this searcher with its experiment, and the unpickled journal storage replays the same file. Trials
suggested after Ray's last searcher checkpoint and restarted by ``--resume`` appear twice in the journal (the
first attempt stays RUNNING there); the report reads the trials from Tune, not from the journal.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import warnings
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from orchestrator.cluster import storage
from orchestrator.spec.space import SearchSpec

logger = logging.getLogger(__name__)


def build_sampler(spec: SearchSpec, max_concurrent: int):
    """The Optuna sampler of a search (single- or multi-objective alike).

    TPE (the default) with ``multivariate=True, group=True`` models the conditional space jointly: ``group``
    splits it into the sub-spaces that occur together (one per method), so each method's hyperparameters are
    modelled from the trials of that method, and with several objectives it is Optuna's MOTPE. With more than
    one trial in flight ``constant_liar`` counts the running trials as bad results, so concurrent proposals
    spread out instead of landing on the same point. NSGA-II evolves only the intersection search space (the
    parameters every trial has), so the spec admits it only for a fixed space (one method; see
    ``orchestrator.spec.space``).
    """
    import optuna

    s = spec.search
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=max(4, min(50, s.num_trials // 2)))
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    with warnings.catch_warnings():  # group is "experimental" in Optuna 5.0 (interface, not results)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=True,
                                          group=True, constant_liar=max_concurrent > 1)


def journal_dir(spec: SearchSpec) -> Path | None:
    """Where the per-method Optuna journals live: ``<storage>/<name>/optuna``; None for a URI storage (a journal
    file needs a local file system with locks: the studies then stay in memory, pickled with the searcher)."""
    if storage.is_uri(spec.storage_path):
        return None
    return Path(spec.storage_path, spec.name, "optuna").resolve()


def study_name(spec: SearchSpec, method: str) -> str:
    return f"{spec.name}.{method}"


def journal_storage(path: Path):
    """An Optuna journal storage on one file (created with its folder)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def dashboard_commands(spec: SearchSpec) -> list[str]:
    """The ``optuna-dashboard`` command per method's journal (empty without journals)."""
    folder = journal_dir(spec)
    if folder is None:
        return []
    return [f"optuna-dashboard {folder / f'{m.kind}.journal'}" for m in spec.methods]


def early_stopped(result: dict | None) -> bool:
    """Whether a trial's last result is short of its full budget (ASHA stopped it)."""
    result = result or {}
    return bool(result.get("total_steps")) and result.get("step", 0) < result["total_steps"]


class PerMethodSearch(Searcher):
    """Ray Tune searcher: per method an ``OptunaSearch`` over that method alone, with equal quotas."""

    def __init__(self, spec: SearchSpec, max_concurrent: int, journals: Path | None = None):
        """``journals``: the folder of the per-method journal files (:func:`journal_dir`); None: in memory."""
        from orchestrator.spec.hparams import ConditionalSpace, optuna_points

        objectives = spec.objectives
        multi = len(objectives) > 1
        metric = list(objectives) if multi else spec.metric
        mode = list(objectives.values()) if multi else objectives[spec.metric]
        super().__init__(metric=metric, mode=mode)
        self.quota = spec.search.num_trials // len(spec.methods)
        self.order = [m.kind for m in spec.methods]
        self.studies: dict[str, OptunaSearch] = {}
        for i, m in enumerate(spec.methods):
            # own seed per method: the studies' random start-up draws are independent, not the same sequence
            own = dataclasses.replace(spec, methods=(m,),
                                      search=dataclasses.replace(spec.search, seed=spec.search.seed + i))
            points = [p for p in spec.search.points_to_evaluate or () if p["method"] == m.kind]
            self.studies[m.kind] = OptunaSearch(
                space=ConditionalSpace((m,)), sampler=build_sampler(own, max_concurrent), metric=metric, mode=mode,
                points_to_evaluate=optuna_points((m,), tuple(points)) or None,
                study_name=study_name(spec, m.kind),
                storage=journal_storage(journals / f"{m.kind}.journal") if journals else None)
        self.method_of: dict[str, str] = {}  # trial id -> method
        self.started = dict.fromkeys(self.order, 0)
        self.pruned: list[str] = []

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return False  # metric, mode and space are ours (Tune then only checks param_space is empty)

    def suggest(self, trial_id: str) -> dict | None:
        left = [k for k in self.order if self.started[k] < self.quota]
        if not left:
            return Searcher.FINISHED
        kind = min(left, key=lambda k: (self.started[k], self.order.index(k)))
        config = self.studies[kind].suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return config
        self.method_of[trial_id] = kind
        self.started[kind] += 1
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.method_of:
            self.studies[self.method_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        kind = self.method_of.get(trial_id)
        if kind is None:
            return
        if not error and early_stopped(result):
            self.pruned.append(trial_id)  # no value: Optuna records the trial as PRUNED
            self.studies[kind].on_trial_complete(trial_id, result=None, error=False)
            return
        self.studies[kind].on_trial_complete(trial_id, result=result, error=error)

    def trials_per_method(self) -> dict[str, int]:
        return dict(self.started)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
