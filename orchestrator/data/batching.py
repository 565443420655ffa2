"""Training micro-batches: random or length-grouped, seeded per epoch, sharded over DDP ranks, resumable.

Length grouping (``group_by_length=True``), one epoch ``e`` over ``n`` encoded examples, batch size ``B``,
``W`` ranks, mega-batches of ``M = MEGA_BATCHES * B`` examples:

1. ``order = shuffle(range(n), seed + e)``; the last ``n mod B`` positions are dropped for this epoch (a
   different tail every epoch, so no example is left out for good).
2. cut ``order`` into consecutive mega-batches of ``M``; sort each by length, longest first (stable, so ties keep
   the shuffled order);
3. cut each sorted mega-batch into batches of ``B``; shuffle the list of batches (``seed + e`` again, through a
   second generator), so that a run does not see a long batch first in every mega-batch;
4. rank ``r`` takes ``batches[r::W]``, cut to ``floor(len(batches) / W)`` batches: the ranks' batches are
   disjoint and every rank gets the same count, so the ranks cross epoch boundaries on the same step.

A random batch mixes short and long sequences, so ``pad share = 1 - sum(lengths) / (B * max(lengths))`` is
large (31 % for batch 8 of the intra-domain mix); neighbours in a sorted mega-batch of 400 differ by a token or
two (about 1 %). Within a mega-batch every example still appears exactly once per epoch, so grouping changes
the order of the data, not its distribution over an epoch.

``group_by_length=False`` is the original stream, kept bit for bit: shuffle with ``seed + e``, rank ``r`` takes
``order[r::W]``, consecutive full batches of it (a shard shorter than ``B`` is one short batch).

A stream is a pure function of ``(seed, epoch, position)``: ``batch_stream(..., start=k)`` is the stream with its
first ``k`` micro-batches skipped (their indices are computed, never collated), which is how a resumed trial
continues exactly where the checkpointed one stopped.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from orchestrator.data.tokenize import collate

MEGA_BATCHES = 50  # batches per mega-batch: 400 examples at batch 8, as in HF's LengthGroupedSampler


def random_batches(n: int, batch_size: int, rank: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """The original order: this rank's shard of a seeded shuffle, cut into consecutive full batches."""
    order = list(range(n))
    random.Random(seed + epoch).shuffle(order)
    shard = order[rank::world]
    stop = len(shard) - batch_size + 1 if len(shard) >= batch_size else 1
    return [shard[i:i + batch_size] for i in range(0, stop, batch_size)]


def grouped_batches(lengths: Sequence[int], batch_size: int, rank: int, world: int, seed: int, epoch: int,
                    mega_batches: int = MEGA_BATCHES) -> list[list[int]]:
    """This rank's length-grouped batches of one epoch (module docstring, steps 1-4)."""
    n = len(lengths)
    order = list(range(n))
    rng = random.Random(seed + epoch)
    rng.shuffle(order)
    if n < batch_size * world:  # too few for one full batch per rank: one short batch each, as the random path
        return [order[rank::world]] if n >= world else [order]
    order = order[:n - n % batch_size]
    mega = mega_batches * batch_size
    out: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])  # stable: ties keep shuffled order
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    per_rank = len(out) // world
    return out[rank::world][:per_rank]


def epoch_batches(lengths: Sequence[int], batch_size: int, rank: int, world: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """Index lists of one epoch for this rank (grouped or the original random order)."""
    if group_by_length:
        return grouped_batches(lengths, batch_size, rank, world, seed, epoch)
    return random_batches(len(lengths), batch_size, rank, world, seed, epoch)


def batch_stream(encoded: Sequence[dict], batch_size: int, rank: int, world: int, seed: int, pad_id: int, *,
                 group_by_length: bool = True, start: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Endless ``(epoch, collated batch)`` of this rank, the first ``start`` micro-batches skipped uncollated."""
    lengths = [len(e["input_ids"]) for e in encoded]
    epoch = 0
    while True:
        plan = epoch_batches(lengths, batch_size, rank, world, seed, epoch, group_by_length)
        if not plan:
            raise ValueError("batch_stream() got no examples")
        if start >= len(plan):  # skipping a whole epoch costs only its index lists
            start -= len(plan)
        else:
            for idx in plan[start:]:
                yield epoch, collate([encoded[j] for j in idx], pad_id)
            start = 0
        epoch += 1


def pad_share(lengths: Sequence[int]) -> float:
    """Share of the positions of a right-padded batch that are padding: ``1 - sum(n_i) / (B * max(n_i))``."""
    return 1.0 - sum(lengths) / (len(lengths) * max(lengths))
