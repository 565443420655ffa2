"""Tasks, suites and the deterministic train/eval selection the orchestrator trains and evaluates on.

A :class:`Task` knows its domain, where its files are, its label words and how it is scored:

- ``scoring="choice"``: multiple choice; by option log-likelihood or by generation + first label-word match.
- ``scoring="number"``: free-form math; generation, last number compared numerically.
- ``scoring="letter"``: AQuA; generation, last standalone A-E letter (log-likelihood also works: it has options).

Suites: ``intra_domain`` (MALoRA's commonsense set), ``commonsense8`` (LLM-Adapters' eight tasks),
``inter_domain`` (one task per domain that loads offline), ``math`` (test sets) and ``mmlu`` (57 subjects).

Pools. Every task gets three disjoint pools, train / val / test, fixed by ``split_seed`` alone (never by the
training seed) and deduplicated by normalised prompt text: :mod:`orchestrator.data.pools` has the rules. Tasks
without a train split here (PIQA, SIQA, HellaSwag, WinoGrande, the math test sets, and MMLU whose dev split has 5
items) have all three carved from their evaluation file; from the Hub, a task's own train split is used where the
dataset has one. Every decision is written to ``Suite.notes``; ``Suite.splits()`` gives sizes and fingerprints.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.data import hub
from orchestrator.data.loaders import (
    LABEL_PREFIX,
    MATH_PREFIX,
    PUBMEDQA_LABELS,
    read_gsm8k,
    read_llm_adapters_choice,
    read_llm_adapters_math,
    read_mmlu,
    read_pubmedqa,
)
from orchestrator.data.pools import make_pools
from orchestrator.data.schema import DataError, Example

__all__ = ["DataError", "Example", "Task", "Suite", "SUITES", "TASK_NAMES", "get_task", "load_suite", "load_task"]
logger = logging.getLogger(__name__)

SCORINGS = ("choice", "number", "letter")
CLOZE_STYLES = ("qa", "continuation", "blank", "answer")
METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class Task:
    """A benchmark task.

    cloze:         how the cloze formulation shows an item (``orchestrator.data.cloze``, ``docs/cloze.md``):
                   ``qa`` = "Question: {q}\\nAnswer:" + " {option}"; ``continuation`` = "{q}" + " {option}";
                   ``blank`` = WinoGrande, the option fills the ``_`` and the rest of the sentence is scored;
                   ``answer`` = "{q}\\nAnswer:" + " {option}" (q already holds the context).
    cloze_words:   ``((label word, cloze option), ...)`` where the options are label words that the cloze
                   formulation says differently (BoolQ: true -> " yes", false -> " no", as lm-eval and OLMES).
    primary:       the metric that names the task's accuracy in the cloze formulation, as OLMES does: ``acc_norm``
                   (log-likelihood per character of the option) or ``acc`` (unnormalised). The label formulation
                   always uses ``acc`` (its options are label words of near-equal length).
    prior_only:    the items here lack what the answer depends on (BoolQ's LLM-Adapters file has no passage), so
                   training can only teach the task's answer prior, never per-item knowledge.
    label_prefix:  the fixed start of every target before the label word ("the correct answer is").
    source:        folder under the data directory; ``fmt`` says which reader parses it.
    carve_train:   True when the train part must be carved from the eval file.
    """

    name: str
    domain: str
    label_set: tuple[str, ...]
    scoring: str
    source: str
    fmt: str
    carve_train: bool = False
    cloze: str = "qa"
    label_prefix: str = LABEL_PREFIX
    cloze_words: tuple[tuple[str, str], ...] = ()
    primary: str = "acc"
    prior_only: bool = False

    def __post_init__(self) -> None:
        assert self.scoring in SCORINGS and self.cloze in CLOZE_STYLES and self.primary in METRICS, self

    def primary_metric(self, formulation: str) -> str:
        """``acc`` or ``acc_norm``: the task's own choice in cloze, ``acc`` in the label formulation."""
        return self.primary if formulation == "cloze" else "acc"


def _labels(word: str, k: int) -> tuple[str, ...]:
    return tuple(f"{word}{i}" for i in range(1, k + 1))


_CS = "commonsense"
_TASKS: dict[str, Task] = {t.name: t for t in (
    Task("boolq", "reading", ("true", "false"), "choice", f"{_CS}/boolq", "choice",
         cloze_words=(("true", "yes"), ("false", "no")), prior_only=True),
    Task("piqa", "physical", _labels("solution", 2), "choice", f"{_CS}/piqa", "choice", carve_train=True,
         primary="acc_norm"),
    Task("siqa", "social", _labels("answer", 3), "choice", f"{_CS}/social_i_qa", "choice", carve_train=True,
         primary="acc_norm"),
    Task("hellaswag", "commonsense", _labels("ending", 4), "choice", f"{_CS}/hellaswag", "choice",
         carve_train=True, cloze="continuation", primary="acc_norm"),
    Task("winogrande", "commonsense", _labels("option", 2), "choice", f"{_CS}/winogrande", "choice",
         carve_train=True, cloze="blank"),
    Task("arc_e", "science", _labels("answer", 5), "choice", f"{_CS}/ARC-Easy", "choice", primary="acc_norm"),
    Task("arc_c", "science", _labels("answer", 5), "choice", f"{_CS}/ARC-Challenge", "choice", primary="acc_norm"),
    Task("obqa", "science", _labels("answer", 4), "choice", f"{_CS}/openbookqa", "choice", primary="acc_norm"),
    Task("gsm8k", "math", (), "number", "math/gsm8k", "gsm8k", label_prefix=MATH_PREFIX),
    *(Task(n.lower(), "math", (), "number", f"math/{n}", "math", carve_train=True, label_prefix=MATH_PREFIX)
      for n in ("SVAMP", "AddSub", "MultiArith", "SingleEq", "mawps")),
    Task("aqua", "math", tuple("ABCDE"), "letter", "math/AQuA", "aqua", carve_train=True, label_prefix=MATH_PREFIX),
    Task("pubmedqa", "medical", PUBMEDQA_LABELS, "choice", "medical/pubmedqa", "pubmedqa", cloze="answer"),
)}
ALIASES = {"ARC-Easy": "arc_e", "ARC-Challenge": "arc_c", "openbookqa": "obqa", "social_i_qa": "siqa"}

MMLU_SUBJECTS = tuple("""abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology
college_chemistry college_computer_science college_mathematics college_medicine college_physics computer_security
conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts
high_school_biology high_school_chemistry high_school_computer_science high_school_european_history
high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics
high_school_microeconomics high_school_physics high_school_psychology high_school_statistics high_school_us_history
high_school_world_history human_aging human_sexuality international_law jurisprudence logical_fallacies
machine_learning management marketing medical_genetics miscellaneous moral_disputes moral_scenarios nutrition
philosophy prehistory professional_accounting professional_law professional_medicine professional_psychology
public_relations security_studies sociology us_foreign_policy virology world_religions""".split())
_MMLU_DOMAINS = {
    "medical": ("anatomy", "clinical_knowledge", "college_medicine", "medical_genetics", "nutrition",
                "professional_medicine", "virology"),
    "law": ("international_law", "jurisprudence", "professional_law"),
    "economics": ("econometrics", "high_school_macroeconomics", "high_school_microeconomics"),
}
for _subject in MMLU_SUBJECTS:
    _domain = next((d for d, subs in _MMLU_DOMAINS.items() if _subject in subs), "mmlu")
    _TASKS[f"mmlu_{_subject}"] = Task(f"mmlu_{_subject}", _domain, _labels("answer", 4), "choice", "mmlu", "mmlu",
                                      carve_train=True, primary="acc_norm")

TASK_NAMES = tuple(_TASKS)
SUITES: dict[str, tuple[str, ...]] = {
    "intra_domain": ("piqa", "obqa", "boolq", "arc_c", "arc_e"),
    "commonsense8": ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"),
    "inter_domain": ("gsm8k", "pubmedqa", "arc_c", "boolq", "mmlu_clinical_knowledge", "mmlu_professional_law",
                     "mmlu_high_school_macroeconomics"),
    "math": ("gsm8k", "svamp", "addsub", "multiarith", "singleeq", "mawps", "aqua"),
    "mmlu": tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS),
}


def get_task(name: str) -> Task:
    """Task by short name (``arc_c``) or LLM-Adapters folder name (``ARC-Challenge``)."""
    task = _TASKS.get(ALIASES.get(name, name))
    if task is None:
        close = [n for n in TASK_NAMES if name.lower()[:4] in n] or list(TASK_NAMES[:14])
        raise DataError(f"unknown task {name!r}; known tasks include {close} (and mmlu_<subject>)")
    return task


def resolve_tasks(suite_or_tasks: str | Sequence[str]) -> tuple[str, tuple[Task, ...]]:
    """``(suite name, tasks)`` for a suite name, a comma-separated string of tasks, or a list of tasks."""
    if isinstance(suite_or_tasks, str):
        if suite_or_tasks in SUITES:
            return suite_or_tasks, tuple(get_task(n) for n in SUITES[suite_or_tasks])
        names = [n.strip() for n in suite_or_tasks.split(",") if n.strip()]
        if len(names) == 1 and names[0] not in _TASKS and names[0] not in ALIASES:
            raise DataError(f"unknown suite or task {suite_or_tasks!r}; suites: {sorted(SUITES)}")
    else:
        names = list(suite_or_tasks)
    tasks = tuple(dict.fromkeys(get_task(n) for n in names))
    if not tasks:
        raise DataError("no tasks given; name a suite or a comma-separated list of tasks")
    return ",".join(t.name for t in tasks), tasks


def load_task(task: Task | str, data_dir: str | Path | None) -> tuple[list[Example] | None, list[Example]]:
    """``(train or None, eval)`` for one task from ``data_dir``, or from the Hub when ``data_dir`` is None."""
    task = get_task(task) if isinstance(task, str) else task
    if data_dir is None:
        return hub.load_hub_task(task.name)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    folder = root / task.source
    if task.fmt == "choice":
        train_file = folder / "train.json"
        return (read_llm_adapters_choice(train_file) if train_file.is_file() else None,
                read_llm_adapters_choice(folder / "test.json"))
    if task.fmt == "gsm8k":
        return read_gsm8k(folder / "train.jsonl"), read_gsm8k(folder / "test.jsonl")
    if task.fmt in ("math", "aqua"):
        return None, read_llm_adapters_math(folder / "test.json", letters=task.fmt == "aqua")
    if task.fmt == "pubmedqa":
        return read_pubmedqa(folder)
    if task.fmt == "mmlu":
        subject = task.name[len("mmlu_"):]
        return read_mmlu(folder, subject, "dev"), read_mmlu(folder, subject, "test")
    raise AssertionError(task.fmt)


@dataclass
class Suite:
    """Selected items per task: ``train``, ``val`` (for choosing) and ``test`` (for reporting), disjoint.

    ``notes[task]`` says where each pool came from (carving, caps, deduplication, seed).
    """

    name: str
    tasks: tuple[str, ...]
    train: dict[str, list[Example]]
    val: dict[str, list[Example]]
    test: dict[str, list[Example]]
    notes: dict[str, str] = field(default_factory=dict)
    split_seed: int = 0
    records: dict[str, dict] = field(default_factory=dict)

    def splits(self) -> dict[str, dict]:
        """Per task: pool sizes and sha256 fingerprints (``train``, ``val``, ``test``, ``*_sha256``)."""
        return {task: dict(self.records[task]) for task in self.tasks}


def _cap(limit: int | Mapping[str, int] | None, task: str, what: str) -> int | None:
    value = limit.get(task) if isinstance(limit, Mapping) else limit
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DataError(f"{what}={value!r} for task {task!r} must be a positive integer or None")
    return value


def load_suite(
    suite_or_tasks: str | Sequence[str],
    data_dir: str | Path | None,
    *,
    train_limit: int | Mapping[str, int] | None = None,
    val_limit: int | Mapping[str, int] | None = None,
    test_limit: int | Mapping[str, int] | None = None,
    split_seed: int = 0,
) -> Suite:
    """Load a suite's train/val/test pools; a limit is one int for every task or a ``{task: int}`` mapping.

    ``None`` (or a task absent from a mapping) means no cap: the whole official test file, or for a carved task
    the largest share the pool rules allow. Searches pass their ``data.val_limit``/``data.test_limit`` (defaults
    200 and 500, ``pools.DEFAULT_VAL_LIMIT``/``DEFAULT_TEST_LIMIT``).
    """
    name, tasks = resolve_tasks(suite_or_tasks)
    for what, limit in (("train_limit", train_limit), ("val_limit", val_limit), ("test_limit", test_limit)):
        if isinstance(limit, Mapping) and (unknown := set(limit) - {t.name for t in tasks}):
            raise DataError(f"{what} names tasks not in suite {name!r}: {sorted(unknown)}")
    suite = Suite(name=name, tasks=tuple(t.name for t in tasks), train={}, val={}, test={}, split_seed=split_seed)
    for task in tasks:
        train, evaluation = load_task(task, data_dir)
        src = str(Path(data_dir) / task.source) if data_dir is not None else f"Hub {task.name}"
        # local files: carve where the task has no real train split; the Hub gives one wherever the dataset has it
        # (MMLU's Hub dev split has 5 items: carve there too)
        carve = train is None or (task.carve_train and (data_dir is not None or task.fmt == "mmlu"))
        val_file = hub.load_hub_validation(task.name) if data_dir is None else None
        pools = make_pools(task.name, train, evaluation, carve=carve, split_seed=split_seed, val_file=val_file,
                           val_limit=_cap(val_limit, task.name, "val_limit"),
                           test_limit=_cap(test_limit, task.name, "test_limit"),
                           train_limit=_cap(train_limit, task.name, "train_limit"))
        suite.train[task.name], suite.val[task.name], suite.test[task.name] = pools.train, pools.val, pools.test
        suite.records[task.name] = pools.record()
        suite.notes[task.name] = f"source {src}; {pools.note}"
        logger.info("%s: %s", task.name, suite.notes[task.name])
    return suite


def default_data_dir() -> Path | None:
    """``$MALORA_DATA_DIR``, else ``../shared/data`` beside the repository if it exists, else None (Hub)."""
    env = os.environ.get("MALORA_DATA_DIR")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[3] / "shared" / "data"
    return candidate if candidate.is_dir() else None
