"""What a run records about how its test scores were made, read in one place by the worker and the report.

A study may aggregate runs only when they were scored on the same items, in the same formulation and at the same
precision (``orchestrator.report.study_report`` refuses otherwise). Each is read by one small function here:

- :func:`formulation_of`: ``data.formulation`` (cloze | label);
- :func:`precision_of`: the precision a run reports it used (metric ``precision``, the resolved value of
  ``train.precision``), else the spec's ``train.precision``;
- :func:`scoring_record`: the final report's ``test_sha256/<task>`` (sha256 of the sorted item keys of the test
  items the run scored, :func:`orchestrator.data.pools.pool_sha256`) and ``formulation``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.data.pools import pool_sha256

TEST_SHA = "test_sha256/"


def formulation_of(spec: Any) -> str:
    """The formulation the spec trains and scores in (see the module docstring)."""
    return str(spec.data.formulation)


def precision_of(metrics: Mapping[str, Any] | None, spec: Any) -> str:
    """The precision a run computed in: its reported ``precision`` if any, else ``train.precision``."""
    reported = (metrics or {}).get("precision")
    return str(reported) if isinstance(reported, str) and reported else str(spec.train.precision)


def scoring_record(test_pools: Mapping[str, Sequence[Any]], spec: Any) -> dict[str, str]:
    """``{"test_sha256/<task>": sha256, ..., "formulation": ...}`` of the test items a run is scored on."""
    return {**{f"{TEST_SHA}{task}": pool_sha256(items) for task, items in test_pools.items()},
            "formulation": formulation_of(spec)}


def item_hashes(metrics: Mapping[str, Any]) -> dict[str, str]:
    """``{task: sha256}`` from a run's reported metrics (empty for a run that recorded none)."""
    return {k[len(TEST_SHA):]: str(v) for k, v in metrics.items() if k.startswith(TEST_SHA)}
