"""Per-method hyperparameters: domains, the conditional Optuna space (define-by-run), and trial -> adapter config.

The space is conditional: ``method`` is categorical and each method only owns its own hyperparameters, so
MALoRA's ``d``/``beta`` exist only when ``method == "malora"``, MoSLD's expert list only for MoSLD, ``top_k``
only for routed methods. Optuna parameter names are ``"<method>.<name>"`` so that TPE never mixes, e.g., the
``r`` of LoRA with the ``r`` of MoLoRA. Pure functions and one picklable callable; no Ray.

Derived hyperparameters (not adapter fields):

* ``alpha_over_r``: ``alpha = alpha_over_r * rank`` (rank = ``r``, or ``r_bar`` for MALoRA; the papers keep 2).
* MALoRA ``r`` (the MoLoRA rank whose budget MALoRA matches, default 8) with ``lam``:
  ``(d, r_bar) = malora_dims(r, N, lam)`` i.e. ``d = lam r N``, ``r_bar = (2 - lam) r``; or with ``d`` alone:
  ``r_bar = 2 r - d / N`` (the same budget rule written in d). Paper: r = 8, N = 8, d = 32 -> r_bar = 12.
* MoSLD ``expert_schedule`` (uniform | increasing | decreasing) with ``expert_levels`` (default 2, 4, 6, 8):
  decoder layer ``i`` of ``L`` gets ``levels[i * len(levels) // L]`` experts (increasing = more experts near the
  output, as MoLA and MoSLD §5.2 recommend; decreasing = MoSLD's main table 8, 6, 4, 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

DOMAIN_KINDS = ("const", "choice", "uniform", "loguniform", "int", "logint")
TRAIN_HPARAMS = ("lr", "weight_decay", "warmup_ratio")
ROUTED_TOPK = ("molora", "malora", "mosld")
EXTRA = {"malora": ("r", "lam"), "mosld": ("expert_schedule", "expert_levels")}


@dataclass(frozen=True)
class Domain:
    """A hyperparameter domain: ``kind`` in DOMAIN_KINDS; ``values`` = (constant,) | choices | (lo, hi)."""

    kind: str
    values: tuple

    @property
    def low(self) -> Any:
        return self.values[0]

    @property
    def high(self) -> Any:
        return self.values[-1]

    def describe(self) -> str:
        if self.kind == "const":
            return repr(self.values[0])
        if self.kind == "choice":
            return "choice " + repr(list(self.values))
        return f"{self.kind} [{self.values[0]}, {self.values[1]}]"


def valid_hparam_names(kind: str) -> list[str]:
    """Names a method may search or fix: its adapter fields, per-method train overrides, derived names."""
    from malora.config import CONFIG_CLASSES

    fields = [f.name for f in dataclasses.fields(CONFIG_CLASSES[kind]) if f.name != "kind"]
    return [*fields, *TRAIN_HPARAMS, "alpha_over_r", *EXTRA.get(kind, ())]


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_domain(value: Any, path: str, numeric_fix: Callable[[Any], str | None]) -> tuple[Domain | None, str | None]:
    """YAML value -> (Domain, None) or (None, problem)."""
    def bad_number(v: Any) -> str | None:
        fix = numeric_fix(v)
        if fix is not None:
            return (f"{path}: {v!r} is a string, not a number (PyYAML reads exponents without a dot as text). "
                    f"Fix: write {fix}")
        return None if _is_num(v) else f"{path}: {v!r} must be a number"

    if not isinstance(value, dict):
        problem = bad_number(value) if numeric_fix(value) is not None else None
        return (None, problem) if problem else (Domain("const", (value,)), None)
    if len(value) != 1 or next(iter(value)) not in DOMAIN_KINDS[1:]:
        return None, (f"{path}: {value!r} must be a constant or exactly one of {{choice: [...]}}, "
                      "{uniform: [lo, hi]}, {loguniform: [lo, hi]}, {int: [lo, hi]}, {logint: [lo, hi]}")
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        return None, f"{path}.{kind}: must be a non-empty list"
    if kind == "choice":
        for v in args:
            if numeric_fix(v) is not None:
                return None, bad_number(v)
        return Domain(kind, tuple(tuple(v) if isinstance(v, list) else v for v in args)), None
    if len(args) != 2:
        return None, f"{path}.{kind}: {args!r} must be [lo, hi]"
    for v in args:
        problem = bad_number(v)
        if problem:
            return None, problem
    lo, hi = args
    if kind in ("int", "logint") and not all(isinstance(v, int) for v in args):
        return None, f"{path}.{kind}: {args!r} bounds must be integers"
    if not lo < hi:
        return None, f"{path}.{kind}: {args!r} needs lo < hi. Fix: swap or widen the bounds, or write a constant"
    if kind in ("loguniform", "logint") and lo <= 0:
        return None, f"{path}.{kind}: {args!r} is log-scaled, so lo must be > 0"
    return Domain(kind, (lo, hi)), None


def _primitive(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _encode(dom: Domain, v: Any) -> Any:
    return v if all(_primitive(c) for c in dom.values) else json.dumps(v)


def suggest(trial: Any, name: str, dom: Domain) -> Any:
    """Ask an Optuna trial (or Ray's captor of one) for ``name`` from ``dom``."""
    lo, hi = dom.low, dom.high
    if dom.kind == "choice":
        return trial.suggest_categorical(name, [_encode(dom, c) for c in dom.values])
    if dom.kind in ("uniform", "loguniform"):
        return trial.suggest_float(name, float(lo), float(hi), log=dom.kind == "loguniform")
    return trial.suggest_int(name, int(lo), int(hi), log=dom.kind == "logint")


class ConditionalSpace:
    """Optuna define-by-run space over the spec's methods (picklable: Ray's OptunaSearch pickles it on save).

    ``space(trial)`` suggests ``method`` and then only that method's hyperparameters; constants are returned
    (Ray adds a define-by-run function's return value to the trial config).
    """

    def __init__(self, methods: tuple):
        self.methods = tuple(methods)

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        kinds = [m.kind for m in self.methods]
        constants: dict[str, Any] = {}
        if len(kinds) > 1:
            kind = trial.suggest_categorical("method", kinds)
        else:
            kind = constants["method"] = kinds[0]
        method = self.methods[kinds.index(kind)]
        for name, dom in method.hparams:
            key = f"{kind}.{name}"
            if dom.kind == "const":
                constants[key] = list(dom.low) if isinstance(dom.low, tuple) else dom.low
            else:
                suggest(trial, key, dom)
        return constants or None


def optuna_points(methods: tuple, points: tuple | None) -> list[dict[str, Any]]:
    """search.points_to_evaluate ({method, name: value}) -> Optuna parameter dicts to enqueue."""
    out = []
    for point in points or ():
        kind = point["method"]
        doms = dict(next(m for m in methods if m.kind == kind).hparams)
        params = {"method": kind} if len(methods) > 1 else {}
        for name, value in point.items():
            if name != "method" and doms[name].kind != "const":
                params[f"{kind}.{name}"] = _encode(doms[name], value)
        out.append(params)
    return out


def trial_hparams(methods: tuple, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Tune trial config -> (method, {name: value}) with prefixes stripped and encoded choices decoded."""
    kind = config.get("method") or methods[0].kind
    doms = dict(next(m for m in methods if m.kind == kind).hparams)
    out = {}
    for key, value in config.items():
        if not key.startswith(kind + "."):
            continue
        name = key[len(kind) + 1:]
        dom = doms.get(name)
        if dom is not None and dom.kind == "choice" and not all(_primitive(c) for c in dom.values):
            value = json.loads(value) if isinstance(value, str) else value
        out[name] = tuple(value) if isinstance(value, list) else value
    return kind, out


def expert_schedule(schedule: str, levels: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Per-layer expert counts: layer i of L gets levels[i * len(levels) // L] (reversed for 'decreasing')."""
    if schedule == "decreasing":
        levels = tuple(reversed(levels))
    return tuple(levels[i * len(levels) // num_layers] for i in range(num_layers))


def adapter_config(kind: str, hp: dict[str, Any], num_layers: int | None = None):
    """Resolved hyperparameters -> malora AdapterConfig (raises malora ConfigError or ValueError)."""
    from malora.config import CONFIG_CLASSES, malora_dims

    cls = CONFIG_CLASSES[kind]
    fields = {f.name for f in dataclasses.fields(cls)} - {"kind"}
    kwargs = {k: v for k, v in hp.items() if k in fields}
    if kind == "malora":
        r, n = hp.get("r", 8), kwargs.get("num_experts", 8)
        if "lam" in hp:
            if "d" in hp or "r_bar" in hp:
                raise ValueError("malora: give lam or d/r_bar, not both")
            kwargs["d"], kwargs["r_bar"] = malora_dims(r, n, hp["lam"])
        elif "d" in hp and "r_bar" not in hp:
            if hp["d"] % n or 2 * r - hp["d"] // n < 1:
                raise ValueError(f"malora: d={hp['d']} with r={r}, N={n} gives no integer r_bar = 2r - d/N >= 1; "
                                 "choose d as a multiple of num_experts below 2 r N, or set r_bar")
            kwargs["r_bar"] = 2 * r - hp["d"] // n
    schedule = hp.get("expert_schedule", "uniform")
    if kind == "mosld" and schedule != "uniform":
        if schedule not in ("increasing", "decreasing"):
            raise ValueError(f"mosld: expert_schedule={schedule!r}; use uniform, increasing or decreasing")
        levels = tuple(hp.get("expert_levels", (2, 4, 6, 8)))
        kwargs["num_experts"] = expert_schedule(schedule, levels, num_layers or len(levels))
    if "alpha_over_r" in hp:
        if "alpha" in hp:
            raise ValueError("give alpha or alpha_over_r, not both")
        rank = kwargs.get("r_bar", 12) if kind == "malora" else kwargs.get("r", 8)
        kwargs["alpha"] = float(hp["alpha_over_r"]) * rank
    return cls(**kwargs)


def corner_points(method: Any) -> list[dict[str, Any]]:
    """All-low, all-high, and each choice value with the rest low (integers rounded)."""
    doms = dict(method.hparams)
    corners = [{n: d.low for n, d in doms.items()}, {n: d.high for n, d in doms.items()}]
    for name, dom in doms.items():
        if dom.kind == "choice":
            corners += [{**corners[0], name: v} for v in dom.values]
    return [{k: (round(v) if doms[k].kind in ("int", "logint") else v) for k, v in hp.items()} for hp in corners]


def method_corner_configs(method: Any) -> list[str]:
    """Problems found by building the adapter config at the corners of the method's domains.

    Catches impossible combinations (``top_k > num_experts``, ``r_bar > d``, a non-integer ``lam r N``) before
    any trial starts: all-low, all-high, and each choice value with the rest low.
    """
    doms = dict(method.hparams)
    for name, dom in doms.items():
        if name in TRAIN_HPARAMS and dom.kind != "choice":
            lo, hi = dom.low, dom.high
            if not (_is_num(lo) and _is_num(hi)) or lo < 0 or (name == "lr" and not 0 < lo <= hi < 1):
                return [f"methods.{method.kind}.{name}: {dom.describe()} is impossible. Fix: use values in (0, 1)"]
    problems = []
    for hp in corner_points(method):
        try:
            adapter_config(method.kind, hp)
        except (ValueError, TypeError) as exc:
            msg = f"methods.{method.kind}: {exc} (at {hp})"
            if not any(str(exc) in p for p in problems):
                problems.append(msg)
    return problems


def schedule_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """LR multiplier: linear warm-up 0 -> 1 over ``warmup`` steps, then cosine/linear decay to 0 or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
