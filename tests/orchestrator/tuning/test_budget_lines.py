"""The --dry-run budget lines: a searched rank makes every figure of a method a range (count, share, ratio)."""

from __future__ import annotations

from types import SimpleNamespace

from orchestrator.tuning.budget import MethodCount, budget_lines


def test_a_searched_rank_prints_ranges_and_a_fixed_one_single_values():
    spec = SimpleNamespace(methods=[SimpleNamespace(kind="lora"), SimpleNamespace(kind="molora")],
                           search=SimpleNamespace(budget_method=None))
    counts = {"molora": MethodCount("molora", 1_000, 4_000, 100_000), "lora": MethodCount("lora", 500, 500, 100_000)}
    molora, lora = budget_lines(spec, counts)
    # molora: 1,000-4,000 of 100,000 = 1.00-4.00 %, 1.000-4.000x its own smallest corner (the budget)
    assert "1,000-4,000 trainable (1.00-4.00 % of the base), 1.000-4.000x the budget (the budget's smallest corner)" \
        in molora
    assert lora.endswith("500 trainable (0.50 % of the base), 0.500x the budget")
