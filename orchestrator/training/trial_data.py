"""A trial's data: the mixed, encoded training stream and the val/test pools, the same on every rank.

The pools come from ``data.split_seed`` (:mod:`orchestrator.data.suites`); ``train.seed`` only shuffles the mixed
stream. :func:`encode_training_example` is the one row every training example (and the gradient-conflict probe,
:mod:`orchestrator.evaluation.grad_conflict`) is encoded into.
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator.data.suites import load_pools
from orchestrator.spec.space import DataSpec, SearchSpec


def encode_training_example(tokenizer: Any, task: str, ex: Any, d: DataSpec) -> dict | None:
    """The training row of one example (None when it does not fit ``data.max_length``): in cloze the scorer's
    row of the gold option (``orchestrator.data.cloze``), else the templated prompt and response."""
    from orchestrator.data.cloze import encode_cloze_example
    from orchestrator.data.tasks import get_task
    from orchestrator.data.tokenize import encode_example

    if d.formulation == "cloze" and ex.choices:
        return encode_cloze_example(tokenizer, get_task(task), ex, max_length=d.max_length)
    return encode_example(tokenizer, ex, template=d.template, max_length=d.max_length)


def build_training_data(spec: SearchSpec, tokenizer: Any) -> tuple[list[dict], dict[str, dict], dict[str, Any]]:
    """(encoded training examples, ``{"val": {task: items}, "test": {task: items}}``, data notes), the same on
    every rank. ``train.seed`` only shuffles the mixed stream; the pools come from ``data.split_seed``."""
    from orchestrator.data.mixing import mix_examples

    d = spec.data
    suite = load_pools(spec)
    mixed = mix_examples(suite.train, d.mixing, temperature=d.mixing_temperature,
                         num_examples=d.num_train_examples, seed=spec.train.seed)
    encoded, dropped = [], 0
    for task, ex in mixed:
        enc = encode_training_example(tokenizer, task, ex, d)
        if enc is None:
            dropped += 1
        else:
            encoded.append(enc)
    if not encoded:
        raise ValueError(f"no training example fits data.max_length={d.max_length} ({dropped} dropped); raise it")
    notes = {"train_examples": len(encoded), "dropped_too_long": dropped, **dict(getattr(suite, "notes", {}))}
    return encoded, {"val": dict(suite.val), "test": dict(suite.test)}, notes


def batches(encoded: list[dict], batch_size: int, rank: int, world: int, seed: int, pad_id: int, *,
            group_by_length: bool = False, start: int = 0):
    """Endless micro-batches of this rank's shard; a new shuffle (seed + epoch) per pass. Yields (epoch, batch).

    Length-grouped or the plain shuffle (``orchestrator.data.batching``); the first ``start`` micro-batches are
    skipped as index lists, without collating them.
    """
    from orchestrator.data.batching import batch_stream

    return batch_stream(encoded, batch_size, rank, world, seed, pad_id, group_by_length=group_by_length,
                        start=start)


def total_steps(spec: SearchSpec, num_examples: int, world: int) -> int:
    if spec.train.max_steps is not None:
        return spec.train.max_steps
    per_step = spec.train.batch_size * spec.train.grad_accum * world
    return max(1, math.ceil(spec.train.epochs * num_examples / per_step))


def resume_stream(encoded: list[dict], spec: SearchSpec, session: Any, tokenizer: Any, start_step: int):
    """This rank's micro-batch stream, advanced past the ``start_step * grad_accum`` micro-batches already used."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # a resumed run continues the same deterministic stream: the used micro-batches are skipped, not collated
    return batches(encoded, spec.train.batch_size, session.rank, session.world_size, spec.train.seed, pad_id,
                   group_by_length=spec.train.group_by_length, start=start_step * spec.train.grad_accum)
