"""Where a trial's worker loop runs: a Ray Train worker (:class:`RaySession`, DDP over ``workers_per_trial``
ranks) or one plain process (:class:`LocalSession`, tests and benchmarks). Both give the rank, the device, the
model prepared for it, the restored checkpoint and a ``report(metrics, checkpoint)``."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from orchestrator.training.partial import PartialStore

logger = logging.getLogger(__name__)


class LocalSession:
    """Single-process stand-in for a Ray Train worker session (rank 0 of 1); keeps every report."""

    rank, world_size = 0, 1

    def __init__(self, resume_dir: str | None = None, keep_checkpoints: str | None = None,
                 partial_dir: str | None = None):
        self.reports: list[dict[str, Any]] = []
        self.resume_dir, self.keep, self.partial_dir = resume_dir, keep_checkpoints, partial_dir

    def partial_store(self) -> PartialStore | None:
        """Where states between evaluations go (``training.partial``): ``partial_dir``, or nowhere."""
        return PartialStore.local(self.partial_dir) if self.partial_dir else None

    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def checkpoint_dir(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext(self.resume_dir)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device())

    def report(self, metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if ckpt_dir and self.keep:
            import shutil
            shutil.copytree(ckpt_dir, Path(self.keep) / f"step_{metrics['step']:06d}", dirs_exist_ok=True)


class RaySession:
    """The Ray Train V2 worker session: rank, device, DDP wrapping, reports and the restored checkpoint."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def checkpoint_dir(self) -> contextlib.AbstractContextManager:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt else contextlib.nullcontext(None)

    def partial_store(self) -> PartialStore | None:
        """``<Train run>/partial`` on the run's storage file system (``training.partial``); None, with a warning,
        where this Ray does not expose it (``TrainContext.get_storage`` is a DeveloperAPI)."""
        import ray.train

        try:
            storage = ray.train.get_context().get_storage()
            return PartialStore(storage.storage_filesystem, f"{storage.experiment_fs_path}/partial")
        except (AttributeError, NotImplementedError) as err:
            logger.warning("no storage for states between evaluations (%s): checkpoints at evaluations only", err)
            return None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # stacked experts: no unused parameter tensors; buffers (rotary tables, per-rank routing counts) are not
        # synchronised on every forward
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp", parallel_strategy_kwargs={
            "find_unused_parameters": False, **no_buffer_sync()})

    def report(self, metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


def no_buffer_sync() -> dict[str, bool]:
    """DDP kwarg that skips the per-forward buffer broadcast (``forward_sync_buffers`` from torch 2.13 on)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
