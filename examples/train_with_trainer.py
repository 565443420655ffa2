"""Fine-tune a causal LM with MALoRA adapters through Hugging Face's ``Trainer``: copy this file and edit.

    python examples/train_with_trainer.py --smoke-test                  # tiny config-built LLaMA, 4 steps, CPU
    python examples/train_with_trainer.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data train.jsonl \
        --output-dir runs/malora --max-steps 1000 --report-to mlflow

``--data`` is a JSON-lines file with a "text" field per line. What malora adds to the plain ``Trainer`` recipe is
three lines: ``inject_adapters`` (wraps the target linears, freezes the rest), ``AdapterTrainer`` (adds the
routers' balance loss to the training loss, logs ``balance_loss`` and each layer's expert shares to every
``report_to`` reporter, saves ``checkpoint-<step>/adapter``) and ``load_adapter`` to use the result. For TRL,
``with_adapters(trl.SFTTrainer)`` is the same trainer with SFT's data handling.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, LlamaConfig,
                          LlamaForCausalLM, TrainingArguments)

from malora import MALoRAConfig, count_parameters, inject_adapters, load_adapter
from malora.trainer import ADAPTER_DIR, AdapterTrainer

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
    from datasets import load_dataset

    data = load_dataset("json", data_files=str(path), split="train")
    if "text" not in data.column_names:
        raise ValueError(f"{path}: every line needs a 'text' field (found {data.column_names}). Fix: rename it.")
    return data.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
                    batched=True, remove_columns=data.column_names)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke-test", action="store_true", help="tiny config-built model, random tokens, 4 steps")
    p.add_argument("--model", help="Hub id or local folder of a causal LM")
    p.add_argument("--data", type=Path, help="JSON-lines file with a 'text' field")
    p.add_argument("--output-dir", type=Path, help="checkpoints go here (default: a temporary folder)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--balance-coef", type=float, default=0.01, help="balance-loss coefficient (MALoRA: 0.01)")
    p.add_argument("--report-to", default="none", help="Trainer reporters, e.g. mlflow (default: none)")
    args = p.parse_args(argv)
    if not args.smoke_test and (args.model is None or args.data is None):
        p.error("--model and --data are required (or --smoke-test)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.output_dir is None:
        with tempfile.TemporaryDirectory(prefix="malora-trainer-") as tmp:
            return run(args, Path(tmp))
    return run(args, args.output_dir)


def run(args: argparse.Namespace, out: Path) -> int:
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
        steps, collator = args.max_steps, DataCollatorForLanguageModeling(tokenizer, mlm=False)

    inject_adapters(model, cfg)                                   # 1. adapters in, everything else frozen
    print(count_parameters(model))
    training = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=4e-4,
        warmup_steps=min(10, steps // 10), weight_decay=0.01, logging_steps=1 if args.smoke_test else 10,
        save_strategy="steps", save_steps=steps if args.smoke_test else 200, report_to=args.report_to,
        use_cpu=args.smoke_test, disable_tqdm=args.smoke_test)
    trainer = AdapterTrainer(model=model, args=training, train_dataset=train, data_collator=collator,
                             processing_class=tokenizer)       # 2. balance loss, routing logs, adapter saves
    trainer.train()

    last = next(e for e in reversed(trainer.state.log_history) if "balance_loss" in e)
    print(f"step {last['step']}: loss {last['loss']:.4f}, balance_loss {last['balance_loss']:.4f}, "
          f"largest expert share {last['routing/max_share']:.3f}")
    folder = out / f"checkpoint-{trainer.state.global_step}" / ADAPTER_DIR
    if args.smoke_test:                                           # 3. the saved adapter gives the same outputs
        restored = tiny_llama()
        load_adapter(restored, folder)
        ids = torch.stack([e["input_ids"] for e in train[:4]])
        with torch.no_grad():
            same = torch.equal(model.eval()(ids).logits, restored.eval()(ids).logits)
        if not same:
            print(f"error: the adapter in {folder} does not reproduce the trained model", file=sys.stderr)
            return 1
    print(f"adapter: {folder}  (load with malora.load_adapter(base_model, '{folder}'))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
