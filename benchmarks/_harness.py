"""What the benchmark scripts share: the checkout on ``sys.path``, the machine record and the JSON line, and the
training harness (our trial loop on a shared-weight copy of the base, the HF Trainer + peft driver, the batch
records and their summary) that ``train_throughput.py``, ``train_precision.py``, ``precision_loss_curve.py`` and
the probes in ``probes/`` time.

A script puts this folder on ``sys.path`` and imports it first (``import _harness``): that puts this checkout's
packages ahead of an installed copy. Scripts import this module, never each other's ``main``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
for _path in (BENCHMARKS, ROOT):  # this checkout's packages first, then the scripts beside this one
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
LORA16 = ("lora", {"r": 16, "alpha": 32.0, "dropout": 0.05})
ADAPTERS = {  # variant -> (malora kind, config fields); all on TARGETS
    "before": LORA16, "ours": LORA16,
    "lora_r64": ("lora", {"r": 64, "alpha": 128.0, "dropout": 0.05}),
    "molora": ("molora", {"r": 8, "num_experts": 8, "top_k": 2, "alpha": 16.0, "dropout": 0.05}),
    "malora": ("malora", {"d": 32, "r_bar": 12, "beta": 1.25, "num_experts": 8, "top_k": 2, "alpha": 24.0,
                          "dropout": 0.05}),
    "mosld": ("mosld", {"r": 8, "num_experts": 8, "top_k": 2, "dropconnect": 0.1, "alpha": 16.0}),
}
SEPARATE = {"lora_r64_sep": "lora_r64", "malora_sep": "malora"}  # fused input side off (malora.layers.fused)
ADAPTERS.update({name: ADAPTERS[of] for name, of in SEPARATE.items()})


# ------------------------------------------------------------------------------------------------ clocks
class Clock:
    def __init__(self, kind: str):
        self.kind = kind

    def now(self) -> tuple[float, float]:
        """(chosen clock, wall) in seconds."""
        return (time.process_time() if self.kind == "cpu" else time.perf_counter()), time.perf_counter()


def shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters and buffers are the base's own tensors (frozen: safe to share)."""
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(base, memo)


def batch_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(real tokens, positions, response positions that carry loss) of a collated batch."""
    mask = batch["attention_mask"]
    return int(mask.sum()), mask.numel(), int((batch["labels"][:, 1:] != -100).sum())


# ------------------------------------------------------------------------------------------------ our loop
class LoopRunner:
    """One variant of our loop: its adapter on a shared-weight copy, its optimiser, its batch plan."""

    def __init__(self, name: str, base, tokenizer, spec, plan: list[list[int]], encoded: list[dict], clock: Clock,
                 *, adapter: str | None = None, precision=None):
        from malora.config import CONFIG_CLASSES
        from malora.inject import adapter_layers, inject_adapters
        from orchestrator.data.tokenize import collate
        from orchestrator.training import worker
        from orchestrator.training.loss import ResponseLoss

        kind, fields = ADAPTERS[adapter or name]
        model = shared_copy(base)
        torch.manual_seed(0)
        cfg = CONFIG_CLASSES[kind](**fields, target_modules=TARGETS)
        inject_adapters(model, cfg)
        for _, layer in adapter_layers(model):
            layer.fused_input = name not in SEPARATE
        self.name, self.spec, self.clock, self.worker = name, spec, clock, worker
        self.trial = worker.TrialModel(model, tokenizer, kind, {}, cfg, None, precision or worker.FP32)
        self.optim = worker.build_optimisation(self.trial, spec, steps=len(plan))
        self.loss = ResponseLoss(model, full_logits=name == "before")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batches = [collate([encoded[j] for j in idx], pad) for idx in plan]
        self.stream = iter([(0, b) for b in self.batches])
        self.step, self.window = 0, worker.new_window()
        self.trainable = sum(p.numel() for p in self.optim.params)
        self.records: list[dict] = []
        self.peak_mib: float | None = None

    def run(self, steps: int, round_idx: int, measure_memory: bool = False) -> None:
        for _ in range(steps):
            batch = self.batches[self.step]
            c0, w0 = self.clock.now()
            with memory_tracker(self.trial.model) if measure_memory and self.peak_mib is None else _no_tracker() as mem:
                self.worker.train_step(self.loss, self.trial, self.optim, self.stream, self.spec, 1, self.step,
                                       self.window, torch.device("cpu"))
            c1, w1 = self.clock.now()
            if mem is not None:
                self.peak_mib = mem.peak / 2**20
            self.records.append(record(round_idx, c1 - c0, w1 - w0, batch))
            print(f"round {round_idx} {self.name}: {c1 - c0:.2f} s", file=sys.stderr, flush=True)
            self.step += 1


def record(round_idx: int, clock_s: float, wall_s: float, batch: dict[str, torch.Tensor]) -> dict:
    tokens, positions, response = batch_counts(batch)
    lengths = batch["attention_mask"].sum(1).tolist()
    return {"round": round_idx, "clock_s": clock_s, "wall_s": wall_s, "tokens": tokens, "positions": positions,
            "response": response, "lengths": lengths}


@contextlib.contextmanager
def _no_tracker():
    yield None


@contextlib.contextmanager
def memory_tracker(model: torch.nn.Module):
    from adapter_speed import PeakTensorMemory  # the benchmarks folder is on sys.path

    with PeakTensorMemory(list(model.parameters()) + list(model.buffers())) as tracker:
        yield tracker


# ------------------------------------------------------------------------------------------------ HF Trainer
def hf_trainer(base, tokenizer, plan: list[list[int]], encoded: list[dict], args, callback, *, bf16: bool = False):
    """HF Trainer + peft LoRA r16 (alpha 32, dropout 0.05, TARGETS), grouped by length, our collate."""
    import peft
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    from orchestrator.data.tokenize import collate

    model = peft.get_peft_model(shared_copy(base), peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep_order = args.hf_sampler == "ours"
    data = [encoded[j] for idx in plan for j in idx] if keep_order else list(encoded)

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset) if keep_order else super()._get_train_sampler(train_dataset)

    def collator(items: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate([{k: it[k] for k in ("input_ids", "labels", "attention_mask")} for it in items], pad)
        callback.batches.append(batch)
        return batch

    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-throughput-"), per_device_train_batch_size=args.batch_size,
        max_steps=len(plan), learning_rate=4.0e-4, weight_decay=0.01, lr_scheduler_type="cosine",
        warmup_steps=0.1, max_grad_norm=1.0, train_sampling_strategy="group_by_length", logging_strategy="no",
        save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        remove_unused_columns=False, bf16=bf16)
    return OrderedTrainer(model=model, args=targs, train_dataset=data, data_collator=collator,
                          callbacks=[callback])


def make_callback(clock: Clock, steps: int, between_rounds):
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        """Times each HF step (on_step_end to on_step_end) and runs the other variants after each round."""

        def __init__(self):
            self.batches: list[dict] = []
            self.records: list[dict] = []
            self.peak_mib: float | None = None
            self._mem = None
            self._last = None

        def on_train_begin(self, args, state, control, **kw):
            self._last = clock.now()

        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 0:  # first (warm-up) step: measure memory
                from adapter_speed import PeakTensorMemory  # the benchmarks folder is on sys.path
                self._mem = PeakTensorMemory(list(model.parameters()) + list(model.buffers()))
                self._mem.__enter__()

        def on_step_end(self, args, state, control, **kw):
            now = clock.now()
            if self._mem is not None:
                self._mem.__exit__(None, None, None)
                self.peak_mib, self._mem = self._mem.peak / 2**20, None
            round_idx = (state.global_step - 1) // steps
            self.records.append(record(round_idx, now[0] - self._last[0], now[1] - self._last[1],
                                       self.batches.pop(0)))
            if state.global_step % steps == 0:
                between_rounds(round_idx)
            self._last = clock.now()

    return Interleave()


# ------------------------------------------------------------------------------------------------ data
def load_data(args):
    from orchestrator.models.loading import load_model
    from orchestrator.spec.space import load_space
    from orchestrator.training import worker

    spec = load_space(Path(args.space))
    spec = dataclasses.replace(
        spec, model=dataclasses.replace(spec.model, name=args.model),
        train=dataclasses.replace(spec.train, batch_size=args.batch_size, grad_accum=1, precision="fp32",
                                  max_grad_norm=1.0, group_by_length=True),
        data=dataclasses.replace(spec.data, train_limit=args.train_limit, max_length=args.max_length))
    base, tokenizer = load_model(args.model, dtype="float32")
    encoded = worker.build_training_data(spec, tokenizer)[0]
    return spec, base, tokenizer, encoded


def summarise(records: list[dict], warmup: int) -> dict:
    timed = [r for r in records if r["round"] >= warmup]
    tokens = sum(r["tokens"] for r in timed)
    per_round = {}
    for r in timed:
        t, c = per_round.get(r["round"], (0, 0.0))
        per_round[r["round"]] = (t + r["tokens"], c + r["clock_s"])
    return {"tokens_per_s": tokens / sum(r["clock_s"] for r in timed),
            "tokens_per_s_wall": tokens / sum(r["wall_s"] for r in timed),
            "per_round": [t / c for t, c in per_round.values()],
            "pad_share": 1 - tokens / sum(r["positions"] for r in timed), "real_tokens": tokens,
            "response_share": sum(r["response"] for r in timed) / tokens}



def model_dims(base) -> dict:
    head = base.get_output_embeddings()
    body = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    c = base.config
    return {"n_body": body, "layers": c.num_hidden_layers, "d_attn": c.num_attention_heads * getattr(
        c, "head_dim", c.hidden_size // c.num_attention_heads), "vocab": c.vocab_size, "hidden": c.hidden_size}


def step_flops(rec: dict, dims: dict, n_adapter: int) -> float:
    per_token = 4 * dims["n_body"] + 6 * n_adapter
    attn = sum(6 * dims["layers"] * dims["d_attn"] * n * (n + 1) / 2 for n in rec["lengths"])
    return per_token * rec["tokens"] + attn + 4 * dims["vocab"] * dims["hidden"] * rec["response"]


# ------------------------------------------------------------------------------------------------ output
def machine() -> dict:
    """What a figure was measured on: CPU model and flags (``orchestrator.models.hardware.cpu_info``), torch,
    threads, logical CPUs and the 1-minute load average (the shared box's contention)."""
    from orchestrator.models.hardware import cpu_info

    return {"cpu": cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]}


def emit(result: dict, as_json: bool) -> None:
    """With ``--json``, the last line of a script's output: ``result`` as one JSON object."""
    if as_json:
        print(json.dumps(result))


# ------------------------------------------------------------------------------------------------ arguments
def training_parser(description: str) -> argparse.ArgumentParser:
    """The options of ``train_throughput.py`` and ``train_precision.py`` (one run, one batch plan, one clock)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "intra_domain.yaml"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-limit", type=int, default=400, help="training examples per task")
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--clock-ghz", type=float, default=None, help="CPU clock for the FLOP limit (default: cpuinfo)")
    p.add_argument("--hf-sampler", choices=("ours", "hf"), default="ours")
    p.add_argument("--variants", default=None, help="comma-separated (default: every variant of the script)")
    p.add_argument("--quick", action="store_true", help="tiny-llama, 1 warm-up + 2 rounds: a smoke test")
    p.add_argument("--json", action="store_true")
    p.add_argument("--precision", action="store_true",
                   help="the bf16 comparison of issue 19 instead (benchmarks/train_precision.py)")
    p.add_argument("--glibc-default", action="store_true", help="--precision: leave glibc's allocator settings")
    return p


def parse_training_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    args = training_parser(description).parse_args(argv)
    if args.quick:
        args.model, args.rounds, args.train_limit = "tiny-llama", 2, 100
    return args


def scoring_at(rev: str):
    """``orchestrator/evaluation/scoring.py`` as it was at git revision ``rev``, as a module of its own (an earlier
    scorer to time against this checkout's, in one process: ``eval_throughput.py --baseline``, ``cloze_scoring.py``)."""
    import subprocess
    from types import ModuleType

    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:orchestrator/evaluation/scoring.py"],
                          check=True, capture_output=True, text=True).stdout
    module = ModuleType(f"scoring_at_{rev}")
    module.__file__ = f"{rev}:orchestrator/evaluation/scoring.py"
    sys.modules[module.__name__] = module  # dataclasses look their module up while the class is built
    exec(compile(text, module.__file__, "exec"), module.__dict__)
    return module
