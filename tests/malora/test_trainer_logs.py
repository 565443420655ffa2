"""malora.trainer's logs and hooks: ``loss`` is the LM loss (equal to ``eval_loss`` on the same batch with the
parameters unchanged) and ``balance_loss`` apart; the routing shares count the training forwards only (not the
evaluation's tokens, not a no-grad forward in train mode such as TRL's metric forwards); the hooks leave with the
training run (a finished trainer can be collected, a second trainer is alone); per-task routing metrics from a
task column equal those of separate forwards per task."""

from __future__ import annotations

import copy
import gc
import weakref

import numpy as np
import pytest
import torch
from datasets import Dataset

from malora import adapter_layers, collect_aux_loss
from malora.diagnostics import routing_counts_by_task, task_expert_metrics
from malora.trainer import AdapterTrainer, with_adapters
from tests.malora.test_trainer import (VOCAB, adapted, examples, sft_args, sft_texts, train_args,
                                      word_tokenizer)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def batch_of(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def router_counts(model) -> dict[str, torch.Tensor]:
    return {name: layer.lora_router.expert_counts.clone() for name, layer in adapter_layers(model)}


def other_examples() -> list[dict[str, torch.Tensor]]:
    """Evaluation rows with other tokens than the training rows (their routing differs)."""
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids}
            for ids in torch.randint(1, VOCAB, (4, 8), generator=g)]


def test_logged_loss_is_the_lm_loss_and_the_balance_loss_is_apart(tmp_path):
    """lr 0: the parameters never move, so the step's training loss on the 4 rows equals eval_loss on them."""
    model = adapted(balance_coef=0.5)
    reference = copy.deepcopy(model).train()
    out = reference(**batch_of(examples()))
    trainer = AdapterTrainer(model=model, train_dataset=examples(), eval_dataset=examples(),
                             args=train_args(tmp_path, max_steps=1, learning_rate=0.0, save_strategy="no",
                                             eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4))
    trainer.train()
    train_log = next(e for e in trainer.state.log_history if "loss" in e)
    eval_log = next(e for e in trainer.state.log_history if "eval_loss" in e)
    assert train_log["loss"] == pytest.approx(float(out.loss), rel=1e-5)
    assert train_log["loss"] == pytest.approx(eval_log["eval_loss"], rel=1e-5)
    assert train_log["balance_loss"] == pytest.approx(float(collect_aux_loss(reference)), rel=1e-5)
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(float(out.loss), rel=1e-5)


def test_shares_count_training_forwards_only(tmp_path):
    """Two steps logged together (lr 0, same 4 rows each step), an evaluation on other rows after step 1 and a
    no-grad train-mode forward of other rows before each step: the logged shares are those of the training rows."""
    model = adapted(balance_coef=0.5)
    reference = copy.deepcopy(model).train()
    before = router_counts(reference)
    reference(**batch_of(examples()))
    expected = {name: c - before[name] for name, c in router_counts(reference).items()}
    extra = batch_of(other_examples())

    class NoGradForward(__import__("transformers").TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                model.train()(**extra)                             # as TRL's metric forwards: train mode, no grad

    trainer = AdapterTrainer(model=model, train_dataset=examples(), eval_dataset=other_examples(),
                             callbacks=[NoGradForward()],
                             args=train_args(tmp_path, max_steps=2, learning_rate=0.0, logging_steps=2,
                                             save_strategy="no", eval_strategy="steps", eval_steps=1))
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    assert logged["step"] == 2 and len([e for e in trainer.state.log_history if "eval_loss" in e]) == 2
    for name, c in expected.items():
        shares = [logged[f"routing/{name}/e{i}"] for i in range(c.numel())]
        assert shares == pytest.approx((c.double() / c.sum()).tolist(), abs=1e-12), name


def test_sft_trainers_no_grad_metric_forward_is_not_counted(tmp_path):
    """SFTTrainer with a compute_loss_func runs a second, no-grad forward of the batch for its metrics: the
    trainer's counts hold each training token's slots once (k per real token per routed layer)."""
    trl = pytest.importorskip("trl")
    texts = sft_texts()
    seen, batches = [], []

    class Recording(with_adapters(trl.SFTTrainer)):
        def compute_loss(self, model, inputs, *args, **kwargs):
            batches.append(inputs["attention_mask"].clone())
            return super().compute_loss(model, inputs, *args, **kwargs)

        def _adapter_metrics(self):
            seen.append({name: c.clone() for name, c in self._counts.items()})
            return super()._adapter_metrics()

    def lm_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].reshape(-1, VOCAB)
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)

    args = sft_args(trl, tmp_path)
    trainer = Recording(model=adapted(balance_coef=0.5), args=args, compute_loss_func=lm_loss,
                        train_dataset=Dataset.from_dict({"text": texts}), processing_class=word_tokenizer())
    trainer.train()
    (counts,) = seen
    real_tokens = int(batches[0].sum())
    assert counts and all(int(c.sum()) == 2 * real_tokens for c in counts.values())   # top_k = 2, once


def test_the_hooks_leave_with_the_training_run(tmp_path):
    model = adapted(balance_coef=0.5)

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    untouched = hooks()
    first = AdapterTrainer(model=model, args=train_args(tmp_path / "1", save_strategy="no"), train_dataset=examples())
    first.train()
    assert hooks() == untouched
    second = AdapterTrainer(model=model, args=train_args(tmp_path / "2", save_strategy="no"),
                            train_dataset=examples())
    second.train()
    assert first._balance_terms == []                      # the first trainer collected nothing of the second run
    assert [e["balance_loss"] for e in second.state.log_history if "loss" in e][0] > 0
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None                                  # nothing on the model keeps it (or its optimizer) alive


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_per_task_routing_metrics_equal_separate_forwards_per_task(tmp_path, checkpointing):
    """Rows of tasks b, a, b, a in one batch (lr 0, one step): the trainer splits each training forward's slots by
    row; the reference runs each task's rows as its own forward (malora.diagnostics.routing_counts_by_task). A
    checkpoint recomputation of the blocks must not count them again."""
    tasks = ["a", "b"]
    rows = [dict(e, task=t) for e, t in zip(examples(), ["b", "a", "b", "a"])]
    model = adapted(balance_coef=0.5)
    reference = copy.deepcopy(model).train()
    counts = routing_counts_by_task(reference, batch_of(examples()), torch.tensor([1, 0, 1, 0]), tasks)
    trainer = AdapterTrainer(model=model, train_dataset=rows,
                             args=train_args(tmp_path, max_steps=1, learning_rate=0.0, save_strategy="no",
                                             gradient_checkpointing=checkpointing))
    assert (trainer.task_column, trainer.tasks) == ("task", tasks)
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    for j, task in enumerate(tasks):
        share = np.mean([c[j] / c[j].sum() for c in counts.values()], axis=0)
        assert [logged[f"routing/{task}/e{i}"] for i in range(4)] == pytest.approx(share.tolist(), abs=1e-12)
    expected = task_expert_metrics(counts, tasks)
    assert {"routing_mi", "routing_mi_norm", "routing_entropy/a", "routing_entropy/b"} <= expected.keys()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, abs=1e-12), key
    assert logged["routing_mi"] > 0                         # the two tasks' rows do route differently


def test_a_named_task_column_must_exist(tmp_path):
    from malora import ConfigError
    with pytest.raises(ConfigError, match="task_column='domain' is not a column of the train dataset"):
        AdapterTrainer(model=adapted(balance_coef=0.5), train_dataset=examples(), task_column="domain",
                       args=train_args(tmp_path, save_strategy="no"))


def test_sft_trainer_logs_per_task_routing_from_a_task_column(tmp_path):
    """The task column survives TRL's dataset preparation and collator; the per-task metrics equal separate
    forwards per task of the batch SFTTrainer built (lr 0: the routers do not move)."""
    trl = pytest.importorskip("trl")
    texts = sft_texts()
    recorded = []

    class Recording(with_adapters(trl.SFTTrainer)):
        def compute_loss(self, model, inputs, *args, **kwargs):
            recorded.append(({k: v.clone() for k, v in inputs.items() if k in ("input_ids", "attention_mask")},
                             self._row_tasks.clone()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = sft_args(trl, tmp_path, learning_rate=0.0)
    model = adapted(balance_coef=0.5)
    reference = copy.deepcopy(model).train()
    data = Dataset.from_dict({"text": texts, "task": ["arc", "piqa", "piqa", "arc"]})
    trainer = Recording(model=model, args=args, train_dataset=data, processing_class=word_tokenizer())
    trainer.train()
    (batch, row_tasks), = recorded
    assert sorted(row_tasks.tolist()) == [0, 0, 1, 1]
    counts = routing_counts_by_task(reference, batch, row_tasks, ["arc", "piqa"])
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    for key, value in task_expert_metrics(counts, ["arc", "piqa"]).items():
        assert logged[key] == pytest.approx(value, abs=1e-12), key
