"""Every answer of a study, kept: the file that lets any statistic be recomputed without training.

``answers.json.gz`` (gzip JSON, beside ``results.json``, which names it and its sha256 under ``answers``)::

    {"format": 1,
     "configs": {method: config}, "splits": {task: {train, val, test, test_sha256, test_majority}},
     "runs": [{"run": {role, method, seed, task, ...}, "metrics": {...},    # one per study run
               "history": {task: [[step, val accuracy], ...]}}],
     "zero_shot": {"test_correct": {task: [1/0]}, "test_chosen": {task: [index]}, ...} | null}

Per run, ``metrics`` holds what the report reads: per task and test item, in pool order, ``test_correct/<task>``
(1/0 under the primary metric), ``test_chosen/<task>`` (the chosen option) and, where the runs recorded them,
``test_gold/<task>`` (the gold option) and ``test_loglik/<task>`` (every option's log-likelihood); plus
``test_sha256/<task>``, the run's precision, formulation, trainable counts, speed and val score, and its seesaw
``diagnostics``. ``python -m orchestrator.study --space FILE --report-only --results results.json`` reads it back
and writes the whole report again (:func:`read_answers`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

FILE = "answers.json.gz"
FORMAT = 1
PER_ITEM = ("test_correct/", "test_chosen/", "test_gold/", "test_loglik/", "test_sha256/")
SCALARS = ("formulation", "precision", "precision_reason", "trainable_params", "total_params", "trainable_share",
           "tokens_per_s", "time_total_s", "val/mean_acc", "test/mean_acc", "diagnostics")
ZERO_SHOT = ("test_correct", "test_chosen", "test_gold", "test_loglik", "test", "test_scores", "primary_metric",
             "formulation", "precision")


class AnswersError(ValueError):
    """An answers file that is missing, altered or of another format: the message names the path and the fix."""


def kept_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's final report the study report reads (module docstring)."""
    return {k: v for k, v in metrics.items() if k.startswith(PER_ITEM) or k in SCALARS}


def answers_record(configs: dict[str, dict], splits: dict[str, dict], done: list[dict],
                   reference: dict | None) -> dict[str, Any]:
    return {"format": FORMAT, "configs": configs, "splits": splits,
            "runs": [{"run": r["run"], "metrics": kept_metrics(r["metrics"]),
                      **({"history": r["history"]} if r.get("history") else {})} for r in done],
            "zero_shot": {k: reference[k] for k in ZERO_SHOT if k in reference} if reference else None}


def write_answers(record: dict[str, Any], folder: Path) -> tuple[Path, str]:
    """Write ``folder/answers.json.gz``; returns its path and the sha256 of its bytes. ``mtime=0``: the same
    answers give the same bytes, so the hash names the answers, not the moment they were written."""
    path = Path(folder) / FILE
    data = gzip.compress(json.dumps(record, separators=(",", ":"), default=float).encode(), mtime=0)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def read_answers(results_path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(results, answers)`` of a written study report: ``results.json`` and the answers file it names, checked
    against the recorded sha256."""
    results_path = Path(results_path)
    if not results_path.is_file():
        raise AnswersError(f"--results {results_path}: no such file. Fix: name the results.json a study wrote")
    try:
        results = json.loads(results_path.read_text())
    except json.JSONDecodeError as exc:
        raise AnswersError(f"--results {results_path}: not JSON ({exc}). Fix: name the results.json a study "
                           "wrote") from None
    named = results.get("answers")
    if not named:
        raise AnswersError(f"{results_path} names no answers file (written before every answer was kept). Fix: "
                           "rerun the study with this version; its report keeps them")
    path = results_path.parent / named["file"]
    if not path.is_file():
        raise AnswersError(f"{path}: missing (results.json names it). Fix: keep it beside {results_path.name}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != named["sha256"]:
        raise AnswersError(f"{path}: its sha256 differs from the one {results_path.name} records: the answers "
                           "were altered or belong to another report. Fix: restore the file the study wrote")
    answers = json.loads(gzip.decompress(data))
    if answers.get("format") != FORMAT:
        raise AnswersError(f"{path}: format {answers.get('format')!r}, this version reads {FORMAT}")
    return results, answers
