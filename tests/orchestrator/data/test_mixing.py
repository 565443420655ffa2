"""Mixing weights, exact counts, up-sampling, determinism and label-token counts."""
from __future__ import annotations

from collections import Counter

import pytest

from orchestrator.data.mixing import label_token_counts, mix_examples, mixture_counts, mixture_weights
from orchestrator.data.schema import DataError, Example
from orchestrator.models.loading import build_tiny_tokenizer


def _items(task: str, n: int) -> list[Example]:
    return [Example(f"{task} q{i}", f"{task} a{i}", None, None, str(i)) for i in range(n)]


DATA = {"big": _items("big", 100), "small": _items("small", 25)}


def test_weights_by_strategy():
    sizes = {"big": 100, "small": 25}
    assert mixture_weights(sizes, "proportional") == pytest.approx({"big": 0.8, "small": 0.2})
    assert mixture_weights(sizes, "uniform") == pytest.approx({"big": 0.5, "small": 0.5})
    # tau = 2: sqrt(100) = 10, sqrt(25) = 5
    assert mixture_weights(sizes, "temperature", temperature=2.0) == pytest.approx({"big": 2 / 3, "small": 1 / 3})
    assert mixture_weights(sizes, "temperature", temperature=1.0) == pytest.approx({"big": 0.8, "small": 0.2})


def test_counts_sum_exactly():
    assert mixture_counts({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 10) == {"a": 4, "b": 3, "c": 3}
    assert sum(mixture_counts({"a": 0.123, "b": 0.877}, 7).values()) == 7


def test_proportional_default_uses_every_item_once():
    mixed = mix_examples(DATA, "proportional")
    assert len(mixed) == 125 and len({ex.prompt for _, ex in mixed}) == 125
    assert Counter(t for t, _ in mixed) == {"big": 100, "small": 25}


def test_uniform_upsamples_small_task_evenly():
    mixed = mix_examples(DATA, "uniform", num_examples=100)
    per_task = Counter(t for t, _ in mixed)
    assert per_task == {"big": 50, "small": 50}
    small_uses = Counter(ex.prompt for t, ex in mixed if t == "small")
    assert set(small_uses.values()) == {2}  # 50 draws over 25 items: each exactly twice
    assert len({ex.prompt for t, ex in mixed if t == "big"}) == 50  # no repeats below the task size


def test_temperature_counts_and_determinism():
    mixed = mix_examples(DATA, "temperature", temperature=2.0, num_examples=30, seed=1)
    assert Counter(t for t, _ in mixed) == {"big": 20, "small": 10}
    assert mixed == mix_examples(DATA, "temperature", temperature=2.0, num_examples=30, seed=1)
    assert mixed != mix_examples(DATA, "temperature", temperature=2.0, num_examples=30, seed=2)


def test_bad_arguments():
    with pytest.raises(DataError, match="strategy 'random' is unknown"):
        mix_examples(DATA, "random")
    with pytest.raises(DataError, match="temperature=0"):
        mix_examples(DATA, "temperature", temperature=0)
    with pytest.raises(DataError, match="zero training items"):
        mix_examples({"a": []})


def test_label_token_counts():
    tok = build_tiny_tokenizer()
    data = {"a": [Example("q", "the correct answer is answer1", None, None, "x")] * 3, "b": []}
    per_item = len(tok("the correct answer is answer1", add_special_tokens=False)["input_ids"])
    assert per_item > 1
    assert label_token_counts(tok, data) == {"a": 3 * per_item, "b": 0}
