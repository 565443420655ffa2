"""Micro-batch streams: length grouping, the original random order, DDP sharding and resuming at a step."""
from __future__ import annotations

import itertools
import random

import pytest

from orchestrator.data.batching import (MEGA_BATCHES, batch_stream, epoch_batches, grouped_batches, pad_share,
                                        random_batches)


def lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(20, 200) for _ in range(n)]


def encoded(lens: list[int]) -> list[dict]:
    return [{"input_ids": [i + 1] * n, "labels": [-100] * (n - 1) + [i + 1], "attention_mask": [1] * n}
            for i, n in enumerate(lens)]


def test_grouped_epoch_uses_every_example_once_but_the_dropped_tail_and_sorts_each_mega_batch():
    lens = lengths(1003)
    plan = grouped_batches(lens, 8, 0, 1, seed=5, epoch=2)
    flat = [i for b in plan for i in b]
    assert all(len(b) == 8 for b in plan) and len(plan) == 1003 // 8
    assert len(set(flat)) == len(flat) == 1000  # 3 = 1003 mod 8 left out this epoch
    # rebuild the mega-batches independently: the shuffled order cut into 400s, each sorted longest first
    order = list(range(1003))
    random.Random(5 + 2).shuffle(order)
    order = order[:1000]
    megas = [order[i:i + 8 * MEGA_BATCHES] for i in range(0, 1000, 8 * MEGA_BATCHES)]
    expect = []
    for m in megas:
        s = sorted(m, key=lambda i: -lens[i])
        expect += [tuple(s[i:i + 8]) for i in range(0, len(s), 8)]
    assert sorted(map(tuple, plan)) == sorted(expect)
    assert [tuple(b) for b in plan] != expect  # the batches are shuffled, not in mega-batch order


def test_grouping_cuts_the_padding_share():
    lens = lengths(2000, seed=1)
    share = lambda plan: sum(pad_share([lens[i] for i in b]) for b in plan) / len(plan)  # noqa: E731
    grouped = share(grouped_batches(lens, 8, 0, 1, seed=0, epoch=0))
    plain = share(random_batches(len(lens), 8, 0, 1, seed=0, epoch=0))
    assert plain > 0.3 and grouped < 0.02


def test_pad_share_by_hand():
    assert pad_share([4, 2]) == pytest.approx(0.25)
    assert pad_share([3, 3, 3]) == 0.0


def test_the_plain_order_is_the_original_stream():
    plan = random_batches(20, 4, 1, 2, seed=3, epoch=1)
    order = list(range(20))
    random.Random(4).shuffle(order)
    shard = order[1::2]
    assert plan == [shard[0:4], shard[4:8]]  # 10 items -> two full batches, the last two left out
    short = list(range(3))
    random.Random(0).shuffle(short)
    assert random_batches(3, 4, 0, 1, seed=0, epoch=0) == [short]  # a shard shorter than a batch: one short batch


def test_epochs_and_seeds_give_new_orders_and_the_same_arguments_the_same_order():
    lens = lengths(500)
    a = grouped_batches(lens, 8, 0, 1, seed=0, epoch=0)
    assert a == grouped_batches(lens, 8, 0, 1, seed=0, epoch=0)
    assert a != grouped_batches(lens, 8, 0, 1, seed=0, epoch=1)
    assert a != grouped_batches(lens, 8, 0, 1, seed=1, epoch=0)


@pytest.mark.parametrize("group", [True, False])
def test_ddp_ranks_get_disjoint_batches(group):
    lens = lengths(1001)
    plans = [epoch_batches(lens, 8, r, 3, seed=0, epoch=0, group_by_length=group) for r in range(3)]
    seen = [i for p in plans for b in p for i in b]
    assert len(seen) == len(set(seen))
    if group:  # equal batch counts, so the ranks cross epoch boundaries on the same step
        assert len({len(p) for p in plans}) == 1 and len(plans[0]) == (1001 // 8) // 3
        union = sorted(map(tuple, (b for p in plans for b in p)))
        whole = sorted(map(tuple, grouped_batches(lens, 8, 0, 1, seed=0, epoch=0)))
        assert set(union) <= set(whole)  # the single-rank batches, dealt out round-robin


def test_fewer_examples_than_one_batch_per_rank():
    assert grouped_batches([5, 3, 9], 8, 0, 1, seed=0, epoch=0)[0] != []
    plans = [grouped_batches([5, 3, 9, 4], 8, r, 2, seed=0, epoch=0) for r in range(2)]
    assert sorted(plans[0][0] + plans[1][0]) == [0, 1, 2, 3]


@pytest.mark.parametrize("group", [True, False])
def test_a_stream_started_at_k_is_the_full_stream_after_k(group):
    enc = encoded(lengths(90, seed=2))
    full = list(itertools.islice(batch_stream(enc, 8, 0, 1, 7, 0, group_by_length=group), 30))  # > 2 epochs
    assert len({e for e, _ in full}) >= 3
    for k in (0, 5, 11, 23):
        tail = list(itertools.islice(batch_stream(enc, 8, 0, 1, 7, 0, group_by_length=group, start=k), 30 - k))
        assert [e for e, _ in tail] == [e for e, _ in full[k:]]
        assert all(a["input_ids"].equal(b["input_ids"]) and a["labels"].equal(b["labels"])
                   for (_, a), (_, b) in zip(tail, full[k:]))


def test_stream_batches_are_right_padded_collations_of_the_planned_examples():
    lens = lengths(40, seed=3)
    enc = encoded(lens)
    (epoch, first), = itertools.islice(batch_stream(enc, 8, 0, 1, 0, pad_id=0), 1)
    plan = grouped_batches(lens, 8, 0, 1, seed=0, epoch=0)[0]
    assert epoch == 0
    assert first["input_ids"][:, 0].tolist() == [i + 1 for i in plan]  # token i + 1 marks example i
    assert first["attention_mask"].sum(1).tolist() == [lens[i] for i in plan]
    assert first["input_ids"].shape[1] == max(lens[i] for i in plan)
