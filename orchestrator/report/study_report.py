"""The study's results: test accuracy per method and task with 95 % CIs, Δ vs single-task, paired comparisons.

Input: the finished study runs (each with its final ``test_correct/<task>`` 1/0 vectors and the
``test_sha256/<task>`` of the items they score), the base model's zero-shot test items, the chosen configurations
and the study's recorded provenance (``orchestrator.tuning.provenance``). Output, the same files in the MLflow
parent run and in ``out_dir``: ``results.json`` (every number, per-seed accuracies included, so any cell can be
rerun and checked), ``results.md`` (the headline table, written by this code, never by hand), ``results.csv`` and
three plots.

results.json names a reader can check: ``provenance`` (``model_sha256``, ``data_sha256`` per file, ``packages``,
``machine``, ``precision``, ``formulation``, ``wall_s``, ...), ``runs`` (per run its ``test_sha256`` per task),
and per comparison ``seed_t`` (``mean``, ``ci95``, ``p``, ``df``), ``bootstrap`` and ``mdd80``.
Statistics: :mod:`orchestrator.evaluation.statistics` (t over seeds, Wilson over items with one seed; comparisons
by t over the per-seed paired differences, the item-level paired bootstrap beside it).

The report refuses (:class:`ReportError`) to aggregate runs scored on different test items (their recorded
``test_sha256`` differ from each other or from the pools the report describes), or in different formulations or
precisions: such numbers do not belong in one table.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.cluster import storage
from orchestrator.evaluation import statistics as st
from orchestrator.evaluation.changes import item_changes
from orchestrator.evaluation.multiplicity import adjust, judge_comparisons, tost
from orchestrator.report import plots, tracking
from orchestrator.report.formatting import cell, ci_text, delta_cell, df_text, p_text, pct, points
from orchestrator.report.secondary import secondary_markdown, secondary_results
from orchestrator.report.seesaw_report import seesaw_over_training_plot, seesaw_section
from orchestrator.report.answers import answers_record, read_answers, write_answers
from orchestrator.spec.hparams import trial_hparams
from orchestrator.spec.recorded import formulation_of, item_hashes, precision_of
from orchestrator.spec.space import SearchSpec

DEFAULT_PAIRS = (("malora", "molora"), ("malora", "lora"), ("molora", "lora"))
ROOT = Path(__file__).resolve().parents[2]


class ReportError(ValueError):
    """The runs cannot be reported together (different items, formulations or precisions); says which and why."""


def _matrix(runs: list[dict], task: str) -> tuple[np.ndarray, list[int]]:
    """(S, I) 0/1 test matrix of ``runs`` on ``task``, rows sorted by seed; and the seeds."""
    rows = sorted(runs, key=lambda r: r["run"]["seed"])
    return (np.array([r["metrics"][f"test_correct/{task}"] for r in rows], dtype=float),
            [r["run"]["seed"] for r in rows])





def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit_state() -> dict[str, Any]:
    """The checkout's HEAD commit and whether tracked files differ from it."""
    return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def start_record(spec: SearchSpec, command: str, *, resume: bool) -> dict[str, Any]:
    """Command, commit and time of the study's first launch, kept in ``<storage>/<name>/study_start.json``.

    The runs were trained by the code of the first launch: a ``--resume`` (or a report rewritten later) reads this
    record back instead of describing itself, so the report names the commit the runs ran on."""
    path = storage.join(spec.storage_path, spec.name, "study_start.json")
    text = storage.read_text(path) if resume else None
    if text is not None:
        return json.loads(text)
    record = {"command": command, **commit_state(), "date": _now(), "unix": time.time()}
    storage.write_text(path, json.dumps(record, indent=1))
    return record


def provenance(command: str, wall_s: float, start: dict[str, Any] | None = None) -> dict[str, Any]:
    """Command, commit and times (results.json ``meta``); model, data, packages and machine are in ``provenance``.

    ``start`` (:func:`start_record`): the first launch; its command and commit are the ones reported, and
    ``elapsed_s`` counts from it (equal to ``wall_s`` for a study that ran in one go)."""
    here = commit_state()
    start = start or {"command": command, **here, "date": _now(), "unix": time.time() - wall_s}
    return {"command": start["command"], "commit": start["commit"], "dirty": start["dirty"],
            "report_command": command, "report_commit": here["commit"],
            "date": _now(), "started": start["date"], "wall_s": round(wall_s, 1),
            "elapsed_s": round(time.time() - start["unix"], 1)}


def _run_name(run: dict) -> str:
    r = run["run"]
    return f"{r['role']} {r.get('task') or r['method']} seed {r['seed']}"


def run_records(spec: SearchSpec, done: list[dict]) -> list[dict[str, Any]]:
    """Per run: role, method, seed, task, and what its test scores belong to (``test_sha256`` per task,
    ``formulation``, ``precision``), as the run reported them."""
    return [{"role": r["run"]["role"], "method": r["run"]["method"], "seed": r["run"]["seed"],
             "task": r["run"].get("task"), "test_sha256": item_hashes(r["metrics"]),
             "formulation": r["metrics"].get("formulation") or formulation_of(spec),
             "precision": precision_of(r["metrics"], spec)} for r in done]


def check_comparable(spec: SearchSpec, done: list[dict], splits: dict[str, dict]) -> tuple[str, str]:
    """(formulation, precision) shared by every run; :class:`ReportError` naming every mismatch otherwise.

    Every run must have recorded the sha256 of the test items of each task it scored, equal to the pools of
    ``splits`` (which the zero-shot reference and the report's tables describe)."""
    problems = []
    records = run_records(spec, done)
    for run, rec in zip(done, records):
        scored = [rec["task"]] if rec["role"] == "single_task" else list(splits)
        missing = [t for t in scored if t not in rec["test_sha256"]]
        if missing:
            problems.append(f"{_run_name(run)} recorded no test_sha256 for {', '.join(missing)}")
        differ = [t for t in scored if t in rec["test_sha256"] and rec["test_sha256"][t] != splits[t]["test_sha256"]]
        if differ:
            problems.append(f"{_run_name(run)} was scored on other test items of {', '.join(differ)} than the "
                            "study's pools")
    for key in ("formulation", "precision"):
        values = sorted({rec[key] for rec in records} | ({formulation_of(spec)} if key == "formulation" else set()))
        if len(values) > 1:
            problems.append(f"the runs (and the zero-shot reference) use different {key}s: {', '.join(values)}")
    if problems:
        raise ReportError("refusing to aggregate runs that are not comparable: " + "; ".join(problems) +
                          ". Fix: rerun those runs with this study's data, formulation and precision (a new "
                          "--name, or delete their trials and --resume)")
    return formulation_of(spec), records[0]["precision"] if records else precision_of(None, spec)


def build_results(spec: SearchSpec, configs: dict[str, dict], done: list[dict], reference: dict | None,
                  splits: dict[str, dict], *, wall_s: float, command: str, start: dict[str, Any] | None = None,
                  provenance_record: dict[str, Any] | None = None, clock: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Every number of the study (the ``results.json`` layout of the module docstring).

    ``clock``: ``tuning.clock.RunClock.summary()`` (``running_s`` summed over every launch, ``elapsed_s`` since
    the first, the ``launches``); with it the provenance's ``wall_s`` is the running time, else this launch's.

    ``provenance_record``: ``orchestrator.tuning.provenance.study_provenance`` of the study (model and data
    hashes, packages, machine); the report adds the runs' common ``precision`` and ``formulation``."""
    s = spec.study
    formulation, precision = check_comparable(spec, done, splits)
    replicates = [r for r in done if r["run"]["role"] == "replicate"]
    singles = [r for r in done if r["run"]["role"] == "single_task"]
    tasks = list(splits)
    methods = [m.kind for m in spec.methods]
    X = {m: {t: _matrix([r for r in replicates if r["run"]["method"] == m], t)[0] for t in tasks} for m in methods}
    references = {t: _matrix([r for r in singles if r["run"]["task"] == t], t) for t in tasks} if singles else {}
    ST = {t: matrix for t, (matrix, _) in references.items()}
    st_seeds = sorted({r["run"]["seed"] for r in singles})
    if any(seeds != st_seeds for _, seeds in references.values()):
        raise ReportError("the single-task references of the tasks trained at different seeds: "
                          + "; ".join(f"{t} {seeds}" for t, (_, seeds) in references.items())
                          + ". Fix: --resume until every reference has finished")
    zero = {t: np.asarray(reference["test_correct"][t], dtype=float) for t in tasks} if reference else {}
    out: dict[str, Any] = {
        "model": spec.model.name, "seeds": sorted({r["run"]["seed"] for r in replicates}),
        "split": {t: {k: splits[t][k] for k in ("train", "val", "test", "test_sha256")} for t in tasks},
        "split_seed": spec.data.split_seed,
        "zero_shot": {t: float(zero[t].mean()) for t in zero},
        "zero_shot_ci95": {t: st.item_interval(int(zero[t].sum()), zero[t].size).as_dict()["ci95"] for t in zero},
        "majority_label": {t: splits[t].get("test_majority") for t in tasks},
        "single_task": {t: st.accuracy_interval(ST[t]).as_dict() for t in ST},
        "single_task_method": s.single_task_method if ST else None,
        "single_task_seeds": st_seeds if ST else None,
        "methods": {}, "comparisons": [], "seesaw": {}, "runs": run_records(spec, done),
        "statistics": {"confidence": st.CONFIDENCE, "interval": "t over seeds (Wilson over items with one seed)",
                       "comparison": "seeds and items random: crossed seed x item variance, effective df "
                                     "(orchestrator.evaluation.crossed); beside it the t over the per-seed paired "
                                     "differences (conditional on the scored items) and the item-level paired "
                                     f"bootstrap, {s.n_boot} draws",
                       "power": f"mdd80: the difference the primary test finds with probability {st.POWER}",
                       "seesaw_threshold": f"one-sided primary test at Phi(-{s.noise_multiple}): "
                                           "delta < -t(1 - Phi(-k), df) x SE",
                       "multiplicity": {"comparisons": "Holm across the pairwise method comparisons",
                                        "delta_mean": "Holm across the methods' mean Δ vs the reference",
                                        "delta_per_task": "Benjamini-Hochberg within each method's per-task Δs",
                                        "seesaw": "Benjamini-Hochberg within each method's per-task seesaw flags"},
                       "equivalence": {"test": "TOST at the margin, same SE and df as the primary test",
                                       "margin": s.equivalence_margin}},
    }
    if ST:
        out["single_task"]["mean"] = st.mean_over_tasks_interval(ST).as_dict()
    paired_rows: dict[str, dict[str, np.ndarray]] = {}
    for m in methods:
        runs = [r for r in replicates if r["run"]["method"] == m]
        first = runs[0]["metrics"]
        _, hp = trial_hparams(spec.methods, configs[m])
        per_task, deltas = {}, {}
        seeds = sorted(r["run"]["seed"] for r in runs)  # the row order of X[m][t] (see _matrix)
        # the method's rows at the references' seeds: all of them, or the first study.single_task_seeds
        paired = {t: X[m][t][[i for i, seed in enumerate(seeds) if seed in st_seeds]] for t in tasks} if ST else X[m]
        paired_rows[m] = paired
        for t in tasks:
            mat = X[m][t]
            iv = st.accuracy_interval(mat).as_dict()
            ref = ST.get(t) if ST else (np.broadcast_to(zero[t], mat.shape) if zero else None)
            delta = st.compare({t: paired[t]}, {t: ref}, n_boot=s.n_boot) if ref is not None else None
            if delta is not None:
                deltas[t] = delta
            per_task[t] = {"mean": iv["mean"], "ci95": iv["ci95"], "n_seeds": len(seeds), "n_items": mat.shape[1],
                           "per_seed": {str(seed): float(row.mean()) for seed, row in zip(seeds, mat)},
                           "delta_vs_single_task" if ST else "delta_vs_zero_shot":
                               delta.as_dict() if delta else None}
        entry = {"config": hp, "trainable_params": int(first.get("trainable_params", 0)),
                 "trainable_share": float(first.get("trainable_share", float("nan"))),
                 "tokens_per_s": float(np.mean([r["metrics"].get("tokens_per_s", np.nan) for r in runs])),
                 "wall_s": float(sum(r["metrics"].get("time_total_s", 0.0) for r in runs)),
                 "val_mean_acc": float(np.mean([r["metrics"].get("val/mean_acc", np.nan) for r in runs])),
                 "mean": st.mean_over_tasks_interval(X[m]).as_dict(), "per_task": per_task}
        if ST:
            entry["delta_vs_single_task"] = st.compare(paired, ST, n_boot=s.n_boot).as_dict()
        if zero:
            # did training teach anything: the same items scored by the base model (deterministic, so the same
            # row for every seed), and the plain check that the zero-shot mean lies below the method's own 95 % CI
            zs = {t: np.broadcast_to(zero[t], X[m][t].shape) for t in tasks}
            entry["delta_vs_zero_shot"] = st.compare(X[m], zs, n_boot=s.n_boot).as_dict()
            entry["above_zero_shot_ci"] = bool(entry["mean"]["ci95"][0] > np.mean([zero[t].mean() for t in tasks]))
            if reference.get("test_chosen") and all(f"test_chosen/{t}" in r["metrics"] for r in runs for t in tasks):
                entry["learned_per_item"] = {t: item_changes(  # per task: items moved from zero-shot, and to gold
                    reference["test_chosen"][t], zero[t], [r["metrics"][f"test_chosen/{t}"] for r in
                                                           sorted(runs, key=lambda r: r["run"]["seed"])], X[m][t]
                ).as_dict() for t in tasks}
        if deltas:   # the method's family of per-task Δs: Benjamini-Hochberg within it
            key = "delta_vs_single_task" if ST else "delta_vs_zero_shot"
            for t, p_bh in adjust({t: per_task[t][key]["p"] for t in deltas}, "bh").items():
                per_task[t][key]["p_bh"] = p_bh
        out["methods"][m] = entry
        if deltas:
            flags = st.seesaw_regressions(deltas, s.noise_multiple)
            p_bh = adjust(flags["p_one_sided"], "bh")
            out["seesaw"][m] = {**flags, "reference": "single_task" if ST else "zero_shot", "p_one_sided_bh": p_bh,
                                "regressed_bh": sorted(t for t, v in p_bh.items()
                                                       if v is not None and v < flags["alpha_one_sided"]),
                                "power_note": "per task the test has the power of one task's items; "
                                              "see each task's delta mdd80"}
    for key in ("delta_vs_single_task", "delta_vs_zero_shot"):   # the methods' mean Δs: Holm across methods
        family = {m: e[key]["p"] for m, e in out["methods"].items() if e.get(key)}
        for m, p_holm in adjust(family, "holm").items():
            out["methods"][m][key]["p_holm"] = p_holm
    pairs = [tuple(p.split("-", 1)) for p in s.comparisons] if s.comparisons else [
        p for p in DEFAULT_PAIRS if p[0] in methods and p[1] in methods]
    for a, b in pairs:
        c = st.compare(X[a], X[b], n_boot=s.n_boot)
        out["comparisons"].append({"a": a, "b": b, **c.as_dict(),
                                   "tost": tost(c.diff, c.primary.se, c.primary.df, s.equivalence_margin)})
    judge_comparisons(out["comparisons"])
    if s.secondary_without:
        out["secondary"] = secondary_results(tuple(s.secondary_without), tasks, X, paired_rows, ST, zero, pairs,
                                             n_boot=s.n_boot, margin=s.equivalence_margin)
        out["statistics"]["multiplicity"]["secondary"] = ("Holm across the secondary's pairwise comparisons, and "
                                                          "across the methods' secondary mean Δs")
    out["meta"] = provenance(command, wall_s, start)
    out["provenance"] = {**(provenance_record or {}), "precision": precision, "formulation": formulation,
                         "wall_s": round(float(wall_s), 1)}
    if clock:
        out["meta"].update(clock)
        out["provenance"].update(wall_s=clock["running_s"], elapsed_s=clock["elapsed_s"])
    return out


def markdown(results: dict[str, Any]) -> str:
    """The headline table and the comparisons, as written to results.md and printed."""
    tasks = list(results["split"])
    ref_name = "single-task" if results["single_task"] else "zero-shot"
    zs = bool(results["zero_shot"])
    both = zs and bool(results["single_task"])  # then zero-shot gets a Δ column of its own
    head = ["method", "trainable params (% of all)", *tasks, "mean", f"Δ mean vs {ref_name}",
            *(["Δ mean vs zero-shot"] if both else [])]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m, e in results["methods"].items():
        delta = e.get("delta_vs_single_task") or (e.get("delta_vs_zero_shot") if not results["single_task"] else None)
        extra = [delta_cell(e.get("delta_vs_zero_shot"))] if both else []
        lines.append("| " + " | ".join([m, f"{e['trainable_params']:,} ({100 * e['trainable_share']:.2f} %)",
                                        *(cell(e["per_task"][t]) for t in tasks), cell(e["mean"]),
                                        delta_cell(delta), *extra]) + " |")
    if results["single_task"]:
        stt = results["single_task"]
        lines.append("| " + " | ".join([f"{results['single_task_method']} (ST)", "per task",
                                        *(cell(stt[t]) for t in tasks), cell(stt["mean"]), "0",
                                        *(["-"] if zs else [])]) + " |")
    majority = results.get("majority_label") or {}
    if any(v is not None for v in majority.values()):
        lines.append("| " + " | ".join(["majority label (constant answer)", "0",
                                        *(pct(majority[t]) if majority.get(t) is not None else "-" for t in tasks),
                                        pct(np.mean([v for v in majority.values() if v is not None])), "-",
                                        *(["-"] if both else [])]) + " |")
    if zs:
        z = results["zero_shot"]
        lines.append("| " + " | ".join(["zero-shot", "0", *(pct(z[t]) for t in tasks),
                                        pct(sum(z.values()) / len(z)), "-", *(["0"] if both else [])]) + " |")
    meta, split = results["meta"], results["split"]
    fewer = results.get("single_task_seeds") if results["single_task"] else None
    fewer = fewer if fewer and len(fewer) < len(results["seeds"]) else None
    text = [f"Test accuracy (%), mean ± half-width of the 95 % CI ({results['statistics']['interval']}); "
            f"{len(results['seeds'])} seeds {results['seeds']}, model {results['model']}; test items per task: "
            + ", ".join(f"{t} {split[t]['test']}" for t in tasks) + f" (split seed {results['split_seed']})."
            + (f" The single-task references trained at {len(fewer)} of these seeds {fewer}: each Δ vs single-task "
               "pairs the methods' runs at those seeds only." if fewer else ""),
            "", *lines, ""]
    if results["comparisons"]:
        margin = 100 * results["statistics"].get("equivalence", {}).get("margin", 0.008)
        text += ["Paired comparisons of the mean test accuracy (" + results["statistics"]["comparison"] + "). "
                 "p Holm: adjusted across these comparisons. MDD: the smallest true difference the primary test "
                 f"finds with 80 % power at these seeds and items. TOST: equivalence within ±{margin:.2g} points.",
                 "", "| a − b | diff (points) | 95 % CI (seeds + items) | p | p Holm | df | 95 % CI given these "
                 "items (per-seed t) | item bootstrap 95 % CI | MDD 80 % (points) | TOST p | verdict |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        text += [f"| {c['a']} − {c['b']} | {100 * c['diff']:+.2f} | {ci_text(c['ci95'])} | {p_text(c['p'])} | "
                 f"{p_text(c.get('p_holm'))} | {df_text(c.get('df'))} | {ci_text(c['seed_t']['ci95'])} | "
                 f"{ci_text(c['bootstrap']['ci95'])} | {points(c['mdd80'])} | {p_text((c.get('tost') or {}).get('p'))} | "
                 f"{c.get('verdict', '-')} |" for c in results["comparisons"]]
        text.append("")
    if results.get("secondary"):
        text += secondary_markdown(results["secondary"], results["statistics"].get("equivalence", {}).get(
            "margin", 0.008))
    if zs:
        above = [m for m, e in results["methods"].items() if e.get("above_zero_shot_ci")]
        below = [m for m in results["methods"] if m not in above]
        text.append(f"- learning visible (the zero-shot mean lies below the method's 95 % CI): "
                    f"{', '.join(above) or 'none'}" + (f"; not: {', '.join(below)}" if below else "") + ".")
    for m, e in results["methods"].items():
        if e.get("learned_per_item"):
            text.append(f"- learned per item, {m} (test items whose answer changed from zero-shot / changed to gold): "
                        + ", ".join(f"{t} {pct(c['changed'])} / {pct(c['to_gold'])} %"
                                    for t, c in e["learned_per_item"].items()) + ".")
    for m, ss in results["seesaw"].items():
        undetermined = f"; undetermined (no spread): {', '.join(ss['undetermined'])}" if ss.get("undetermined") else ""
        adjusted = (f"; after Benjamini-Hochberg within {m}'s {len(ss['p_one_sided'])} tasks: "
                    f"{', '.join(ss['regressed_bh']) or 'none'}") if "regressed_bh" in ss else ""
        text.append(f"- seesaw, {m}: {ss['n_regressed_significant']} task(s) significantly below the "
                    f"{ss['reference'].replace('_', '-')} reference ({', '.join(ss['regressed']) or 'none'}); pure "
                    f"noise would give {ss['expected_by_noise']:.2f} on average "
                    f"({results['statistics']['seesaw_threshold']}, {100 * ss['alpha_one_sided']:.1f} % per task)"
                    f"{adjusted}{undetermined}.")
    dirty = " (dirty tree)" if meta["dirty"] else ""
    later = (f" (report written by `{meta['report_command']}` at `{meta['report_commit']}`)"
             if meta.get("report_commit", meta["commit"]) != meta["commit"]
             or meta.get("report_command", meta["command"]) != meta["command"] else "")
    elapsed = meta.get("elapsed_s", meta["wall_s"])
    prov = results.get("provenance") or {}
    if "running_s" in meta:   # the study clock: every launch's running time, killed ones included
        timing = (f"running time {meta['running_s'] / 60:.1f} min summed over {len(meta.get('launches') or [])} "
                  f"launch(es); {elapsed / 60:.1f} min from the first launch ({meta.get('started', meta['date'])}) "
                  "to this report")
    else:
        timing = (f"wall time of the last launch {meta['wall_s'] / 60:.1f} min ({elapsed / 60:.1f} min since the "
                  f"first launch {meta.get('started', meta['date'])})")
    text += ["", f"Command: `{meta['command']}`  ", f"Commit: `{meta['commit']}`{dirty}{later}"
             f"; {timing}; {meta['date']}.  ",
             f"Scored in the {prov.get('formulation')} formulation at {prov.get('precision')} precision; "
             f"{_machine_line(prov.get('machine'))}; model sha256 {prov.get('model_sha256') or '-'}."]
    return "\n".join(text) + "\n"






def _machine_line(machine: dict | None) -> str:
    """``machine_info()`` in words: CPU model, its recorded flags, logical CPUs, GPUs."""
    if not machine:
        return "machine not recorded"
    cpu = machine.get("cpu") or {}
    gpus = ", ".join(g["name"] for g in machine.get("gpus") or []) or "none"
    return (f"machine: {cpu.get('model')} ({cpu.get('logical_cpus')} logical CPUs; "
            f"{' '.join(cpu.get('flags') or []) or 'no recorded flags'}), GPU {gpus}")


def write_csv(results: dict[str, Any], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "task", "mean", "ci95_low", "ci95_high", "n_seeds", "delta", "delta_ci95_low",
                    "delta_ci95_high", "delta_p", "delta_mdd80"])
        for m, e in results["methods"].items():
            for t, c in e["per_task"].items():
                d = c.get("delta_vs_single_task") or c.get("delta_vs_zero_shot") or {}
                w.writerow([m, t, c["mean"], *c["ci95"], c["n_seeds"], d.get("diff"), *(d.get("ci95") or [None, None]),
                            d.get("p"), d.get("mdd80")])
            w.writerow([m, "mean", e["mean"]["mean"], *e["mean"]["ci95"], e["mean"]["n"], None, None, None, None,
                        None])
    return path


def _write_files(results: dict[str, Any], answers: dict[str, Any], folder: Path) -> list[Path]:
    """results.json (naming the answers file and its hash), results.md, .csv, the answers and the plots."""
    answers_path, sha = write_answers(answers, folder)
    results["answers"] = {"file": answers_path.name, "sha256": sha,
                          "holds": "per run and task: each test item's correct, chosen (and gold, per-option "
                                   "log-likelihoods where recorded); zero-shot's; configs and splits"}
    seesaw, seesaw_text, figures = seesaw_diagnostics(results, answers["runs"], folder)
    if seesaw:
        results["seesaw_diagnostics"] = seesaw
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (folder / "results.md").write_text("# Results\n\n" + markdown(results) + ("\n" + seesaw_text if seesaw_text else ""))
    files = [folder / "results.json", folder / "results.md", write_csv(results, folder / "results.csv"),
             answers_path, plots.study_accuracy_plot(results, folder / "accuracy_per_task.png"),
             plots.study_accuracy_vs_params(results, folder / "accuracy_vs_params.png"), *figures]
    if results["single_task"]:
        files.append(plots.study_delta_heatmap(results, folder / "delta_vs_single_task.png"))
    return files


def seesaw_diagnostics(results: dict[str, Any], runs: list[dict], folder: Path
                       ) -> tuple[dict[str, Any], str, list[Path]]:
    """The seesaw section (``report.seesaw_report``: gradient cosines, I(task; expert), Δ vs single-task beside
    the most conflicting partner) and the val-accuracy-over-training plot with each single-task reference's end.
    ``runs``: the answers file's runs (final metrics with ``diagnostics``; ``history`` {task: [[step, acc]]})."""
    deltas = {m: {t: c["delta_vs_single_task"]["diff"] for t, c in e["per_task"].items()
                  if c.get("delta_vs_single_task")} for m, e in results["methods"].items()}
    section, text, figures = seesaw_section(runs, deltas, folder)
    histories: dict[str, dict[Any, dict]] = {}
    single_final: dict[str, list[float]] = {}
    for r in runs:
        history = {t: [tuple(x) for x in pts] for t, pts in (r.get("history") or {}).items()}
        if not history:
            continue
        run = r["run"]
        if run["role"] == "single_task":
            if history.get(run["task"]):
                single_final.setdefault(run["task"], []).append(history[run["task"]][-1][1])
        else:
            histories.setdefault(run["method"], {})[run["seed"]] = history
    if histories:
        path = seesaw_over_training_plot(histories, single_final, folder / "seesaw_over_training.png")
        if path is not None:
            figures = [*figures, path]
            text += ("\n" if text else "## Seesaw\n\n") + (
                "Each task's val accuracy over training per method (mean over seeds, band min-max), the single-task "
                f"reference's final val accuracy beside it: ![val accuracy over training]({path.name})\n")
    return section, text, figures


def write_report(spec: SearchSpec, configs: dict[str, dict], done: list[dict], reference: dict | None,
                 splits: dict[str, dict], *, wall_s: float, command: str, out_dir: str | None, uri: str,
                 parent_id: str, start: dict[str, Any] | None = None,
                 provenance_record: dict[str, Any] | None = None, clock: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Compute, write (``out_dir`` or ``<storage>/<name>-study/results``, local or a URI) and log to the parent run.
    ``clock``: as :func:`build_results`."""
    results = build_results(spec, configs, done, reference, splits, wall_s=wall_s, command=command, start=start,
                            provenance_record=provenance_record, clock=clock)
    dest = out_dir or storage.join(spec.storage_path, f"{spec.name}-study", "results")
    with storage.local_dir(dest) as folder:  # a URI: written here, uploaded when the block ends
        files = _write_files(results, answers_record(configs, splits, done, reference), folder)
        c = tracking.client(uri)
        for f in files:
            c.log_artifact(parent_id, str(f), "results")
    metrics = {f"result/{m}/mean": e["mean"]["mean"] for m, e in results["methods"].items()}
    metrics.update({f"result/{m}/{t}": c_["mean"] for m, e in results["methods"].items()
                    for t, c_ in e["per_task"].items()})
    tracking.log_dict(uri, parent_id, metrics=metrics, params={"study.seeds": spec.study.seeds,
                                                               "study.commit": results["meta"]["commit"]})
    return {"table": markdown(results), "dir": str(dest if storage.is_uri(dest) else folder), "results": results}


def rewrite_report(spec: SearchSpec, results_path: str | Path, out_dir: str | Path | None,
                   command: str) -> dict[str, Any]:
    """``--report-only``: every statistic, table and plot again from a written report's answers, no training.

    The runs' provenance, first launch and wall time are the recorded ones; ``meta.report_command`` names this
    command. Raises ``answers.AnswersError`` (bad file) or :class:`ReportError` (runs that cannot share a table)."""
    recorded, answers = read_answers(results_path)
    meta = recorded.get("meta") or {}
    start = {"command": meta.get("command", command), "commit": meta.get("commit"), "dirty": meta.get("dirty"),
             "date": meta.get("started", meta.get("date")), "unix": time.time() - meta.get("elapsed_s", 0.0)}
    prov = {k: v for k, v in (recorded.get("provenance") or {}).items()
            if k not in ("precision", "formulation", "wall_s", "elapsed_s")}
    clock = {k: meta[k] for k in ("running_s", "elapsed_s", "launches")} if "running_s" in meta else None
    results = build_results(spec, answers["configs"], answers["runs"], answers["zero_shot"], answers["splits"],
                            wall_s=float(meta.get("wall_s", 0.0)), command=command, start=start,
                            provenance_record=prov, clock=clock)
    folder = Path(out_dir) if out_dir else Path(results_path).parent
    folder.mkdir(parents=True, exist_ok=True)
    _write_files(results, answers, folder)
    return {"table": markdown(results), "dir": str(folder), "results": results}
