"""``python -m orchestrator.study --space FILE``: choose on val, replicate over seeds, report test with 95 % CIs.

The search (or ``--from-search NAME``, a finished one under the storage path) picks each method's configuration
on validation; each is retrained with ``study.seeds`` seeds, single-task references and the zero-shot model are
added, and the report (``results.md``/``.json``/``.csv`` and plots, in the MLflow parent run and in ``--out``)
gives test accuracy per method and task with CIs, Δ vs single-task, paired comparisons and seesaw counts. The
``study:`` block of the YAML configures it (``orchestrator.spec.space.StudySpec``); the search's flags work the
same. Exit codes: 0 done, 1 a run failed (``--resume`` continues), 2 invalid input (nothing started), 130 interrupted
(``--resume`` continues).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

from orchestrator.spec.space import SpaceError, load_space
from orchestrator.tuning.options import add_search_arguments, cli_overrides
from orchestrator.tuning.plan import describe

SMOKE_STUDY = {"seeds": 2, "n_boot": 1000}  # --smoke-test: the whole shape, minimal size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.study", description=__doc__.split("\n\n")[0])
    add_search_arguments(p)
    p.add_argument("--from-search", default=None, metavar="NAME",
                   help="reuse the finished search <storage_path>/NAME instead of running one")
    p.add_argument("--seeds", type=int, default=None, help="override study.seeds")
    p.add_argument("--out", default=None, help="also write results.md/.json/.csv and plots to this folder")
    p.add_argument("--no-estimate", action="store_true", help="--dry-run without the wall-time estimate (which "
                   "measures this machine once, a few minutes, then reads its cache)")
    p.add_argument("--recalibrate", action="store_true", help="--dry-run: measure this machine's rates again")
    p.add_argument("--report-only", action="store_true", help="no training: write the report again from --results "
                   "(its results.json and the answers file it names), into --out or beside it")
    p.add_argument("--results", default=None, metavar="FILE", help="--report-only: a study's results.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = cli_overrides(args)
    study = dict(SMOKE_STUDY) if args.smoke_test else {}
    if args.seeds is not None:
        study["seeds"] = args.seeds
    if study:
        overrides["study"] = study
    try:
        spec = load_space(args.space, smoke_test=args.smoke_test, overrides=overrides)
    except SpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.report_only or args.results:
        return _report_only(spec, args, argv)
    if args.dry_run:
        from orchestrator.tuning.budget import describe_budget

        st = spec.study
        text, problem = describe_budget(spec)
        print(describe(spec) + "\n" + text)
        source = "search first" if st.search and not args.from_search else (
            f"search {args.from_search}" if args.from_search else "study.configs")
        single = st.single_task_method if st.single_task else "off"
        from orchestrator.data.tasks import SUITES

        n_tasks = len(SUITES[spec.data.suite]) if spec.data.suite else len(spec.data.tasks or ())
        st_seeds = min(st.seeds, st.single_task_seeds or st.seeds)
        n_runs = st.seeds * len(spec.methods) + (st_seeds * n_tasks if st.single_task else 0)
        searched = spec.search.num_trials if st.search and not args.from_search else 0
        print(f"  study        {st.seeds} seeds; configurations from {source}; single-task {single}; "
              f"zero-shot {'on' if st.zero_shot else 'off'}; {st.n_boot} bootstrap draws")
        print(f"  runs         {searched} search trials + {n_runs} study runs ({st.seeds} x {len(spec.methods)} "
              f"methods" + (f" + {st_seeds} x {n_tasks} single-task runs, each with its task's share of the budget"
                            + (f", at the first {st_seeds} of the {st.seeds} seeds)" if st_seeds < st.seeds else ")")
                            if st.single_task else ")"))
        from orchestrator.tuning.record import replicate_seeds

        choice = f"; never the choices' seeds {list(st.choice_seeds)}" if st.choice_seeds else ""
        print(f"  seeds        search trials train.seed = {spec.train.seed}; replicates the next {st.seeds} seeds no "
              f"search used{choice} (recorded in the study's plan.json)" if st.search or args.from_search else
              f"  seeds        replicates {replicate_seeds(spec.train.seed, st.seeds, st.choice_seeds)}{choice}")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        if args.no_estimate or st.search or args.from_search:
            print("  estimate     " + ("skipped (--no-estimate)" if args.no_estimate else
                                     "needs fixed configurations (study.search: false): a search chooses them"))
        else:
            from orchestrator.tuning.calibrate import study_estimate_text

            print(study_estimate_text(spec, refresh=args.recalibrate))
        return 0
    from orchestrator.tuning.study import run_study  # imports Ray: not needed for --dry-run and bad input

    return run_study(spec, address=args.address, tracking_uri=args.tracking_uri, resume=args.resume,
                     from_search=args.from_search, out_dir=args.out,
                     command=shlex.join(["python", "-m", "orchestrator.study", *argv]))


def _report_only(spec, args: argparse.Namespace, argv: list[str]) -> int:
    """``--report-only --results FILE``: the report again from the kept answers; exit 2 on bad input."""
    from orchestrator.report.answers import AnswersError
    from orchestrator.report.study_report import ReportError, rewrite_report

    if not (args.report_only and args.results):
        print("error: --report-only and --results FILE go together. Fix: pass both (e.g. --report-only --results "
              "docs/results/intra_domain_cpu/results.json)", file=sys.stderr)
        return 2
    try:
        out = rewrite_report(spec, args.results, args.out,
                             command=shlex.join(["python", "-m", "orchestrator.study", *argv]))
    except (AnswersError, ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out["table"])
    print(f"\nresults: {out['dir']}/results.md (and .json, .csv, answers, plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
