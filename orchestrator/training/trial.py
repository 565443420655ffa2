"""A trial's model (the base with its adapter injected), its optimisation, and where it stands."""

from __future__ import annotations

import contextlib

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator.models.precision import FP32, Precision, keep_freed_memory, plan_run
from orchestrator.spec.hparams import adapter_config, schedule_factor, trial_hparams
from orchestrator.spec.space import SearchSpec

logger = logging.getLogger(__name__)


@dataclass
class TrialModel:
    """The base model with the trial's adapter injected (on ``device``), and what describes it."""

    model: torch.nn.Module
    tokenizer: Any
    method: str
    hparams: dict[str, Any]
    adapter: Any          # the malora adapter config
    counts: Any           # malora.params.ParamCounts
    precision: Precision = FP32        # training's, resolved on the device (orchestrator.models.precision)
    eval_precision: Precision = FP32   # scoring's, on the weights training holds


@dataclass
class Optimisation:
    """AdamW over the trainable (adapter) tensors, its LR schedule and the fp16 loss scaler."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any


@dataclass
class Progress:
    """Where a trial stands: optimizer steps done, real tokens seen, the accuracies of earlier evaluations, and
    (restored from a state saved between evaluations, ``training.partial``) the open window's accumulators."""

    step: int = 0
    tokens: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    window: dict[str, Any] | None = None


def build_trial_model(spec: SearchSpec, trial_config: dict[str, Any], device: torch.device) -> TrialModel:
    """Load the base model (seeded), inject the adapter that ``trial_config`` describes, move it to ``device``."""
    from malora.inject import inject_adapters
    from malora.params import count_parameters
    from orchestrator.models.loading import load_model

    if device.type == "cpu":
        torch.set_num_threads(max(1, int(round(spec.resources.cpus_per_worker))))
        keep_freed_memory()  # no fresh zero-filled pages for every step's activations
    precision, eval_precision = plan_run(spec.model.dtype, spec.train.precision, spec.eval.precision, device)
    logger.info("precision: train %s, eval %s (%s)", precision.name, eval_precision.name, precision.reason)
    torch.manual_seed(spec.train.seed)
    model, tokenizer = load_model(spec.model.name, dtype=precision.weights, device=str(device),
                                  cache_dir=spec.model.cache_dir, seed=spec.train.seed)
    method, hp = trial_hparams(spec.methods, trial_config)
    cfg = adapter_config(method, hp, num_layers=getattr(model.config, "num_hidden_layers", None))
    inject_adapters(model, cfg)
    model.to(device)
    if spec.train.compile:
        from malora.compile import compile_blocks

        logger.info("torch.compile: %d decoder blocks (compiled at the first step)", len(compile_blocks(model)))
    return TrialModel(model, tokenizer, method, hp, cfg, count_parameters(model), precision, eval_precision)


def build_optimisation(trial: TrialModel, spec: SearchSpec, steps: int) -> Optimisation:
    """AdamW (trial's lr/weight decay, else the spec's) with linear warm-up then the spec's decay schedule."""
    train, hp = spec.train, trial.hparams
    lr, wd = hp.get("lr", train.lr), hp.get("weight_decay", train.weight_decay)
    warmup = int(round(hp.get("warmup_ratio", train.warmup_ratio) * steps))
    params = [p for p in trial.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule_factor(s, steps, warmup, train.schedule))
    device_type = next(trial.model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type, enabled=train.precision == "fp16")  # fp16 needs loss scaling
    return Optimisation(params, opt, sched, scaler)


def training_loss(model: torch.nn.Module) -> torch.nn.Module:
    """The module the session prepares (DDP wraps): the LM loss with the head at response positions only."""
    from orchestrator.training.loss import ResponseLoss

    return ResponseLoss(model)


def eager_scoring() -> contextlib.AbstractContextManager:
    """Scoring runs compiled blocks (``train.compile``) eagerly: under no_grad they would compile a second time,
    for a few hundred items a window; a no-op on a model without compiled modules (and on a torch before 2.6,
    which has no stances: there scoring compiles once more)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
