"""The seesaw diagnostics of one evaluation as one JSON string in the trial's reported result.

``result["diagnostics"]`` (:data:`DIAGNOSTICS_KEY`) = ``{"tasks": [...], "routing": <record of
orchestrator.evaluation.routing_metrics.routing_diagnostics>, "grad_conflict": <record of
orchestrator.evaluation.grad_conflict.conflict_diagnostics>}``, either record ``{}`` where it was not computed.
A string, not a nested dict, so that Tune, the checkpoint's metrics.json and the MLflow callback carry it as one
value (the callback logs numbers only and skips it); the numbers themselves are reported as flat metrics too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

DIAGNOSTICS_KEY = "diagnostics"


def diagnostics_record(tasks: list[str], routing: dict[str, Any], conflict: dict[str, Any]) -> str:
    return json.dumps({"tasks": list(tasks), "routing": routing, "grad_conflict": conflict})


def diagnostics_of(result: Mapping[str, Any] | None) -> dict[str, Any]:
    """The parsed record of a reported result (a trial's last result, a run's metrics.json); {} without one."""
    raw = (result or {}).get(DIAGNOSTICS_KEY)
    if isinstance(raw, str):
        return json.loads(raw)
    return dict(raw) if isinstance(raw, Mapping) else {}
