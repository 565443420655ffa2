"""Per-task evaluation of a causal LM (with or without adapters); the CLI is ``python -m orchestrator.evaluate``.

Which strings are scored (``formulation=``, one setting for training and scoring, see
:mod:`orchestrator.data.cloze`) for a multiple-choice item:

- ``"cloze"``: context = the bare question without the option list and without template
  (``"Question: {q}\\nAnswer:"``; HellaSwag the sentence stem; WinoGrande the sentence up to the blank with the
  option filled in); continuations = each option's own text, the strings of lm-evaluation-harness and OLMES
  (``docs/cloze.md``). A model trained in cloze learned exactly these rows; a small base model scores
  meaningfully here.
- ``"label"``: context = the templated prompt (which lists the options) followed by the fixed target prefix
  ``"the correct answer is"``; continuations = ``" answer1"``, ``" answer2"``, ... exactly the label words a
  model trained in the label formulation learns to emit.

Metrics per task: ``acc`` = argmax_k LL_k hits the gold option; ``acc_norm`` = argmax_k LL_k / len(choice_k)
(characters of lm-eval's ``doc_to_choice`` string, lm-eval's ``acc_norm``; OLMES' ``acc_per_char`` divides by
``len(" " + choice)``, see ``docs/cloze.md``); the
task's ``primary`` metric is its OLMES choice in cloze (``Task.primary``) and ``acc`` in the label formulation.

``scoring="generate"`` instead decodes greedily from the templated prompt and takes the first label word
(LLM-Adapters' rule; label formulation only). Free-form math (``scoring`` of the task = ``"number"``) is always
generated and compared numerically. A model's zero-shot accuracy is simply this evaluation without adapters.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


from orchestrator.evaluation import scoring as sc
from orchestrator.data.cloze import FORMULATIONS, cloze_item, cloze_requests
from orchestrator.data.schema import DataError, Example
from orchestrator.data.tasks import Task, get_task
from orchestrator.data.tokenize import TEMPLATES, prompt_ids

logger = logging.getLogger(__name__)
SCORING_MODES = ("loglik", "generate")


@dataclass(frozen=True)
class TaskScore:
    """accuracy (``acc``) in [0, 1] over n items; accuracy_norm = ``acc_norm`` (None if generated); method = how
    it was scored; chance = expected accuracy of a uniform random guess; primary = the metric that names the
    task's accuracy (``acc`` or ``acc_norm``). Per item, in the order of the items scored (paired comparisons,
    bootstrap CIs and the learned-per-item check need them): ``correct``/``correct_norm`` 1/0 and
    ``chosen``/``chosen_norm`` the picked option's index (-1 where a generation named none), ``gold`` the right
    option's index and, when scored by log-likelihood, ``logliks`` every option's log-likelihood (() for an item
    that could not be scored): what a study keeps so that any statistic can be recomputed."""

    accuracy: float
    n: int
    accuracy_norm: float | None = None
    method: str = "loglik"
    chance: float = 0.0
    correct: tuple[int, ...] = ()
    primary: str = "acc"
    correct_norm: tuple[int, ...] = ()
    chosen: tuple[int, ...] = ()
    chosen_norm: tuple[int, ...] = ()
    gold: tuple[int, ...] = ()
    logliks: tuple[tuple[float, ...], ...] = ()

    @property
    def primary_accuracy(self) -> float:
        return self.accuracy_norm if self.primary == "acc_norm" else self.accuracy

    @property
    def primary_correct(self) -> tuple[int, ...]:
        return self.correct_norm if self.primary == "acc_norm" else self.correct

    @property
    def primary_chosen(self) -> tuple[int, ...]:
        return self.chosen_norm if self.primary == "acc_norm" else self.chosen


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


def _check_formulation(formulation: str) -> None:
    if formulation not in FORMULATIONS:
        raise DataError(f"formulation={formulation!r} is unknown; use one of {list(FORMULATIONS)}")


def option_requests(task: Task, ex: Example, tokenizer, *, formulation: str = "label", template: str = "alpaca"
                    ) -> list[tuple[list[int], list[int]]]:
    """``[(context_ids, continuation_ids)]`` per option of ``ex`` (see the module docstring for the two modes)."""
    _check_formulation(formulation)
    if formulation == "cloze":
        return cloze_requests(task, ex, tokenizer)
    cont_ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx = prompt_ids(tokenizer, ex.prompt, template) + cont_ids(task.label_prefix)
    return [(ctx, cont_ids(f" {label}")) for label in ex.labels]


def choice_lengths(task: Task, ex: Example, formulation: str) -> list[int]:
    """Characters of each option's ``doc_to_choice`` string: the divisor of ``acc_norm``."""
    choices = cloze_item(task, ex).choices if formulation == "cloze" else ex.labels
    return [max(1, len(c)) for c in choices]


def _score_loglik(model, tokenizer, task, examples, *, formulation, template, batch_size, max_length):
    requests = [option_requests(task, ex, tokenizer, formulation=formulation, template=template)
                for ex in examples]
    scored = sc.item_logprobs(model, tokenizer, requests, max_length=max_length, batch_size=batch_size,
                              name=task.name)
    chosen, chosen_norm, logliks = [], [], []
    for ex, scores in zip(examples, scored):
        if scores is None:  # an option longer than max_length: unanswered, counted in scoring's warning
            chosen.append(-1)
            chosen_norm.append(-1)
            logliks.append(())
            continue
        chosen.append(sc.pick(scores))
        chosen_norm.append(sc.pick([s / n for s, n in zip(scores, choice_lengths(task, ex, formulation))]))
        logliks.append(tuple(float(x) for x in scores))
    return chosen, chosen_norm, logliks


def _score_generate(model, tokenizer, task, examples, *, template, batch_size, max_new_tokens):
    prompts = [prompt_ids(tokenizer, ex.prompt, template) for ex in examples]
    # stop at the tokenizer's eos and at the model's own stop ids (chat models often end turns with another id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    eos = sorted({tokenizer.eos_token_id, *configured} - {None})
    texts = sc.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        eos_ids=eos)
    hits, chosen = [], []
    for ex, text in zip(examples, texts):
        if task.scoring == "number":
            hits.append(int(sc.number_correct(text, ex.gold)))
            chosen.append(-1)
            continue
        labels = ex.labels or task.label_set
        idx = sc.parse_letter(text, labels) if task.scoring == "letter" else sc.parse_label(text, labels)
        hits.append(int(idx is not None and labels[idx].lower() == ex.gold.lower()))
        chosen.append(-1 if idx is None else idx)
    return hits, chosen


def evaluate_tasks(
    model,
    tokenizer,
    eval_by_task: Mapping[str, Sequence[Example]],
    *,
    scoring: str = "loglik",
    batch_size: int = 8,
    template: str = "alpaca",
    formulation: str = "label",
    max_new_tokens: int | None = None,
    max_length: int | None = None,
) -> dict[str, TaskScore]:
    """Accuracy per task. ``max_new_tokens`` defaults to 256 for number tasks and 32 otherwise; ``max_length``
    (context + continuation) to the model's ``max_position_embeddings`` (or 2048)."""
    if scoring not in SCORING_MODES:
        raise DataError(f"scoring={scoring!r} is unknown; use one of {list(SCORING_MODES)}")
    _check_formulation(formulation)
    if scoring == "generate" and formulation == "cloze":
        raise DataError("scoring='generate' decodes from the templated prompt (the label formulation); use "
                        "scoring='loglik' with formulation='cloze', or formulation='label'")
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
                chosen, chosen_norm, logliks = _score_loglik(model, tokenizer, task, examples,
                                                             formulation=formulation, template=template,
                                                             batch_size=batch_size, max_length=max_length)
                hits = tuple(int(c == ex.answer_index) for c, ex in zip(chosen, examples))
                hits_norm = tuple(int(c == ex.answer_index) for c, ex in zip(chosen_norm, examples))
                results[name] = TaskScore(sum(hits) / len(hits), len(examples), sum(hits_norm) / len(hits),
                                          f"loglik/{formulation}", chance, hits, task.primary_metric(formulation),
                                          hits_norm, tuple(chosen), tuple(chosen_norm),
                                          tuple(ex.answer_index for ex in examples), tuple(logliks))
            else:
                budget = max_new_tokens or (256 if task.scoring == "number" else 32)
                hits, chosen = _score_generate(model, tokenizer, task, examples, template=template,
                                               batch_size=batch_size, max_new_tokens=budget)
                results[name] = TaskScore(sum(hits) / len(hits), len(examples), None, "generate", chance,
                                          tuple(hits), chosen=tuple(chosen))
            score = results[name]  # the task's own metric first: the one every table and comparison uses
            logger.info("%s: %s %.4f (acc %.4f) over %d items in %.1f s", name, score.primary,
                        score.primary_accuracy, score.accuracy, len(examples), time.perf_counter() - start)
    finally:
        model.train(was_training)
    return results


def format_table(scores: Mapping[str, TaskScore]) -> str:
    """A plain-text table (also valid Markdown) with a mean row; ``primary`` names each task's headline metric."""
    lines = ["| task | n | acc | acc_norm | primary | chance | method |", "|---|---:|---:|---:|---|---:|---|"]
    for name, s in scores.items():
        norm = f"{s.accuracy_norm:.3f}" if s.accuracy_norm is not None else "-"
        lines.append(f"| {name} | {s.n} | {s.accuracy:.3f} | {norm} | {s.primary} {s.primary_accuracy:.3f} | "
                     f"{s.chance:.3f} | {s.method} |")
    valid = [s for s in scores.values() if s.n and not math.isnan(s.accuracy)]
    if valid:
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        norms = [s.accuracy_norm for s in valid if s.accuracy_norm is not None]
        norm = f"{mean(norms):.3f}" if len(norms) == len(valid) else "-"
        lines.append(f"| mean | {sum(s.n for s in valid)} | {mean([s.accuracy for s in valid]):.3f} | {norm} | "
                     f"{mean([s.primary_accuracy for s in valid]):.3f} | {mean([s.chance for s in valid]):.3f} | |")
    return "\n".join(lines)
