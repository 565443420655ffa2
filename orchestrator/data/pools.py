"""Three disjoint pools per task -- train, val, test -- fixed by a data seed, deduplicated, and fingerprinted.

Rules (``../shared/RESEARCH.md``): hyperparameters, early stopping and "best" are chosen on **val**; **test** is
scored once per finished configuration and never feeds a choice; the pools depend only on ``split_seed`` (never on
the training seed), so every run of a study is scored on the same items.

Where the pools come from, per task:

- an official train split exists (ARC, OBQA, BoolQ, GSM8K, PubMedQA; and every task from the Hub that has one):
  test = a seeded sample of ``test_limit`` items of the official evaluation file; val = a seeded sample of
  ``val_limit`` items carved from the train split; train = the rest of the train split. From the Hub, ARC and
  OBQA also have a labelled validation split: val is sampled from it and train is the whole train split.
- only an evaluation file here (PIQA, SIQA, HellaSwag, WinoGrande, MMLU, the math test sets): all three are carved
  from one seeded permutation of that file: test first (at most ``MAX_TEST_SHARE`` of it), then val (at most
  ``MAX_VAL_SHARE``), the rest (plus a small dev split, MMLU's 5 items) is train.

Near-duplicates: two items are the same when their normalised prompt text (:func:`normalise`) is equal. No
normalised prompt is in two pools; a duplicate always leaves the train/val side, never the test side (test
removes it from val and train, val from train). The shared ARC-Easy files have train/test overlaps and SIQA has
duplicated instructions, which this removes.

Fingerprint of a pool: the sha256 of its sorted item keys (:func:`item_key`: sha256 of prompt and target), so
two runs that report the same ``test_sha256`` were scored on exactly the same items.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.data.schema import Example

DEFAULT_VAL_LIMIT = 200
DEFAULT_TEST_LIMIT = 500
MAX_TEST_SHARE = 0.4   # of a file that must also give val and train
MAX_VAL_SHARE = 0.2


def normalise(text: str) -> str:
    """Lower case, every run of non-alphanumeric characters as one space: ``"A  cat?"`` -> ``"a cat"``."""
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def item_key(ex: Example) -> str:
    """A stable key of one item: sha256 over its prompt and target (16 hex digits)."""
    return hashlib.sha256(f"{ex.prompt}\x1f{ex.target}".encode()).hexdigest()[:16]


def pool_sha256(items: Sequence[Example]) -> str:
    """sha256 over the sorted item keys of a pool (order-independent)."""
    return hashlib.sha256("\n".join(sorted(item_key(ex) for ex in items)).encode()).hexdigest()


@dataclass
class TaskPools:
    """The three pools of one task (each in file order) and a sentence on how they were made."""

    train: list[Example]
    val: list[Example]
    test: list[Example]
    note: str

    def record(self) -> dict:
        """Sizes and fingerprints, as logged to MLflow and ``splits.json``."""
        return {**{name: len(getattr(self, name)) for name in ("train", "val", "test")},
                **{f"{name}_sha256": pool_sha256(getattr(self, name)) for name in ("train", "val", "test")}}


def _sample(items: list[Example], n: int | None, rng: random.Random) -> tuple[list[Example], list[Example]]:
    """(a seeded sample of ``n`` items in their original order, the others in order)."""
    if n is None or n >= len(items):
        return list(items), []
    chosen = set(rng.sample(range(len(items)), n))
    return ([ex for i, ex in enumerate(items) if i in chosen], [ex for i, ex in enumerate(items) if i not in chosen])


def _without(items: list[Example], seen: set[str]) -> tuple[list[Example], int]:
    kept = [ex for ex in items if normalise(ex.prompt) not in seen]
    return kept, len(items) - len(kept)


def make_pools(task: str, train_file: list[Example] | None, eval_file: list[Example], *, carve: bool,
               split_seed: int, val_limit: int | None = DEFAULT_VAL_LIMIT,
               test_limit: int | None = DEFAULT_TEST_LIMIT, train_limit: int | None = None,
               val_file: list[Example] | None = None) -> TaskPools:
    """The train/val/test pools of ``task`` (see the module docstring); ``None`` limits mean "as many as allowed".

    ``carve`` says that all three pools come from ``eval_file`` (``train_file``, if any, is a small dev split that
    joins the train side). ``val_file``: the dataset's own validation split (Hub ARC, OBQA), sampled for val
    instead of carving val from train. ``train_limit`` caps the train pool after deduplication (a seeded sample).
    """
    rng = lambda what: random.Random(f"{split_seed}:{task}:{what}")  # noqa: E731 -- one stream per decision
    if carve or train_file is None:
        order = list(range(len(eval_file)))
        rng("carve").shuffle(order)
        n_test = int(len(order) * MAX_TEST_SHARE) if test_limit is None else min(test_limit,
                                                                                 int(len(order) * MAX_TEST_SHARE))
        n_val = int(len(order) * MAX_VAL_SHARE) if val_limit is None else min(val_limit,
                                                                              int(len(order) * MAX_VAL_SHARE))
        test = [eval_file[i] for i in sorted(order[:n_test])]
        val_side = [eval_file[i] for i in sorted(order[n_test:n_test + n_val])]
        train_side = [eval_file[i] for i in sorted(order[n_test + n_val:])] + list(train_file or [])
        how = (f"all pools carved from the evaluation file ({len(eval_file)} items, split seed {split_seed}): test "
               f"{n_test}, val {n_val}, train the other {len(order) - n_test - n_val}"
               + (f" + {len(train_file)} from its dev split" if train_file else ""))
    elif val_file is not None:
        test, _ = _sample(list(eval_file), test_limit, rng("test"))
        val_side, _ = _sample(list(val_file), val_limit, rng("val"))
        train_side = list(train_file)
        how = (f"test = {len(test)} of the official test split ({len(eval_file)}), val = {len(val_side)} of the "
               f"official validation split ({len(val_file)}), train = the train split (split seed {split_seed})")
    else:
        test, _ = _sample(list(eval_file), test_limit, rng("test"))
        val_side, train_side = _sample(list(train_file), val_limit, rng("val"))
        how = (f"test = {len(test)} of the official evaluation file ({len(eval_file)}), val = {len(val_side)} "
               f"carved from the train split ({len(train_file)}), train = the rest (split seed {split_seed})")
    test_prompts = {normalise(ex.prompt) for ex in test}
    val, dup_val = _without(val_side, test_prompts)
    train, dup_train = _without(train_side, test_prompts | {normalise(ex.prompt) for ex in val})
    if dup_val or dup_train:
        how += f"; near-duplicates removed: {dup_val} from val, {dup_train} from train"
    n_train = len(train)
    train, _ = _sample(train, train_limit, rng("train"))
    if len(train) < n_train:
        how += f"; train capped to {len(train)} of {n_train}"
    return TaskPools(train=train, val=val, test=test, note=how)
