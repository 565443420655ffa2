"""malora.trainer's saving: ``save_model`` writes the adapter (not the renamed full state dict), checkpoints hold
the adapter and the trainer's state but no base weights, and resuming from one continues the run exactly as an
uninterrupted run; ``load_best_model_at_end`` and ``hyperparameter_search`` (run-* folders) use the same files;
FSDP / ZeRO-3 are refused."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from malora import ConfigError, adapter_layers, load_adapter
from malora.trainer import AdapterTrainer, refuse_sharded
from tests.malora.test_trainer import adapted, base_model, examples, train_args

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
BASE_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def adapter_values(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_save_model_writes_an_adapter_that_load_adapter_restores_exactly(tmp_path):
    model = adapted(balance_coef=0.5)
    trainer = AdapterTrainer(model=model, args=train_args(tmp_path / "run", save_strategy="no"),
                             train_dataset=examples())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert ADAPTER_FILES <= files and not files & BASE_FILES
    saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert saved.keys() == adapter_values(model).keys()                # every trainable tensor, nothing else
    ids = torch.stack([e["input_ids"] for e in examples()])
    fresh = base_model()
    before = logits(fresh, ids)
    load_adapter(fresh, tmp_path / "final")
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)
    assert not torch.allclose(before, logits(model, ids))             # the adapter changed the outputs


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_a_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """4 steps (batch 2, 2 epochs) saved every 2; a second trainer whose adapter starts elsewhere resumes from
    checkpoint-2 and must reproduce steps 3-4's losses and the final adapter (optimizer and scheduler state
    included: Adam's moments change the step-3 update)."""
    args = dict(per_device_train_batch_size=2, max_steps=4, save_steps=2, learning_rate=0.01)
    full = AdapterTrainer(model=adapted(balance_coef=0.5), args=train_args(tmp_path / "full", **args),
                          train_dataset=examples())
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert ADAPTER_FILES | {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    assert not files & BASE_FILES                                      # the frozen base is not written

    other = adapted(balance_coef=0.5)
    with torch.no_grad():
        for _, layer in adapter_layers(other):
            for p in layer.adapter_params().values():
                p.add_(0.3)                                            # resume must overwrite these
    resumed = AdapterTrainer(model=other, args=train_args(tmp_path / "resumed", **args), train_dataset=examples())
    resumed.train(resume_from_checkpoint=str(checkpoint))

    def losses(trainer):
        return {e["step"]: (e["loss"], e["balance_loss"]) for e in trainer.state.log_history if "loss" in e}
    assert sorted(losses(resumed)) == [1, 2, 3, 4]                    # 1-2 from the checkpoint's trainer_state
    for step in (3, 4):
        assert losses(resumed)[step] == pytest.approx(losses(full)[step], rel=1e-5, abs=1e-7)
    final, again = adapter_values(full.model), adapter_values(other)
    for name, value in final.items():
        torch.testing.assert_close(again[name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    """Evaluated and saved every step for 3 steps; at the end the model holds the adapter of the checkpoint the
    trainer names best (which the full-state-dict loader could not read)."""
    ex = examples()
    trainer = AdapterTrainer(model=adapted(balance_coef=0.5), train_dataset=ex, eval_dataset=ex[:2],
                             args=train_args(tmp_path, max_steps=3, save_steps=1, eval_strategy="steps",
                                             eval_steps=1, load_best_model_at_end=True, learning_rate=0.2,
                                             metric_for_best_model="eval_loss", greater_is_better=False))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    expected = base_model()
    load_adapter(expected, best)
    ids = torch.stack([e["input_ids"] for e in ex])
    torch.testing.assert_close(logits(trainer.model, ids), logits(expected, ids), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
def test_hyperparameter_search_checkpoints_land_in_the_trial_folder(tmp_path):
    pytest.importorskip("optuna")
    trainer = AdapterTrainer(model_init=lambda trial=None: adapted(balance_coef=0.5), train_dataset=examples(),
                             eval_dataset=examples()[:2],
                             args=train_args(tmp_path, max_steps=2, save_steps=2))
    trainer.hyperparameter_search(direction="minimize", backend="optuna", n_trials=1,
                                  hp_space=lambda trial: {"learning_rate": trial.suggest_float("lr", 1e-3, 1e-2)},
                                  compute_objective=lambda metrics: metrics.get("eval_loss", 0.0))
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"run-0"}     # nothing beside the trial folder
    files = {p.name for p in (tmp_path / "run-0" / "checkpoint-2").iterdir()}
    assert ADAPTER_FILES <= files and not files & BASE_FILES


def test_fsdp_and_zero3_are_refused_and_zero2_is_not():
    def trainer(fsdp: bool, stage: int | None):
        plugin = None if stage is None else SimpleNamespace(zero_stage=stage)
        return SimpleNamespace(is_fsdp_enabled=fsdp, accelerator=SimpleNamespace(state=SimpleNamespace(
            deepspeed_plugin=plugin)))
    with pytest.raises(ConfigError, match="FSDP shards the adapter tensors.*Fix: train with DDP"):
        refuse_sharded(trainer(True, None))
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO-3 shards"):
        refuse_sharded(trainer(False, 3))
    refuse_sharded(trainer(False, 2))
    refuse_sharded(trainer(False, None))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_hub_pushes_during_training_carry_the_adapter(tmp_path, monkeypatch):
    """hub_strategy every_save pushes output_dir after copying the checkpoint's model files into it; without
    peft installed the trainer copies no adapter file, so the push would hold none. The Hub client is replaced by
    a recorder (no network): what matters is the folder it is asked to upload."""
    import transformers.trainer as hf_trainer

    uploads = []

    class Hub:
        def upload_folder(self, **kwargs):
            uploads.append({p.name for p in Path(kwargs["folder_path"]).iterdir()})
            return SimpleNamespace(is_done=lambda: True)

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: Hub())
    trainer = AdapterTrainer(model=adapted(balance_coef=0.5), args=train_args(tmp_path, save_strategy="no"),
                             train_dataset=examples())
    trainer.train()
    trainer.save_model(str(tmp_path / "checkpoint-2"))
    trainer.hub_model_id, trainer.push_in_progress = "someone/malora-test", None   # what init_hf_repo sets
    trainer._push_from_checkpoint(str(tmp_path / "checkpoint-2"))
    assert uploads and ADAPTER_FILES <= uploads[0]
