"""Size the intra-domain study by power, from a pilot (issue 23).

    python benchmarks/study_power.py --pilot ~/malora_runs/pilot_report/results.json --seeds 3 --items-per-task 300
    python benchmarks/study_power.py --change-rate 0.2 --tasks 5 --seeds 3 --items-per-task 300

Input: ``q``, the share of test items whose correctness differs between two runs. ``--pilot`` reads it from a
pilot study's ``results.json`` (``search_spaces/intra_domain_cpu_pilot.yaml``): per method and task, the items that
moved from the zero-shot answer to gold or away from it (``learned_per_item``: ``to_gold + from_gold``), averaged
over methods and tasks weighted by items. That is a run against zero-shot, so it holds what training changed as
well as the seed noise: sizing with it errs towards more items. ``--change-rate`` gives ``q`` directly (e.g. the
share that differs between two seeds of one method, the seed noise itself).

Output (the study's own test, ``orchestrator.evaluation.statistics``: t over the per-seed paired differences with
S − 1 df, MDD at 80 % power by the noncentral t): the test items per task for a mean Δ vs zero-shot of
``--delta`` (+3 points) to be detected with 80 % power, and the minimum detectable MALoRA − MoLoRA difference at
``--items-per-task``. Items are pooled over tasks (the headline is the mean over equal-sized tasks).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.evaluation.statistics import change_rate_mdd, items_for_mdd  # noqa: E402


def pilot_change_rate(path: Path) -> tuple[float, int, int]:
    """(q, items counted, tasks) from a pilot's results.json (module docstring)."""
    results = json.loads(path.read_text())
    moved, items, tasks = 0.0, 0, set()
    for method, entry in results["methods"].items():
        for task, c in (entry.get("learned_per_item") or {}).items():
            moved += (c["to_gold"] + c["from_gold"]) * c["n_items"]
            items += c["n_items"]
            tasks.add(task)
    if not items:
        raise ValueError(f"{path}: no learned_per_item in any method. Fix: run the pilot with study.zero_shot: true "
                         "(search_spaces/intra_domain_cpu_pilot.yaml)")
    return moved / items, items, len(tasks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pilot", type=Path, help="a pilot study's results.json")
    src.add_argument("--change-rate", type=float, help="q: share of test items whose correctness differs")
    p.add_argument("--tasks", type=int, default=None, help="tasks in the mean (default: the pilot's, else 5)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--delta", type=float, default=0.03, help="mean Δ vs zero-shot to detect (default +3 points)")
    p.add_argument("--items-per-task", type=int, default=300, help="test items per task for the MDD line")
    args = p.parse_args(argv)
    try:
        q, counted, pilot_tasks = pilot_change_rate(args.pilot) if args.pilot else (args.change_rate, 0, 0)
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: --pilot: {exc}", file=sys.stderr)
        return 2
    if not 0 < q <= 1:
        print(f"error: change rate {q} must lie in (0, 1]", file=sys.stderr)
        return 2
    tasks = args.tasks or pilot_tasks or 5
    pooled = items_for_mdd(args.delta, q, args.seeds, vs_fixed=True)
    per_task = math.ceil(pooled / tasks)
    at = args.items_per_task * tasks
    print(f"change rate q = {q:.4f}" + (f" (pilot {args.pilot}: {counted} run x item pairs)" if args.pilot else ""))
    print(f"Δ vs zero-shot of {args.delta:+.3f} at 80 % power with {args.seeds} seeds: {pooled} test items pooled over "
          f"{tasks} tasks = {per_task} per task (data.test_limit)")
    print(f"at data.test_limit = {args.items_per_task} ({at} items): MDD vs zero-shot "
          f"{change_rate_mdd(q, at, args.seeds, vs_fixed=True):.4f}, MALoRA - MoLoRA "
          f"{change_rate_mdd(q, at, args.seeds, vs_fixed=False):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
