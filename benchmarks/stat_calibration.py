"""Calibration of the study's comparison tests under a simulated null (two equal methods).

For each seed SD it simulates ``--n-sim`` studies (``--seeds`` seeds, ``--items`` test items, item difficulty
shared by both methods, a normal per-(method, seed) accuracy shift) and prints the share of studies each test
calls significant at 5 %, and the share of tasks the seesaw rule calls "regressed" (nominal Φ(−2) = 2.28 %):

- ``seed_t``: t over the per-seed paired differences (the study's primary test, ``statistics.seed_t``);
- ``item bootstrap``: the item-level paired bootstrap reported beside it (seeds kept; it ignores seed noise);
- ``old joint bootstrap`` (with ``--old COMMIT``): ``paired_bootstrap`` of that commit's statistics.py, which
  resampled seeds and items jointly, and its seesaw rule ``Δ < −2 · bootstrap SE``.

    python benchmarks/stat_calibration.py --old 760b2f8 [--n-sim 2000] [--json]

``--crossed``: the primary test (seeds and items random, ``orchestrator.evaluation.crossed``) against the per-seed t
over a grid of regimes of the probit model (item ease shared by the methods, a method x item interaction of SD
``interaction``, a run shift of SD ``run``, answers flipping between seeds), 5 tasks, at 3 and 5 seeds:

    python benchmarks/stat_calibration.py --crossed [--n-sim 3000] [--items 320]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.evaluation.statistics import item_bootstrap, regression_threshold, t_test  # noqa: E402


def old_statistics(commit: str) -> types.ModuleType:
    """statistics.py as it was at ``commit``, loaded as a module."""
    code = subprocess.run(["git", "show", f"{commit}:orchestrator/evaluation/statistics.py"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("old_statistics")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(code, f"{commit}:statistics.py", "exec"), module.__dict__)
    return module


def simulate(rng: np.random.Generator, n_sim: int, seeds: int, items: int, seed_sd: float):
    """(n_sim, seeds, items) 0/1 matrices of two equal methods (see the module docstring)."""
    p = rng.uniform(0.3, 0.8, size=(n_sim, 1, items))
    shift = rng.normal(0.0, seed_sd, size=(2, n_sim, seeds, 1))
    a = rng.random((n_sim, seeds, items)) < np.clip(p + shift[0], 0, 1)
    b = rng.random((n_sim, seeds, items)) < np.clip(p + shift[1], 0, 1)
    return a.astype(float), b.astype(float)


REGIMES = [(0.3, 0.03), (0.1, 0.03), (0.05, 0.03), (0.0, 0.03), (0.0, 0.05), (0.0, 0.1), (0.3, 0.1), (0.3, 0.0),
           (0.0, 0.0), (0.5, 0.0), (0.1, 0.0)]


def crossed_grid(n_sim: int, items: int, as_json: bool) -> int:
    from orchestrator.evaluation.crossed import crossed_se, simulate_null

    rows = []
    for seeds in (3, 5):
        for k, (interaction, run_sd) in enumerate(REGIMES):
            a, b = simulate_null(np.random.default_rng(100 * seeds + k), n_sim=n_sim, seeds=seeds, tasks=5,
                                 items=items, interaction=interaction, run_sd=run_sd)
            d = [x - y for x, y in zip(a, b)]
            mean, se, df, _ = crossed_se(d)
            t = mean / se
            per_seed = np.mean([x.mean(axis=-1) for x in d], axis=0)
            r = t_test(per_seed)
            rows.append({"seeds": seeds, "interaction": interaction, "run_sd": run_sd,
                         "flips": float(np.mean([np.mean(x[:, 0] != x[:, 1]) for x in a])),
                         "crossed_reject": float(np.mean(2 * stats.t.sf(np.abs(t), df) < 0.05)),
                         "crossed_seesaw": float(np.mean(stats.t.cdf(t, df) < stats.norm.cdf(-2.0))),
                         "seed_t_reject": float(np.mean(r["p"] < 0.05))})
    if as_json:
        print(json.dumps({"n_sim": n_sim, "items": items, "tasks": 5, "rows": rows}))
        return 0
    print(f"null, probit model, 5 tasks x {items} items, {n_sim} studies per row; nominal 5 % (seesaw 2.28 %)")
    print("seeds | interaction | run SD | flips | crossed reject | crossed seesaw | per-seed t reject")
    for r in rows:
        print(f"{r['seeds']:>5} | {r['interaction']:>11} | {r['run_sd']:>6} | {100 * r['flips']:4.1f} % | "
              f"{100 * r['crossed_reject']:12.1f} % | {100 * r['crossed_seesaw']:12.1f} % | "
              f"{100 * r['seed_t_reject']:15.1f} %")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-sim", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--boot-sims", type=int, default=1000, help="simulations for the (slow) bootstrap columns")
    ap.add_argument("--old", default=None, metavar="COMMIT", help="also run that commit's joint bootstrap")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--crossed", action="store_true", help="the primary test over the probit regimes (docstring)")
    args = ap.parse_args(argv)
    if args.crossed:
        return crossed_grid(args.n_sim, args.items if args.items != 500 else 320, args.json)
    old = old_statistics(args.old) if args.old else None
    alpha_seesaw = float(stats.norm.cdf(-2.0))
    rows = []
    for sd in (0.0, 0.02, 0.04):
        rng = np.random.default_rng(int(sd * 1000) + 1)
        a, b = simulate(rng, args.n_sim, args.seeds, args.items, sd)
        r = t_test((a - b).mean(axis=-1))
        row = {"seed_sd": sd, "n_sim": args.n_sim, "seed_t_reject": float(np.mean(r["p"] < 0.05)),
               "seed_t_seesaw": float(np.mean(r["mean"] < regression_threshold(r["se"], r["df"])))}
        k = min(args.boot_sims, args.n_sim)
        boots = [item_bootstrap({"t": a[i]}, {"t": b[i]}, n_boot=args.n_boot, seed=i) for i in range(k)]
        row["item_boot_reject"] = float(np.mean([c.p < 0.05 for c in boots]))
        if old is not None:
            olds = [old.paired_bootstrap({"t": a[i]}, {"t": b[i]}, n_boot=args.n_boot, seed=i) for i in range(k)]
            row["old_joint_reject"] = float(np.mean([c.p < 0.05 for c in olds]))
            row["old_seesaw"] = float(np.mean([c.diff < -2.0 * c.se for c in olds]))
        row["boot_sims"] = k
        rows.append(row)
    print(f"null: 2 equal methods, {args.seeds} seeds, {args.items} items; nominal 5 % test, seesaw nominal "
          f"{100 * alpha_seesaw:.2f} %; bootstrap columns over the first {rows[0]['boot_sims']} simulations, "
          f"{args.n_boot} draws")
    print(f"{'seed SD':>8} | {'seed_t reject':>13} | {'item boot reject':>16} | {'old joint reject':>16} | "
          f"{'seesaw seed_t':>13} | {'seesaw old':>10}")
    for r in rows:
        fmt = lambda key: f"{100 * r[key]:.1f} %" if key in r else "-"  # noqa: E731
        print(f"{100 * r['seed_sd']:>6.0f} p | {fmt('seed_t_reject'):>13} | {fmt('item_boot_reject'):>16} | "
              f"{fmt('old_joint_reject'):>16} | {fmt('seed_t_seesaw'):>13} | {fmt('old_seesaw'):>10}")
    if args.json:
        print(json.dumps({"rows": rows, "seeds": args.seeds, "items": args.items, "old": args.old}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
