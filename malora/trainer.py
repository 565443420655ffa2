"""malora in Hugging Face's ``Trainer`` and TRL's ``SFTTrainer``: balance loss, routing logs, adapter saves.

    from malora.trainer import AdapterTrainer, with_adapters
    inject_adapters(model, MALoRAConfig(balance_coef=0.01, ...))
    AdapterTrainer(model=model, args=TrainingArguments(...), train_dataset=ds).train()
    with_adapters(SFTTrainer)(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok).train()

What :class:`AdapterTrainerMixin` adds to a trainer class (it goes first in the bases, before the trainer):

- **Balance loss**: every *training forward* of the model (train mode, grad enabled when the model's forward
  starts, not a checkpoint recomputation) leaves its routers' balance loss ``collect_aux_loss(model)`` (the
  config's ``balance_coef`` is the coefficient); ``compute_loss`` adds the mean over the training forwards it
  ran, in the same backward call (which reentrant checkpointing needs, :mod:`malora.deferred_aux`). A forward
  hook collects it: TRL's ``SFTTrainer`` may run extra ``no_grad`` forwards, whose balance loss has no graph.
  Scale: with accumulation G each micro-batch's term weighs 1/G whether or not ``training_step`` divides the
  loss (it does not when the loss was normalised by ``num_items_in_batch``).
- **Logs** through the trainer's own ``log`` (every ``report_to`` reporter, MLflow included), on each training
  log: ``loss`` is the LM loss alone, the number ``eval_loss`` is comparable with; ``balance_loss`` is the
  balance term (mean over the micro-batches since the last log, and over ranks), so ``loss + balance_loss`` is
  the objective. ``routing/max_share`` / ``routing/min_share`` (largest / smallest expert share over all routed
  layers: 1/N each when balanced) and, with ``log_layer_routing``, ``routing/<layer>/e<i>``, the share of
  token-slots expert i of that layer received in the training forwards since the last log (real tokens only,
  counts summed over ranks). Only training forwards count, the ones whose routing the optimizer step acts on:
  not the evaluation's (eval mode), not a ``no_grad`` forward in train mode (TRL's metric forward of the same
  batch, which counted every token twice), not a checkpoint recomputation. The routers' own counts
  (``routing_stats``) are left alone.
- **Per-task routing** (issue 31) when the train dataset has a task column (``task_column=``, default
  ``"task"`` if present): the names ride beside each batch (:class:`TaskCollator`), a router hook splits each
  training forward's token-slots by the task of their row, and each training log adds, from the per-layer
  task x expert counts C_l (T, N): ``routing/<task>/e<i>`` = mean over layers of C_l[t, i] / sum_j C_l[t, j]
  (``routing/<task>/n<N>/e<i>`` when layers differ in N), and :func:`task_expert_metrics`'s
  ``routing_mi`` / ``routing_mi_norm`` / ``routing_entropy/<task>`` / ``routing_max_share``.
- **Saving**: ``save_model`` (so ``push_to_hub``) and every ``checkpoint-<step>`` hold the adapter
  (``adapter_config.json`` + ``adapter_model.safetensors``, :func:`malora.save_adapter`), never the frozen base;
  a checkpoint adds the trainer's optimizer, scheduler, RNG and ``trainer_state.json``.
  ``resume_from_checkpoint`` and ``load_best_model_at_end`` load the adapter back;
  ``load_adapter(base_model, folder)`` restores a trained model from any of them.

The hooks live only while ``train`` runs: a second trainer on the same model finds none of the first's, and a
finished trainer (with its optimizer) is not kept alive by the model. Refused: FSDP and DeepSpeed ZeRO-3 when the
trainer is built (their parameters are shards, which the adapter files would hold; :func:`refuse_sharded`),
``nn.DataParallel`` at the first forward (launch with ``torchrun``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from malora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from malora.config import ConfigError
from malora.diagnostics import task_expert_metrics
from malora.inject import adapter_context, adapter_layers, collect_aux_loss
from malora.routing import in_backward

log = logging.getLogger(__name__)

TASK_KEY = "malora_tasks"
"""Batch key under which :class:`TaskCollator` hands the trainer the B task names (taken out before the model)."""


class TaskCollator:
    """Wraps a data collator: takes the task column out of each feature, collates the rest, and adds the B
    task names under :data:`TASK_KEY` (collators pad tensors and drop or choke on strings)."""

    def __init__(self, collator: Any, column: str) -> None:
        self.collator, self.column = collator, column

    def __call__(self, features: list) -> Any:
        if not features or not all(isinstance(f, Mapping) and self.column in f for f in features):
            return self.collator(features)                  # e.g. an evaluation set without the column
        batch = self.collator([{k: v for k, v in f.items() if k != self.column} for f in features])
        batch[TASK_KEY] = [str(f[self.column]) for f in features]
        return batch


def dataset_tasks(dataset: Any, column: str | None, owner: str) -> tuple[str | None, list[str] | None]:
    """(task column, its sorted distinct values as str) of a map-style train dataset; (None, None) when
    ``column`` is None and the dataset has no ``"task"`` column. The list is fixed before training so that every
    rank indexes the tasks alike (the per-task counts are summed over ranks by position)."""
    wanted = column or "task"
    names = getattr(dataset, "column_names", None)
    if names is None and dataset is not None and hasattr(dataset, "__len__") and len(dataset):
        first = dataset[0]
        names = list(first) if isinstance(first, Mapping) else None
    if names is None or wanted not in names:
        if column is not None:
            raise ConfigError(f"{owner}: task_column={column!r} is not a column of the train dataset "
                              f"(columns: {names}). Fix: name the column that holds each example's task.")
        return None, None
    if not hasattr(dataset, "__len__"):
        if column is not None:
            raise ConfigError(f"{owner}: task_column={column!r} needs a map-style train dataset (an iterable one "
                              "cannot list its tasks before training). Fix: pass a datasets.Dataset or a list.")
        log.warning("%s: the iterable train dataset has a %r column; per-task routing is not logged", owner, wanted)
        return None, None
    values = dataset.unique(wanted) if hasattr(dataset, "unique") else {dataset[i][wanted] for i in range(len(dataset))}
    return wanted, sorted({str(v) for v in values})


def task_metrics(counts: dict[str, torch.Tensor], tasks: list[str]) -> dict[str, float]:
    """``routing/<task>/e<i>`` (mean over layers of the task's share p(e | t); layers grouped by N) for the tasks
    with tokens since the last log, and :func:`malora.diagnostics.task_expert_metrics` of the per-layer task x
    expert token-slot counts ``counts`` (layer -> (T, N), rows in ``tasks`` order)."""
    mats = {layer: c.numpy() for layer, c in counts.items()}
    by_n: dict[int, list[np.ndarray]] = {}
    for m in mats.values():
        by_n.setdefault(m.shape[1], []).append(m / np.maximum(m.sum(1, keepdims=True), 1.0))   # (T, N) p(e | t)
    present = [j for j, _ in enumerate(tasks) if any(m[j].sum() > 0 for m in mats.values())]
    out: dict[str, float] = {}
    for n, shares in sorted(by_n.items()):
        mean = np.mean(shares, axis=0)                                 # (T, N) over the layers
        group = "" if len(by_n) == 1 else f"n{n}/"
        out.update({f"routing/{tasks[j]}/{group}e{i}": float(mean[j, i]) for j in present for i in range(n)})
    if present:
        out.update(task_expert_metrics(mats, tasks))
    return out


def refuse_sharded(trainer: Trainer) -> None:
    """ConfigError under FSDP or DeepSpeed ZeRO-3: each rank holds shards of the adapter tensors, so
    ``save_adapter`` would write partial tensors (and resume would load them into the wrong slices)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    engine = ("FSDP" if getattr(trainer, "is_fsdp_enabled", False)
              else "DeepSpeed ZeRO-3" if getattr(plugin, "zero_stage", None) == 3 else None)
    if engine:
        raise ConfigError(f"{type(trainer).__name__}: {engine} shards the adapter tensors across ranks, and "
                          "malora saves whole adapter tensors. Fix: train with DDP (torchrun, no fsdp / ZeRO-3 "
                          "setting) or DeepSpeed ZeRO-1/2: the adapters are small, only the frozen base is large.")


class AdapterTrainerMixin:
    """Adds the balance loss, routing logs and adapter saving to a ``transformers.Trainer`` subclass.

    Use it first in the bases (``class MyTrainer(AdapterTrainerMixin, SFTTrainer)``) or through
    :func:`with_adapters`; see the module docstring for what each part does. ``task_column``: the train
    dataset's column naming each example's task (None: ``"task"`` when the dataset has it).
    """

    log_layer_routing: bool = True
    """Log every routed layer's expert shares (N metrics per layer); False keeps only the summaries."""

    def __init__(self, *args: Any, task_column: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if adapter_context(self.model) is None:
            raise ConfigError(f"{type(self).__name__}: the model has no malora adapters. Fix: call "
                              "malora.inject_adapters(model, cfg) before building the trainer.")
        refuse_sharded(self)
        self._balance_terms: list[torch.Tensor] = []       # this compute_loss call's training forwards
        self._balance_seen: list[torch.Tensor] = []        # detached, since the last log
        self._balance_in_step: torch.Tensor | None = None  # its share of training_step's returned loss
        self._handles: list[Any] = []
        self._training_forward, self._depth = False, 0
        self._routers: dict[str, torch.nn.Module] = {}
        self._snapshot: list[torch.Tensor] = []
        self._counts: dict[str, torch.Tensor] = {}        # layer -> (N,) token-slots, training forwards
        self._task_counts: dict[str, torch.Tensor] = {}   # layer -> (T, N) the same split by task
        self._row_tasks: torch.Tensor | None = None       # (B,) task ids of the batch being trained on
        self.task_column, self.tasks = dataset_tasks(self.train_dataset, task_column, type(self).__name__)
        if self.task_column is not None:
            self.data_collator = TaskCollator(self.data_collator, self.task_column)
            self._signature_columns = None                 # recomputed with the task column kept

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.task_column is not None and self.task_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.task_column]

    # ------------------------------------------------------------------------------------ hooks
    def _inner_training_loop(self, *args: Any, **kwargs: Any):
        """The hooks exist only while training runs (``model_init`` may build a new model per trial)."""
        self._install(self.model)
        try:
            return super()._inner_training_loop(*args, **kwargs)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles, self._training_forward, self._depth, self._row_tasks = [], False, 0, None

    def _install(self, model: torch.nn.Module) -> None:
        if adapter_context(model) is None:
            raise ConfigError(f"{type(self).__name__}: the model to train has no malora adapters. Fix: inject "
                              "them in model_init (malora.inject_adapters(model, cfg)) before returning it.")
        self._routers = {name: layer.lora_router for name, layer in adapter_layers(model)
                         if hasattr(layer, "lora_router")}
        self._counts = {name: torch.zeros_like(r.expert_counts) for name, r in self._routers.items()}
        self._task_counts = {name: c.new_zeros(len(self.tasks or ()), c.numel()) for name, c in self._counts.items()}
        self._balance_seen = []
        self._handles = [model.register_forward_pre_hook(self._forward_starts, with_kwargs=True),
                         model.register_forward_hook(self._forward_ends, with_kwargs=True, always_call=True)]
        if self.tasks:
            self._handles += [router.register_forward_hook(self._count_tasks(name), with_kwargs=True)
                              for name, router in self._routers.items()]

    @torch.compiler.disable
    def _forward_starts(self, module, args, kwargs) -> None:
        self._depth += 1
        if self._depth == 1:
            self._training_forward = module.training and torch.is_grad_enabled() and not in_backward()
            if self._training_forward:       # the counts before it: this forward's own are the difference
                self._snapshot = [r.expert_counts.clone() for r in self._routers.values()]

    @torch.compiler.disable
    def _forward_ends(self, module, args, kwargs, output) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth or not self._training_forward:
            return
        self._training_forward = False
        for (name, router), before in zip(self._routers.items(), self._snapshot):
            self._counts[name] += router.expert_counts - before
        if output is not None:                       # None: the forward raised
            self._balance_terms.append(collect_aux_loss(module))

    def _count_tasks(self, name: str):
        """Router hook: this layer's token-slots of a training forward, by the task of their row, into (T, N)."""
        @torch.compiler.disable
        def hook(router, args, kwargs, output) -> None:
            if not self._training_forward or self._row_tasks is None or not kwargs.get("count", True):
                return
            rows = args[1] if len(args) > 1 else kwargs.get("rows")           # (T,) bool or None
            idx = output.idx if output.idx is not None else output.probs.argmax(-1, keepdim=True)   # (T, k)
            T, k = idx.shape
            B = self._row_tasks.numel()
            if T % B:
                raise RuntimeError(f"{name}: a routed input of {T} rows is not the batch's {B} rows x positions, so "
                                   "its tokens cannot be given their row's task. Fix: drop the task column.")
            task = self._row_tasks.to(idx.device).repeat_interleave(T // B)   # (T,): rows are (B, S) flattened
            counts = self._task_counts[name]
            weight = (torch.ones_like(idx) if rows is None else rows[:, None].expand(T, k).to(idx.dtype))
            flat = (task[:, None] * counts.shape[1] + idx).reshape(-1)         # (T*k,) cell of (task, expert)
            counts.view(-1).scatter_add_(0, flat, weight.reshape(-1))
        return hook

    def _prepare_inputs(self, inputs):
        tasks = inputs.pop(TASK_KEY, None) if isinstance(inputs, Mapping) else None
        inputs = super()._prepare_inputs(inputs)
        self._row_tasks = None
        if tasks is not None and self.model.training and self.tasks:
            ids = inputs.get("input_ids")
            if ids is not None and ids.shape[0] != len(tasks):
                raise ConfigError(
                    f"{type(self).__name__}: task_column {self.task_column!r} gives {len(tasks)} tasks for a batch of "
                    f"{ids.shape[0]} rows (packing or padding-free batches join examples). Fix: turn packing / "
                    "padding_free off, or drop the task column.")
            unknown = sorted(set(tasks) - set(self.tasks))
            if unknown:
                raise ConfigError(f"{type(self).__name__}: tasks {unknown} are not among the train dataset's "
                                  f"{self.tasks} (listed when the trainer was built). Fix: rebuild the trainer.")
            self._row_tasks = torch.tensor([self.tasks.index(t) for t in tasks], dtype=torch.long,
                                           device=self.args.device)
        return inputs

    # ------------------------------------------------------------------------------------- loss
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
            # whichever way training_step scales, the balance term's part of the loss it returns is balance / G
            self._balance_in_step = balance.detach() / self.current_gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    def _balance_scale(self, num_items_in_batch) -> float:
        """1/G when ``training_step`` will not divide the loss by the accumulation steps G (its own rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                      or self.compute_loss_func is not None)
        return 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The LM part of the step's loss (what the trainer sums into the logged ``loss``); backward saw both."""
        self._balance_in_step = None
        loss = super().training_step(*args, **kwargs)
        if self._balance_in_step is not None:
            loss = loss - self._balance_in_step.to(loss.device, loss.dtype)
        return loss

    # -------------------------------------------------------------------------------------- logs
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:                                  # a training log (evaluation keys start with eval_)
            logs.update(self._adapter_metrics())
        super().log(logs, *args, **kwargs)

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return t.cpu()
        return self.accelerator.reduce(t.to(self.args.device), reduction="sum").cpu()

    def _summed(self, counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``counts`` summed over ranks (one all-reduce), as float64 on the CPU, then zeroed here."""
        if not counts:
            return {}
        flat = self._sum_over_ranks(torch.cat([c.reshape(-1) for c in counts.values()]).double())
        out = {name: part.view(c.shape) for (name, c), part in
               zip(counts.items(), flat.split([c.numel() for c in counts.values()]))}
        for c in counts.values():
            c.zero_()
        return out

    def _adapter_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        seen, self._balance_seen = self._balance_seen, []
        if seen:
            total = self._sum_over_ranks(torch.stack([torch.stack(seen).float().mean().cpu(), torch.ones(())]))
            metrics["balance_loss"] = float(total[0] / total[1])   # mean over ranks
        shares = []
        for name, total in self._summed(self._counts).items():
            if total.sum() > 0:
                share = total / total.sum()
                shares.append(share)
                if self.log_layer_routing:
                    metrics.update({f"routing/{name}/e{i}": float(s) for i, s in enumerate(share)})
        if shares:
            metrics["routing/max_share"] = float(max(s.max() for s in shares))
            metrics["routing/min_share"] = float(min(s.min() for s in shares))
        if self.tasks:
            metrics.update(task_metrics(self._summed(self._task_counts), self.tasks))
        return metrics

    # ------------------------------------------------------------------------------------ saving
    def _unwrapped(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter (not the model's state dict) plus the processing class and the training arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self._unwrapped()
        save_adapter(model, adapter_context(model).config, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if not (Path(resume_from_checkpoint) / CONFIG_NAME).is_file():   # a checkpoint of the full model
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter(self._unwrapped(model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not (Path(best) / CONFIG_NAME).is_file():
            return super()._load_best_model()
        log.info("loading the best adapter from %s (score %s)", best, self.state.best_metric)
        load_adapter(self._unwrapped(), best)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The adapter files go to the pushed folder too (the trainer copies them only when peft is installed)."""
        if self.is_world_process_zero():
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                if (Path(checkpoint_folder) / name).is_file():
                    shutil.copy(Path(checkpoint_folder) / name, Path(self.args.output_dir) / name)
        super()._push_from_checkpoint(checkpoint_folder)


def with_adapters(trainer_cls: type) -> type:
    """``trainer_cls`` (``Trainer`` or a subclass, e.g. TRL's ``SFTTrainer``) with :class:`AdapterTrainerMixin`."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"with_adapters expects transformers.Trainer or a subclass, got {trainer_cls!r}")
    return type(f"Adapter{trainer_cls.__name__}", (AdapterTrainerMixin, trainer_cls), {})


class AdapterTrainer(AdapterTrainerMixin, Trainer):
    """``transformers.Trainer`` with malora's balance loss, routing logs and adapter saving."""
