"""A worker killed between two evaluations resumes from the state it saved there (``training.partial``) and
trains exactly what an uninterrupted run trains: the same adapter tensors, losses, tokens and test answers."""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch

from orchestrator.spec.space import load_space
from orchestrator.training import worker
from orchestrator.training.checkpoints import restore_progress
from orchestrator.training.partial import PartialStore

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"
MALORA = {"method": "malora", "malora.r": 4, "malora.num_experts": 4, "malora.top_k": 2, "malora.d": 16,
          "malora.beta": 1.25, "malora.alpha_over_r": 2.0, "malora.target_modules": ["q_proj", "v_proj"],
          "malora.lr": 1.0e-3, "malora.dropout": 0.3}  # dropout draws from the RNG the state must carry


class Killed(Exception):
    """What SIGKILL would do to the loop, raised where the test wants it."""


@pytest.fixture
def spec(shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    smoke = load_space(SPACES / "smoke.yaml")
    # one evaluation, at the end (step 4); a state after every step between (any elapsed time is due)
    return dataclasses.replace(smoke, eval=dataclasses.replace(smoke.eval, every_n_steps=4),
                               resources=dataclasses.replace(smoke.resources, checkpoint_every_min=1e-9))


def _final_state(folder: Path) -> dict:
    return torch.load(folder / "step_000004" / worker.TRAIN_STATE, weights_only=False)


def kill_at(monkeypatch, step: int) -> None:
    """Make optimizer step ``step`` (1-based) die before it runs."""
    real = worker.train_step

    def dying(ddp, trial, optim, stream, spec, world, index, window, device):
        if index + 1 == step:
            raise Killed(f"killed before step {step}")
        return real(ddp, trial, optim, stream, spec, world, index, window, device)

    monkeypatch.setattr(worker, "train_step", dying)


@pytest.mark.slow  # three tiny trainings, ~10 s
def test_a_run_killed_between_evaluations_continues_exactly(spec, tmp_path, monkeypatch):
    whole = worker.run_training(spec, MALORA, worker.LocalSession(keep_checkpoints=str(tmp_path / "whole"),
                                                                  partial_dir=str(tmp_path / "p_whole")))
    assert [r["step"] for r in whole] == [4]
    assert not list((tmp_path / "p_whole").iterdir())  # the final checkpoint cleared the states before it

    with monkeypatch.context() as m:
        kill_at(m, 3)
        with pytest.raises(Killed):
            worker.run_training(spec, MALORA, worker.LocalSession(partial_dir=str(tmp_path / "p")))
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["step_000002"]  # only the newest kept

    resumed = worker.run_training(spec, MALORA, worker.LocalSession(keep_checkpoints=str(tmp_path / "resumed"),
                                                                    partial_dir=str(tmp_path / "p")))
    assert [r["step"] for r in resumed] == [4]
    a, b = _final_state(tmp_path / "whole"), _final_state(tmp_path / "resumed")
    assert a["adapter"].keys() == b["adapter"].keys()
    for name, tensor in a["adapter"].items():
        assert torch.equal(tensor, b["adapter"][name]), name
    for key in ("train_loss", "balance_loss", "tokens_total", "test/mean_acc", "val/mean_acc"):
        assert resumed[0][key] == whole[0][key], key
    for task in ("boolq", "arc_e"):
        assert resumed[0][f"test_correct/{task}"] == whole[0][f"test_correct/{task}"]

    # killed between its final checkpoint and the clear: the restart trains nothing, reports again, and clears
    PartialStore.local(str(tmp_path / "p")).save(3, 0, {"step": 3, "trial": MALORA, "steps": 4}, {})
    again = worker.run_training(spec, MALORA, worker.LocalSession(resume_dir=str(tmp_path / "resumed" / "step_000004"),
                                                                  partial_dir=str(tmp_path / "p")))
    assert [r["step"] for r in again] == [4] and not list((tmp_path / "p").iterdir())


@pytest.mark.slow  # two tiny trainings, ~6 s
def test_a_state_written_for_another_config_is_not_resumed(spec, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        kill_at(m, 3)
        with pytest.raises(Killed):
            worker.run_training(spec, MALORA, worker.LocalSession(partial_dir=str(tmp_path / "p")))
    other = {**MALORA, "malora.lr": 2.0e-3}
    session = worker.LocalSession(partial_dir=str(tmp_path / "p"))
    reports = worker.run_training(spec, other, session)
    # trained from step 0: its train loss averages 4 steps of its own, not 2 inherited from the other config's
    fresh = worker.run_training(spec, other, worker.LocalSession())
    assert reports[0]["train_loss"] == fresh[0]["train_loss"]


def test_the_store_keeps_the_newest_complete_state(tmp_path):
    store = PartialStore.local(str(tmp_path))
    trial, window = {"method": "lora"}, {"loss": 1.0, "tokens": 3}
    store.save(2, 0, {"step": 2, "trial": trial, "steps": 9}, window)
    store.save(5, 0, {"step": 5, "trial": trial, "steps": 9}, {**window, "tokens": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005"]
    got = store.latest(0, after=0, trial=trial, steps=9)
    assert got["step"] == 5 and got["window"]["tokens"] == 7 and torch.equal(got["rng"]["cpu"],
                                                                              torch.get_rng_state())
    assert store.latest(0, after=5, trial=trial, steps=9) is None     # an evaluation at 5 is as new
    assert store.latest(0, after=0, trial=trial, steps=10) is None    # another step count
    assert store.latest(1, after=0, trial=trial, steps=9)["rng"] is None  # a rank that wrote none
    (tmp_path / "step_000007").mkdir()                                 # killed while writing: no mark
    (tmp_path / "step_000007" / "state.pt").write_bytes(b"half")
    assert store.latest(0, after=0, trial=trial, steps=9)["step"] == 5
    store.save(8, 0, {"step": 8, "trial": trial, "steps": 9}, window)   # the half-written 7 goes with 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000008"]
    store.clear()
    assert not list(tmp_path.iterdir()) and store.latest(0, after=0, trial=trial, steps=9) is None


def _tiny_optimisation(model: torch.nn.Module) -> worker.Optimisation:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    return worker.Optimisation(params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), None)


def test_a_newer_state_is_restored_without_reading_the_checkpoint_tensors(tmp_path):
    model = torch.nn.Linear(2, 2)
    optim = _tiny_optimisation(model)
    trial = {"method": "lora"}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metrics.json").write_text('{"step": 2}')
    (ckpt / worker.TRAIN_STATE).write_bytes(b"not a torch file")  # reading it would raise
    weights = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    store = PartialStore.local(str(tmp_path / "p"))
    store.save(3, 0, {"step": 3, "tokens": 30, "history": [], "trial": trial, "steps": 9, "adapter": weights,
                      "optimizer": optim.optimizer.state_dict(), "scheduler": optim.scheduler.state_dict()},
               {"tokens": 5})
    session = worker.LocalSession(resume_dir=str(ckpt))
    got = restore_progress(session, model, optim, torch.device("cpu"), partial=store, trial_config=trial, steps=9)
    assert (got.step, got.tokens, got.window) == (3, 30, {"tokens": 5})
    assert torch.equal(model.weight, torch.full((2, 2), 7.0))
    # a state no newer than the checkpoint leaves the checkpoint to be read: the corrupt file is reached
    with pytest.raises(pickle.UnpicklingError):
        restore_progress(session, model, optim, torch.device("cpu"), partial=store, trial_config={"method": "x"},
                         steps=9)
