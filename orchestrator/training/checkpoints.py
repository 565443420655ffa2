"""A trial's checkpoints: written at every evaluation (adapter + training state + metrics), restored by a
restarted worker group or a resumed search, and the final report repeated for a trial killed after its end."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from orchestrator.training.partial import PartialStore, restore_rng
from orchestrator.training.trial import Optimisation, Progress, TrialModel

logger = logging.getLogger(__name__)
TRAIN_STATE = "train_state.pt"
ADAPTER_DIR = "adapter"


def restore_progress(session: Any, model: torch.nn.Module, optim: Optimisation, device: torch.device,
                     trial_id: str = "", *, partial: PartialStore | None = None,
                     trial_config: dict[str, Any] | None = None, steps: int | None = None) -> Progress:
    """Load adapter, optimizer and schedule from the session's checkpoint, or from the ``partial`` store's state
    when that is further on (``training.partial``: also the open window and this rank's RNG); else start at 0."""
    with session.checkpoint_dir() as ckpt:
        state, source = None, None
        saved = Path(ckpt) / TRAIN_STATE if ckpt else None
        has_ckpt = saved is not None and saved.is_file()
        # The checkpoint's step from its small metrics.json, so that a newer partial state is found before the
        # checkpoint's tensors (hundreds of MB) are read only to be dropped; without one, the state says.
        ckpt_step = _checkpoint_step(saved.parent) if has_ckpt else 0
        if ckpt_step is None:
            state = torch.load(saved, map_location=device, weights_only=False)
            ckpt_step = state["step"]
        later = partial.latest(session.rank, after=ckpt_step, trial=trial_config,
                               steps=steps) if partial is not None else None
        if later is not None:
            state, source = later, partial.root
        elif has_ckpt:
            if state is None:
                state = torch.load(saved, map_location=device, weights_only=False)
            source = ckpt
        if state is None:
            return Progress()
        missing = set(state["adapter"]) ^ {n for n, p in model.named_parameters() if p.requires_grad}
        if missing:
            raise RuntimeError(f"checkpoint {source} does not match the adapter: {sorted(missing)[:5]}")
        model.load_state_dict(state["adapter"], strict=False)
        optim.optimizer.load_state_dict(state["optimizer"])
        optim.scheduler.load_state_dict(state["scheduler"])
        if later is not None:
            restore_rng(later["rng"])
        logger.info("trial %s resumes at step %d from %s", trial_id, state["step"], source)
        return Progress(state["step"], state["tokens"], state.get("history", []), state.get("window"))


def _checkpoint_step(ckpt: Path) -> int | None:
    """The step recorded in a checkpoint's metrics.json; None when it has none (then the state says)."""
    try:
        step = json.loads((ckpt / "metrics.json").read_text()).get("step")
    except (OSError, ValueError):
        return None
    return int(step) if isinstance(step, (int, float)) else None


def save_partial(session: Any, partial: PartialStore, trial: TrialModel, optim: Optimisation, step: int,
                 tokens: int, history: list[dict[str, float]], window: dict[str, Any],
                 trial_config: dict[str, Any], steps: int) -> None:
    """Every rank: the training state after ``step`` into ``partial`` (rank 0 the state, each rank its RNG and
    open ``window``); ``tokens`` and ``history`` as of the last evaluation (the window holds the rest)."""
    state = None
    if session.rank == 0:
        state = {"step": step, "tokens": tokens, "history": history, "trial": trial_config, "steps": steps,
                 **_train_state(trial, optim)}
    partial.save(step, session.rank, state, window)
    if session.rank == 0:
        logger.info("step %d: training state saved to %s", step, partial.root)


def _train_state(trial: TrialModel, optim: Optimisation) -> dict[str, Any]:
    """Adapter tensors, optimizer and schedule: what a restarted worker loads (``restore_progress``)."""
    return {"optimizer": optim.optimizer.state_dict(), "scheduler": optim.scheduler.state_dict(),
            "adapter": {n: p.detach() for n, p in trial.model.named_parameters() if p.requires_grad}}


def report_final_again(session: Any, trial_id: str = "") -> list[dict[str, Any]]:
    """Re-report the final metrics (and checkpoint) of a trial whose training had finished before a kill.

    Tune had not recorded the trial's end (the driver died between the last checkpoint and the trial's
    completion), so the restarted worker must report once more, or the trial would end without its final,
    test-scored result. Every rank reports (Train requires it); rank 0 attaches a copy of the checkpoint.
    """
    import shutil

    with session.checkpoint_dir() as ckpt:
        metrics = json.loads((Path(ckpt) / "metrics.json").read_text())
        logger.info("trial %s had finished (step %d); reporting its final metrics again", trial_id, metrics["step"])
        with tempfile.TemporaryDirectory(prefix="malora-ckpt-") as tmp:
            ckpt_dir = None
            if session.rank == 0:
                shutil.copytree(ckpt, tmp, dirs_exist_ok=True)
                ckpt_dir = tmp
            session.report(metrics, ckpt_dir)
    return [metrics] if session.rank == 0 else []


def checkpoint_and_report(session: Any, trial: TrialModel, optim: Optimisation, progress: Progress,
                          metrics: dict[str, Any], out: list[dict[str, Any]]) -> None:
    """Rank 0 writes the adapter and the training state to a checkpoint; every rank reports (Train needs all)."""
    from malora.checkpoint import save_adapter

    core = trial.model
    with tempfile.TemporaryDirectory(prefix="malora-ckpt-") as tmp:
        ckpt_dir = None
        if session.rank == 0:
            save_adapter(core, trial.adapter, Path(tmp) / ADAPTER_DIR)
            torch.save({"step": progress.step, "tokens": progress.tokens, "history": progress.history,
                        **_train_state(trial, optim)}, Path(tmp) / TRAIN_STATE)
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics, indent=1))
            ckpt_dir = tmp
            out.append(metrics)
        session.report(metrics, ckpt_dir)
