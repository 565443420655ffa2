"""bf16 against fp32 training, and every variant's share of the core's own GEMM limit (issue 19).

    python benchmarks/train_throughput.py --precision --threads 1 --rounds 4 --steps 2 --json
    python benchmarks/train_throughput.py --precision --max-length 48 --batch-size 8 --json   # short, cloze-like
    python benchmarks/train_throughput.py --precision --quick                                  # tiny-llama smoke
    python benchmarks/train_precision.py --quick                                               # the same

Run by ``train_throughput.py --precision`` or on its own, with the same options, batches, clock, interleaving and
HF Trainer driver (``benchmarks/_harness.py``).
Variants, one process, identical batches (the length-grouped plan of ``ours``), one thread:

- ``ours_fp32``: our loop as before this issue: LoRA r16 on the float32 base, fp32 throughout.
- ``ours_bf16``: the same on the base *held* in bfloat16 (``load_model(dtype="bfloat16")``: attention in fp32
  where a backward follows, :mod:`orchestrator.models.attention`); adapter masters and AdamW state fp32, the
  adapter matrices cast to bf16 in the forward; no autocast.
- ``ours_autocast_bf16``: the same LoRA on the float32 base under ``torch.autocast(bfloat16)`` (every frozen
  weight cast per op): the alternative to holding the base in bf16, measured beside it.
- ``hf_trainer_peft_bf16``: ``transformers.Trainer`` + peft LoRA r16 with ``bf16=True`` on CPU (autocast over
  the float32 base, the usual recipe) and group-by-length sampling, fed our batches.
- ``lora_r64_bf16``, ``malora_bf16``, ``molora_bf16``, ``mosld_bf16``: ``ours_bf16`` with those adapters.
- ``ours_bf16_compiled``, ``lora_r64_bf16_compiled``, ``malora_bf16_compiled``: the same with every decoder block
  compiled (``malora.compile.compile_blocks``, ``train.compile``), compiled before the rounds on each kind of
  input the batches hold (:func:`compile_and_prime`; its seconds are ``compile_s``).

GEMM limit: the script times ``x W^T`` (forward) and ``dy W`` (backward to the input) in fp32 and bf16 at every
distinct (in, out) shape of the model's frozen linears with M = the mean positions per batch, and the head at M =
the mean response positions per batch; the limit of a precision is the model's mix of those products at their
measured rates: ``sum FLOPs / sum (FLOPs / rate)``, weighted by how many layers have each shape. Model FLOPs of a
step (as ``_harness.step_flops``): per real token ``4 N_body + 6 N_adapter`` (frozen weights: forward and
backward to the input only) plus causal attention ``6 L d_attn t`` at position t, plus ``4 V H`` per response
position (head forward and backward). ``limit_share``: a variant's model FLOPs per second over the bf16 limit,
the machine's real ceiling (``limit_share_own``: over its own precision's limit).

The process keeps freed memory mapped (``orchestrator.models.precision.keep_freed_memory``, as the worker does);
``--glibc-default`` leaves glibc's default (fresh zero-filled pages for large blocks), the loop before this issue.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _harness as h  # noqa: E402  (this checkout's packages first on sys.path)

LORA16 = h.ADAPTERS["ours"]
# variant -> (adapter of h.ADAPTERS, base held in, autocast, decoder blocks compiled)
VARIANTS = {
    "ours_fp32": ("ours", "float32", False, False),
    "ours_bf16": ("ours", "bfloat16", False, False),
    "ours_autocast_bf16": ("ours", "float32", True, False),
    "lora_r64_bf16": ("lora_r64", "bfloat16", False, False),
    "malora_bf16": ("malora", "bfloat16", False, False),
    "molora_bf16": ("molora", "bfloat16", False, False),
    "mosld_bf16": ("mosld", "bfloat16", False, False),
    "ours_bf16_compiled": ("ours", "bfloat16", False, True),
    "lora_r64_bf16_compiled": ("lora_r64", "bfloat16", False, True),
    "malora_bf16_compiled": ("malora", "bfloat16", False, True),
}
HF = "hf_trainer_peft_bf16"
TARGETS = [  # (name, numerator, denominator, bound)
    ("ours bf16 / ours fp32", "ours_bf16", "ours_fp32", 3.0),
    ("ours bf16 / HF Trainer + peft bf16", "ours_bf16", HF, 1.25),
    ("MALoRA bf16 / LoRA r64 bf16", "malora_bf16", "lora_r64_bf16", 0.95),
    ("ours bf16 held / ours autocast bf16", "ours_bf16", "ours_autocast_bf16", 1.0),
    ("ours bf16 compiled / ours fp32", "ours_bf16_compiled", "ours_fp32", 3.0),
    ("ours bf16 compiled / HF Trainer + peft bf16", "ours_bf16_compiled", HF, 1.25),
    ("MALoRA bf16 compiled / LoRA r64 bf16 compiled", "malora_bf16_compiled", "lora_r64_bf16_compiled", 0.95),
    ("ours bf16 compiled / ours bf16", "ours_bf16_compiled", "ours_bf16", 1.0),
]


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, min_s: float = 0.2) -> float:
    """GFLOP/s of (m, k) @ (k, n) -> (m, n) into a reused output, process CPU time, at least ``min_s`` timed."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)
    reps, t0 = 0, time.process_time()
    while (elapsed := time.process_time() - t0) < min_s:
        torch.mm(a, b, out=out)
        reps += 1
    return 2 * m * k * n * reps / elapsed / 1e9


def gemm_limits(base, positions: int, response: int) -> dict:
    """Measured fp32/bf16 rates per shape and the model-weighted limit of each precision (GFLOP/s)."""
    head = base.get_output_embeddings()
    shapes: dict[tuple[int, int, int], int] = {}
    for mod in base.modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            n, m = mod.in_features, mod.out_features
            for key in ((positions, n, m), (positions, m, n)):   # forward x W^T, backward dy W
                shapes[key] = shapes.get(key, 0) + 1
    v, h = head.weight.shape
    for key in ((response, h, v), (response, v, h)):
        shapes[key] = shapes.get(key, 0) + 1
    rates = {dt: {k: gemm_rate(*k, getattr(torch, name)) for k in shapes}
             for dt, name in (("fp32", "float32"), ("bf16", "bfloat16"))}
    flops = {k: 2 * k[0] * k[1] * k[2] * c for k, c in shapes.items()}
    limit = {dt: sum(flops.values()) / sum(f / rates[dt][k] for k, f in flops.items()) for dt in rates}
    table = [{"m": k[0], "k": k[1], "n": k[2], "count": c, "fp32": rates["fp32"][k], "bf16": rates["bf16"][k]}
             for k, c in shapes.items()]
    return {"limit": limit, "shapes": table}


def compile_and_prime(runner) -> float:
    """Compile the runner's decoder blocks and trace them on every input kind its batches hold; returns seconds.

    A block compiles once per kind of input: the first block's input needs no grad and the others' do, and a batch
    without padding reaches attention with no mask (transformers drops it for a causal SDPA) while a padded one
    has one. Those are one-off costs of a run; here they are paid before the timed rounds, on a padded and an
    unpadded batch of the plan (forward and backward, no optimiser step)."""
    from malora.compile import compile_blocks
    from malora.inject import collect_aux_loss

    model = runner.trial.model
    start = time.perf_counter()
    compile_blocks(model)
    runner.loss.train()                                                 # as train_step: dropout on
    kinds = {}
    for batch in runner.batches:
        kinds.setdefault(bool(batch["attention_mask"].all()), batch)
    for batch in kinds.values():
        with runner.trial.precision.context("cpu"):
            (runner.loss(**batch) + collect_aux_loss(model)).backward()
    runner.optim.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(args) -> int:
    from orchestrator.data.batching import epoch_batches
    from orchestrator.models.hardware import cpu_info
    from orchestrator.models.loading import load_model
    from orchestrator.models.precision import Precision, keep_freed_memory

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if not args.glibc_default:
        keep_freed_memory()
    names = [*VARIANTS, HF] if args.variants is None else [
        n for n in args.variants.split(",") if n in VARIANTS or n == HF]
    t_setup = time.perf_counter()
    spec, base, tokenizer, encoded = h.load_data(args)
    base_bf16 = load_model(args.model, dtype="bfloat16")[0]
    lengths = [len(e["input_ids"]) for e in encoded]
    n_batches = (args.warmup + args.rounds) * args.steps
    plan = epoch_batches(lengths, args.batch_size, 0, 1, spec.train.seed, 0, True)[:n_batches]
    clock = h.Clock(args.clock)
    held = Precision("bf16", "benchmark", "bfloat16")
    autocast = Precision("bf16", "benchmark", "float32")
    runners, compile_s = {}, {}
    for n in names:
        if n == HF:
            continue
        adapter, weights, cast, compiled = VARIANTS[n]
        runners[n] = h.LoopRunner(n, base_bf16 if weights == "bfloat16" else base, tokenizer, spec, plan, encoded,
                                   clock, adapter=adapter,
                                   precision=autocast if cast else held if weights == "bfloat16" else None)
        if compiled:
            compile_s[n] = compile_and_prime(runners[n])
    order = list(runners)

    def between_rounds(round_idx: int) -> None:
        shift = round_idx % max(1, len(order))
        for n in order[shift:] + order[:shift]:
            runners[n].run(args.steps, round_idx)

    callback = None
    setup_s = time.perf_counter() - t_setup
    if HF in names:
        callback = h.make_callback(clock, args.steps, between_rounds)
        h.hf_trainer(base, tokenizer, plan, encoded, args, callback, bf16=True).train()
    else:
        for r in range(args.warmup + args.rounds):
            between_rounds(r)
    records = {n: r.records for n, r in runners.items()}
    if callback is not None:
        records[HF] = callback.records
    summary = {n: h.summarise(records[n], args.warmup) for n in names}
    timed = [r for r in records[names[0]] if r["round"] >= args.warmup]
    positions = round(statistics.mean(r["positions"] for r in timed))
    response = round(statistics.mean(r["response"] for r in timed))
    gemm = gemm_limits(base, positions, response)
    dims = h.model_dims(base)
    lora16 = sum(p.numel() for p in runners["ours_bf16"].optim.params) if "ours_bf16" in runners else 0
    flops_per_s = {}
    for n in names:
        t = [r for r in records[n] if r["round"] >= args.warmup]
        trainable = runners[n].trainable if n in runners else lora16
        flops_per_s[n] = sum(h.step_flops(r, dims, trainable) for r in t) / sum(r["clock_s"] for r in t) / 1e9
    tps = {n: summary[n]["tokens_per_s"] for n in names}
    ratios = {name: tps[a] / tps[b] for name, a, b, _ in TARGETS if a in tps and b in tps}
    info = cpu_info()
    own = lambda n: "fp32" if n == "ours_fp32" else "bf16"  # noqa: E731
    result = {
        "tokens_per_s": tps, "tokens_per_s_wall": {n: summary[n]["tokens_per_s_wall"] for n in names},
        "ratios": ratios, "targets": {name: {"bound": b, "met": ratios[name] >= b}
                                      for name, _, _, b in TARGETS if name in ratios},
        "gemm_gflops": gemm["limit"], "gemm_shapes": gemm["shapes"], "model_gflops_per_s": flops_per_s,
        "limit_share": {n: flops_per_s[n] / gemm["limit"]["bf16"] for n in names},
        "limit_share_own": {n: flops_per_s[n] / gemm["limit"][own(n)] for n in names},
        "per_round_tokens_per_s": {n: summary[n]["per_round"] for n in names},
        "compile_s": compile_s,
        "batch": {"size": args.batch_size, "mean_positions": positions, "mean_response": response,
                  "pad_share": summary[names[0]]["pad_share"], "max_length": args.max_length},
        "cpu": {"model": info["model"], "bf16_flags": [f for f in info["flags"] if "bf16" in f or "amx" in f],
                "flags": info["flags"], "logical_cpus": info["logical_cpus"]},
        "keep_freed_memory": not args.glibc_default, "setup_s": setup_s, "clock": args.clock,
        "torch": torch.__version__, "loadavg_1m": os.getloadavg()[0],
        "config": {k: v for k, v in vars(args).items() if k != "json"},
    }
    print_table(result, names)
    h.emit(result, args.json)
    return 0


def print_table(result: dict, names: list[str]) -> None:
    tps, limit = result["tokens_per_s"], result["gemm_gflops"]
    print(f"CPU {result['cpu']['model']} ({', '.join(result['cpu']['bf16_flags']) or 'no bf16 units'}); batch "
          f"{result['batch']['size']} x {result['batch']['mean_positions'] / result['batch']['size']:.0f} positions")
    print(f"GEMM limit at the model's shapes: fp32 {limit['fp32']:.0f} GFLOP/s, bf16 {limit['bf16']:.0f} GFLOP/s")
    print(f"| variant | real tokens/s ({result['clock']} clock) | x ours_fp32 | model GFLOP/s | share of bf16 limit | "
          "per-round tokens/s |")
    print("|---|---:|---:|---:|---:|---|")
    for n in names:
        rel = tps[n] / tps["ours_fp32"] if "ours_fp32" in tps else float("nan")
        rounds = " ".join(f"{x:.0f}" for x in result["per_round_tokens_per_s"][n])
        print(f"| {n} | {tps[n]:.1f} | {rel:.2f} | {result['model_gflops_per_s'][n]:.1f} | "
              f"{result['limit_share'][n]:.1%} | {rounds} |")
    for name, target in result["targets"].items():
        print(f"{name}: {result['ratios'][name]:.3f} (target >= {target['bound']}) "
              f"{'ok' if target['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    return run(h.parse_training_args(argv, __doc__.split("\n\n")[0]))


if __name__ == "__main__":
    sys.exit(main())
