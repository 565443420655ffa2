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

import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _harness as h  # noqa: E402  (this checkout's packages first on sys.path)
from _harness import (SEPARATE, Clock, LoopRunner, hf_trainer, load_data, make_callback, model_dims,  # noqa: E402
                      step_flops, summarise)

VARIANTS = ("before", "ours", "hf_trainer_peft", "lora_r64", "molora", "malora", "mosld", *SEPARATE)
TARGETS_MET = [  # (name, numerator, denominator, bound)
    ("ours / before", "ours", "before", 1.7),
    ("ours / HF Trainer + peft (group_by_length)", "ours", "hf_trainer_peft", 1.25),
    ("MALoRA / LoRA r64", "malora", "lora_r64", 0.95),
    ("MALoRA / MALoRA separate ops", "malora", "malora_sep", 1.0),   # what the fused input side gains
    ("LoRA r64 / LoRA r64 separate ops", "lora_r64", "lora_r64_sep", 1.0),
]


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


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = h.parse_training_args(argv, __doc__.split("\n\n")[0])
    if args.precision:
        import train_precision  # one way: train_precision imports the harness, never this script

        return train_precision.run(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    names = [v for v in (args.variants or ",".join(VARIANTS)).split(",") if v]
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
    h.emit(result, args.json)
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
