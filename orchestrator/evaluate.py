"""Per-task evaluation of a causal LM (with or without adapters), and the ``python -m orchestrator.evaluate`` CLI.

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

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator import scoring as sc
from orchestrator.data.schema import DataError, Example
from orchestrator.data.tasks import SUITES, Task, get_task, load_suite
from orchestrator.data.tokenize import TEMPLATES, prompt_ids

logger = logging.getLogger("orchestrator.evaluate")  # not __name__: under `python -m` that is "__main__"
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


def chance_level(task: Task, examples: Sequence[Example]) -> float:
    """Mean over items of ``1 / (number of options)``; 0 for free-form answers."""
    if task.scoring == "number" or not examples:
        return 0.0
    sizes = [len(ex.choices) if ex.choices else len(task.label_set) for ex in examples]
    return sum(1.0 / k for k in sizes) / len(sizes)


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
    hits = hits_norm = 0
    flat = 0
    for ex, opts in zip(examples, requests):
        scores = [ll[flat + k] for k in range(len(opts))]
        flat += len(opts)
        nbytes = _continuation_bytes(task, ex, options)
        hits += sc.pick(scores) == ex.answer_index
        hits_norm += sc.pick([s / max(1, b) for s, b in zip(scores, nbytes)]) == ex.answer_index
    return hits / len(examples), hits_norm / len(examples)


def _score_generate(model, tokenizer, task, examples, *, template, batch_size, max_new_tokens):
    prompts = [prompt_ids(tokenizer, ex.prompt, template) for ex in examples]
    # stop at the tokenizer's eos and at the model's own stop ids (chat models often end turns with another id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    eos = sorted({tokenizer.eos_token_id, *configured} - {None})
    texts = sc.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        eos_ids=eos)
    hits = 0
    for ex, text in zip(examples, texts):
        if task.scoring == "number":
            hits += sc.number_correct(text, ex.gold)
            continue
        labels = ex.labels or task.label_set
        idx = sc.parse_letter(text, labels) if task.scoring == "letter" else sc.parse_label(text, labels)
        hits += idx is not None and labels[idx].lower() == ex.gold.lower()
    return hits / len(examples)


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
                acc, acc_norm = _score_loglik(model, tokenizer, task, examples, options=options, template=template,
                                              batch_size=batch_size, max_length=max_length)
                results[name] = TaskScore(acc, len(examples), acc_norm, f"loglik/{options}", chance)
            else:
                budget = max_new_tokens or (256 if task.scoring == "number" else 32)
                acc = _score_generate(model, tokenizer, task, examples, template=template, batch_size=batch_size,
                                      max_new_tokens=budget)
                results[name] = TaskScore(acc, len(examples), None, "generate", chance)
            logger.info("%s: acc %.4f over %d items in %.1f s", name, results[name].accuracy, len(examples),
                        time.perf_counter() - start)
    finally:
        model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------- CLI
def default_data_dir() -> Path | None:
    """``$MALORA_DATA_DIR``, else ``../shared/data`` beside the repository if it exists, else None (Hub)."""
    env = os.environ.get("MALORA_DATA_DIR")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[2] / "shared" / "data"
    return candidate if candidate.is_dir() else None


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.evaluate", description="Per-task accuracy of a causal LM.")
    p.add_argument("--model", required=True, help="smollm2-135m-instruct, tiny-llama, a local folder or a Hub id")
    p.add_argument("--suite", default="intra_domain", help=f"one of {sorted(SUITES)} or comma-separated task names")
    p.add_argument("--limit", type=int, default=None, help="items per task (seeded sample; default: all)")
    p.add_argument("--data-dir", default=None, help="local data folder (default: $MALORA_DATA_DIR or ../shared/data)")
    p.add_argument("--scoring", choices=SCORING_MODES, default="loglik")
    p.add_argument("--options", choices=("auto", *OPTION_MODES), default="auto",
                   help="log-likelihood strings: text (cloze), label (trained format); auto = text without "
                        "--adapter, label with it")
    p.add_argument("--template", choices=TEMPLATES, default="alpaca")
    p.add_argument("--adapter", default=None, help="folder saved by malora.checkpoint.save_adapter")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=None, help="converted-model cache (default: $MALORA_CACHE or ~/.cache)")
    p.add_argument("--quiet", action="store_true", help="no per-task progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("orchestrator").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        if args.limit is not None and args.limit < 1:
            raise DataError(f"--limit {args.limit} must be a positive integer")
        if args.batch_size < 1:
            raise DataError(f"--batch-size {args.batch_size} must be at least 1")
        if args.threads:
            torch.set_num_threads(args.threads)
        options = args.options if args.options != "auto" else ("label" if args.adapter else "text")
        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        t0 = time.perf_counter()
        suite = load_suite(args.suite, data_dir, eval_limit=args.limit, seed=args.seed)
        t1 = time.perf_counter()
        from orchestrator.models import load_model

        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir)
        if args.adapter:
            from malora.checkpoint import load_adapter

            load_adapter(model, args.adapter)
            model.eval()
        t2 = time.perf_counter()
        scores = evaluate_tasks(model, tokenizer, suite.eval, scoring=args.scoring, batch_size=args.batch_size,
                                template=args.template, options=options, max_new_tokens=args.max_new_tokens)
        t3 = time.perf_counter()
    except (ValueError, OSError) as exc:  # DataError, ModelError, ConfigError are ValueErrors
        print(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
              file=sys.stderr)
        return 2
    print(f"model {args.model}{' + adapter ' + args.adapter if args.adapter else ''} | suite {suite.name} | "
          f"scoring {args.scoring} (options {options}, template {args.template}) | limit {args.limit} | "
          f"seed {args.seed} | data {data_dir or 'Hub'} | torch threads {torch.get_num_threads()}")
    print(format_table(scores))
    print(f"time: data {t1 - t0:.1f} s, model {t2 - t1:.1f} s, evaluation {t3 - t2:.1f} s, total {t3 - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
