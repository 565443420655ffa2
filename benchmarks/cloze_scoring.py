"""Cloze scoring per task: the earlier key/value-cache scorer against the packed one, with the positions each runs.

    python benchmarks/cloze_scoring.py --limit 40 --rounds 2 --json      # SmolLM2-135M, 5 intra-domain tasks
    python benchmarks/cloze_scoring.py --model tiny-llama --limit 8 --rounds 1   # seconds

Both score the same requests (``orchestrator.evaluation.accuracy.option_requests`` in the cloze formulation, cut
to ``--max-length`` by ``scoring.fit_requests``) of the intra-domain test pools (``load_suite("intra_domain",
test_limit=--limit)``, split seed 0):

- ``cache``: ``shared_context_logprobs`` of ``scoring.py`` at ``--baseline`` (issue 20's scorer: the context once
  per item with a key/value cache, option rows continued from it; short contexts one row per option);
- ``packed``: this checkout's ``scoring.option_logprobs`` (items packed into rows, every context once, option
  segments under a block mask).

Per task and round, the two run back to back in alternating order in one process on one thread (``--threads``),
so a busy machine slows both alike; the time is the process CPU time (``--clock cpu``, default) or wall time.
Positions: the input positions the forwards run, real (non-pad) and in all. The log-likelihoods of the two are
compared (max absolute difference). ``--json``: the last line is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402,F401  (this checkout's packages first)

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
        if mask is None:
            self.real += kwargs["input_ids"].numel()
        elif mask.dim() == 4:  # packed rows: a real position may attend to itself, padding to nothing
            self.real += int(mask.diagonal(dim1=-2, dim2=-1).sum())
        else:
            self.real += int(mask[:, -kwargs["input_ids"].shape[1]:].sum())

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
    p.add_argument("--max-length", type=int, default=256, help="data.max_length (the study's: 256)")
    p.add_argument("--baseline", default="67471d5", help="git revision of the earlier scorer")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model, tok = load_model(args.model)
    model.eval()
    suite = load_suite("intra_domain", default_data_dir(), test_limit=args.limit)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    max_length = args.max_length
    earlier = _harness.scoring_at(args.baseline)
    sc.lm_parts(model)  # its probe forward before counting
    counter = Positions(model)
    out: dict = {"model": args.model, "limit": args.limit, "rounds": args.rounds, "threads": args.threads,
                 "clock": args.clock, "tasks": {}}
    paths = {
        "cache": lambda reqs: earlier.shared_context_logprobs(model, reqs, batch_size=args.batch_size, pad_id=pad,
                                                              max_length=max_length),
        "packed": lambda reqs: sc.option_logprobs(model, reqs, batch_size=args.batch_size, pad_id=pad),
    }
    for name in suite.tasks:
        task = get_task(name)
        reqs = [option_requests(task, ex, tok, formulation="cloze") for ex in suite.test[name]]
        reqs = [r for r in sc.fit_requests(tok, reqs, max_length, name=name) if r is not None]
        times = {k: [] for k in paths}
        tokens, lls = {}, {}
        for r in range(args.rounds):
            for key in (("cache", "packed") if r % 2 == 0 else ("packed", "cache")):
                t0 = clock()
                lls[key] = paths[key](reqs)
                times[key].append(clock() - t0)
                tokens[key] = counter.take()
        diff = max(abs(lls["cache"][i] - lls["packed"][i]) for i in lls["cache"])
        row = {"items": len(reqs), "options": sum(len(x) for x in reqs), "max_abs_ll_diff": diff,
               **{f"{k}_s": min(v) for k, v in times.items()},
               **{f"{k}_real_tokens": tokens[k][0] for k in paths}, **{f"{k}_positions": tokens[k][1] for k in paths}}
        row["speedup"] = row["cache_s"] / row["packed_s"]
        out["tasks"][name] = row
    tot = {k: sum(r[k] for r in out["tasks"].values()) for k in ("cache_s", "packed_s", "cache_real_tokens",
                                                                  "packed_real_tokens", "cache_positions",
                                                                  "packed_positions")}
    out["total"] = {**tot, "speedup": tot["cache_s"] / tot["packed_s"],
                    "positions_saved": 1 - tot["packed_positions"] / tot["cache_positions"],
                    "max_abs_ll_diff": max(r["max_abs_ll_diff"] for r in out["tasks"].values())}
    print(f"model {args.model}, {args.limit} test items per task, {args.threads} thread(s), {args.clock} clock, "
          f"best of {args.rounds} interleaved rounds")
    print("| task | items | options | cache s | packed s | speed-up | real tokens cache / packed | positions "
          "cache / packed | max abs LL diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in [*out["tasks"].items(), ("total", {**out["total"], "items": "", "options": ""})]:
        print(f"| {name} | {r['items']} | {r['options']} | {r['cache_s']:.1f} | {r['packed_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['cache_real_tokens']:,} / {r['packed_real_tokens']:,} | "
              f"{r['cache_positions']:,} / {r['packed_positions']:,} | {r['max_abs_ll_diff']:.1e} |")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
