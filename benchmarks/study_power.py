"""Size a study by power: the MDD of the primary comparison (seeds and items random) at other designs.

    python benchmarks/study_power.py --pilot docs/results/<pilot>/results.json --pair malora-molora
    python benchmarks/study_power.py --seed-sd 0.29 --item-se 0.25 --tasks 5 --pilot-items 320 --target 0.8

Input, one of: ``--pilot``, a study's results.json with its answers file (``orchestrator.report.answers``): the
variance components of the pair's paired difference (``orchestrator.evaluation.crossed``); or two figures a report
states, in points: ``--seed-sd`` (SD over seeds of the per-seed mean difference) and ``--item-se`` (item-level
bootstrap SE of the mean difference at ``--tasks`` x ``--pilot-items``), which keep the residual in the seed term
(conservative). Output: the MDD at 80 % power of the study's own test for each design in the grid (``--seeds``,
``--items``), and the cheapest design (seeds x items) whose MDD is at most ``--target`` points. The study's
``--dry-run`` then says whether that design fits the time budget.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.evaluation.crossed import Components, components_from_summary, crossed_se  # noqa: E402
from orchestrator.evaluation.statistics import projected_mdd  # noqa: E402
from orchestrator.report.answers import AnswersError, read_answers  # noqa: E402


def pilot_components(path: Path, a: str, b: str) -> Components:
    """Components of ``a − b`` from a pilot's kept answers (replicate runs, seeds paired by order)."""
    _, answers = read_answers(path)
    runs = [r for r in answers["runs"] if r["run"]["role"] == "replicate"]
    tasks = sorted(answers["splits"])

    def matrix(method: str, task: str) -> np.ndarray:
        rows = sorted((r for r in runs if r["run"]["method"] == method), key=lambda r: r["run"]["seed"])
        if not rows:
            raise AnswersError(f"{path}: no replicate runs of {method!r}. Fix: --pair names two of the study's methods")
        return np.array([r["metrics"][f"test_correct/{task}"] for r in rows], dtype=float)

    return crossed_se([matrix(a, t) - matrix(b, t) for t in tasks])[3]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pilot", type=Path, help="a study's results.json (with its answers file)")
    p.add_argument("--pair", default="malora-molora", help="a-b: the comparison to size (with --pilot)")
    p.add_argument("--seed-sd", type=float, help="points: SD over seeds of the per-seed mean difference")
    p.add_argument("--item-se", type=float, help="points: item-bootstrap SE of the mean difference")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--pilot-items", type=int, default=320, help="items per task behind --item-se")
    p.add_argument("--seeds", default="3,5,8,10", help="seed counts to tabulate")
    p.add_argument("--items", default="320,500,1000", help="items per task to tabulate")
    p.add_argument("--target", type=float, default=0.8, help="MDD to reach, points (default: the paper's gap)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.pilot:
            a, _, b = args.pair.partition("-")
            comps = pilot_components(args.pilot, a, b)
        elif args.seed_sd is not None and args.item_se is not None:
            comps = components_from_summary(args.seed_sd / 100, args.item_se / 100, args.tasks, args.pilot_items)
        else:
            raise ValueError("give --pilot FILE, or --seed-sd and --item-se (points)")
        seeds = [int(x) for x in args.seeds.split(",")]
        items = [int(x) for x in args.items.split(",")]
        if min(seeds) < 2 or min(items) < 2:
            raise ValueError("--seeds and --items need values >= 2")
    except (AnswersError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    grid = {(s, i): 100 * projected_mdd(comps, s, i) for s in seeds for i in items}
    fits = sorted(((s * i, s, i) for (s, i), m in grid.items() if m <= args.target))
    if args.json:
        print(json.dumps({"components": comps.as_dict(), "mdd80_points": {f"{s}x{i}": m for (s, i), m in grid.items()},
                          "cheapest": fits[0][1:] if fits else None, "target": args.target}, indent=1))
        return 0
    print(f"variance components (accuracy²): seed {comps.seed:.3g}; item per task "
          + ", ".join(f"{v:.3g}" for v in comps.item) + "; residual " + ", ".join(f"{v:.3g}" for v in comps.residual))
    print("MDD at 80 % power (points), seeds x items per task:")
    print("seeds | " + " | ".join(f"{i:>6}" for i in items))
    for s in seeds:
        print(f"{s:>5} | " + " | ".join(f"{grid[(s, i)]:6.2f}" for i in items))
    if fits:
        print(f"cheapest design with MDD <= {args.target}: {fits[0][1]} seeds x {fits[0][2]} items per task "
              f"({grid[fits[0][1:]]:.2f} points)")
    else:
        print(f"no design in the grid reaches MDD <= {args.target} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
