"""``python -m orchestrator.rerun --results R --method M --seed S``: retrain one cell of a study and compare its test.

A study's ``results.json`` holds every per-seed, per-task test accuracy. This command trains that one (method,
seed) replicate again, in this process on this machine (no Ray: the worker's own ``run_training`` with a local
session, the same threads per worker as the study), scores the same test items and prints, per task, the recorded
accuracy, the rerun's and their difference. With ``--storage-path`` (the study's) it also reads the recorded run's
per-item answers from its trial and counts the items whose correctness changed. The configuration is the study's
own (``plan.json`` under the storage path when given, else the space's fixed configuration), and it must equal the
one results.json records; the space is the one in results.json's recorded command unless ``--space`` names it.
Without ``--results`` (a study still running, its cell already done) the recorded run's own answers under
``--storage-path`` are the record, and ``--space`` names the space.

The same code on the same machine and thread count reproduced the intra-domain study's MALoRA seed-1 cell bit
for bit in bf16 (0 of 1,600 answers changed); code that changes the order or rounding of the arithmetic (another
commit, another oneDNN blocking, another CPU) moves per-item log-likelihoods in the last bits, so near-ties can flip
(35 of 1,600 after the low-rank add). The difference is reported, not judged.
Exit codes: 0 compared, 1 the rerun failed, 2 invalid input (nothing trained).
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class RerunError(ValueError):
    """Bad input for a rerun; the message names the file or key and the fix."""


def read_results(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RerunError(f"--results {path}: no such file. Fix: pass a study's results.json "
                         "(python -m orchestrator.study ... --out DIR writes DIR/results.json)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RerunError(f"--results {path}: not readable JSON ({exc}). Fix: pass the results.json a study "
                         "wrote, unedited") from None


def space_of(results: dict[str, Any], given: str | None) -> str:
    """``--space`` if given, else the ``--space`` of the study's recorded command."""
    if given:
        return given
    argv = shlex.split(results.get("meta", {}).get("command", ""))
    if "--space" in argv and argv.index("--space") + 1 < len(argv):
        return argv[argv.index("--space") + 1]
    raise RerunError("results.json records no --space in meta.command. Fix: pass --space FILE")


def recorded_cell(results: dict[str, Any], method: str, seed: int) -> dict[str, float]:
    """``{task: test accuracy}`` of the replicate (method, seed) in results.json."""
    methods = results.get("methods") or {}
    if method not in methods:
        raise RerunError(f"--method {method!r}: not in results.json (methods: {', '.join(methods) or 'none'})")
    per_task = methods[method]["per_task"]
    cell = {t: v["per_seed"].get(str(seed)) for t, v in per_task.items()}
    if any(v is None for v in cell.values()):
        seeds = sorted({int(s) for v in per_task.values() for s in v["per_seed"]})
        raise RerunError(f"--seed {seed}: {method} has no replicate with that seed in results.json "
                         f"(seeds: {seeds})")
    return cell


def study_config(spec: Any, method: str, storage_path: str | None, results: dict[str, Any]) -> dict[str, Any]:
    """The Tune config the study trained ``method`` with, checked against results.json's recorded one."""
    from orchestrator.spec.hparams import trial_hparams
    from orchestrator.tuning.study import fixed_configs, study_name

    config = None
    if storage_path:
        plan = Path(storage_path).expanduser() / study_name(spec) / "plan.json"
        if plan.is_file():
            config = json.loads(plan.read_text())["configs"].get(method)
    if config is None:
        if spec.study.search:
            raise RerunError(f"{spec.name}: the study chose its configurations by a search. Fix: pass the study's "
                             "--storage-path, whose plan.json records them")
        config = fixed_configs(spec).get(method)
    if config is None:
        raise RerunError(f"--method {method!r}: not a method of the space {spec.name}")
    _, hp = trial_hparams(spec.methods, config)
    recorded = results["methods"][method].get("config") if results else None
    hp = json.loads(json.dumps(hp))  # as results.json holds it: tuples become lists
    if recorded is not None and hp != recorded:
        keys = sorted(k for k in set(hp) | set(recorded) if hp.get(k) != recorded.get(k))
        raise RerunError(f"the space's {method} configuration differs from results.json's in {keys}. Fix: pass "
                         "the --space (and --storage-path) the study ran with")
    return config


def recorded_items(storage_path: str | None, spec: Any, method: str, seed: int) -> dict[str, list[int]] | None:
    """The recorded replicate's per-item test correctness from its trial under the study's storage, if there."""
    from orchestrator.tuning.study import study_name

    if not storage_path:
        return None
    root = Path(storage_path).expanduser() / study_name(spec)
    for params in sorted(root.glob("trial_*/params.json")):
        run = json.loads(params.read_text()).get("run", {})
        if run.get("role") == "replicate" and run.get("method") == method and run.get("seed") == seed:
            lines = (params.parent / "result.json").read_text().strip().splitlines()
            final = json.loads(lines[-1]) if lines else {}
            return {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("test_correct/")} or None
    return None


def kept_items(results_path: Path, method: str, seed: int) -> dict[str, list[int]] | None:
    """The replicate's per-item test correctness from the answers file a report keeps beside its results.json
    (``orchestrator.report.answers``); None for a report written before answers were kept."""
    from orchestrator.report.answers import AnswersError, read_answers

    try:
        _, answers = read_answers(results_path)
    except AnswersError:
        return None
    for r in answers["runs"]:
        run = r["run"]
        if run["role"] == "replicate" and run["method"] == method and run["seed"] == seed:
            return {k.split("/", 1)[1]: v for k, v in r["metrics"].items() if k.startswith("test_correct/")} or None
    return None


def compare(recorded: dict[str, float], rerun: dict[str, list[int]],
            items: dict[str, list[int]] | None) -> dict[str, dict[str, Any]]:
    """Per task: recorded and rerun accuracy, difference, and (with per-item records) items that changed."""
    out = {}
    for task, acc in recorded.items():
        row = rerun[task]
        new = sum(row) / len(row)
        entry: dict[str, Any] = {"recorded": acc, "rerun": new, "diff": new - acc, "n_items": len(row)}
        if items and task in items and len(items[task]) == len(row):
            entry["items_changed"] = sum(int(a != b) for a, b in zip(items[task], row))
        out[task] = entry
    return out


def table(method: str, seed: int, rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"{method} seed {seed}: test accuracy (%) recorded in results.json against this rerun",
             "| task | recorded | rerun | diff (points) | items changed |", "|---|---|---|---|---|"]
    for task, r in rows.items():
        changed = f"{r['items_changed']} of {r['n_items']}" if "items_changed" in r else "-"
        lines.append(f"| {task} | {100 * r['recorded']:.2f} | {100 * r['rerun']:.2f} | {100 * r['diff']:+.2f} | "
                     f"{changed} |")
    mean_rec = sum(r["recorded"] for r in rows.values()) / len(rows)
    mean_new = sum(r["rerun"] for r in rows.values()) / len(rows)
    lines.append(f"| mean | {100 * mean_rec:.2f} | {100 * mean_new:.2f} | {100 * (mean_new - mean_rec):+.2f} | |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.rerun", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=None,
                   help="the study's results.json (optional with --space and --storage-path: the trial's record)")
    p.add_argument("--method", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--space", default=None, help="the study's space (default: from results.json meta.command)")
    p.add_argument("--storage-path", default=None, help="the study's storage: its plan.json and per-item answers")
    p.add_argument("--out", type=Path, default=None, help="also write the comparison as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from orchestrator.spec.space import SpaceError, load_space

    try:
        if args.results is None and not (args.space and args.storage_path):
            raise RerunError("nothing to compare with. Fix: pass --results (a study's results.json), or --space and "
                             "--storage-path of a study whose cell has finished")
        results = read_results(args.results) if args.results else {}
        space = space_of(results, args.space)
        try:
            spec = load_space(space)
        except SpaceError as exc:
            raise RerunError(str(exc)) from None
        items = recorded_items(args.storage_path, spec, args.method, args.seed) or (
            kept_items(args.results, args.method, args.seed) if args.results else None)
        if results:
            recorded = recorded_cell(results, args.method, args.seed)
        elif items:
            recorded = {t: sum(v) / len(v) for t, v in items.items()}
        else:
            raise RerunError(f"--storage-path {args.storage_path}: no finished replicate {args.method} seed "
                             f"{args.seed} of {spec.name}. Fix: wait until it has finished, or pass --results")
        config = study_config(spec, args.method, args.storage_path, results)
    except RerunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from orchestrator.models.hardware import machine_info
    from orchestrator.report.study_report import commit_state
    from orchestrator.training.worker import LocalSession, run_training
    from orchestrator.tuning.study import REPLICATE, run_spec

    code = commit_state()  # at the start: the code this process imports, whatever is committed meanwhile
    run = {"role": REPLICATE, "method": args.method, "seed": args.seed, "task": None, "config": config}
    started = time.monotonic()
    try:
        final = run_training(run_spec(spec, run), config, LocalSession(), score_test=True)[-1]
    except Exception as exc:  # noqa: BLE001 - one line and exit 1, as the study does for a failed run
        print(f"error: the rerun failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    rerun = {t: final[f"test_correct/{t}"] for t in recorded}
    rows = compare(recorded, rerun, items)
    wall_s = time.monotonic() - started
    print(table(args.method, args.seed, rows))
    print(f"rerun at commit {code['commit'] or 'unknown'}{' (uncommitted changes)' if code['dirty'] else ''}, "
          f"{wall_s / 60:.1f} min, precision {final.get('precision')}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"results": str(args.results), "space": space, "method": args.method,
                                        "seed": args.seed, "config": config, "tasks": rows,
                                        "precision": final.get("precision"), **code, "wall_s": wall_s,
                                        "machine": machine_info()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
