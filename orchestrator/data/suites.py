"""A spec's suite: the train/val/test pools of its tasks (:func:`orchestrator.data.tasks.load_suite`), loaded once
per data spec in a process.

The pools are fixed by ``data.split_seed`` (never by ``train.seed``). The driver asks for them several times
(preflight, the recorded splits, a study's plan and report, the zero-shot reference), about a second each for
the intra-domain files; callers only read them.
"""

from __future__ import annotations

import functools
from typing import Any


def load_pools(spec: Any):
    """The suite of ``spec.data`` (a frozen ``orchestrator.spec.space.DataSpec``: hashable, so it keys the cache)."""
    return pools_for(spec.data)


@functools.lru_cache(maxsize=4)
def pools_for(d: Any):
    """The suite of one data spec (``suite`` or ``tasks``, ``data_dir``, the three limits and ``split_seed``)."""
    from orchestrator.data.tasks import load_suite

    return load_suite(d.suite or list(d.tasks), d.data_dir, train_limit=d.train_limit, val_limit=d.val_limit,
                      test_limit=d.test_limit, split_seed=d.split_seed)
