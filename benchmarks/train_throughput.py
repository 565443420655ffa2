"""Training throughput: our trial loop before and after issue 13, HF Trainer + peft, and the mixture adapters.

    python benchmarks/train_throughput.py --threads 1 --rounds 3 --json      # SmolLM2-135M, a few minutes
    python benchmarks/train_throughput.py --quick                            # tiny-llama smoke run, seconds

Variants, all in one process and all stepping ``orchestrator.training.worker.train_step`` unless noted
(AdamW, clipping, schedule, balance loss; batch ``--batch-size`` of the intra-domain mix, one micro-batch per
step):

- ``before``: the loop as it was: the model's own loss (logits at every position) on batches of a plain shuffle;
  LoRA r16, alpha 32, dropout 0.05 on q, k, v, gate, up, down (``ResponseLoss(full_logits=True)``).
- ``ours``: the same LoRA with the head at response positions only, on length-grouped batches.
- ``hf_trainer_peft``: ``transformers.Trainer`` (its own loop: ``train()``) with a peft ``LoraConfig`` of the
  same shape, grouped by length (``group_by_length=True`` in transformers 4, ``train_sampling_strategy=
  "group_by_length"`` in 5). ``--hf-sampler ours`` (default) gives it the very batches ``ours`` gets
  (its train sampler replaced by a sequential one over our grouped order, our collate); ``--hf-sampler hf``
  leaves its ``LengthGroupedSampler`` over the whole training set (other batches, same grouping rule).
- ``lora_r64`` (r64, alpha 128), ``molora`` (8 x r8, top-2), ``malora`` (d 32, r_bar 12, beta 1.25, 8 experts,
  top-2), ``mosld`` (r8, 8 experts, top-2, DropConnect 0.1): ``ours`` with that adapter, same batches, all on
  the six projections. ``lora_r64_sep`` / ``malora_sep``: the same with the layers' fused input side off
  (:mod:`malora.layers.fused`; frozen matmul, router and down-projection as separate autograd ops), its baseline.

Batches: every variant steps through the first ``(warmup + rounds) * steps`` batches of its own stream over the
same training set: ``ours``, the adapter variants and (``--hf-sampler ours``) HF the very same batches of the
grouped epoch, ``before`` those of the plain shuffle (re-batching the grouped batches' examples at random would
understate its padding: they are already of similar lengths). Real tokens/s makes the two comparable; the
padding share of the timed batches is printed next to that of a whole epoch. The frozen base weights are
shared by all variants (one copy in memory).

Timing: ``--warmup`` rounds, then ``--rounds`` timed rounds; a round runs ``--steps`` steps of every variant.
The HF Trainer drives the rounds from a ``TrainerCallback`` (after each of its rounds, ``on_step_end`` runs the
other variants' round), so its own loop runs unchanged; its step time runs from one ``on_step_end`` to the
next, i.e. includes its data loading and collate, as ours includes ours. The order of the other variants is
rotated by one every round. The default clock is the process CPU time (``--clock cpu``): with one thread it is
the ops' own cost even when other jobs share the cores; wall figures are printed as well. Real tokens/s =
non-pad tokens / step time.

Peak memory: the peak of live tensor bytes allocated during one step (the first warm-up step; a
``TorchDispatchMode``, ``adapter_speed.PeakTensorMemory``), weights excluded.

FLOP limit (CPU): ``threads x FMA pipes (2) x fp32 lanes (8 with AVX2, 16 with AVX-512) x 2 FLOP x clock``
(the clock from /proc/cpuinfo, or ``--clock-ghz``). Model FLOPs of a step with a frozen base: per real token
``4 N_body`` (forward, and backward to the inputs only: frozen weights need no weight gradient) ``+ 6 N_adapter
+ 6 L d_attn t`` (causal attention at position t: QK and AV, forward and two backward products, halved by the
mask) and per response position ``4 V H`` (head forward and backward to its input). The share is model FLOPs per
second over the limit.

``--json``: the last line of output is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy
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
VARIANTS = ("before", "ours", "hf_trainer_peft", "lora_r64", "molora", "malora", "mosld", *SEPARATE)
TARGETS_MET = [  # (name, numerator, denominator, bound)
    ("ours / before", "ours", "before", 1.7),
    ("ours / HF Trainer + peft (group_by_length)", "ours", "hf_trainer_peft", 1.25),
    ("MALoRA / LoRA r64", "malora", "lora_r64", 0.95),
    ("MALoRA / MALoRA separate ops", "malora", "malora_sep", 1.0),   # what the fused input side gains
    ("LoRA r64 / LoRA r64 separate ops", "lora_r64", "lora_r64_sep", 1.0),
]


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
    from adapter_speed import PeakTensorMemory

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
                from adapter_speed import PeakTensorMemory
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


# ------------------------------------------------------------------------------------------------ FLOPs
def cpu_flop_limit(threads: int, clock_ghz: float | None) -> dict:
    flags = ""
    ghz = clock_ghz
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        if ghz is None:
            mhz = [float(ln.split(":")[1]) for ln in text.splitlines() if ln.startswith("cpu MHz")]
            ghz = max(mhz) / 1000 if mhz else None
    lanes = 16 if " avx512f" in flags else 8 if " avx2" in flags else 4
    fma_pipes = 2
    peak = threads * fma_pipes * lanes * 2 * (ghz or 0) * 1e9
    return {"threads": threads, "fma_pipes": fma_pipes, "fp32_lanes": lanes, "clock_ghz": ghz, "flop_per_s": peak}


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


# ------------------------------------------------------------------------------------------------ main
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--quick", action="store_true", help="tiny-llama, 1 warm-up + 2 rounds: a smoke test")
    p.add_argument("--json", action="store_true")
    p.add_argument("--precision", action="store_true",
                   help="the bf16 comparison of issue 19 instead (benchmarks/train_precision.py)")
    p.add_argument("--glibc-default", action="store_true", help="--precision: leave glibc's allocator settings")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.rounds, args.train_limit = "tiny-llama", 2, 100
    if args.precision:
        import train_precision

        return train_precision.run(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2

    from orchestrator.data.batching import epoch_batches, grouped_batches, pad_share, random_batches

    t_setup = time.perf_counter()
    spec, base, tokenizer, encoded = load_data(args)
    lengths = [len(e["input_ids"]) for e in encoded]
    n_batches = (args.warmup + args.rounds) * args.steps
    grouped = epoch_batches(lengths, args.batch_size, 0, 1, spec.train.seed, 0, True)[:n_batches]
    plain = random_batches(len(encoded), args.batch_size, 0, 1, spec.train.seed, 0)[:n_batches]
    epoch_share = lambda plan: statistics.mean(pad_share([lengths[i] for i in b]) for b in plan)  # noqa: E731
    data_notes = {
        "train_examples": len(encoded), "mean_length": statistics.mean(lengths),
        "pad_share_epoch_grouped": epoch_share(grouped_batches(lengths, args.batch_size, 0, 1, 0, 0)),
        "pad_share_epoch_random": epoch_share(random_batches(len(lengths), args.batch_size, 0, 1, 0, 0)),
    }
    dims = model_dims(base)
    clock = Clock(args.clock)
    runners = {n: LoopRunner(n, base, tokenizer, spec, plain if n == "before" else grouped, encoded, clock)
               for n in names if n != "hf_trainer_peft"}
    order = list(runners)

    def between_rounds(round_idx: int) -> None:
        shift = round_idx % max(1, len(order))
        for n in order[shift:] + order[:shift]:
            runners[n].run(args.steps, round_idx, measure_memory=round_idx == 0)

    callback = None
    setup_s = time.perf_counter() - t_setup
    if "hf_trainer_peft" in names:
        callback = make_callback(clock, args.steps, between_rounds)
        hf_trainer(base, tokenizer, grouped, encoded, args, callback).train()
    else:
        for r in range(args.warmup + args.rounds):
            between_rounds(r)

    records = {n: r.records for n, r in runners.items()}
    peaks = {n: r.peak_mib for n, r in runners.items()}
    if callback is not None:
        records["hf_trainer_peft"], peaks["hf_trainer_peft"] = callback.records, callback.peak_mib
    summary = {n: summarise(records[n], args.warmup) for n in names}
    limit = cpu_flop_limit(args.threads, args.clock_ghz)
    flop_share = {}
    for n in ("ours", "before", "lora_r64"):
        if n in runners and limit["flop_per_s"]:
            timed = [r for r in records[n] if r["round"] >= args.warmup]
            flops = sum(step_flops(r, dims, runners[n].trainable) for r in timed)
            flop_share[n] = flops / sum(r["clock_s"] for r in timed) / limit["flop_per_s"]
    tps = {n: summary[n]["tokens_per_s"] for n in names}
    ratios = {name: tps[a] / tps[b] for name, a, b, _ in TARGETS_MET if a in tps and b in tps}
    result = {
        "tokens_per_s": tps, "tokens_per_s_wall": {n: summary[n]["tokens_per_s_wall"] for n in names},
        "ratios": ratios, "targets": {name: {"bound": bound, "met": ratios[name] >= bound}
                                      for name, a, b, bound in TARGETS_MET if name in ratios},
        "flop_limit_share": flop_share, "flop_limit": limit, "model_dims": dims,
        "peak_memory_mib": peaks, "per_round_tokens_per_s": {n: summary[n]["per_round"] for n in names},
        "pad_share_timed": {n: summary[n]["pad_share"] for n in names},
        "response_share_timed": {n: summary[n]["response_share"] for n in names},
        "real_tokens_timed": {n: summary[n]["real_tokens"] for n in names},
        "data": data_notes, "setup_s": setup_s, "clock": args.clock,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
    }
    print_table(result, names)
    if args.json:
        print(json.dumps(result))
    return 0


def print_table(result: dict, names: list[str]) -> None:
    tps, wall, mem = result["tokens_per_s"], result["tokens_per_s_wall"], result["peak_memory_mib"]
    print(f"| variant | real tokens/s ({result['clock']} clock) | wall | x before | pad share | peak MiB | "
          "per-round tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for n in names:
        rel = tps[n] / tps["before"] if "before" in tps else float("nan")
        rounds = " ".join(f"{x:.1f}" for x in result["per_round_tokens_per_s"][n])
        peak = f"{mem[n]:.0f}" if mem.get(n) is not None else "-"
        print(f"| {n} | {tps[n]:.1f} | {wall[n]:.1f} | {rel:.2f} | {result['pad_share_timed'][n]:.3f} | {peak} | "
              f"{rounds} |")
    for name, target in result["targets"].items():
        verdict = "ok" if target["met"] else "MISSED"
        print(f"{name}: {result['ratios'][name]:.3f} (target >= {target['bound']}) {verdict}")
    for n, share in result["flop_limit_share"].items():
        print(f"{n}: {share:.1%} of the CPU FLOP limit ({result['flop_limit']['flop_per_s'] / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    sys.exit(main())
