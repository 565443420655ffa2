"""``python -m orchestrator.search --space FILE``: a Ray Tune + Optuna search over adapter methods, tracked in MLflow.

Each trial is a Tune function (``trial_driver``, a 0.01-CPU slot) that fits a Ray Train ``TorchTrainer``
(``workers_per_trial`` DDP workers); Optuna's TPE (multivariate, grouped by method, multi-objective when several
objectives are given, constant liar under concurrency; ``tuning.tuner``) proposes the conditional
hyperparameters from the trials' **validation** metrics (one Optuna study per method, equal trials each), ASHA
stops weak trials, and MLflow gets one parent run plus a nested run per trial. Trials score val only; once the
search has chosen (best per method, Pareto front) the chosen trials' adapters are scored once on test.

Embedded defaults: a local Ray (dashboard on 127.0.0.1, needed to free a stopped trial's placement group) and
a SQLite MLflow store in the working directory. ``--address``/``RAY_ADDRESS`` joins a cluster and
``--tracking-uri``/``MLFLOW_TRACKING_URI`` a tracking server. ``--resume`` continues ``<storage>/<name>``:
finished trials are kept, unfinished and errored ones restarted (from their last adapter checkpoint).
Exit codes: 0 done, 1 no trial succeeded, 2 invalid input (nothing started).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from orchestrator.spec.space import SpaceError, load_space
from orchestrator.tuning.options import add_search_arguments, cli_overrides
from orchestrator.tuning.plan import describe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.search", description=__doc__.split("\n\n")[0])
    add_search_arguments(p)
    return p


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
        print(describe(spec) + "\n" + text)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
        return 2 if problem else 0
    from orchestrator.tuning.run import run_search  # imports Ray: not needed for --dry-run and bad input

    return run_search(spec, address=args.address, tracking_uri=args.tracking_uri, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
