"""The recorded plan of a search or study: written once at first launch, read (never recomputed) by ``--resume``.

``<storage>/<name>/plan.json`` holds what a report must be able to state and a resume must not change: the
fingerprint of the space that launched it, the seeds used where (``seeds.search``: the training seed of every
search trial; ``seeds.replicate``: the study's replicate seeds, disjoint from them), the trials per method, and
for a study the chosen configurations and the run grid. A resume whose space differs from the recorded one is
refused (the report would otherwise describe runs the space never trained).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from orchestrator.cluster import storage
from orchestrator.spec.space import SearchSpec

PLAN = "plan.json"
#: what the runs' results depend on; resources, tracking and the debug hooks may change between launches
FINGERPRINTED = ("model", "data", "train", "eval", "methods", "search", "study")
#: keys of those groups that change only what the report computes from the runs' answers (or the estimate),
#: never a run: a resume accepts a changed value
REPORT_ONLY = {"study": ("n_boot", "comparisons", "noise_multiple", "equivalence_margin", "time_bound_min",
                         "secondary_without")}


class PlanError(ValueError):
    """A resume that does not match its recorded plan; the message names what changed and the fix."""


def spec_groups(spec: SearchSpec, names: tuple[str, ...] | list[str] = FINGERPRINTED) -> dict[str, Any]:
    """The groups ``names`` of ``spec`` as JSON-ready values."""
    return {g: json.loads(json.dumps(dataclasses.asdict(spec)[g] if g != "methods" else
                                     [dataclasses.asdict(m) for m in spec.methods], default=str, sort_keys=True))
            for g in names}


def fingerprint(groups: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the groups."""
    return hashlib.sha256(json.dumps(groups, sort_keys=True).encode()).hexdigest()


def plan_path(spec: SearchSpec, name: str | None = None) -> str:
    return storage.join(spec.storage_path, name or spec.name, PLAN)


def read_plan(spec: SearchSpec, name: str | None = None) -> dict[str, Any] | None:
    text = storage.read_text(plan_path(spec, name))
    return None if text is None else json.loads(text)


def write_plan(spec: SearchSpec, plan: dict[str, Any], name: str | None = None,
               names: tuple[str, ...] = FINGERPRINTED) -> dict[str, Any]:
    """Record ``plan`` with the space's groups ``names`` and their fingerprint; returns what was written."""
    groups = spec_groups(spec, names)
    record = {"space": spec.source, "fingerprint": fingerprint(groups), "groups": groups, **plan}
    storage.write_text(plan_path(spec, name), json.dumps(record, indent=1, sort_keys=True, default=str))
    return record


def check_resume(spec: SearchSpec, recorded: dict[str, Any], what: str) -> None:
    """Raise PlanError when ``spec`` is not the space ``recorded`` was launched with, naming the groups."""
    old = recorded.get("groups") or {}
    groups = spec_groups(spec, list(old) or FINGERPRINTED)
    if fingerprint(groups) == recorded.get("fingerprint"):
        return
    changed = [g for g in groups if _runs_part(g, groups.get(g)) != _runs_part(g, old.get(g))]
    if old and not changed:   # only report keys differ (REPORT_ONLY)
        return
    raise PlanError(f"--resume: the space differs from the one that launched this {what} "
                    f"(changed: {', '.join(changed) or 'unknown'}; recorded in {plan_path(spec)}). The recorded "
                    f"plan is what ran. Fix: restore the space (and flags) of the first launch, or start a new "
                    f"{what} with --name")


def _runs_part(group: str, values: Any) -> Any:
    """A recorded group without its :data:`REPORT_ONLY` keys (absent keys and the defaults of newer code alike)."""
    if not isinstance(values, dict):
        return values
    return {k: v for k, v in values.items() if k not in REPORT_ONLY.get(group, ())}


def replicate_seeds(first: int, n: int, used: set[int] | list[int]) -> list[int]:
    """The first ``n`` seeds from ``first`` upwards that no search trial trained with."""
    used, out, seed = set(used), [], first
    while len(out) < n:
        if seed not in used:
            out.append(seed)
        seed += 1
    return out
