"""Train/val/test pools: disjoint (also by normalised prompt), fixed by the split seed only, fingerprinted."""

from __future__ import annotations

import hashlib
import re
import string

import pytest

from orchestrator.data.pools import make_pools
from orchestrator.data.schema import Example
from orchestrator.data.tasks import load_suite, load_task


def _norm(text: str) -> str:  # written out again here: the test must not call the function it checks
    text = "".join(" " if ch in string.punctuation or ch == "_" else ch for ch in text.lower())
    return " ".join(text.split())


def _ex(prompt: str, i: int = 0) -> Example:
    return Example(prompt=prompt, target=f"the correct answer is answer{i % 2 + 1}", choices=("a", "b"),
                   answer_index=i % 2, gold=f"answer{i % 2 + 1}", labels=("answer1", "answer2"))


def _prompts(items) -> set[str]:
    return {_norm(ex.prompt) for ex in items}


def test_intra_domain_pools_are_disjoint_sized_and_documented(shared_data_dir):
    suite = load_suite("intra_domain", shared_data_dir, split_seed=0, val_limit=200, test_limit=500)
    for task in suite.tasks:
        train, val, test = (_prompts(getattr(suite, pool)[task]) for pool in ("train", "val", "test"))
        assert not (train & val or train & test or val & test), task
    # PIQA ships one file of 1838 items: all three pools carved from it (test 500, val 200, the rest train)
    assert (len(suite.test["piqa"]), len(suite.val["piqa"]), len(suite.train["piqa"])) == (500, 200, 1138)
    assert "carved from the evaluation file" in suite.notes["piqa"]
    # ARC-Challenge has an official test file (1172): test = 500 of it; val = 200 of the 1119 train items, and
    # the one duplicated train prompt leaves the train side
    _, arc_test = load_task("arc_c", shared_data_dir)
    assert _prompts(suite.test["arc_c"]) <= _prompts(arc_test) and len(suite.test["arc_c"]) == 500
    assert (len(suite.val["arc_c"]), len(suite.train["arc_c"])) == (200, 918)


def test_arc_easy_overlaps_leave_the_train_side_never_test(shared_data_dir):
    train_file, test_file = load_task("arc_e", shared_data_dir)
    overlap = {_norm(ex.prompt) for ex in train_file} & {_norm(ex.prompt) for ex in test_file}
    assert len(overlap) == 2  # the shared files' known train/test overlap
    suite = load_suite(["arc_e"], shared_data_dir, test_limit=None)  # the whole official test file
    assert len(suite.test["arc_e"]) == len(test_file) == 2376
    assert not overlap & (_prompts(suite.train["arc_e"]) | _prompts(suite.val["arc_e"]))
    assert len(suite.train["arc_e"]) + len(suite.val["arc_e"]) == len(train_file) - 2


def test_duplicates_inside_a_carved_file_leave_val_and_train():
    # ten distinct prompts, each written twice with different spacing/punctuation
    items = [_ex(p, i) for i, p in enumerate(f"Question {k}{sep}" for k in range(10) for sep in ("?", " !"))]
    pools = make_pools("siqa", None, items, carve=True, split_seed=1, val_limit=4, test_limit=8)
    test, val, train = _prompts(pools.test), _prompts(pools.val), _prompts(pools.train)
    assert not (test & val or test & train or val & train)
    assert len(pools.test) == 8  # the test side is never thinned (it may hold both spellings of a prompt)
    assert len(pools.val) + len(pools.train) == sum(_norm(ex.prompt) not in test for ex in items) - sum(
        _norm(ex.prompt) in val for ex in items if ex not in pools.val and _norm(ex.prompt) not in test)


def test_pools_depend_on_the_split_seed_only(shared_data_dir):
    a = load_suite(["piqa", "boolq"], shared_data_dir, split_seed=3, val_limit=50, test_limit=80)
    b = load_suite(["piqa", "boolq"], shared_data_dir, split_seed=3, val_limit=50, test_limit=80, train_limit=40)
    assert a.val == b.val and a.test == b.test  # capping train does not move val or test
    assert set(map(id, b.train["piqa"])) and _prompts(b.train["piqa"]) <= _prompts(a.train["piqa"])
    c = load_suite(["piqa", "boolq"], shared_data_dir, split_seed=4, val_limit=50, test_limit=80)
    assert c.test["piqa"] != a.test["piqa"] and c.val["boolq"] != a.val["boolq"]


def test_splits_record_sizes_and_an_order_free_sha256(shared_data_dir):
    suite = load_suite(["obqa"], shared_data_dir, val_limit=30, test_limit=40)
    record = suite.splits()["obqa"]
    keys = sorted(hashlib.sha256(f"{ex.prompt}\x1f{ex.target}".encode()).hexdigest()[:16]
                  for ex in suite.test["obqa"])
    assert record["test_sha256"] == hashlib.sha256("\n".join(keys).encode()).hexdigest()
    assert (record["train"], record["val"], record["test"]) == (len(suite.train["obqa"]), 30, 40)
    assert re.fullmatch(r"[0-9a-f]{64}", record["val_sha256"]) and record["val_sha256"] != record["test_sha256"]


def test_spec_pools_ignore_the_training_seed(shared_data_dir, monkeypatch):
    import dataclasses

    from orchestrator.spec.space import load_space
    from orchestrator.data.suites import load_pools

    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    spec = load_space("search_spaces/smoke.yaml")
    other = dataclasses.replace(spec, train=dataclasses.replace(spec.train, seed=7))
    a, b = load_pools(spec), load_pools(other)
    assert a.val == b.val and a.test == b.test and a.train == b.train


@pytest.mark.parametrize("limit", [0, -1, 1.5])
def test_bad_limits_name_the_key(shared_data_dir, limit):
    from orchestrator.data.schema import DataError

    with pytest.raises(DataError, match=f"test_limit={limit!r} for task 'piqa'"):
        load_suite("piqa", shared_data_dir, test_limit=limit)


def test_hub_tasks_use_their_own_train_and_validation_splits(monkeypatch):
    from orchestrator.data import hub

    def rows(task, dataset_id, config, split):  # a few synthetic Hub rows per split, tagged with the split
        if task == "piqa":
            return [{"goal": f"{split} goal {i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(30)]
        return [{"question_stem": f"{split} question {i}", "answerKey": "A",
                 "choices": {"text": ["w", "x", "y", "z"], "label": ["A", "B", "C", "D"]}} for i in range(30)]

    monkeypatch.setattr(hub, "_rows", rows)
    suite = load_suite(["piqa", "obqa"], None, val_limit=5, test_limit=6)
    # OBQA: test from its test split, val from its validation split, train = the whole train split
    assert all("test question" in ex.prompt for ex in suite.test["obqa"]) and len(suite.test["obqa"]) == 6
    assert all("validation question" in ex.prompt for ex in suite.val["obqa"]) and len(suite.val["obqa"]) == 5
    assert len(suite.train["obqa"]) == 30 and all("train question" in ex.prompt for ex in suite.train["obqa"])
    # PIQA: the Hub has its train split (the local files do not): test = validation, val carved from train
    assert all("validation goal" in ex.prompt for ex in suite.test["piqa"])
    assert all("train goal" in ex.prompt for ex in suite.val["piqa"] + suite.train["piqa"])
    assert len(suite.val["piqa"]) == 5 and len(suite.train["piqa"]) == 25
