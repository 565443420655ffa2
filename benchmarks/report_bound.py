"""The primary comparison, bounded, for a study report written before every answer was kept.

    python benchmarks/report_bound.py docs/results/intra_domain_cpu/results.json [--margin 0.8]

Such a results.json has, per comparison, the per-seed t's SE (seeds, conditional on the items) and the item-level
bootstrap SE, but no per-item answers, so the crossed test (seeds and items random) cannot be computed. The sum of
the two variances bounds it from above (it counts the residual twice: ``crossed.bound_from_summary``), so a
difference significant here is significant in the crossed test, and an equivalence (TOST) here holds there too.
Printed per comparison: the difference, the bounded SE and df, two-sided p, Holm across the comparisons, the MDD
at 80 % power, the TOST at ``--margin`` points and the verdict.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.evaluation.crossed import bound_from_summary  # noqa: E402
from orchestrator.evaluation.multiplicity import judge_comparisons, tost  # noqa: E402
from orchestrator.evaluation.statistics import mdd80  # noqa: E402


def bounded(results: dict, margin: float) -> list[dict]:
    seeds = len(results["seeds"])
    items = sum(v["test"] for v in results["split"].values())
    rows = []
    for c in results["comparisons"]:
        se, df = bound_from_summary(c["seed_t"]["se"], c["bootstrap"]["se"], seeds, items)
        rows.append({"a": c["a"], "b": c["b"], "diff": c["diff"], "se": se, "df": df,
                     "p": float(2 * stats.t.sf(abs(c["diff"]) / se, df)), "mdd80": mdd80(se, df),
                     "tost": tost(c["diff"], se, df, margin)})
    judge_comparisons(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--margin", type=float, default=0.8, help="TOST margin, points")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
        rows = bounded(results, args.margin / 100)
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        print(f"error: {args.results}: {exc!r}. Fix: name a study's results.json", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| a − b | diff | bounded SE | df | p | p Holm | MDD 80 % | TOST p (±{:.2g}) | verdict |".format(args.margin))
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['a']} − {r['b']} | {100 * r['diff']:+.2f} | {100 * r['se']:.2f} | {r['df']:.1f} | {r['p']:.3f} | "
              f"{r['p_holm']:.3f} | {100 * r['mdd80']:.2f} | {r['tost']['p']:.3f} | {r['verdict']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
