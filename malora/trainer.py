"""malora in Hugging Face's ``Trainer`` and TRL's ``SFTTrainer``: balance loss, routing logs, adapter checkpoints.

    from malora.trainer import AdapterTrainer, with_adapters
    inject_adapters(model, MALoRAConfig(balance_coef=0.01, ...))
    AdapterTrainer(model=model, args=TrainingArguments(...), train_dataset=ds).train()
    with_adapters(SFTTrainer)(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok).train()

What :class:`AdapterTrainerMixin` adds to a trainer class (it goes first in the bases, before the trainer):

- **Balance loss**: every training forward of the model (grad enabled, train mode) leaves its routers' balance
  loss ``collect_aux_loss(model)`` (the config's ``balance_coef`` is the coefficient: one knob, as in the papers
  and ``orchestrator``); ``compute_loss`` adds the mean over the forwards it ran to the trainer's loss, so it is
  in the same backward call (which reentrant checkpointing needs, :mod:`malora.deferred_aux`). A forward hook
  collects it, not ``compute_loss`` after the fact: TRL's ``SFTTrainer`` may run a second, ``no_grad`` forward
  for its metrics, whose balance loss has no graph. Scale: the trainer divides its loss by the accumulation
  steps unless the loss was already normalised by ``num_items_in_batch`` (``Trainer.training_step``); in that
  case the balance term is divided here, so with accumulation G each micro-batch weighs 1/G either way.
- **Logs** through the trainer's own ``log`` (so every ``report_to`` reporter, MLflow included, receives them),
  on each training log: ``balance_loss`` (mean over the micro-batches since the last log, and over ranks),
  ``routing/max_share`` / ``routing/min_share`` (the largest and smallest expert share over all routed
  layers: 1/N each when balanced) and, with ``log_layer_routing`` (default True), ``routing/<layer>/e<i>``,
  the share of token-slots expert i of that layer received since the last log (real tokens only; counts summed
  over ranks). The counts are then reset.
- **Checkpoints**: :class:`AdapterCheckpointCallback` writes ``save_adapter`` into ``checkpoint-<step>/adapter``
  beside the trainer's own files; ``load_adapter(base_model, ".../checkpoint-<step>/adapter")`` restores it.

``nn.DataParallel`` (several GPUs without torchrun) is refused at the first forward: launch with ``torchrun``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from malora.checkpoint import save_adapter
from malora.config import ConfigError
from malora.inject import adapter_context, collect_aux_loss, reset_routing_stats, routing_stats
from malora.routing import in_backward

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
"""Sub-folder of each ``checkpoint-<step>`` folder that holds the adapter (adapter_config.json + safetensors)."""


class AdapterCheckpointCallback(TrainerCallback):
    """Saves the model's adapter into ``<output_dir>/checkpoint-<step>/adapter`` whenever the trainer saves."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        ctx = adapter_context(model)
        if ctx is None:
            raise ConfigError("AdapterCheckpointCallback: the model has no malora adapters. Fix: call "
                              "malora.inject_adapters(model, cfg) before building the trainer.")
        out = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / ADAPTER_DIR
        save_adapter(model, ctx.config, out)


class AdapterTrainerMixin:
    """Adds the balance loss, routing logs and adapter checkpoints to a ``transformers.Trainer`` subclass.

    Use it first in the bases (``class MyTrainer(AdapterTrainerMixin, SFTTrainer)``) or through
    :func:`with_adapters`; see the module docstring for what each part does.
    """

    log_layer_routing: bool = True
    """Log every routed layer's expert shares (N metrics per layer); False keeps only the two summaries."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if adapter_context(self.model) is None:
            raise ConfigError(f"{type(self).__name__}: the model has no malora adapters. Fix: call "
                              "malora.inject_adapters(model, cfg) before building the trainer.")
        self._balance_terms: list[torch.Tensor] = []       # this compute_loss call's training forwards
        self._balance_seen: list[torch.Tensor] = []        # detached, since the last log
        self.model.register_forward_hook(self._collect_balance)
        self.add_callback(AdapterCheckpointCallback())

    def _collect_balance(self, module, args, output) -> None:
        if module.training and torch.is_grad_enabled() and not in_backward():
            self._balance_terms.append(collect_aux_loss(module))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._balance_terms = []
        # return_outputs passed through: asking for outputs costs TRL's SFTTrainer an extra forward
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        terms, self._balance_terms = self._balance_terms, []
        if terms:
            balance = torch.stack(terms).mean()
            self._balance_seen.append(balance.detach())
            loss = loss + balance.to(loss.dtype) * self._balance_scale(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _balance_scale(self, num_items_in_batch) -> float:
        """1/G when ``training_step`` will not divide the loss by the accumulation steps G (its own rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                      or self.compute_loss_func is not None)
        return 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:                                  # a training log (evaluation keys start with eval_)
            logs.update(self._adapter_metrics())
        super().log(logs, *args, **kwargs)

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return t
        return self.accelerator.reduce(t.to(self.args.device), reduction="sum").cpu()

    def _adapter_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        seen, self._balance_seen = self._balance_seen, []
        if seen:
            total = self._sum_over_ranks(torch.stack([torch.stack(seen).float().mean().cpu(), torch.ones(())]))
            metrics["balance_loss"] = float(total[0] / total[1])   # mean over ranks
        counts = routing_stats(self.model, counts=True)         # per layer (N,) int64, this rank's
        if counts:
            flat = self._sum_over_ranks(torch.cat(list(counts.values())).double())
            shares = []
            for (name, c), total in zip(counts.items(), flat.split([c.numel() for c in counts.values()])):
                if total.sum() > 0:
                    share = total / total.sum()
                    shares.append(share)
                    if self.log_layer_routing:
                        metrics.update({f"routing/{name}/e{i}": float(s) for i, s in enumerate(share)})
            if shares:
                metrics["routing/max_share"] = float(max(s.max() for s in shares))
                metrics["routing/min_share"] = float(min(s.min() for s in shares))
            reset_routing_stats(self.model)
        return metrics


def with_adapters(trainer_cls: type) -> type:
    """``trainer_cls`` (``Trainer`` or a subclass, e.g. TRL's ``SFTTrainer``) with :class:`AdapterTrainerMixin`."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"with_adapters expects transformers.Trainer or a subclass, got {trainer_cls!r}")
    return type(f"Adapter{trainer_cls.__name__}", (AdapterTrainerMixin, trainer_cls), {})


class AdapterTrainer(AdapterTrainerMixin, Trainer):
    """``transformers.Trainer`` with malora's balance loss, routing logs and adapter checkpoints."""
