"""Fine-tune a causal LM with MALoRA adapters through Hugging Face's ``Trainer``: copy this file and edit.

    python examples/train_with_trainer.py --smoke-test                  # tiny config-built LLaMA, 4 steps, CPU
    python examples/train_with_trainer.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data train.jsonl \
        --output-dir runs/malora --max-steps 1000 --report-to mlflow

``--data`` is a JSON-lines file with a "text" field per line (each text is one example, ended by EOS). What
malora adds to the plain ``Trainer`` recipe is three lines: ``inject_adapters`` (wraps the target linears, freezes
the rest), ``AdapterTrainer`` (adds the routers' balance loss to the training loss, logs ``balance_loss`` and each
layer's expert shares to every ``report_to`` reporter, saves the adapter in ``save_model`` and every
``checkpoint-<step>``) and ``load_adapter`` to use the result. For TRL, ``with_adapters(trl.SFTTrainer)`` is the
same trainer with SFT's data handling. Without ``--output-dir`` (only with ``--smoke-test``) nothing is kept.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainingArguments

from malora import MALoRAConfig, count_parameters, inject_adapters, load_adapter
from malora.trainer import AdapterTrainer

TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")   # MALoRA's (no o_proj)


def tiny_llama() -> LlamaForCausalLM:
    """A 2-layer LLaMA built from a config (random weights): enough to exercise the whole loop offline."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        pad_token_id=0))


def random_examples(n: int, width: int = 16) -> list[dict[str, torch.Tensor]]:
    """Right-padded random token sequences with labels (-100 on padding)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = width - i % 5
        ids = torch.randint(1, 128, (width,), generator=g)
        mask = (torch.arange(width) < length).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def text_dataset(path: Path, tokenizer, max_length: int):
    """Each text's tokens, cut to ``max_length - 1``, then EOS: the model learns where an example ends."""
    from datasets import load_dataset

    data = load_dataset("json", data_files=str(path), split="train")
    if "text" not in data.column_names:
        raise ValueError(f"{path}: every line needs a 'text' field (found {data.column_names}). Fix: rename it.")

    def encode(batch):
        ids = tokenizer(batch["text"], truncation=True, max_length=max_length - 1)["input_ids"]
        return {"input_ids": [row + [tokenizer.eos_token_id] for row in ids]}

    return data.map(encode, batched=True, remove_columns=data.column_names)


def pad_and_label(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` to the longest row; labels are the tokens, -100 on padding only.

    Masking by position, not by token id: with pad = EOS (a common fallback) a label mask built from
    ``input_ids == pad_id`` would drop every real EOS from the loss."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)      # (B, L)
    mask = torch.zeros((len(features), width), dtype=torch.long)           # (B, L) 1 = real token
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.as_tensor(f["input_ids"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke-test", action="store_true", help="tiny config-built model, random tokens, 4 steps")
    p.add_argument("--model", help="Hub id or local folder of a causal LM")
    p.add_argument("--data", type=Path, help="JSON-lines file with a 'text' field")
    p.add_argument("--output-dir", type=Path, help="checkpoints and the final adapter go here (required unless "
                   "--smoke-test, which then uses a temporary folder and keeps nothing)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--balance-coef", type=float, default=0.01, help="balance-loss coefficient (MALoRA: 0.01)")
    p.add_argument("--report-to", default="none", help="Trainer reporters, e.g. mlflow (default: none)")
    args = p.parse_args(argv)
    if not args.smoke_test and (args.model is None or args.data is None or args.output_dir is None):
        p.error("--model, --data and --output-dir are required (or --smoke-test)")
    if args.max_steps < 1:
        p.error(f"--max-steps must be at least 1, got {args.max_steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.output_dir is None:                                   # smoke test only (parse): nothing is kept
        with tempfile.TemporaryDirectory(prefix="malora-trainer-") as tmp:
            return run(args, Path(tmp), keep=False)
    return run(args, args.output_dir)


def run(args: argparse.Namespace, out: Path, keep: bool = True) -> int:
    if args.smoke_test:
        model, tokenizer, train = tiny_llama(), None, random_examples(16)
        cfg = MALoRAConfig(d=16, r_bar=6, num_experts=4, top_k=2, alpha=12.0, balance_coef=args.balance_coef,
                           target_modules=TARGETS)
        steps, collator = 4, None
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        train = text_dataset(args.data, tokenizer, args.max_length)
        cfg = MALoRAConfig(d=32, r_bar=12, num_experts=8, top_k=2, alpha=24.0, beta=1.0,
                           balance_coef=args.balance_coef, target_modules=TARGETS)
        steps, collator = args.max_steps, partial(pad_and_label, pad_id=tokenizer.pad_token_id)

    inject_adapters(model, cfg)                                   # 1. adapters in, everything else frozen
    print(count_parameters(model))
    training = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=4e-4,
        warmup_steps=min(10, steps // 10), weight_decay=0.01, logging_steps=1 if args.smoke_test else min(10, steps),
        save_strategy="steps", save_steps=steps if args.smoke_test else 200, report_to=args.report_to,
        use_cpu=args.smoke_test, disable_tqdm=args.smoke_test)
    trainer = AdapterTrainer(model=model, args=training, train_dataset=train, data_collator=collator,
                             processing_class=tokenizer)       # 2. balance loss, routing logs, adapter saves
    trainer.train()
    trainer.save_model(str(out))                                  # adapter_config.json + adapter_model.safetensors

    last = next((e for e in reversed(trainer.state.log_history) if "balance_loss" in e), None)
    if last is not None:
        print(f"step {last['step']}: loss {last['loss']:.4f} (LM), balance_loss {last['balance_loss']:.4f}, "
              f"largest expert share {last['routing/max_share']:.3f}")
    folder = out
    if args.smoke_test:                                           # 3. the saved adapter gives the same outputs
        restored = tiny_llama()
        load_adapter(restored, folder)
        ids = torch.stack([e["input_ids"] for e in train[:4]])
        with torch.no_grad():
            same = torch.equal(model.eval()(ids).logits, restored.eval()(ids).logits)
        if not same:
            print(f"error: the adapter in {folder} does not reproduce the trained model", file=sys.stderr)
            return 1
    if keep:
        print(f"adapter: {folder}  (load with malora.load_adapter(base_model, '{folder}'))")
    else:
        print("adapter not kept (smoke test without --output-dir)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
