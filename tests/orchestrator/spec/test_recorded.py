"""What a run records about its test scores: the item hash against a from-scratch sha256, and the two readers
tolerant of fields other branches add (``data.formulation``, a reported ``precision``)."""

from __future__ import annotations

import dataclasses
import hashlib

from orchestrator.data.schema import Example
from orchestrator.spec.recorded import formulation_of, item_hashes, precision_of, scoring_record
from orchestrator.spec.space import load_space


def _ex(prompt: str, target: str) -> Example:
    return Example(prompt=prompt, target=target, choices=None, answer_index=None, gold=target, labels=None,
                   question=prompt)


def test_test_record_hashes_the_sorted_item_keys():
    spec = load_space("search_spaces/smoke.yaml")
    items = [_ex("q2", "b"), _ex("q1", "a")]
    keys = sorted(hashlib.sha256(f"{e.prompt}\x1f{e.target}".encode()).hexdigest()[:16] for e in items)
    rec = scoring_record({"boolq": items, "arc_e": items[:1]}, spec)
    assert rec["test_sha256/boolq"] == hashlib.sha256("\n".join(keys).encode()).hexdigest()
    reversed_ = scoring_record({"boolq": items[::-1]}, spec)
    assert rec["test_sha256/boolq"] == reversed_["test_sha256/boolq"]  # order-free
    assert rec["test_sha256/arc_e"] != rec["test_sha256/boolq"] and rec["formulation"] == spec.data.formulation
    assert item_hashes({**rec, "test/mean_acc": 0.5}) == {"boolq": rec["test_sha256/boolq"],
                                                          "arc_e": rec["test_sha256/arc_e"]}


def test_formulation_and_precision_prefer_what_is_recorded():
    spec = load_space("search_spaces/smoke.yaml")
    label = dataclasses.replace(spec, data=dataclasses.replace(spec.data, formulation="label"))
    assert formulation_of(spec) == "cloze" and formulation_of(label) == "label"
    assert precision_of(None, spec) == spec.train.precision == "auto"      # as written when nothing was reported
    assert precision_of({"precision": "bf16"}, spec) == "bf16"               # the resolved value a run reports
    assert precision_of({"precision": 1.0}, spec) == "auto"                  # not a precision name
