"""Matched trainable-parameter budgets: each method's count on the space's model, checked before anything runs.

A comparison of methods holds only at one budget (RESEARCH.md, "Compare like with like"). Counts come from
the analytic formulas of :mod:`malora.params` (METHODS.md §1.5) over the adapted linears of the model's
skeleton, built on the ``meta`` device (no weights, no memory), so the check costs well under a second.

For each method every *corner* of its domains is counted (all-low, all-high, each choice value with the rest
low): a count-changing hyperparameter (MALoRA's ``d``, MoSLD's ``expert_schedule``) shows up as a range. The
budget ``B`` is the count of ``search.budget_method`` at its all-low corner, and a method passes when
``|count / B - 1| <= search.budget_tolerance`` at every corner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from orchestrator.spec.space import SearchSpec

logger = logging.getLogger(__name__)

#: SmolLM2-135M's dimensions (its GGUF header; docs ENVIRONMENT.md §5), so no conversion runs for a count.
SMOLLM2_DIMS = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


class BudgetError(ValueError):
    """The methods' trainable counts differ from the budget by more than the tolerance; the message says how."""


@dataclass(frozen=True)
class MethodCount:
    """Trainable parameters of one method over the corners of its domains, and its share of the base model."""

    method: str
    low: int
    """Smallest count over the corners."""
    high: int
    """Largest count over the corners."""
    base: int
    """Parameters of the base model (frozen), the denominator of the papers' "#Params %"."""

    @property
    def share(self) -> float:
        return self.low / self.base if self.base else float("nan")


def skeleton(spec: SearchSpec) -> Any:
    """The space's base model on the ``meta`` device: exact shapes, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from orchestrator.models.loading import SMOLLM2, TINY_LLAMA, build_tiny_llama

    name = spec.model.name
    if name == TINY_LLAMA:
        return build_tiny_llama(seed=0)[0]  # a few hundred kB: the real thing is cheaper than a copy of its config
    config = LlamaConfig(**SMOLLM2_DIMS) if name == SMOLLM2 else AutoConfig.from_pretrained(name)
    with torch.device("meta"):
        return LlamaForCausalLM(config) if name == SMOLLM2 else AutoModelForCausalLM.from_config(config)


def trainable_count(model: Any, kind: str, hp: dict[str, Any]) -> int:
    """Trainable parameters of adapter ``kind`` with hyperparameters ``hp`` on ``model`` (METHODS.md §1.5)."""
    from malora.params import analytic_trainable, linear_dims
    from orchestrator.spec.hparams import adapter_config

    layers = model.config.num_hidden_layers
    cfg = adapter_config(kind, hp, num_layers=layers)
    return analytic_trainable(cfg, linear_dims(model, cfg.target_modules), num_layers=layers)


def method_counts(spec: SearchSpec, configs: dict[str, list[dict[str, Any]]] | None = None,
                  model: Any = None) -> dict[str, MethodCount]:
    """Per method, its count range over ``configs[method]`` (hyperparameter dicts; default: its corners)."""
    from malora.params import count_parameters
    from orchestrator.spec.hparams import corner_points

    model = skeleton(spec) if model is None else model
    base = count_parameters(model).total
    out = {}
    for m in spec.methods:
        counts = [trainable_count(model, m.kind, hp) for hp in (configs or {}).get(m.kind) or corner_points(m)]
        out[m.kind] = MethodCount(m.kind, min(counts), max(counts), base)
    return out


def budget_method(spec: SearchSpec) -> str:
    kinds = [m.kind for m in spec.methods]
    return spec.search.budget_method or ("molora" if "molora" in kinds else kinds[0])


def check_budget(spec: SearchSpec, counts: dict[str, MethodCount]) -> int:
    """The budget ``B``; raises BudgetError naming every method whose count leaves ``B (1 ± tolerance)``,
    unless ``search.match_budget`` is false (then the counts are only reported)."""
    ref = budget_method(spec)
    budget, tol = counts[ref].low, spec.search.budget_tolerance
    if budget <= 0:
        raise BudgetError(f"{ref} adapts no layer of {spec.model.name} (0 trainable parameters). Fix: its "
                          "target_modules must name linear layers of the model, e.g. q_proj, v_proj")
    bad = [c for c in counts.values() if max(abs(c.low / budget - 1), abs(c.high / budget - 1)) > tol]
    if bad and spec.search.match_budget:
        listed = "; ".join(f"{c.method} {c.low:,}" + (f"-{c.high:,}" if c.high != c.low else "") +
                           f" ({c.low / budget - 1:+.0%}" + (f" to {c.high / budget - 1:+.0%}" if c.high != c.low
                                                             else "") + ")" for c in bad)
        raise BudgetError(f"trainable parameters differ from the budget ({ref}: {budget:,} on {spec.model.name}) by "
                          f"more than search.budget_tolerance={tol:g}: {listed}. Fix: change those methods' "
                          "hyperparameters (r, num_experts, d, target_modules) to match it, or set "
                          "search.match_budget: false to compare unequal budgets on purpose")
    return budget


def describe_budget(spec: SearchSpec) -> tuple[str, str | None]:
    """(the --dry-run lines on budgets, the refusal or None) for the space's model."""
    counts = method_counts(spec)
    head = (f"  budget       {budget_method(spec)}'s count, tolerance {spec.search.budget_tolerance:g}"
            if spec.search.match_budget else "  budget       not matched (search.match_budget: false)")
    try:
        check_budget(spec, counts)
        problem = None
    except BudgetError as exc:
        problem = f"search.match_budget: {exc}"
    return "\n".join([head, *budget_lines(spec, counts)]), problem


def budget_lines(spec: SearchSpec, counts: dict[str, MethodCount]) -> list[str]:
    """One line per method: count (range), share of the base model, ratio to the budget."""
    ref = budget_method(spec)
    budget = counts[ref].low
    lines = []
    for c in counts.values():
        ranged = c.high != c.low   # a searched rank: every figure is a range over the corners of the domains
        span = f"{c.low:,}" + (f"-{c.high:,}" if ranged else "")
        share = f"{100 * c.share:.2f}" + (f"-{100 * c.high / c.base:.2f}" if ranged and c.base else "")
        ratio = f"{c.low / budget:.3f}" + (f"-{c.high / budget:.3f}" if ranged else "") if budget else ""
        lines.append(f"    {c.method:7s} {span} trainable ({share} % of the base), "
                     + (f"{ratio}x the budget" if budget else "no budget (0)")
                     + (" (the budget's smallest corner)" if c.method == ref and ranged
                        else " (the budget)" if c.method == ref else ""))
    return lines
