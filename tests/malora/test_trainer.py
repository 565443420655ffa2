"""malora.trainer: a tiny LLaMA trained a few steps through transformers' Trainer (and TRL's SFTTrainer): the
balance loss reaches the routers' gradients, the logged metrics hold it and the expert shares, and every
checkpoint folder holds an adapter that loads back to the same outputs. Saving, resuming and the logged losses:
test_trainer_saving.py and test_trainer_logs.py."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback, TrainingArguments

from malora import MALoRAConfig, adapter_layers, collect_aux_loss, inject_adapters, load_adapter
from malora.trainer import AdapterTrainer, with_adapters
from tests.tiny import small_llama

VOCAB, WIDTH = 40, 8
TARGETS = ("q_proj", "v_proj", "down_proj")


def base_model() -> LlamaForCausalLM:
    return small_llama(vocab_size=VOCAB, pad_token_id=0)


def adapted(balance_coef: float) -> LlamaForCausalLM:
    model = base_model()
    inject_adapters(model, MALoRAConfig(d=8, r_bar=4, num_experts=4, top_k=2, dropout=0.0, dispatch="dense",
                                        balance_coef=balance_coef, target_modules=TARGETS))
    return model


def examples() -> list[dict[str, torch.Tensor]]:
    """Four right-padded sequences (lengths 8, 6, 5, 3): one batch of 4."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (8, 6, 5, 3):
        ids = torch.randint(1, VOCAB, (WIDTH,), generator=g)
        mask = (torch.arange(WIDTH) < n).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


class RouterGrads(TrainerCallback):
    """The router gradients just before the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if n.endswith("lora_router.weight")}


def train_args(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(**{
        "output_dir": str(tmp_path), "per_device_train_batch_size": 4, "max_steps": 2, "learning_rate": 0.05,
        "logging_steps": 1, "save_strategy": "steps", "save_steps": 2, "report_to": [], "use_cpu": True,
        "seed": 0, "disable_tqdm": True, "dataloader_num_workers": 0, **overrides})


def reference(model: LlamaForCausalLM) -> tuple[dict[str, torch.Tensor], float, dict[str, torch.Tensor]]:
    """Router grads of (lm_loss + balance loss) on the one batch, the balance loss, each layer's expert counts."""
    batch = {k: torch.stack([e[k] for e in examples()]) for k in examples()[0]}
    out = model.train()(**batch)
    aux = collect_aux_loss(model)
    (out.loss + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("lora_router.weight")}
    counts = {name: layer.lora_router.expert_counts.clone() for name, layer in adapter_layers(model)}
    return grads, float(aux), counts


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_trainer_adds_the_balance_loss_logs_it_and_checkpoints_a_loadable_adapter(tmp_path, checkpointing):
    model = adapted(balance_coef=0.5)
    untouched = copy.deepcopy(model)
    ref_grads, ref_aux, ref_counts = reference(copy.deepcopy(model))
    lm_only = copy.deepcopy(model)
    for _, layer in adapter_layers(lm_only):
        layer.lora_router.balance_coef = 0.0
    lm_grads, _, _ = reference(lm_only)

    grads = RouterGrads()
    args = train_args(tmp_path, **({"gradient_checkpointing": True} if checkpointing else {}))
    trainer = AdapterTrainer(model=model, args=args, train_dataset=examples(), callbacks=[grads])
    trainer.train()

    assert grads.grads.keys() == ref_grads.keys() and len(ref_grads) == 6
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads.grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
        assert not torch.allclose(g, lm_grads[name], rtol=1e-3, atol=1e-6)   # the balance term is in there

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    first = logs[0]
    assert first["balance_loss"] == pytest.approx(ref_aux, rel=1e-5)
    for name, counts in ref_counts.items():                            # step 1's counts, reset after its log
        shares = [first[f"routing/{name}/e{i}"] for i in range(4)]
        assert shares == pytest.approx((counts.double() / counts.sum()).tolist(), abs=1e-12)
    assert first["routing/max_share"] == pytest.approx(max(max(c.tolist()) / c.sum().item()
                                                           for c in ref_counts.values()))
    assert logs[1]["balance_loss"] != first["balance_loss"]            # the routers moved

    folder = tmp_path / "checkpoint-2"                                   # the checkpoint is the adapter folder
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    loaded = base_model()
    load_adapter(loaded, folder)
    ids = torch.stack([e["input_ids"] for e in examples()])
    model.eval()
    with torch.no_grad():
        trained, restored, initial = (m.eval()(ids).logits for m in (model, loaded, untouched))
    torch.testing.assert_close(restored, trained, rtol=0, atol=0)
    assert not torch.allclose(trained, initial)                        # training changed the adapter


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_gradient_accumulation_weighs_each_micro_batch_balance_loss_once(tmp_path):
    """Two micro-batches of 2 accumulate to the single batch of 4's gradient only if the balance term of each
    micro-batch is divided by the 2 accumulation steps (Trainer does not divide a num_items-normalised loss)."""
    model = adapted(balance_coef=0.5)
    grads = RouterGrads()
    args = train_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                      save_strategy="no", train_sampling_strategy="sequential")   # micro-batches [0, 1], [2, 3]
    ex = examples()
    AdapterTrainer(model=copy.deepcopy(model), args=args, train_dataset=ex, callbacks=[grads]).train()
    # independent reference: the micro-batches' LM losses normalised by all label tokens of the step (what
    # num_items_in_batch does), plus each micro-batch's balance loss / 2
    reference_model = copy.deepcopy(model).train()
    tokens = sum(int((e["labels"][1:] != -100).sum()) for e in ex)
    for half in ([0, 1], [2, 3]):
        batch = {k: torch.stack([ex[i][k] for i in half]) for k in ex[0]}
        out = reference_model(**batch)
        logits = out.logits[:, :-1].reshape(-1, VOCAB)
        lm = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                               reduction="sum") / tokens
        (lm + collect_aux_loss(reference_model) / 2).backward()
    for name, p in reference_model.named_parameters():
        if name.endswith("lora_router.weight"):
            torch.testing.assert_close(grads.grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over w0..w35 (built in memory: no download)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(VOCAB - 4)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def sft_texts() -> list[str]:
    """Four texts of 7, 5, 4 and 2 words of :func:`word_tokenizer` (one batch of 4)."""
    g = torch.Generator().manual_seed(0)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (n,), generator=g)) for n in (7, 5, 4, 2)]


def sft_args(trl, out, **overrides):
    """One SFT step on one batch of 4 on the CPU, logged, not saved."""
    return trl.SFTConfig(**{"output_dir": str(out), "max_steps": 1, "per_device_train_batch_size": 4,
                            "logging_steps": 1, "report_to": [], "use_cpu": True, "save_strategy": "no",
                            "max_length": 16, "disable_tqdm": True, "seed": 0,
                            "bf16": False, **overrides})   # TRL defaults to bf16 autocast where supported


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_sft_trainer_gets_the_balance_gradient_and_logs(tmp_path):
    """Router grads at step 1 with balance_coef c and with 0 differ by exactly the balance loss's gradient on the
    batch SFTTrainer built (recomputed independently by a plain forward of that batch)."""
    trl = pytest.importorskip("trl")
    texts = sft_texts()
    batches = []

    class Recording(with_adapters(trl.SFTTrainer)):
        def compute_loss(self, model, inputs, *args, **kwargs):
            batches.append({k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
            return super().compute_loss(model, inputs, *args, **kwargs)

    def run(model, out):
        grads = RouterGrads()
        args = sft_args(trl, out)
        trainer = Recording(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                            processing_class=word_tokenizer(), callbacks=[grads])
        trainer.train()
        return grads.grads, trainer.state.log_history[0]

    model = adapted(balance_coef=0.5)
    reference_model = copy.deepcopy(model).train()
    without = copy.deepcopy(model)
    for _, layer in adapter_layers(without):
        layer.lora_router.balance_coef = 0.0
    with_grads, logged = run(model, tmp_path / "c")
    without_grads, _ = run(without, tmp_path / "zero")
    assert len(batches) == 2 and torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    batch = {k: v for k, v in batches[0].items() if k in ("input_ids", "attention_mask", "position_ids")}
    reference_model(**batch)
    aux = collect_aux_loss(reference_model)
    aux.backward()
    assert logged["balance_loss"] == pytest.approx(float(aux), rel=1e-5)
    assert "routing/max_share" in logged and "routing/model.layers.0.self_attn.q_proj/e0" in logged
    for name, p in reference_model.named_parameters():
        if name.endswith("lora_router.weight"):
            torch.testing.assert_close(with_grads[name] - without_grads[name], p.grad, rtol=1e-3, atol=1e-6,
                                       msg=name)


@pytest.mark.slow  # the sqlite store's schema migrations: ~20 s on 2 shared cores
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
def test_mlflow_reporter_receives_the_balance_loss_and_shares(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "malora-trainer-test")
    trainer = AdapterTrainer(model=adapted(balance_coef=0.5),
                             args=train_args(tmp_path / "out", report_to=["mlflow"], save_strategy="no"),
                             train_dataset=examples())
    trainer.train()
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("malora-trainer-test")
    (run,) = client.search_runs([experiment.experiment_id])
    logged = [e for e in trainer.state.log_history if "balance_loss" in e]
    history = client.get_metric_history(run.info.run_id, "balance_loss")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([e["balance_loss"] for e in logged])
    name = "routing/model.layers.0.self_attn.q_proj/e0"
    assert [m.value for m in client.get_metric_history(run.info.run_id, name)] == pytest.approx(
        [e[name] for e in logged])
