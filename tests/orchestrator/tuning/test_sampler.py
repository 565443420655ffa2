"""The search's Optuna sampler over the real conditional space (no Ray): its proposals follow the history
(single- and multi-objective), and with trials in flight the constant liar spreads them out."""

from __future__ import annotations

import dataclasses
import math
import statistics
import warnings
from pathlib import Path

import optuna
import pytest

from orchestrator.spec.hparams import ConditionalSpace
from orchestrator.spec.space import load_space
from orchestrator.tuning.searcher import build_sampler

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"
MULTI = {"val/mean_acc": "max", "trainable_params": "min"}


@pytest.fixture()
def smoke(shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return load_space(SPACES / "smoke.yaml")


def _with_objectives(spec, objectives):
    return dataclasses.replace(spec, search=dataclasses.replace(spec.search, objectives=objectives))


def accuracy(params: dict, best_beta: float) -> float:
    """Synthetic val/mean_acc: MALoRA peaks at beta = best_beta, lr = 10^-2.5; LoRA is flat and worse."""
    if params["method"] == "lora":
        return 0.3
    return 1 - 10 * (params["malora.beta"] - best_beta) ** 2 - 0.1 * (math.log10(params["malora.lr"]) + 2.5) ** 2


def malora_betas(spec, sampler, best_beta: float, multi: bool, n: int = 30, skip: int = 10) -> list[float]:
    """The malora.beta proposals after the first ``skip`` trials of a study told ``accuracy`` (and, multi-objective,
    a size objective that ranks every LoRA trial below every MALoRA one)."""
    space = ConditionalSpace(spec.methods)
    study = optuna.create_study(directions=["maximize", "minimize"] if multi else ["maximize"], sampler=sampler)
    out = []
    for i in range(n):
        trial = study.ask()
        space(trial)
        p = trial.params
        size = p.get("malora.d", 100)
        study.tell(trial, [accuracy(p, best_beta), size] if multi else accuracy(p, best_beta))
        if i >= skip and p["method"] == "malora":
            out.append(p["malora.beta"])
    return out


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi-objective"])
def test_proposals_follow_the_history_of_the_conditional_space(smoke, multi):
    """Same seed, two histories whose best MALoRA beta differs (1.45 vs 1.05): the default sampler's later beta
    proposals move to each optimum. Independent draws (RandomSampler, same seed) give the same betas whatever the
    history, which is what NSGA-II does with every parameter outside the intersection space (all but method)."""
    spec = _with_objectives(smoke, MULTI if multi else smoke.objectives)
    hi = malora_betas(spec, build_sampler(spec, 1), 1.45, multi)
    lo = malora_betas(spec, build_sampler(spec, 1), 1.05, multi)
    assert len(hi) >= 5 and len(lo) >= 5
    assert statistics.mean(hi) - statistics.mean(lo) > 0.2, (hi, lo)
    assert statistics.mean(abs(b - 1.45) for b in hi) < 0.1 and statistics.mean(abs(b - 1.05) for b in lo) < 0.1
    random_hi = malora_betas(spec, optuna.samplers.RandomSampler(seed=0), 1.45, multi)
    random_lo = malora_betas(spec, optuna.samplers.RandomSampler(seed=0), 1.05, multi)
    assert random_hi == random_lo  # independent draws ignore the history
    # and land far from the optimum on average: the model, not luck, brings TPE there
    assert statistics.mean(abs(b - 1.45) for b in random_hi) > 2 * statistics.mean(abs(b - 1.45) for b in hi)


def test_constant_liar_spreads_concurrent_proposals(smoke):
    """Four proposals asked while none has reported: with concurrency (constant liar) they spread over beta;
    one trial at a time (no liar) the same history gives near-duplicates."""
    def pending_betas(max_concurrent: int) -> list[float]:
        space = ConditionalSpace(smoke.methods)
        study = optuna.create_study(direction="maximize", sampler=build_sampler(smoke, max_concurrent))
        for _ in range(12):
            trial = study.ask()
            space(trial)
            study.tell(trial, accuracy(trial.params, 1.45))
        out = []
        for _ in range(4):  # asked, never told: running trials
            trial = study.ask()
            space(trial)
            out.append(trial.params.get("malora.beta", float("nan")))
        return out

    spread, dupes = pending_betas(2), pending_betas(1)
    assert all(not math.isnan(b) for b in spread + dupes)
    assert statistics.pstdev(spread) > 2 * statistics.pstdev(dupes), (spread, dupes)


def test_sampler_choice(smoke):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's ExperimentalWarning for group is silenced, nothing else raised
        tpe = build_sampler(smoke, 3)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    one = dataclasses.replace(smoke, methods=smoke.methods[:1],
                              search=dataclasses.replace(smoke.search, sampler="nsga2", objectives=MULTI))
    assert isinstance(build_sampler(one, 2), optuna.samplers.NSGAIISampler)
