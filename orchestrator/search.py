"""``python -m orchestrator.search --space FILE``: a Ray Tune + Optuna search over adapter methods, tracked in MLflow.

Each trial is a Tune function (``trial_driver``, a 0.01-CPU slot) that fits a Ray Train ``TorchTrainer``
(``workers_per_trial`` DDP workers); Optuna's TPE (multivariate, grouped by method, multi-objective when several
objectives are given, constant liar under concurrency; ``tuning.tuner``) proposes the conditional
hyperparameters from the trials' **validation** metrics (one Optuna study per method, equal trials each), ASHA
stops weak trials, and MLflow gets one parent run plus a nested run per trial. Trials score val only; once the
search has chosen (best per method, Pareto front) the chosen trials' adapters are scored once on test.

At the end the search report (``orchestrator.report.search_report``: every trial, the front, importances and
slice/contour plots per method, MALoRA's (d, β) surface, the seesaw across trials, the ties per method) goes to
``<storage>/<name>/report``, ``--out DIR`` and the parent run; the per-method Optuna studies are journal files in
``<storage>/<name>/optuna`` (the ``optuna-dashboard`` command is printed). ``--dry-run`` estimates the wall time
from rates measured once on this machine (``tuning.search_estimate``); ``--report-only`` writes the report again
from what the search stored (``tuning.search_rebuild``).

Embedded defaults: a local Ray (dashboard on 127.0.0.1, needed to free a stopped trial's placement group) and
a SQLite MLflow store in the working directory. ``--address``/``RAY_ADDRESS`` joins a cluster and
``--tracking-uri``/``MLFLOW_TRACKING_URI`` a tracking server. ``--resume`` continues ``<storage>/<name>``:
finished trials are kept, unfinished and errored ones restarted (from their last adapter checkpoint).
Exit codes: 0 done, 1 no trial succeeded, 2 invalid input (nothing started).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Sequence

from orchestrator.spec.space import SpaceError, load_space
from orchestrator.tuning.options import add_search_arguments, cli_overrides
from orchestrator.tuning.plan import describe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.search", description=__doc__.split("\n\n")[0])
    add_search_arguments(p)
    p.add_argument("--out", default=None, help="write the search report (trial table, front, importances, seesaw, "
                   "ties; orchestrator.report.search_report) into this folder too (default: only in the storage "
                   "and the MLflow parent run)")
    p.add_argument("--no-estimate", action="store_true", help="--dry-run without the wall-time estimate (which "
                   "measures this machine's rates once, minutes, then reads them from a cache)")
    p.add_argument("--recalibrate", action="store_true", help="--dry-run: measure this machine's rates again")
    p.add_argument("--report-only", action="store_true", help="write the search report again from what the search "
                   "stored (Tune's experiment, its MLflow runs, its clock), without Ray and without training")
    return p


def searched_lines(spec) -> list[str]:
    """Per method, what its trials search (name and what it sets; MALoRA's lam as the (d, r_bar) it gives)."""
    from malora.config import malora_dims

    lines = []
    for m in spec.methods:
        doms = dict(m.hparams)
        names = [n for n, d in m.hparams if d.kind != "const"]
        words = [{"r": "rank r", "top_k": "top-k", "lam": "lam (d = lam r N)"}.get(n, n) for n in names]
        line = f"    {m.kind:7s} " + (", ".join(words) or "nothing (fixed)")
        if m.kind == "malora" and "lam" in doms and doms["lam"].kind in ("const", "choice"):
            n = doms["num_experts"].low if "num_experts" in doms else 8
            ranks = doms["r"].values if "r" in doms and doms["r"].kind in ("const", "choice") else (8,)
            pairs = sorted({malora_dims(r, n, lam) for r in ranks for lam in doms["lam"].values})
            line += "; (d, r_bar) in " + ", ".join(f"({d}, {rb})" for d, rb in pairs)
        lines.append(line)
    return ["  searched", *lines]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        spec = load_space(args.space, smoke_test=args.smoke_test, overrides=cli_overrides(args))
    except SpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        from orchestrator.tuning.budget import describe_budget

        text, problem = describe_budget(spec)
        print("\n".join([describe(spec), *searched_lines(spec), text]))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        if args.no_estimate or args.smoke_test:
            print("  estimate     skipped" + (" (--no-estimate)" if args.no_estimate else " (--smoke-test)"))
        else:
            from orchestrator.tuning.search_estimate import search_estimate_text

            print(search_estimate_text(spec, refresh=args.recalibrate))
        return 0
    command = shlex.join(["python", "-m", "orchestrator.search", *(argv if argv is not None else sys.argv[1:])])
    if args.report_only:
        from orchestrator.tuning.search_rebuild import rebuild_report

        return rebuild_report(spec, tracking_uri=args.tracking_uri, out_dir=args.out, command=command)
    from orchestrator.tuning.run import run_search  # imports Ray: not needed for --dry-run and bad input

    return run_search(spec, address=args.address, tracking_uri=args.tracking_uri, resume=args.resume,
                      out_dir=args.out, command=command)


if __name__ == "__main__":
    sys.exit(main())
