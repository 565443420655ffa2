"""The training state between two evaluations, so that a worker killed there resumes near where it stopped.

A trial checkpoints at every evaluation (``training.checkpoints``). With evaluations far apart (a study scores
once, at the end) a kill between them (SIGKILL, a preempted node, a session's end) would cost every step since
the last one. So every ``resources.checkpoint_every_min`` minutes the worker also writes its training state here,
and a restarted worker (Ray Train's ``FailureConfig``, ``--resume``) continues from it when it is further on than
the last checkpoint.

Why not a Ray Train checkpoint: ``ray.train.report`` forwards every report to Tune, which takes a result without
the objective for an error (``TuneController._validate_result_metrics``) and hands every result to ASHA and
Optuna; a report here means an evaluation. So the worker writes the state itself, beside its Train run's
checkpoints on the run's storage file system (local, NFS or S3, through pyarrow.fs):

    <train run>/partial/step_000123/state.pt      rank 0: adapter, optimizer, schedule, progress
    <train run>/partial/step_000123/rank_0.pt     each rank: its torch RNG (dropout: the continuation is exact) and
                                                  its open window (losses, tokens, time since the last evaluation)
    <train run>/partial/step_000123/complete      written last by rank 0: the folder is whole

The state carries the trial's config and step count; a folder written by another configuration is ignored.
Saving a folder deletes the older ones (complete or not), and an evaluation's checkpoint clears them all.
"""

from __future__ import annotations

import io
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)
STATE, COMPLETE = "state.pt", "complete"


@dataclass(frozen=True)
class PartialStore:
    """The ``partial`` folder ``root`` of one trial's Train run on the pyarrow file system ``fs``."""

    fs: Any
    root: str

    @classmethod
    def local(cls, folder: str) -> PartialStore:
        import pyarrow.fs

        return cls(pyarrow.fs.LocalFileSystem(), str(folder))

    def _write(self, path: str, obj: Any) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        with self.fs.open_output_stream(path) as f:
            f.write(buf.getvalue())

    def _read(self, path: str) -> Any:
        with self.fs.open_input_stream(path) as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)

    def _folders(self) -> list[int]:
        """Steps of every ``step_*`` folder, oldest first (also one a kill left half written)."""
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        return sorted(int(i.base_name.removeprefix("step_")) for i in infos
                      if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("step_"))

    def _steps(self) -> list[int]:
        """Steps of the complete folders, oldest first."""
        import pyarrow.fs

        return [s for s in self._folders()
                if self.fs.get_file_info(self._path(s, COMPLETE)).type == pyarrow.fs.FileType.File]

    def _path(self, step: int, name: str = "") -> str:
        return posixpath.join(self.root, f"step_{step:06d}", name) if name else \
            posixpath.join(self.root, f"step_{step:06d}")

    def save(self, step: int, rank: int, state: dict[str, Any] | None, window: dict[str, Any]) -> None:
        """Write this rank's RNG and ``window`` (and on rank 0 ``state``, then the ``complete`` mark) for ``step``;
        rank 0 then deletes older folders. Every rank calls it at the same step (the worker agrees on it)."""
        self.fs.create_dir(self._path(step), recursive=True)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        self._write(self._path(step, f"rank_{rank}.pt"), {"rng": rng, "window": dict(window)})
        if rank != 0:
            return
        self._write(self._path(step, STATE), state)
        with self.fs.open_output_stream(self._path(step, COMPLETE)) as f:
            f.write(b"")
        for old in self._folders():
            if old < step:
                self.fs.delete_dir(self._path(old))

    def latest(self, rank: int, *, after: int, trial: dict[str, Any], steps: int) -> dict[str, Any] | None:
        """The newest complete state past step ``after`` written for this ``trial`` config and step count, with
        this rank's ``"rng"`` and ``"window"`` (None when the rank wrote none: a changed world size); else None."""
        import pyarrow.fs

        for step in reversed(self._steps()):
            if step <= after:
                return None
            state = self._read(self._path(step, STATE))
            if state.get("trial") != trial or state.get("steps") != steps:
                logger.warning("partial state %s was written by another trial config or step count; ignored",
                               self._path(step))
                continue
            own_path = self._path(step, f"rank_{rank}.pt")
            found = self.fs.get_file_info(own_path).type == pyarrow.fs.FileType.File
            own = self._read(own_path) if found else {}
            return {**state, "rng": own.get("rng"), "window": own.get("window")}
        return None

    def clear(self) -> None:
        """Delete every folder (an evaluation's checkpoint holds a state at least as new)."""
        for step in self._folders():
            self.fs.delete_dir(self._path(step))


def restore_rng(rng: dict[str, torch.Tensor] | None) -> None:
    """Set the torch RNG this rank saved (no-op for None)."""
    if not rng:
        return
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
