"""Scoring throughput: bf16 against fp32 (issue 19), and the packed scorer against an earlier one (issue 30).

    python benchmarks/eval_throughput.py --per-task 100 --json        # SmolLM2, bf16 vs fp32, ~10 min on one thread
    python benchmarks/eval_throughput.py --quick                      # tiny-llama smoke run, seconds
    python benchmarks/eval_throughput.py --baseline 67471d5 --tasks arc_c,arc_e,piqa,obqa,boolq --per-task 40 --json

Precision mode (default): one process, one thread (``--threads``), two copies of the model: the fp32 one and the
one held in bfloat16 (``load_model(dtype="bfloat16")``: natively bf16, no autocast; attention in bf16 since no
backward follows, and the log-softmax over the vocabulary in float32, as ``orchestrator.evaluation.scoring``
does). Baseline mode (``--baseline REV``): one fp32 model, two scorers: ``scoring.py`` as it was at git revision
``REV`` (loaded from ``git show``; its ``shared_context_logprobs``, the cloze path held-out scoring used there:
one context pass per item with a key/value cache, option rows continued from it; items with short contexts one row
per option) against this checkout's packed ``option_logprobs``, on the same fitted requests.

The items are the test pools of ``--tasks`` (``--per-task`` each, ``data.split_seed`` 0), scored by option
log-likelihood (``--formulation cloze``: lm-eval's cloze strings, the default; ``label``: the option list), cut to
``--max-length`` (the study's ``data.max_length``) as training cuts them. They are cut into ``--chunks`` chunks;
each chunk is scored by both sides, their order alternating chunk by chunk, so the load of the shared machine
falls on both alike. Clock: the process CPU time (one thread: the ops' own cost).

Reported: items/s per side and their ratio; accuracy per side; the paired comparison on the same items:
discordant counts (b = right on the first side only, c = on the second only), McNemar's exact p (binomial test of
b against b + c, scipy), the 95 % paired-bootstrap CI of the difference (scipy, 10,000 resamples of items); items
whose pick changed (``acc`` and ``acc_norm``); the largest |ΔLL| over all options (nats) and its median.
``--json``: the last line is one JSON object (``items_per_s`` keyed by side).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402  (this checkout's packages first)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


def load_items(tasks: list[str], per_task: int, data_dir: Path) -> list[tuple[str, object]]:
    from orchestrator.data.tasks import load_suite

    suite = load_suite(tasks, data_dir, train_limit=1, val_limit=1, test_limit=per_task, split_seed=0)
    return [(task, ex) for task in tasks for ex in suite.test[task]]


def option_logliks(model, tokenizer, items, *, formulation: str, batch_size: int, max_length: int,
                   scorer=None) -> list[list[float]]:
    """Per item, the log-likelihood of each option's continuation (nats): this checkout's scoring, or with
    ``scorer`` (an earlier ``scoring`` module) its ``shared_context_logprobs`` on the same fitted requests."""
    from orchestrator.data.tasks import get_task
    from orchestrator.evaluation import scoring as sc
    from orchestrator.evaluation.accuracy import option_requests

    requests = [option_requests(get_task(task), ex, tokenizer, formulation=formulation) for task, ex in items]
    if scorer is None:
        return sc.item_logprobs(model, tokenizer, requests, max_length=max_length, batch_size=batch_size)
    fitted = sc.fit_requests(tokenizer, requests, max_length)
    if any(r is None for r in fitted):
        raise SystemExit("an item does not fit --max-length: raise it (the sides must score the same requests)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ll = scorer.shared_context_logprobs(model, fitted, batch_size=batch_size, pad_id=pad, max_length=max_length)
    out, flat = [], 0
    for opts in fitted:
        out.append([ll[flat + k] for k in range(len(opts))])
        flat += len(opts)
    return out


def norm_picks(items, ll, formulation: str) -> list[int]:
    """acc_norm's pick per item: LL / characters of the option's doc_to_choice string."""
    from orchestrator.data.tasks import get_task
    from orchestrator.evaluation.accuracy import choice_lengths
    from orchestrator.evaluation.scoring import pick

    return [pick([s / n for s, n in zip(scores, choice_lengths(get_task(t), ex, formulation))])
            for scores, (t, ex) in zip(ll, items)]


def paired(first: list[int], second: list[int], seed: int = 0, names: tuple[str, str] = ("fp32", "bf16")) -> dict:
    """McNemar's exact test and a paired-bootstrap 95 % CI of mean(second) - mean(first) over the same items."""
    from scipy import stats

    one, two = names
    a, b = np.asarray(first), np.asarray(second)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    diff = (b - a).astype(float)
    if np.all(diff == diff[0]):  # no variation to resample: the CI is the point
        low = high = float(diff[0])
    else:
        ci = stats.bootstrap((diff,), np.mean, n_resamples=10_000, confidence_level=0.95, method="percentile",
                             rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return {"n": len(a), f"acc_{one}": float(a.mean()), f"acc_{two}": float(b.mean()), "diff": float(diff.mean()),
            "diff_ci95": [low, high], f"right_in_{one}_only": only_a, f"right_in_{two}_only": only_b,
            "mcnemar_exact_p": float(p)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tasks", default="arc_e,arc_c,obqa,piqa")
    p.add_argument("--per-task", type=int, default=100)
    p.add_argument("--formulation", choices=("cloze", "label"), default="cloze")
    p.add_argument("--batch-size", type=int, default=16, help="eval.batch_size (the study's: 16)")
    p.add_argument("--max-length", type=int, default=256, help="data.max_length (the study's: 256)")
    p.add_argument("--baseline", metavar="REV", help="compare this checkout's scoring with scoring.py at git REV "
                   "(fp32) instead of bf16 with fp32")
    p.add_argument("--chunks", type=int, default=8, help="interleaving: chunks scored by both sides in turn")
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
    if args.baseline:  # side -> (model, tokenizer, earlier scoring module or None for this checkout's)
        model, tokenizer = load_model(args.model, dtype="float32")
        sides = {"before": (model, tokenizer, _harness.scoring_at(args.baseline)), "packed": (model, tokenizer, None)}
    else:
        sides = {name: (*load_model(args.model, dtype=dtype), None) for name, dtype in PRECISIONS.items()}
    names = tuple(sides)
    size = -(-len(items) // args.chunks)
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    ll = {name: [] for name in names}
    seconds = dict.fromkeys(names, 0.0)
    for c, chunk in enumerate(chunks):
        for name in (names if c % 2 == 0 else names[::-1]):
            model, tokenizer, scorer = sides[name]
            t0 = time.process_time()
            ll[name] += option_logliks(model, tokenizer, chunk, formulation=args.formulation,
                                       batch_size=args.batch_size, max_length=args.max_length, scorer=scorer)
            seconds[name] += time.process_time() - t0
            print(f"chunk {c} {name}: {len(chunk) / (time.process_time() - t0):.2f} items/s", file=sys.stderr,
                  flush=True)
    one, two = names
    hits = {name: [int(pick(s) == ex.answer_index) for s, (_, ex) in zip(ll[name], items)] for name in names}
    norm = {name: norm_picks(items, ll[name], args.formulation) for name in names}
    deltas = [abs(a - b) for sa, sb in zip(ll[one], ll[two]) for a, b in zip(sa, sb)]
    per_task = {}
    for task in args.tasks.split(","):
        idx = [i for i, (t, _) in enumerate(items) if t == task]
        per_task[task] = paired([hits[one][i] for i in idx], [hits[two][i] for i in idx], names=names)
    ips = {name: len(items) / seconds[name] for name in names}
    info = cpu_info()
    result = {
        "items_per_s": ips, f"speedup_{two}": ips[two] / ips[one], "seconds": seconds,
        "paired": paired(hits[one], hits[two], names=names), "per_task": per_task,
        "picks_changed": sum(int(pick(a) != pick(b)) for a, b in zip(ll[one], ll[two])),
        "norm_picks_changed": sum(int(a != b) for a, b in zip(norm[one], norm[two])),
        "max_abs_loglik_diff": max(deltas), "median_abs_loglik_diff": statistics.median(deltas),
        "options_scored": len(deltas), "items": len(items),
        "cpu": {"model": info["model"], "flags": info["flags"], "bf16_flags": [f for f in info["flags"]
                                                                               if "bf16" in f or "amx" in f]},
        "config": {k: v for k, v in vars(args).items() if k != "json"}, "torch": torch.__version__,
        "loadavg_1m": os.getloadavg()[0],
    }
    pr = result["paired"]
    print(f"items/s: {one} {ips[one]:.2f}, {two} {ips[two]:.2f} ({result[f'speedup_{two}']:.2f}x)")
    print(f"accuracy over {pr['n']} items: {one} {pr[f'acc_{one}']:.4f}, {two} {pr[f'acc_{two}']:.4f}, diff "
          f"{pr['diff']:+.4f} (95 % CI {pr['diff_ci95'][0]:+.4f} .. {pr['diff_ci95'][1]:+.4f}), right only in {one} "
          f"{pr[f'right_in_{one}_only']}, only in {two} {pr[f'right_in_{two}_only']}, McNemar p "
          f"{pr['mcnemar_exact_p']:.3f}")
    print(f"picks changed: acc {result['picks_changed']}, acc_norm {result['norm_picks_changed']}; |LL {two} - LL "
          f"{one}| max {result['max_abs_loglik_diff']:.2e} nats, median {result['median_abs_loglik_diff']:.2e} over "
          f"{len(deltas)} options")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
