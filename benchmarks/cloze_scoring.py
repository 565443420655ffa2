"""Cloze scoring: one row per option vs the item's context run once with a key/value cache.

    python benchmarks/cloze_scoring.py --limit 100 --rounds 3 --json      # SmolLM2-135M, 5 intra-domain tasks
    python benchmarks/cloze_scoring.py --model tiny-llama --limit 8 --rounds 1   # seconds

Both paths score the same requests (``orchestrator.evaluation.accuracy.option_requests`` in the cloze
formulation) of the intra-domain test pools (``load_suite("intra_domain", test_limit=--limit)``, split seed 0):

- ``rows``: ``scoring.build_rows`` + ``scoring.continuation_logprobs``, one row ``context + option`` per option;
- ``cache``: ``scoring.shared_context_logprobs``, the context once per item, every option continued from its
  cache.

Per task and round, the two run back to back in alternating order in one process on one thread (``--threads``),
so a busy machine slows both alike; the time is the process CPU time (``--clock cpu``, default) or wall time.
Tokens: the input positions the forwards run, real (non-pad) and padded. The log-likelihoods of the two paths
are compared (max absolute difference). ``--json``: the last line is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.data.tasks import default_data_dir, get_task, load_suite  # noqa: E402
from orchestrator.evaluation import scoring as sc  # noqa: E402
from orchestrator.evaluation.accuracy import option_requests  # noqa: E402
from orchestrator.models.loading import load_model  # noqa: E402


class Positions:
    """Counts the input positions (all, and non-pad) of every forward of a model."""

    def __init__(self, model: torch.nn.Module):
        self.total = self.real = 0
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, _module, _args, kwargs) -> None:
        self.total += kwargs["input_ids"].numel()
        mask = kwargs.get("attention_mask")
        self.real += int(mask[:, -kwargs["input_ids"].shape[1]:].sum()) if mask is not None else \
            kwargs["input_ids"].numel()

    def take(self) -> tuple[int, int]:
        out = (self.real, self.total)
        self.total = self.real = 0
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--limit", type=int, default=100, help="test items per task")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model, tok = load_model(args.model)
    model.eval()
    suite = load_suite("intra_domain", default_data_dir(), test_limit=args.limit)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    max_length = int(model.config.max_position_embeddings)
    counter = Positions(model)
    out: dict = {"model": args.model, "limit": args.limit, "rounds": args.rounds, "threads": args.threads,
                 "clock": args.clock, "tasks": {}}
    paths = {
        "rows": lambda reqs: sc.continuation_logprobs(model, sc.build_rows(reqs, max_length),
                                                      batch_size=args.batch_size, pad_id=pad),
        "cache": lambda reqs: sc.shared_context_logprobs(model, reqs, batch_size=args.batch_size, pad_id=pad,
                                                         max_length=max_length),
    }
    for name in suite.tasks:
        task = get_task(name)
        reqs = [option_requests(task, ex, tok, formulation="cloze") for ex in suite.test[name]]
        times = {k: [] for k in paths}
        tokens, lls = {}, {}
        for r in range(args.rounds):
            for key in (("rows", "cache") if r % 2 == 0 else ("cache", "rows")):
                t0 = clock()
                lls[key] = paths[key](reqs)
                times[key].append(clock() - t0)
                tokens[key] = counter.take()
        diff = max(abs(lls["rows"][i] - lls["cache"][i]) for i in lls["rows"])
        row = {"items": len(reqs), "options": sum(len(x) for x in reqs), "max_abs_ll_diff": diff,
               **{f"{k}_s": min(v) for k, v in times.items()},
               **{f"{k}_real_tokens": tokens[k][0] for k in paths}, **{f"{k}_positions": tokens[k][1] for k in paths}}
        row["speedup"] = row["rows_s"] / row["cache_s"]
        out["tasks"][name] = row
    tot = {k: sum(r[k] for r in out["tasks"].values()) for k in ("rows_s", "cache_s", "rows_real_tokens",
                                                                  "cache_real_tokens", "rows_positions",
                                                                  "cache_positions")}
    out["total"] = {**tot, "speedup": tot["rows_s"] / tot["cache_s"],
                    "real_tokens_saved": 1 - tot["cache_real_tokens"] / tot["rows_real_tokens"],
                    "max_abs_ll_diff": max(r["max_abs_ll_diff"] for r in out["tasks"].values())}
    print(f"model {args.model}, {args.limit} test items per task, {args.threads} thread(s), {args.clock} clock, "
          f"best of {args.rounds} interleaved rounds")
    print("| task | items | options | rows s | cache s | speed-up | real tokens rows / cache | padded positions "
          "rows / cache | max abs LL diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in [*out["tasks"].items(), ("total", {**out["total"], "items": "", "options": ""})]:
        print(f"| {name} | {r['items']} | {r['options']} | {r['rows_s']:.1f} | {r['cache_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['rows_real_tokens']:,} / {r['cache_real_tokens']:,} | "
              f"{r['rows_positions']:,} / {r['cache_positions']:,} | {r['max_abs_ll_diff']:.1e} |")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
