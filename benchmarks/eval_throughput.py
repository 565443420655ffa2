"""Scoring throughput and accuracy in bf16 against fp32, paired on the same items (issue 19).

    python benchmarks/eval_throughput.py --per-task 100 --json        # SmolLM2, 400 items, ~10 min on one thread
    python benchmarks/eval_throughput.py --quick                      # tiny-llama smoke run, seconds

One process, one thread (``--threads``), two copies of the model: the fp32 one and the one held in bfloat16
(``load_model(dtype="bfloat16")``: natively bf16, no autocast; attention in bf16 since no backward follows, and the
log-softmax over the vocabulary in float32, as ``orchestrator.evaluation.scoring`` does). The items are the test
pools of ``--tasks`` (``--per-task`` each, ``data.split_seed`` 0), scored by option log-likelihood
(``--formulation cloze``: lm-eval's cloze strings, the default; ``label``: the option list). They are cut into ``--chunks`` chunks;
each chunk is scored by both precisions, their order alternating chunk by chunk, so the load of the shared machine
falls on both alike. Clock: the process CPU time (one thread: the ops' own cost).

Reported: items/s per precision and their ratio; accuracy per precision; the paired comparison on the same
items: discordant counts (b = right in fp32 only, c = right in bf16 only), McNemar's exact p (binomial test of
b against b + c, scipy), the 95 % paired-bootstrap CI of acc(bf16) - acc(fp32) (scipy, 10,000 resamples of
items); items whose pick changed; the largest |LL_bf16 - LL_fp32| over all options (nats) and its median.
``--json``: the last line is one JSON object (``items_per_s`` with ``fp32`` and ``bf16``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


def load_items(tasks: list[str], per_task: int, data_dir: Path) -> list[tuple[str, object]]:
    from orchestrator.data.tasks import load_suite

    suite = load_suite(tasks, data_dir, train_limit=1, val_limit=1, test_limit=per_task, split_seed=0)
    return [(task, ex) for task in tasks for ex in suite.test[task]]


def option_logliks(model, tokenizer, items, *, formulation: str, batch_size: int) -> list[list[float]]:
    """Per item, the log-likelihood of each option's continuation (nats), through the library's scoring."""
    from orchestrator.data.tasks import get_task
    from orchestrator.evaluation import scoring as sc
    from orchestrator.evaluation.accuracy import option_requests

    requests = [option_requests(get_task(task), ex, tokenizer, formulation=formulation) for task, ex in items]
    rows = sc.build_rows(requests, int(model.config.max_position_embeddings))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ll = sc.continuation_logprobs(model, rows, batch_size=batch_size, pad_id=pad)
    out, flat = [], 0
    for opts in requests:
        out.append([ll[flat + k] for k in range(len(opts))])
        flat += len(opts)
    return out


def paired(fp32: list[int], bf16: list[int], seed: int = 0) -> dict:
    """McNemar's exact test and a paired-bootstrap 95 % CI of mean(bf16) - mean(fp32) over the same items."""
    from scipy import stats

    a, b = np.asarray(fp32), np.asarray(bf16)
    only_fp32, only_bf16 = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = stats.binomtest(only_fp32, only_fp32 + only_bf16, 0.5).pvalue if only_fp32 + only_bf16 else 1.0
    diff = (b - a).astype(float)
    if np.all(diff == diff[0]):  # no variation to resample: the CI is the point
        low = high = float(diff[0])
    else:
        ci = stats.bootstrap((diff,), np.mean, n_resamples=10_000, confidence_level=0.95, method="percentile",
                             rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return {"n": len(a), "acc_fp32": float(a.mean()), "acc_bf16": float(b.mean()), "diff": float(diff.mean()),
            "diff_ci95": [low, high], "right_in_fp32_only": only_fp32, "right_in_bf16_only": only_bf16,
            "mcnemar_exact_p": float(p)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tasks", default="arc_e,arc_c,obqa,piqa")
    p.add_argument("--per-task", type=int, default=100)
    p.add_argument("--formulation", choices=("cloze", "label"), default="cloze")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunks", type=int, default=8, help="interleaving: chunks scored by both precisions in turn")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=os.environ.get("MALORA_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--quick", action="store_true", help="tiny-llama, 2 tasks x 4 items: a smoke test")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.tasks, args.per_task, args.chunks = "tiny-llama", "arc_e,piqa", 4, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from orchestrator.evaluation.scoring import pick
    from orchestrator.models.hardware import cpu_info
    from orchestrator.models.loading import load_model
    from orchestrator.models.precision import keep_freed_memory

    keep_freed_memory()
    items = load_items(args.tasks.split(","), args.per_task, Path(args.data_dir))
    models = {name: load_model(args.model, dtype=dtype) for name, dtype in PRECISIONS.items()}
    size = -(-len(items) // args.chunks)
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    ll = {name: [] for name in PRECISIONS}
    seconds = dict.fromkeys(PRECISIONS, 0.0)
    for c, chunk in enumerate(chunks):
        order = list(PRECISIONS) if c % 2 == 0 else list(PRECISIONS)[::-1]
        for name in order:
            model, tokenizer = models[name]
            t0 = time.process_time()
            ll[name] += option_logliks(model, tokenizer, chunk, formulation=args.formulation, batch_size=args.batch_size)
            seconds[name] += time.process_time() - t0
            print(f"chunk {c} {name}: {len(chunk) / (time.process_time() - t0):.2f} items/s", file=sys.stderr,
                  flush=True)
    hits = {name: [int(pick(s) == ex.answer_index) for s, (_, ex) in zip(ll[name], items)] for name in PRECISIONS}
    deltas = [abs(a - b) for sa, sb in zip(ll["fp32"], ll["bf16"]) for a, b in zip(sa, sb)]
    per_task = {}
    for task in args.tasks.split(","):
        idx = [i for i, (t, _) in enumerate(items) if t == task]
        per_task[task] = paired([hits["fp32"][i] for i in idx], [hits["bf16"][i] for i in idx])
    ips = {name: len(items) / seconds[name] for name in PRECISIONS}
    info = cpu_info()
    result = {
        "items_per_s": ips, "speedup_bf16": ips["bf16"] / ips["fp32"], "seconds": seconds,
        "paired": paired(hits["fp32"], hits["bf16"]), "per_task": per_task,
        "picks_changed": sum(int(pick(a) != pick(b)) for a, b in zip(ll["fp32"], ll["bf16"])),
        "max_abs_loglik_diff": max(deltas), "median_abs_loglik_diff": statistics.median(deltas),
        "options_scored": len(deltas), "items": len(items),
        "cpu": {"model": info["model"], "bf16_flags": [f for f in info["flags"] if "bf16" in f or "amx" in f]},
        "config": {k: v for k, v in vars(args).items() if k != "json"}, "torch": torch.__version__,
        "loadavg_1m": os.getloadavg()[0],
    }
    pr = result["paired"]
    print(f"items/s: fp32 {ips['fp32']:.2f}, bf16 {ips['bf16']:.2f} ({result['speedup_bf16']:.2f}x)")
    print(f"accuracy over {pr['n']} items: fp32 {pr['acc_fp32']:.4f}, bf16 {pr['acc_bf16']:.4f}, diff "
          f"{pr['diff']:+.4f} (95 % CI {pr['diff_ci95'][0]:+.4f} .. {pr['diff_ci95'][1]:+.4f}), right only in fp32 "
          f"{pr['right_in_fp32_only']}, only in bf16 {pr['right_in_bf16_only']}, McNemar p {pr['mcnemar_exact_p']:.3f}")
    print(f"picks changed: {result['picks_changed']}; |LL bf16 - LL fp32| max {result['max_abs_loglik_diff']:.4f} "
          f"nats, median {result['median_abs_loglik_diff']:.4f} over {len(deltas)} options")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
