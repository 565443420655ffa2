"""Per-task evaluation of a causal LM (with or without adapters); the CLI is ``python -m orchestrator.evaluate``.

Which strings are scored (``options=``) for a multiple-choice item:

- ``"label"``: the trained formulation. Context = the templated prompt (which lists the options) followed by
  the fixed target prefix ``"the correct answer is"``; continuations = ``" answer1"``, ``" answer2"``, ...
  exactly the label words a fine-tuned adapter learns to emit. Use it for trained adapters and for their
  zero-shot reference (same formulation on both sides of a Δ).
- ``"text"``: the cloze formulation lm-eval uses for base models. Context = the bare question without the option
  list and without template (``"Question: {q}\\nAnswer:"``; HellaSwag the sentence stem; WinoGrande the
  sentence up to the blank with the option filled in); continuations = each option's own text. A small base
  model cannot map "answer3" to the third listed option, but it does know which text is a plausible answer,
  so this is the meaningful zero-shot number. BoolQ's options are its label words " true" / " false" (the
  LLM-Adapters file has the question only, no passage).

``scoring="generate"`` instead decodes greedily from the templated prompt and takes the first label word
(LLM-Adapters' rule). Free-form math (``scoring`` of the task = ``"number"``) is always generated and compared
numerically. A model's zero-shot accuracy is simply this evaluation without adapters.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


from orchestrator.evaluation import scoring as sc
from orchestrator.data.schema import DataError, Example
from orchestrator.data.tasks import Task, get_task
from orchestrator.data.tokenize import TEMPLATES, prompt_ids

logger = logging.getLogger(__name__)
SCORING_MODES = ("loglik", "generate")
OPTION_MODES = ("label", "text")


@dataclass(frozen=True)
class TaskScore:
    """accuracy in [0, 1] over n items; accuracy_norm = length-normalised log-likelihood accuracy (None if
    generated); method = how it was scored; chance = expected accuracy of a uniform random guess."""

    accuracy: float
    n: int
    accuracy_norm: float | None = None
    method: str = "loglik"
    chance: float = 0.0
    correct: tuple[int, ...] = ()
    """1/0 per item, in the order of the items scored (paired comparisons and bootstrap CIs need it)."""


def chance_level(task: Task, examples: Sequence[Example]) -> float:
    """Mean over items of ``1 / (number of options)``; 0 for free-form answers."""
    if task.scoring == "number" or not examples:
        return 0.0
    sizes = [len(ex.choices) if ex.choices else len(task.label_set) for ex in examples]
    return sum(1.0 / k for k in sizes) / len(sizes)


def majority_share(examples: Sequence[Example]) -> float | None:
    """Accuracy of answering every item with the most frequent gold option (a constant-answer reference).

    A model that has only learnt a label prior scores exactly the share of one option, so a table needs this
    beside the zero-shot line to show when a number is a prior and not per-item knowledge. None for free-form
    answers or no items."""
    if not examples or any(ex.answer_index is None for ex in examples):
        return None
    return max(Counter(ex.answer_index for ex in examples).values()) / len(examples)


def option_requests(task: Task, ex: Example, tokenizer, *, options: str = "label", template: str = "alpaca"
                    ) -> list[tuple[list[int], list[int]]]:
    """``[(context_ids, continuation_ids)]`` per option of ``ex`` (see the module docstring for the two modes)."""
    cont_ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if options == "label":
        ctx = prompt_ids(tokenizer, ex.prompt, template) + cont_ids(task.label_prefix)
        return [(ctx, cont_ids(f" {label}")) for label in ex.labels]
    choices = ex.choices
    q = ex.question or ex.prompt
    ctx_ids = lambda s: tokenizer(s)["input_ids"]  # noqa: E731  (raw text: the tokenizer's own BOS, if any)
    if task.cloze == "blank" and "_" in q:
        cut = q.index("_")
        rest = " " + q[cut + 1:].strip()
        return [(ctx_ids(q[:cut] + c), cont_ids(rest)) for c in choices]
    context = {"qa": f"Question: {q}\nAnswer:", "answer": f"{q}\nAnswer:"}.get(task.cloze, q)
    ctx = ctx_ids(context)
    return [(ctx, cont_ids(f" {c}")) for c in choices]


def _continuation_bytes(task: Task, ex: Example, options: str) -> list[int]:
    if options == "label":
        return [len(f" {lab}".encode()) for lab in ex.labels]
    q = ex.question or ex.prompt
    if task.cloze == "blank" and "_" in q:
        return [len((" " + q[q.index("_") + 1:].strip()).encode())] * len(ex.choices)
    return [len(f" {c}".encode()) for c in ex.choices]


def _score_loglik(model, tokenizer, task, examples, *, options, template, batch_size, max_length):
    requests = [option_requests(task, ex, tokenizer, options=options, template=template) for ex in examples]
    rows = sc.build_rows(requests, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ll = sc.continuation_logprobs(model, rows, batch_size=batch_size, pad_id=pad_id)
    hits, hits_norm = [], 0
    flat = 0
    for ex, opts in zip(examples, requests):
        scores = [ll[flat + k] for k in range(len(opts))]
        flat += len(opts)
        nbytes = _continuation_bytes(task, ex, options)
        hits.append(int(sc.pick(scores) == ex.answer_index))
        hits_norm += sc.pick([s / max(1, b) for s, b in zip(scores, nbytes)]) == ex.answer_index
    return hits, hits_norm / len(examples)


def _score_generate(model, tokenizer, task, examples, *, template, batch_size, max_new_tokens):
    prompts = [prompt_ids(tokenizer, ex.prompt, template) for ex in examples]
    # stop at the tokenizer's eos and at the model's own stop ids (chat models often end turns with another id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    eos = sorted({tokenizer.eos_token_id, *configured} - {None})
    texts = sc.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        eos_ids=eos)
    hits = []
    for ex, text in zip(examples, texts):
        if task.scoring == "number":
            hits.append(int(sc.number_correct(text, ex.gold)))
            continue
        labels = ex.labels or task.label_set
        idx = sc.parse_letter(text, labels) if task.scoring == "letter" else sc.parse_label(text, labels)
        hits.append(int(idx is not None and labels[idx].lower() == ex.gold.lower()))
    return hits


def evaluate_tasks(
    model,
    tokenizer,
    eval_by_task: Mapping[str, Sequence[Example]],
    *,
    scoring: str = "loglik",
    batch_size: int = 8,
    template: str = "alpaca",
    options: str = "label",
    max_new_tokens: int | None = None,
    max_length: int | None = None,
) -> dict[str, TaskScore]:
    """Accuracy per task. ``max_new_tokens`` defaults to 256 for number tasks and 32 otherwise; ``max_length``
    (context + continuation) to the model's ``max_position_embeddings`` (or 2048)."""
    if scoring not in SCORING_MODES:
        raise DataError(f"scoring={scoring!r} is unknown; use one of {list(SCORING_MODES)}")
    if options not in OPTION_MODES:
        raise DataError(f"options={options!r} is unknown; use one of {list(OPTION_MODES)}")
    if template not in TEMPLATES:
        raise DataError(f"template={template!r} is unknown; use one of {list(TEMPLATES)}")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be at least 1")
    max_length = max_length or int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    was_training = model.training
    model.eval()
    results: dict[str, TaskScore] = {}
    try:
        for name, examples in eval_by_task.items():
            task = get_task(name)
            start = time.perf_counter()
            if not examples:
                results[name] = TaskScore(float("nan"), 0, None, "none", 0.0)
                continue
            chance = chance_level(task, examples)
            loglik_ok = scoring == "loglik" and task.scoring != "number" and all(ex.choices for ex in examples)
            if loglik_ok:
                hits, acc_norm = _score_loglik(model, tokenizer, task, examples, options=options,
                                               template=template, batch_size=batch_size, max_length=max_length)
                results[name] = TaskScore(sum(hits) / len(hits), len(examples), acc_norm, f"loglik/{options}",
                                          chance, tuple(hits))
            else:
                budget = max_new_tokens or (256 if task.scoring == "number" else 32)
                hits = _score_generate(model, tokenizer, task, examples, template=template, batch_size=batch_size,
                                       max_new_tokens=budget)
                results[name] = TaskScore(sum(hits) / len(hits), len(examples), None, "generate", chance, tuple(hits))
            logger.info("%s: acc %.4f over %d items in %.1f s", name, results[name].accuracy, len(examples),
                        time.perf_counter() - start)
    finally:
        model.train(was_training)
    return results


def format_table(scores: Mapping[str, TaskScore]) -> str:
    """A plain-text table (also valid Markdown) with a mean row."""
    lines = ["| task | n | acc | acc_norm | chance | method |", "|---|---:|---:|---:|---:|---|"]
    for name, s in scores.items():
        norm = f"{s.accuracy_norm:.3f}" if s.accuracy_norm is not None else "-"
        lines.append(f"| {name} | {s.n} | {s.accuracy:.3f} | {norm} | {s.chance:.3f} | {s.method} |")
    valid = [s for s in scores.values() if s.n and not math.isnan(s.accuracy)]
    if valid:
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        norms = [s.accuracy_norm for s in valid if s.accuracy_norm is not None]
        norm = f"{mean(norms):.3f}" if len(norms) == len(valid) else "-"
        lines.append(f"| mean | {sum(s.n for s in valid)} | {mean([s.accuracy for s in valid]):.3f} | {norm} | "
                     f"{mean([s.chance for s in valid]):.3f} | |")
    return "\n".join(lines)
