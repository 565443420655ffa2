"""One optimizer step of a trial and the accumulators of its reporting window (time, tokens, memory)."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import time
from typing import Any

import torch

from orchestrator.evaluation.metrics import reduce_sum
from orchestrator.spec.space import SearchSpec
from orchestrator.training.chunks import token_chunks
from orchestrator.training.trial import Optimisation, TrialModel

logger = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: on CUDA the window's peak allocation (the counter is reset when a window
    starts, see :func:`new_window`); on CPU the process's peak RSS so far (Linux cannot reset it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a wall-clock timer read next measures the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_over_ranks(value: float, rank: int, world: int, device: torch.device) -> float:
    """The largest ``value`` over the ranks (each rank's value in its own slot of a summed vector)."""
    return max(reduce_sum([value if r == rank else 0.0 for r in range(world)], device)) if world > 1 else value


def new_window(device: torch.device | None = None) -> dict[str, Any]:
    """Accumulators of one reporting window (the steps between two evaluations); on CUDA also restarts the
    peak-memory counter, so each window reports its own peak (evaluation included)."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {"loss": 0.0, "aux": 0.0, "micro": 0, "tokens": 0, "time": 0.0, "steps": 0}


def window_pad_share(window: dict[str, Any], device: torch.device) -> float:
    """Share of the window's micro-batch positions, over all ranks, that were padding: 1 - tokens / (B * T)."""
    tokens, positions = reduce_sum([float(window["tokens"]), float(window.get("positions", 0))], device)
    return 1.0 - tokens / positions if positions else 0.0


def progress_line(trial_id: str, done: int, steps: int, window: dict[str, Any], world: int) -> str:
    """One line between two evaluations: steps done, this window's tokens/s (rank 0 x ranks), time left."""
    per_step = window["time"] / max(1, window["steps"])
    eta = (steps - done) * per_step
    tokens_per_s = world * window["tokens"] / max(window["time"], 1e-9)
    return (f"trial {trial_id or '-'}: step {done}/{steps}, {tokens_per_s:.0f} tokens/s, "
            f"{per_step:.2f} s/step, ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")


def debug_kill(spec: SearchSpec, method: str, step: int, started_at: int) -> None:
    """``debug.fail_mode: kill``: SIGKILL this process before optimizer step ``step + 1`` when it is the failing
    step of the failing method and this worker started at step 0 (so a resumed worker goes on)."""
    d = spec.debug
    if d.fail_mode == "kill" and d.fail_method == method and step + 1 == d.fail_at_step and started_at == 0:
        logger.warning("debug.fail_mode=kill: killing this worker (pid %d) before step %d", os.getpid(), step + 1)
        os.kill(os.getpid(), signal.SIGKILL)


def train_step(ddp: torch.nn.Module, trial: TrialModel, optim: Optimisation, stream, spec: SearchSpec, world: int,
               step: int, window: dict[str, Any], device: torch.device) -> int:
    """One optimizer step over ``grad_accum`` micro-batches of ``L = CE + balance loss``; returns the data epoch.

    A micro-batch above ``train.max_batch_tokens`` padded positions runs as row chunks with token-share weights
    (``orchestrator.training.chunks``: the same gradient, a bounded activation peak). DDP all-reduces only on the
    last forward of the step (``no_sync`` before); ``window`` accumulates losses and tokens.
    """
    from malora.inject import collect_aux_loss

    train = spec.train
    autocast = trial.precision.context(device.type)  # autocast only over float32-held weights
    fail = spec.debug.fail_method == trial.method
    ddp.train()
    synchronize(device)  # the previous step's kernels are not this step's time
    t0 = time.perf_counter()
    epoch = 0
    for micro in range(train.grad_accum):
        epoch, batch = next(stream)
        pieces = token_chunks(batch, train.max_batch_tokens)  # one piece unless the batch is above the cap
        for i, (piece, weight) in enumerate(pieces):
            piece = {k: v.to(device) for k, v in piece.items()}
            sync = world == 1 or (micro == train.grad_accum - 1 and i == len(pieces) - 1)
            with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast:
                out = ddp(**piece)
                lm_loss = out if torch.is_tensor(out) else out.loss  # ResponseLoss: L; a bare HF model: an output
                aux = collect_aux_loss(trial.model)
                loss = lm_loss + aux
                if fail and step + 1 == spec.debug.fail_at_step and spec.debug.fail_mode != "kill":
                    if spec.debug.fail_mode == "raise":
                        raise RuntimeError(f"debug.fail_method={trial.method!r}: failing on purpose at step {step + 1}")
                    loss = loss * float("nan")
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1} "
                                             f"(lm {lm_loss.item():.4g}, balance {aux.item():.4g}); lower the lr")
                optim.scaler.scale(loss * (weight / train.grad_accum)).backward()
            window["loss"] += weight * lm_loss.item()
            window["aux"] += weight * aux.item()
            window["tokens"] += int(piece["attention_mask"].sum())
            window["positions"] = window.get("positions", 0) + piece["attention_mask"].numel()
        window["micro"] += 1
    if train.max_grad_norm:
        optim.scaler.unscale_(optim.optimizer)
        torch.nn.utils.clip_grad_norm_(optim.params, train.max_grad_norm)
    optim.scaler.step(optim.optimizer)
    optim.scaler.update()
    optim.scheduler.step()
    optim.optimizer.zero_grad(set_to_none=True)
    synchronize(device)  # CUDA runs asynchronously: without it the timer stops before the step's kernels end
    window["time"] += time.perf_counter() - t0
    window["steps"] += 1
    return epoch
