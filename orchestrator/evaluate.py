"""``python -m orchestrator.evaluate``: per-task accuracy of a causal LM, with or without an adapter.

Zero-shot reference of a model: ``--model smollm2-135m-instruct --suite intra_domain --limit 200`` (cloze by
default). Scoring modes and the two formulations are described in :mod:`orchestrator.evaluation.accuracy`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from orchestrator.data.schema import DataError
from orchestrator.data.tasks import SUITES, default_data_dir, load_suite
from orchestrator.data.tokenize import TEMPLATES
from orchestrator.data.cloze import FORMULATIONS
from orchestrator.evaluation.accuracy import SCORING_MODES, evaluate_tasks, format_table

logger = logging.getLogger("orchestrator.evaluate")  # not __name__: under `python -m` that is "__main__"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.evaluate", description="Per-task accuracy of a causal LM.")
    p.add_argument("--model", required=True, help="smollm2-135m-instruct, tiny-llama, a local folder or a Hub id")
    p.add_argument("--suite", default="intra_domain", help=f"one of {sorted(SUITES)} or comma-separated task names")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="which pool to score: the held-out test pool (default) or val (see orchestrator.data.pools)")
    p.add_argument("--limit", type=int, default=None,
                   help="items per task in that pool (seeded sample; default: the whole pool)")
    p.add_argument("--data-dir", default=None, help="local data folder (default: $MALORA_DATA_DIR or ../shared/data)")
    p.add_argument("--scoring", choices=SCORING_MODES, default="loglik")
    p.add_argument("--formulation", choices=FORMULATIONS, default="cloze",
                   help="cloze: each option's own text after a question (lm-eval/OLMES strings, docs/cloze.md); "
                        "label: the templated option list and label words. With --adapter: the formulation it "
                        "was trained in (a search space's data.formulation)")
    p.add_argument("--options", default=None, help=argparse.SUPPRESS)  # replaced by --formulation
    p.add_argument("--template", choices=TEMPLATES, default="alpaca")
    p.add_argument("--adapter", default=None, help="folder saved by malora.checkpoint.save_adapter")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="split seed of the pools (a search's data.split_seed)")
    p.add_argument("--dtype", default="auto", help="base weights: auto (follows --precision), float32, bfloat16")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32", "fp16"), default="auto",
                   help="auto: bf16 where the device computes it natively, else fp32 (orchestrator.models.precision)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=None, help="converted-model cache (default: $MALORA_CACHE or ~/.cache)")
    p.add_argument("--quiet", action="store_true", help="no per-task progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("orchestrator").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        if args.limit is not None and args.limit < 1:
            raise DataError(f"--limit {args.limit} must be a positive integer")
        if args.batch_size < 1:
            raise DataError(f"--batch-size {args.batch_size} must be at least 1")
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.options is not None:
            raise DataError("--options was replaced by --formulation (text -> cloze, label -> label): one setting "
                            "for training and scoring")
        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        t0 = time.perf_counter()
        suite = load_suite(args.suite, data_dir, split_seed=args.seed, **{f"{args.split}_limit": args.limit})
        t1 = time.perf_counter()
        from orchestrator.models.loading import load_model

        from orchestrator.models.precision import plan_precision

        precision = plan_precision(args.precision, args.dtype, args.device, key="--precision", dtype_key="--dtype")
        model, tokenizer = load_model(args.model, dtype=precision.weights, device=args.device,
                                      cache_dir=args.cache_dir)
        if args.adapter:
            from malora.checkpoint import load_adapter

            load_adapter(model, args.adapter)
            model.eval()
        t2 = time.perf_counter()
        with precision.context(torch.device(args.device).type):
            scores = evaluate_tasks(model, tokenizer, getattr(suite, args.split), scoring=args.scoring,
                                    batch_size=args.batch_size, template=args.template,
                                    formulation=args.formulation, max_new_tokens=args.max_new_tokens)
        t3 = time.perf_counter()
    except (ValueError, OSError) as exc:  # DataError, ModelError, ConfigError are ValueErrors
        print(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
              file=sys.stderr)
        return 2
    print(f"model {args.model}{' + adapter ' + args.adapter if args.adapter else ''} | suite {suite.name} | "
          f"scoring {args.scoring} (formulation {args.formulation}, template {args.template}) | {args.split} pool, "
          f"limit {args.limit} | split seed {args.seed} | data {data_dir or 'Hub'} | torch threads "
          f"{torch.get_num_threads()} | precision {precision.name} ({precision.record()['precision_reason']})")
    print(format_table(scores))
    print(f"time: data {t1 - t0:.1f} s, model {t2 - t1:.1f} s, evaluation {t3 - t2:.1f} s, total {t3 - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
